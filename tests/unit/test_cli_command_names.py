"""Every `rma ...` command that a message of the code tells people to run exists (subcommand and options),
checked against the CLI's Typer app with the doc-drift checker; and `rma --help` at 80 columns cuts no option
name. A few seconds; no Ray."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rma_ray.cli import app
from tests.docs.test_doc_drift import check_rma

ROOT = Path(__file__).resolve().parents[2]
NAMED = re.compile(r"`(rma(?: [^`]*)?)`")


def named_commands() -> list[tuple[str, str]]:
    found = []
    for room in ("rma_ray", "admission", "deployments"):
        for f in sorted((ROOT / room).rglob("*.py")):
            for n, line in enumerate(f.read_text().splitlines(), 1):
                for m in NAMED.finditer(line):
                    found.append((f"{f.relative_to(ROOT)}:{n}", m[1]))
    return found


def test_messages_name_only_commands_that_exist() -> None:
    commands = named_commands()
    assert len(commands) > 10  # the scan finds what it should
    bad = []
    for where, command in commands:
        try:
            argv = shlex.split(command.replace("…", ""))[1:]
        except ValueError:
            argv = command.split()[1:]
        argv = [a for a in argv if not (a.startswith(("[", "<")) or a.endswith(("]", ">")) or a == "|")]
        last = argv[-1] if argv else ""
        for alternative in last.split("|") if "|" in last else [last]:  # `rma donors list|revoke|drain`
            why = check_rma([*argv[:-1], alternative] if argv else [])
            if why:
                bad.append(f"{where}: {command!r}: {why}")
    assert not bad, "\n".join(bad)


def test_the_check_catches_a_command_that_does_not_exist() -> None:
    assert check_rma(["admission", "new-admin-key"]) is not None


def _groups() -> list[list[str]]:
    import typer.main

    cmd = typer.main.get_command(app)
    paths: list[list[str]] = [[]]
    for name, sub in cmd.commands.items():  # type: ignore[attr-defined]
        paths.append([name])
        paths += [[name, s] for s in getattr(sub, "commands", {})]
    return paths


@pytest.mark.parametrize("path", _groups(), ids=lambda p: " ".join(p) or "rma")
def test_help_at_80_columns_cuts_no_option_name(path: list[str]) -> None:
    import typer.main

    r = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "80", "TERM": "dumb"}, terminal_width=80)
    assert r.exit_code == 0, r.output
    assert "…" not in r.output, r.output
    cmd = typer.main.get_command(app)
    for p in path:
        cmd = cmd.commands[p]  # type: ignore[attr-defined]
    for param in cmd.params:
        for opt in (*param.opts, *param.secondary_opts):
            if opt.startswith("--") and opt != "--help":
                assert opt in r.output, f"{opt} missing or cut in `rma {' '.join(path)} --help`:\n{r.output}"
