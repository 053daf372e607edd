"""Drift guard for the rooms of DESIGN.md: rma_ray imports neither admission nor deployments, and those two
never import each other (they meet over HTTP and Ray). An import path written as a string counts as an import
(`"pkg.mod:attr"` for pkgutil/uvicorn/Serve, `["-m", "pkg.mod"]` for a child process, `import_path:` in a
YAML file of the room): a room above is reached through an entry point it registers (pyproject's
`rma.commands`)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.support import parse_python

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    "rma_ray": {"admission", "deployments"},
    "admission": {"deployments"},
    "deployments": {"admission"},
}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(parse_python(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


# a whole string that is a module path with a dot or an attribute (`pkg.mod`, `pkg.mod:attr`, `pkg:attr`,
# `-m pkg.mod`); a lone word ("admission") is a name, not a path
_PATH = re.compile(r"^(?:-m\s+)?([A-Za-z_]\w*)(?:(?:\.\w+)+(?::[\w.]*)?|:\w[\w.]*)$")
_YAML_PATH = re.compile(r"^\s*-?\s*import_path:\s*[\"']?([A-Za-z_]\w*)[.:]", re.M)
# strings not yet moved behind an entry point, each with the change that removes it (keep this list shrinking)
ALLOWED = {
    ("rma_ray/head.py", "deployments")
}  # `python -m deployments up|down`: rma up runs the upper room as a child (JSON lines), never imports it


def string_roots(path: Path) -> set[str]:
    """The roots of the import paths a module writes as strings: whole constants, f-strings' leading text, and
    the argument after a "-m" in a list or tuple (an argv)."""
    roots = set()
    for node in ast.walk(parse_python(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if m := _PATH.match(node.value.strip()):
                roots.add(m[1])
        elif isinstance(node, ast.JoinedStr) and node.values:
            head = node.values[0]
            if isinstance(head, ast.Constant) and isinstance(head.value, str):
                if m := _PATH.match(head.value):
                    roots.add(m[1])
        elif isinstance(node, ast.List | ast.Tuple):
            for flag, arg in zip(node.elts, node.elts[1:], strict=False):
                if (
                    isinstance(flag, ast.Constant)
                    and flag.value == "-m"
                    and isinstance(arg, ast.Constant)
                    and isinstance(arg.value, str)
                ):
                    roots.add(arg.value.split(".")[0])
    return roots


def room_violations(room: str) -> dict[str, list[str]]:
    bad = {}
    for p in (ROOT / room).rglob("*"):
        rel = str(p.relative_to(ROOT))
        if p.suffix == ".py":
            found = imported_roots(p) | string_roots(p)
        elif p.suffix in (".yaml", ".yml"):
            found = set(_YAML_PATH.findall(p.read_text()))
        else:
            continue
        found = {r for r in found & FORBIDDEN[room] if (rel, r) not in ALLOWED}
        if found:
            bad[rel] = sorted(found)
    return bad


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_room_imports(room: str) -> None:
    assert room_violations(room) == {}


@pytest.mark.parametrize(
    ("source", "roots"),
    [
        ('pkgutil.resolve_name("admission.serve:serve")', {"admission"}),
        ('pkgutil.resolve_name(f"admission.serve:{name}")', {"admission"}),
        ('subprocess.run([sys.executable, "-m", "deployments", "up"])', {"deployments"}),
        ('argv = ("-m deployments.stores",)', {"deployments"}),
        ('uvicorn.run("admission.main:app")', {"admission"}),
        ('app.add_typer(sub, name="admission")', set()),  # a name, not a path
        ('log.info("admission refused: %s", why)', set()),
    ],
)
def test_string_import_paths_are_seen(tmp_path: Path, source: str, roots: set[str]) -> None:
    f = tmp_path / "m.py"
    f.write_text(source + "\n")
    assert string_roots(f) & {"admission", "deployments"} == roots


def test_allowed_strings_are_still_there() -> None:
    """An entry of ALLOWED whose string is gone must go too, so the list only shrinks."""
    for rel, root in ALLOWED:
        assert root in string_roots(ROOT / rel), f"{rel} no longer names {root}: remove it from ALLOWED"


def test_yaml_import_paths_are_seen(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("applications:\n  - name: llm\n    import_path: deployments.x:app\n")
    assert _YAML_PATH.findall((tmp_path / "c.yaml").read_text()) == ["deployments"]


def test_rma_up_knows_every_store_kind_and_app() -> None:
    """`rma up --stores/--apps` (rma_ray.poolinfo) and `python -m deployments` name the same parts."""
    from deployments.serve_config import APP_GROUPS
    from deployments.stores.kinds import KINDS
    from rma_ray.poolinfo import APP_NAMES, STORE_NAMES

    assert set(STORE_NAMES) == set(KINDS)
    assert list(APP_NAMES) == list(APP_GROUPS)
