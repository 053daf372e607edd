"""Fixtures for every layer. Anything that starts a server says what it costs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Postgres, capabilities, run_postgres

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "hardware"  # real probe readings; the tests own them
ARTIFACTS = ROOT / "artifacts"
OPT_IN = "RMA_TEST_"  # opt-in switches of the suite itself (RMA_TEST_OLLAMA_URL, RMA_TEST_REQUIRE, ...)


def pytest_configure(config: pytest.Config) -> None:
    capabilities.register(config)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Inside tests/e2e, the modules that build their own beds (overlay, the bed itself) run before those that
    use the package's pool: that pool (9 hosts, `rma up`) stays up from its first test to the package's end,
    and a second cluster beside it would share this machine's two cores."""
    e2e = [i for i, item in enumerate(items) if item.path.parent.name == "e2e"]
    if not e2e:
        return
    uses_pool = {item.path for item in (items[i] for i in e2e) if "pool" in getattr(item, "fixturenames", ())}
    # a stable sort: each module stays whole and in its order
    # a module that leaves the pool changed for good (RUNS_LAST: an impostor raylet, a quarantined donor) goes last
    ordered = sorted(
        (items[i] for i in e2e),
        key=lambda item: (item.path in uses_pool, getattr(item.module, "RUNS_LAST", False)),
    )
    for i, item in zip(e2e, ordered, strict=True):
        items[i] = item


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Own HOME and data dir per test: nothing leaks into ~/.ray or ~/.local/share/rma, no RMA_* from
    outside but the suite's own RMA_TEST_* switches."""
    for key in list(os.environ):
        if key.startswith("RMA_") and not key.startswith(OPT_IN):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RMA_DATA_DIR", str(tmp_path / "rma-data"))


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A private PostgreSQL server (initdb + start, ~3 s); session-scoped, one database per test."""
    with run_postgres() as pg:
        yield pg


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same test on SQLite (a file, WAL) and on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'coordinator.db'}"
    pg: Postgres = request.getfixturevalue("postgres")
    return pg.create_database()


@pytest.fixture(scope="session")
def hardware_fixtures() -> dict[str, dict]:  # type: ignore[type-arg]
    import json

    return {p.stem: json.loads(p.read_text()) for p in sorted(FIXTURES.glob("*.json"))}
