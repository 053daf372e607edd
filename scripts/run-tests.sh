#!/usr/bin/env bash
# `make test`'s run (after the install and the lint): the suite in two lanes at once.
#
# Lane 1 (the background): the unit tests in random order (pytest-randomly; the seed is printed), then the
# "light" tests: those of tests/integration and tests/docs that carry none of the markers in HEAVY, that is every
# test that needs nothing but this process, its SQLite or private PostgreSQL and its subprocesses (the coordinator,
# schemathesis over its OpenAPI, the CLI, the linters). Lane 2 (the foreground, its log live): the heavy tests, every
# test that starts a Ray cluster, a netns bed, dockerd, Chromium or the LLM.
#
# Why two lanes: the heavy lane leaves about half of the 2 cores idle (measured, session 18: 64 % busy over
# tests/e2e/test_edge.py, test_services.py and test_llm.py, 47 % over the heavy lane of a CI run: it waits on
# heartbeats, route refreshes, collector passes, donors' starts), and the light lane is one pytest process, at most
# one core, ~450 s of it. Why not more: two heavy modules busy at the same moments gain nothing (session 12:
# tests/e2e/test_edge.py and test_services.py at once 962 s, one after the other 974 s, CPU 97 % busy); and every
# edge head on a machine runs as the one `rma-edge` user, whose processes a stopping edge head kills (one pool per
# machine): tried in session 18, tests/e2e beside the heavy integration tests, the integration lane's edge tests
# killed the e2e lane's edge head. A split of the heavy tests must keep
# every test that starts an edge head in one lane.
#
# Each pytest is interrupted at TEST_SESSION_LIMIT (it prints the test it was in, and the run fails).
# RMA_TEST_REQUIRE (unset: all this machine can run, tests/support/capabilities.py) holds for the heavy lane; the
# light lane requires what of it its tests carry (postgres), the unit lane postgres as before. After both lanes, the
# claims of SECURITY.md, docs/architecture.md and the README (tests/claims.toml) are reported against the three
# JUnit files, even when pytest failed (its status is kept): a claim whose named test failed or vanished fails too.
# PYTHONNODEBUGRANGES: see the Makefile.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

PY=${PY:-.venv/bin/python}
LIMIT=${TEST_SESSION_LIMIT:-80m}
HEAVY="ray or docker or browser or llm or gpu or e2e or overlay or docs"
OUT=artifacts/test

REQUIRE=${RMA_TEST_REQUIRE-$("$PY" -m tests.support.capabilities)}
echo "RMA_TEST_REQUIRE=$REQUIRE"
case ",$REQUIRE," in
*,all,* | *,postgres,*) LIGHT_REQUIRE=postgres ;;
*) LIGHT_REQUIRE= ;;
esac

run_pytest() {
  PYTHONNODEBUGRANGES=1 timeout --signal=INT --kill-after=120 "$LIMIT" "$PY" -m pytest -q --durations=25 "$@"
}

rm -rf "$OUT" && mkdir -p "$OUT/unit" "$OUT/light"

(
  RMA_TEST_REQUIRE=postgres run_pytest -p randomly tests/unit --junitxml="$OUT/unit/junit.xml" \
    >"$OUT/unit/pytest.log" 2>&1
  echo $? >"$OUT/unit/status"
  RMA_TEST_REQUIRE=$LIGHT_REQUIRE run_pytest --ignore=tests/unit -m "not ($HEAVY)" \
    --junitxml="$OUT/light/junit.xml" >"$OUT/light/pytest.log" 2>&1
  echo $? >"$OUT/light/status"
) &
lane=$!
# Ctrl-C or a kill of `make test`: the background lane's pytest goes too (timeout passes the signal on)
trap 'pkill -INT -P "$lane" 2>/dev/null || kill "$lane"; wait "$lane"; exit 130' INT TERM

echo "lane 1 (unit, then light: $OUT/unit/pytest.log, $OUT/light/pytest.log) runs in the background; lane 2 (heavy):"
RMA_TEST_REQUIRE=$REQUIRE run_pytest --ignore=tests/unit -m "$HEAVY" --junitxml="$OUT/junit.xml" 2>&1 |
  tee "$OUT/pytest.log"
heavy=$?
wait "$lane"
trap - INT TERM

status=0
for name in unit light; do
  echo
  echo "=============================== lane 1: $name ($OUT/$name/pytest.log) ==============================="
  cat "$OUT/$name/pytest.log" 2>/dev/null
  got=$(cat "$OUT/$name/status" 2>/dev/null || echo 1)
  [ "$got" = 0 ] || { echo "the $name tests failed (pytest exit $got)"; status=$((status ? status : got)); }
done
[ "$heavy" = 0 ] || { echo "the heavy tests failed (pytest exit $heavy)"; status=$((status ? status : heavy)); }

claims=0
"$PY" -m tests.support.claims "$OUT/unit/junit.xml" "$OUT/light/junit.xml" "$OUT/junit.xml" || claims=$?
exit $((status ? status : claims))
