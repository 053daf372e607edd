from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from rma_ray import cli
from rma_ray.cli import admin

runner = CliRunner()


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("15m", 900), ("2h", 7200), ("7d", 604800), ("600", 600)]
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert cli.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "-5m", "0"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(cli.CliError):
        cli.parse_duration(text)


def test_probe_prints_capabilities_json() -> None:
    result = runner.invoke(cli.app, ["probe"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["cpu_cores"] >= 1 and "qualifies_for" in data and isinstance(data["gpus"], list)


def test_invite_refuses_unknown_tier() -> None:
    result = runner.invoke(cli.app, ["invite", "create", "--tier", "quantum"])
    assert isinstance(result.exception, cli.CliError)
    assert "unknown tier" in str(result.exception)


class _FakeAdmin:
    """admin_client's stand-in: the rows a coordinator would send, no server."""

    def __init__(self, rows: list[dict]) -> None:  # type: ignore[type-arg]
        self.rows = rows

    def __enter__(self) -> _FakeAdmin:
        return self

    def __exit__(self, *_: object) -> None:
        return None

    def workers(self, **_: object) -> list[dict]:  # type: ignore[type-arg]
        return self.rows

    def revoke_worker(self, worker_id: str) -> dict:  # type: ignore[type-arg]
        return next(r for r in self.rows if r["id"] == worker_id)


def test_donor_supplied_names_print_literally(monkeypatch: pytest.MonkeyPatch) -> None:
    names = ["[/bold]x", "[red]pwned[/red]", "evil\x1b]0;owned\x07\x1b[2J", "rtl\u202eexe.txt"]
    rows = [
        {
            "id": f"w{i:011d}",
            "name": n,
            "tier": "service",
            "trusted": False,
            "status": "healthy",
            "current_load": None,
            "last_seen_at": None,
        }
        for i, n in enumerate(names)
    ]
    monkeypatch.setattr(admin, "admin_client", lambda *_: _FakeAdmin(rows))
    monkeypatch.setenv("COLUMNS", "200")
    result = runner.invoke(cli.app, ["donors", "list"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "[/bold]x" in out and "[red]pwned[/red]" in out  # markup shown, not applied (nor a MarkupError)
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out  # nothing reaches the terminal raw
    assert "evil\\x1b]0;owned\\x07\\x1b[2J" in out and "rtl\\u202eexe.txt" in out
    result = runner.invoke(cli.app, ["donors", "revoke", "w00000000002"])
    assert result.exit_code == 0 and "\x1b" not in result.stdout and "evil\\x1b" in result.stdout


def test_a_command_group_whose_room_is_not_installed_is_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """The donor image ships rma_ray and deployments only: admission's registered group must not break `rma`."""
    from importlib.metadata import EntryPoint

    import typer

    import rma_ray.cli as cli

    missing = EntryPoint(name="ghost", value="ghost_room.cli:app", group=cli.COMMAND_GROUP)
    broken = EntryPoint(name="broken", value="tests.unit.no_such_module_here:app", group=cli.COMMAND_GROUP)
    monkeypatch.setattr(cli, "entry_points", lambda group: [missing])
    root = typer.Typer()
    cli.add_registered_commands(root)  # skipped, no error
    assert [g.name for g in root.registered_groups] == []
    monkeypatch.setattr(cli, "entry_points", lambda group: [broken])
    with pytest.raises(ModuleNotFoundError):  # a module missing inside an installed room is a real error
        cli.add_registered_commands(typer.Typer())
