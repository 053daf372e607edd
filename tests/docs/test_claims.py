"""The claims map (tests/claims.toml) against the docs and the tests, without a pool or Ray (well under a second):
every excerpt is in its doc, every named test exists, every claim names tests or says why none proves it, and
every section of the three docs has a claim or says why it has none, so a new section cannot go unmapped. The
last tests feed the run report (tests/support/claims.py) a hand-made JUnit file."""

from __future__ import annotations

import ast
import json
from collections import Counter
from functools import cache
from pathlib import Path

import pytest

from tests.support import claims
from tests.support.claims import ROOT, Claim, Run

MAP = claims.load()
IDS = [f"{c.doc}: {c.says[:50]}" for c in MAP.claims]


@cache
def _doc(path: str) -> str:
    return (ROOT / path).read_text()


@cache
def _test_functions(path: str) -> frozenset[str]:
    """The module-level test functions a test file defines, read with `ast` (importing it could start things)."""
    tree = ast.parse((ROOT / path).read_text())
    return frozenset(
        n.name
        for n in tree.body
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name.startswith("test")
    )


@pytest.mark.parametrize("claim", MAP.claims, ids=IDS)
def test_each_claim_is_in_its_doc(claim: Claim) -> None:
    assert claim.doc in claims.DOCS, f"{claim.doc} is not one of the mapped docs {claims.DOCS}"
    assert claims.section_of(_doc(claim.doc), claim.says) is not None, (
        f"{claim.doc} no longer says {claim.says!r}: update the excerpt, or the claim if the doc changed its mind"
    )


@pytest.mark.parametrize("claim", MAP.claims, ids=IDS)
def test_each_claim_names_tests_that_exist_or_says_why_none(claim: Claim) -> None:
    if not claim.tests:
        assert claim.untested.strip(), f"{claim.says!r}: no tests and no `untested` reason"
        return
    assert not claim.untested, f"{claim.says!r}: names tests and says it is untested"
    for node in claim.tests:
        path, sep, func = node.partition("::")
        assert sep and "[" not in func, f"{node}: write `path::test_function`, without parameters"
        assert (ROOT / path).is_file(), f"{node}: no file {path}"
        assert func in _test_functions(path), f"{node}: {path} defines no test function {func}"


def test_no_claim_is_listed_twice() -> None:
    seen = Counter((c.doc, claims.normalise(c.says)) for c in MAP.claims)
    assert [k for k, n in seen.items() if n > 1] == []
    tests = [Counter(c.tests) for c in MAP.claims]
    assert [c for c in tests if max(c.values(), default=1) > 1] == [], "a claim names one test twice"


@pytest.mark.parametrize("doc", claims.DOCS)
def test_every_section_has_a_claim_or_says_why_not(doc: str) -> None:
    """A `##`/`###` section with no claim must be listed in [[no_claims]] with a reason; one listed there must
    still exist and still have no claim (else the entry is stale)."""
    text = _doc(doc)
    titles = [title for _, title in claims.sections(text)]
    covered = {claims.section_of(text, c.says) for c in MAP.claims if c.doc == doc}
    excused = {n.section: n.why for n in MAP.no_claims if n.doc == doc}
    assert all(why.strip() for why in excused.values())
    assert [t for t in titles if t not in covered and t not in excused] == [], (
        f"{doc}: sections with no claim in tests/claims.toml; map their claims, or list them under [[no_claims]]"
    )
    assert [t for t in excused if t not in titles] == [], f"{doc}: [[no_claims]] names sections it lacks"
    assert [t for t in excused if t in covered] == [], f"{doc}: [[no_claims]] names sections that have claims"


def test_an_excerpt_is_found_across_line_breaks_and_in_its_section() -> None:
    text = (
        "# T\n\nintro\n\n## One\nfirst  line\n   wraps here\n\n```sh\n## not a heading\n```\n### Two\nlast\n"
    )
    assert claims.section_of(text, "line wraps") == "One"
    assert claims.section_of(text, "not a heading") == "One"
    assert claims.section_of(text, "last") == "Two"
    assert claims.section_of(text, "intro") == ""
    assert claims.section_of(text, "absent") is None
    assert [t for _, t in claims.sections(text)] == ["One", "Two"]


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest">
  <testcase classname="tests.integration.test_a" name="test_passes"/>
  <testcase classname="tests.integration.test_a" name="test_param[sqlite]"/>
  <testcase classname="tests.integration.test_a" name="test_param[postgres]"><skipped message="no pg"/></testcase>
  <testcase classname="tests.integration.test_a" name="test_fails[x]"><failure message="boom"/></testcase>
  <testcase classname="tests.integration.test_a" name="test_fails[y]"/>
  <testcase classname="tests.integration.test_a" name="test_errors"><error message="teardown"/></testcase>
  <testcase classname="tests.e2e.test_b" name="test_skipped"><skipped message="needs root"/></testcase>
</testsuite></testsuites>
"""


def _claim(*tests: str, untested: str = "") -> Claim:
    return Claim("SECURITY.md", f"says {tests}", tests, untested)


def test_a_run_reads_each_function_whatever_its_parameters(tmp_path: Path) -> None:
    (tmp_path / "junit.xml").write_text(JUNIT)
    run = Run.read([tmp_path / "junit.xml"])
    a = "tests/integration/test_a.py::"
    assert run.status(a + "test_passes") == "passed"
    assert run.status(a + "test_param") == "passed"  # one case skipped, none failed
    assert run.status(a + "test_fails") == "failed"  # one case of two failed
    assert run.status(a + "test_errors") == "failed"
    assert run.status("tests/e2e/test_b.py::test_skipped") == "skipped"
    assert run.status(a + "test_renamed") == "missing"  # its module ran, it did not
    assert run.status("tests/unit/test_c.py::test_x") == "not run"


def test_the_report_fails_on_a_failed_or_missing_test_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    junit = tmp_path / "junit.xml"
    junit.write_text(JUNIT)
    a = "tests/integration/test_a.py::"
    fine = [
        _claim(a + "test_passes", a + "test_param"),
        _claim("tests/e2e/test_b.py::test_skipped"),
        _claim("tests/unit/test_c.py::test_x"),
        _claim(untested="needs a GPU"),
    ]
    monkeypatch.setattr(claims, "load", lambda: claims.ClaimsMap(fine, []))
    assert claims.main([str(junit)]) == 0
    out = json.loads((tmp_path / "claims.json").read_text())
    sec = out["docs"]["SECURITY.md"]
    assert (sec["claims"], sec["proved"], len(sec["unproved"]), len(sec["untested"])) == (4, 1, 2, 1)
    assert out["broken"] == [] and out["docs"]["README.md"]["claims"] == 0

    for bad in (a + "test_fails", a + "test_renamed"):
        monkeypatch.setattr(claims, "load", lambda bad=bad: claims.ClaimsMap([*fine, _claim(bad)], []))
        assert claims.main([str(junit)]) == 1
        assert json.loads((tmp_path / "claims.json").read_text())["broken"] == [bad]


def test_the_report_without_its_junit_says_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert claims.main([str(tmp_path / "nowhere.xml")]) == 2
    assert "run the tests with --junitxml first" in capsys.readouterr().err
