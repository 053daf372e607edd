#!/bin/bash
# Beside a CI rehearsal (`CI=true bash .ci/run` in a clean clone): every 30 s, the integration pytest process's
# thread count, RSS, CPU ticks (utime+stime, 1/100 s) and a `py-spy dump` of its Python threads, appended to
# $1 (default /tmp/ci-spy.log). Stops when the file $1.stop exists. Used in round 2, session 16 to rule out a
# slow pytest process (it waits on clusters: 0-7 % of a core) and to find the contributions overview's cost
# during the fuzz (then `py-spy record --pid PID -d 30 --format raw` for where the time goes).
out=${1:-/tmp/ci-spy.log}
here=$(cd "$(dirname "$0")/.." && pwd)
while true; do
  pid=""
  for p in $(pgrep -f "pytest -q.*--ignore=tests/unit"); do
    case "$(readlink "/proc/$p/exe")" in *python*) pid=$p; break;; esac
  done
  if [ -n "$pid" ]; then
    {
      echo "=== $(date +%T) pid $pid threads $(find "/proc/$pid/task" -mindepth 1 -maxdepth 1 | wc -l)" \
        "rss $(awk '/VmRSS/ {print $2}' "/proc/$pid/status") kB cpu $(awk '{print $14+$15}' "/proc/$pid/stat")"
      timeout 20 "$here/.venv/bin/py-spy" dump --pid "$pid" 2>&1 | head -400
    } >> "$out"
  fi
  [ -f "$out.stop" ] && exit 0
  sleep 30
done
