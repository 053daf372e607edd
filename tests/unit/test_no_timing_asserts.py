"""Benchmarks print figures and assert nothing; tests never time things (docs/architecture.md, "Figures"). A
timing assertion on a shared box is a flake, so this reads the code, as test_constant_time does for secrets: no
`assert` in tests/ compares a duration (a clock reading, a name computed from one, or a name that says it is a
duration) with <, <=, > or >=, and no `assert` in bench/ involves a figure at all. A bench may still assert that
the operation it measured worked (a store moved, a job ran), else its figure would measure a failure. Timeouts
passed as arguments are no assertions and do not count. No Ray."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLOCKS = {"monotonic", "monotonic_ns", "perf_counter", "perf_counter_ns", "time", "time_ns", "process_time"}
# a name that says it holds a duration: `elapsed`, `took`, `duration_ms`, `latency_p50`, `wait_seconds`, `up_s`
DURATION = re.compile(r"(^|_)(elapsed|took|duration|durations|latency|latencies|seconds|secs)($|_)|._(s|ms)$")
# names that match DURATION but are no measured duration (a configured bound, not a reading)
NOT_DURATIONS = {"timeout_s", "interval_s", "period_s", "ttl_s", "grace_s", "patience_s", "max_age_s"}
# asserts that compare a clock or a duration on purpose, each with why it times nothing (`file name`)
ALLOWED = {
    # a bound on a stream-reading loop (fails a stream that never ends instead of hanging), not a measurement:
    # the events it waits for are asserted after the loop
    "tests/unit/test_ingest_jobs.py clock",
    # the delay the router computes to its next refresh from a credential's expiry (75 s ahead, 60 s margin):
    # a computed schedule, read back, not a time the test measured
    "tests/unit/test_edge_router.py next_refresh_s",
    # percentiles the summary computes from latency histograms the test wrote: figures in the data, not timing
    "tests/unit/test_request_metrics.py p99_ms",
    "tests/unit/test_request_metrics.py p50_ms",
}
ORDER = (ast.Lt, ast.LtE, ast.Gt, ast.GtE)


def _clock_names(tree: ast.Module) -> set[str]:
    """Names a clock is called by in this module: `time.monotonic` always, `monotonic` if imported from time."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "time":
            names |= {a.asname or a.name for a in node.names if a.name in CLOCKS}
    return names


def _is_clock_call(node: ast.AST, imported: set[str]) -> bool:
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    if (
        isinstance(f, ast.Attribute)
        and f.attr in CLOCKS
        and isinstance(f.value, ast.Name)
        and f.value.id == "time"
    ):
        return True
    return isinstance(f, ast.Name) and f.id in imported


def _name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    return None


def _timed_names(scope: ast.AST, imported: set[str]) -> set[str]:
    """Names assigned in this scope from an expression that subtracts a clock reading (`took = monotonic() - t0`,
    `elapsed = end - start` where start and end are readings), and names computed from those (`ms = took * 1000`),
    followed to a fixed point."""
    readings: set[str] = set()
    timed: set[str] = set()
    assigns = [
        n for n in ast.walk(scope) if isinstance(n, (ast.Assign, ast.AnnAssign)) and n.value is not None
    ]

    def uses(node: ast.AST, names: set[str], clock: bool) -> bool:
        return any(
            (clock and _is_clock_call(x, imported)) or (isinstance(x, ast.Name) and x.id in names)
            for x in ast.walk(node)
        )

    for _ in range(3):
        for node in assigns:
            value = node.value
            assert value is not None
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = {t.id for t in targets if isinstance(t, ast.Name)}
            if _is_clock_call(value, imported):
                readings |= names
            clocky = readings | timed
            if uses(value, timed, clock=False) or any(
                isinstance(n, ast.BinOp)
                and isinstance(n.op, ast.Sub)
                and uses(n.left, clocky, clock=True)
                and uses(n.right, clocky, clock=True)
                for n in ast.walk(value)
            ):
                timed |= names
    return timed


def _durationish(node: ast.AST, imported: set[str], timed: set[str]) -> str | None:
    """Why this operand is a duration, or None."""
    for x in ast.walk(node):
        if _is_clock_call(x, imported):
            return "clock"
        name = _name(x)
        if name in timed:
            return name
        if name and name not in NOT_DURATIONS and DURATION.search(name):
            return name
    return None


def _scopes(tree: ast.Module) -> list[ast.AST]:
    return [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))]


def timing_asserts(source: str, filename: str) -> list[str]:
    """`file:line name` of every assert that compares a duration with <, <=, > or >= (`clock`: a clock read in
    the assert itself)."""
    tree = ast.parse(source, filename)
    imported = _clock_names(tree)
    found = set()
    for scope in _scopes(tree):
        timed = _timed_names(scope, imported)
        for node in ast.walk(scope):
            if not isinstance(node, ast.Assert):
                continue
            for cmp in (c for c in ast.walk(node.test) if isinstance(c, ast.Compare)):
                operands = [cmp.left, *cmp.comparators]
                for op, left, right in zip(cmp.ops, operands[:-1], operands[1:], strict=True):
                    why = isinstance(op, ORDER) and (
                        _durationish(left, imported, timed) or _durationish(right, imported, timed)
                    )
                    if why:
                        found.add(f"{filename}:{node.lineno} {why}")
    return sorted(found)


def figure_asserts(source: str, filename: str) -> list[str]:
    """`file:line name` of every assert in a benchmark whose test involves a figure (a clock reading, a name computed
    from one, or a duration by its name) in any way."""
    tree = ast.parse(source, filename)
    imported = _clock_names(tree)
    found = set()
    for scope in _scopes(tree):
        timed = _timed_names(scope, imported)
        for node in ast.walk(scope):
            if isinstance(node, ast.Assert):
                why = _durationish(node.test, imported, timed)
                if why:
                    found.add(f"{filename}:{node.lineno} {why}")
    return sorted(found)


def _files(room: str) -> list[Path]:
    return sorted((ROOT / room).rglob("*.py"))


def test_no_test_asserts_a_duration() -> None:
    files = _files("tests")
    assert len(files) > 100  # the walk reaches the suite
    found = [f for p in files for f in timing_asserts(p.read_text(), str(p.relative_to(ROOT)))]
    unexplained = [f for f in found if re.sub(r":\d+ ", " ", f) not in ALLOWED]
    assert unexplained == [], (
        "tests never time things: assert on behaviour, wait on conditions with a timeout"
    )
    assert {re.sub(r":\d+ ", " ", f) for f in found} == ALLOWED  # an exception no longer needed goes


def test_no_benchmark_asserts_a_figure() -> None:
    files = _files("bench")
    assert len(files) > 10  # the walk reaches the benchmarks
    found = [f for p in files for f in figure_asserts(p.read_text(), str(p.relative_to(ROOT)))]
    assert found == [], "benchmarks print figures and assert nothing about them"


def test_the_reader_catches_a_timed_assert() -> None:
    bad = (
        "import time\n"
        "from time import perf_counter as pc\n"
        "def test_fast(client):\n"
        "    t0 = time.monotonic()\n"
        "    client.get('/')\n"
        "    took = time.monotonic() - t0\n"
        "    assert took < 0.5\n"
        "    assert client.ok and time.monotonic() - t0 <= 2\n"
        "    start = pc()\n"
        "    end = pc()\n"
        "    ms = (end - start) * 1000\n"
        "    assert 10 > ms\n"
        "    assert client.stats.latency_p99 < 0.2\n"
        "    assert duration_s >= 1\n"
    )
    assert timing_asserts(bad, "bad.py") == [
        "bad.py:12 ms",
        "bad.py:13 latency_p99",
        "bad.py:14 duration_s",
        "bad.py:7 took",
        "bad.py:8 clock",
    ]
    assert figure_asserts(
        "import time\ndef main():\n    t = time.time()\n    assert time.time() - t\n", "b.py"
    ) == ["b.py:4 clock"]


def test_the_reader_lets_timeouts_and_behaviour_through() -> None:
    fine = (
        "import time\n"
        "def test_ok(client, wait_until):\n"
        "    deadline = 10\n"
        "    wait_until(lambda: client.ready(), timeout_s=30, what='ready')\n"
        "    assert client.get('/', timeout=5).status == 200\n"
        "    assert len(client.rows) >= 3\n"
        "    assert client.settings.timeout_s > 0\n"
        "    assert {s for s in client.names} <= {'a'} and client.tries > 0 == client.s\n"
        "    t0 = time.monotonic()\n"
        "    assert client.calls == 1, time.monotonic() - t0\n"
    )
    assert timing_asserts(fine, "fine.py") == []
    assert figure_asserts("def main(st):\n    assert st['status'] == 'ready', st\n", "b.py") == []
