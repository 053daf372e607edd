"""No `rma` option or argument takes a secret on the command line (SECURITY.md: secrets come from the
environment, 0600 files or a prompt): every parameter of every command, the registered groups included, whose
name or help speaks of a secret must be a flag, a file path or an id, or an exception named below with its
reason. A second or so; no Ray."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.main

from rma_ray.cli import app

SECRET_WORDS = re.compile(r"\b(token|key|secret|passw(or)?d|credential|cookie|jwt)\b", re.IGNORECASE)

# (command, parameter name) -> why it may name a secret and still take a value on the command line
ALLOWED = {
    ("join", "token"): "the documented exception (SECURITY.md): single-use and short-lived; the guides use "
    "RMA_JOIN_TOKEN or --token-file",
    ("rotate-cluster-token", "edge"): "an edge cluster's name; its help names the token it rotates",
    ("admission create-admin-key", "name"): "a label for the new key, shown in the key list",
    ("clients quota", "name"): "a client key's name or id, both public",
    ("clients link", "name"): "a client key's name or id, both public",
}


def _parameters(cmd: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, Any]]:
    for param in cmd.params:
        yield " ".join(path), param
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _parameters(sub, (*path, name))


def _takes_a_file(param: Any) -> bool:
    annotation = param.type_descriptor.annotation  # Typer's record of the function's annotation
    return annotation is Path or (param.name.endswith("_file") and "file" in (param.help or ""))


def secret_taking(root: typer.Typer) -> list[tuple[str, str]]:
    """(command, parameter name) of every parameter that looks like it takes a secret's value."""
    found = []
    for command, param in _parameters(typer.main.get_command(root)):
        words = " ".join([param.name, *param.opts, getattr(param, "help", None) or ""])
        if not SECRET_WORDS.search(words):
            continue
        if getattr(param, "is_flag", False) or _takes_a_file(param) or param.name.endswith("_id"):
            continue  # a switch, a file that holds the secret, or the public id of a credential
        found.append((command, param.name))
    return found


def test_no_command_takes_a_secret_on_the_command_line() -> None:
    commands = {command for command, _ in _parameters(typer.main.get_command(app))}
    # the walk reaches every room's commands: rma_ray's own, admin's groups and the registered admission group
    assert {"up", "join", "invite create", "clients create", "admission serve", "stores backup"} <= commands
    found = secret_taking(app)
    assert sorted(set(found) - set(ALLOWED)) == [], "an option takes a secret: read it from a file instead"
    assert sorted(set(ALLOWED) - set(found)) == [], "an exception no longer needed: drop it from ALLOWED"


def test_the_walk_catches_an_option_that_takes_a_secret() -> None:
    demo = typer.Typer()

    @demo.command()
    def login(
        password: Annotated[str, typer.Option()],
        api: Annotated[str, typer.Option(help="the admin key")],
        key_file: Annotated[Path, typer.Option(help="file holding the key")],
        key_id: Annotated[str, typer.Option()],
        show_token: Annotated[bool, typer.Option(help="print the token")] = False,
    ) -> None:
        pass

    @demo.command()
    def other(url: str) -> None:
        pass

    assert sorted(secret_taking(demo)) == [("login", "api"), ("login", "password")]
