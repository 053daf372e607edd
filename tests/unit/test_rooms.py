"""Drift guard for the rooms of DESIGN.md: rma_ray imports neither admission nor deployments, and those two
never import each other (they meet over HTTP and Ray)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {"rma_ray": {"admission", "deployments"}, "admission": {"deployments"}, "deployments": {"admission"}}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_room_imports(room: str) -> None:
    bad = {str(p.relative_to(ROOT)): sorted(imported_roots(p) & FORBIDDEN[room])
           for p in (ROOT / room).rglob("*.py")}
    assert {k: v for k, v in bad.items() if v} == {}


def test_rma_up_knows_every_store_kind_and_app() -> None:
    """`rma up --stores/--apps` (rma_ray.poolinfo) and `python -m deployments` name the same parts."""
    from deployments.serve_config import APP_GROUPS
    from deployments.stores.kinds import KINDS
    from rma_ray.poolinfo import APP_NAMES, STORE_NAMES

    assert set(STORE_NAMES) == set(KINDS)
    assert list(APP_NAMES) == list(APP_GROUPS)
