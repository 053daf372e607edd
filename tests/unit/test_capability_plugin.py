"""tests/support/capabilities.py: with RMA_TEST_REQUIRE, a skipped test of a required capability fails, an
opt-in skip never does, a module whose import skipped fails, and a required capability with no passing test
fails the session. Runs pytest in-process on small generated modules (pytester, ~1 s)."""

from __future__ import annotations

import json

import pytest

pytest_plugins = ["pytester"]
# the inner runs load no plugin that imports heavy modules: pytester forgets what a run imported, and torch
# (pulled in through pytest-randomly's seeders) cannot be imported twice in one process
QUIET = ("-p", "no:randomly", "-p", "no:looptime_plugin")

CONFTEST = """
from tests.support import capabilities

def pytest_configure(config):
    capabilities.register(config)
"""

MODULE = """
import pytest

@pytest.mark.browser
def test_browser_runs():
    pass

@pytest.mark.browser
def test_browser_missing():
    pytest.skip("chromium not found")

@pytest.mark.docker
@pytest.mark.skipif(True, reason="no dockerd")
def test_docker_missing():
    pass

@pytest.mark.docker
@pytest.mark.opt_in("RMA_TEST_SOMETHING", reason="needs a registry")
def test_opt_in():
    raise AssertionError("runs only when opted in")

def test_plain():
    pass

@pytest.fixture
def postgres():
    pytest.skip("no initdb")

def test_uses_postgres(postgres):
    pass
"""

SKIPPED_MODULE = """
import pytest
pytest.importorskip("no_such_module_here")
pytestmark = pytest.mark.llm

def test_never():
    pass
"""


@pytest.fixture
def suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.delenv("RMA_TEST_REQUIRE", raising=False)
    monkeypatch.delenv("RMA_TEST_SOMETHING", raising=False)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_marked=MODULE, test_skipped_module=SKIPPED_MODULE)
    return pytester


def test_without_require_every_skip_stays_a_skip(suite: pytest.Pytester) -> None:
    result = suite.runpytest_inprocess(*QUIET, "-rs")
    result.assert_outcomes(passed=2, skipped=5)
    result.stdout.fnmatch_lines(
        [
            "*capabilities (RMA_TEST_REQUIRE=-)*",
            "postgres*0 passed*0 failed*1 skipped*",
            "browser*1 passed*0 failed*1 skipped*",
        ]
    )
    result.stdout.fnmatch_lines(["*opt-in: set RMA_TEST_SOMETHING to run it; needs a registry*"])
    assert result.ret == 0


def test_a_skip_of_a_required_capability_fails(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RMA_TEST_REQUIRE", "browser,docker,llm")
    result = suite.runpytest_inprocess(*QUIET, "--junitxml=out/junit.xml", "test_marked.py")
    # browser_missing fails, docker_missing errors (its skip is in set-up); the opt-in and the postgres one
    # (not required) stay skips
    result.assert_outcomes(passed=2, failed=1, errors=1, skipped=2)
    for line in (
        "*RMA_TEST_REQUIRE requires browser, but this test was skipped: chromium not found*",
        "*RMA_TEST_REQUIRE requires docker, but this test was skipped: no dockerd*",
        "FAILED: RMA_TEST_REQUIRE requires docker*no test of it passed*",
        "FAILED: RMA_TEST_REQUIRE requires llm*no test of it passed*",
    ):
        result.stdout.fnmatch_lines([line])
    counts = json.loads((suite.path / "out" / "capabilities.json").read_text())
    assert counts["required"] == ["browser", "docker", "llm"]
    assert counts["counts"]["browser"] == {"passed": 1, "failed": 1}
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_a_required_module_that_skips_at_import_fails(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RMA_TEST_REQUIRE", "llm")
    result = suite.runpytest_inprocess(*QUIET, "test_skipped_module.py")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*RMA_TEST_REQUIRE requires llm, but the whole module was skipped*no_such_module_here*"]
    )
    assert result.ret != pytest.ExitCode.OK


def test_opting_in_makes_the_skip_count(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RMA_TEST_SOMETHING", "1")
    result = suite.runpytest_inprocess(*QUIET, "-k", "opt_in", "test_marked.py")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*AssertionError: runs only when opted in*"])


def test_a_required_capability_with_nothing_run_fails_the_session(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RMA_TEST_REQUIRE", "e2e")
    result = suite.runpytest_inprocess(*QUIET, "-k", "plain", "test_marked.py")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["FAILED: RMA_TEST_REQUIRE requires e2e*no test of it passed*"])
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    # nothing selected (pytest's exit 5): fails too
    result = suite.runpytest_inprocess(*QUIET, "-k", "no_such_test", "test_marked.py")
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_unknown_capability_is_a_usage_error(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RMA_TEST_REQUIRE", "browser,gpus")
    result = suite.runpytest_inprocess(*QUIET)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*RMA_TEST_REQUIRE: unknown capability gpus*"])


def test_opt_in_variables_survive_the_isolation_fixture(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tests/conftest.py's autouse _isolated_home drops every RMA_* from outside but the suite's own
    RMA_TEST_*."""
    pytester.makeconftest("from tests.conftest import _isolated_home  # noqa: F401\n")
    pytester.makepyfile(
        test_env="""
        import os

        def test_env():
            assert os.environ["RMA_TEST_OLLAMA_URL"] == "http://127.0.0.1:11434"
            assert "RMA_ADMIN_KEY" not in os.environ
            assert os.environ["RMA_DATA_DIR"].endswith("rma-data")
    """
    )
    monkeypatch.setenv("RMA_TEST_OLLAMA_URL", "http://127.0.0.1:11434")
    monkeypatch.setenv("RMA_ADMIN_KEY", "from-outside")
    pytester.runpytest_inprocess(*QUIET).assert_outcomes(passed=1)
