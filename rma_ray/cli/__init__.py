"""The `rma` command line (Typer + Rich): `pool.py` (up, down, rotate-cluster-token), `donor.py` (join, leave,
status, probe), `admin.py` (invites, donors, clients), and the coordinator's own commands, which `admission`
registers through the `rma.commands` entry-point group. A user mistake prints one line and exits non-zero;
tracebacks are for bugs. Secrets are read from the environment, a 0600 file or a prompt, never from the
command line."""

from __future__ import annotations

import sys
from importlib.metadata import entry_points

import typer
from pydantic import ValidationError
from rich.text import Text

from rma_ray.cli import admin, donor, pool, stores
from rma_ray.cli.admin import admin_client, parse_duration
from rma_ray.cli.common import HELP, CliError, err, fail, shown
from rma_ray.client import AdmissionError

COMMAND_GROUP = "rma.commands"

__all__ = ["COMMAND_GROUP", "CliError", "admin_client", "app", "fail", "main", "parse_duration"]


def add_registered_commands(root: typer.Typer) -> None:
    """The command groups other rooms register (`[project.entry-points."rma.commands"]`, each entry
    name = "pkg.mod:app"), each a Typer app added under its entry's name."""
    for ep in sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
        try:
            group = ep.load()
        except (
            ModuleNotFoundError
        ) as exc:  # a room this install leaves out (the donor image has no admission)
            if exc.name != ep.module.split(".")[0]:
                raise
            continue
        root.add_typer(group, name=ep.name)


app = typer.Typer(
    help="RMA Pool: a compute pool of donated machines on Ray.",
    pretty_exceptions_enable=False,
    add_completion=False,
    **HELP,
)
app.add_typer(pool.commands)  # no name: the commands themselves, `rma up`
app.add_typer(donor.commands)
add_registered_commands(app)
for _name, _group in admin.GROUPS.items():
    app.add_typer(_group, name=_name)
app.add_typer(stores.stores_app, name="stores")


def main() -> None:
    try:
        app()
    except (CliError, AdmissionError) as exc:  # may quote what a donor or the server sent: shown literally
        err.print(Text.assemble(("error:", "red"), " ", shown(exc)), highlight=False)
        sys.exit(1)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        msg = str(
            first.get("ctx", {}).get("error", first["msg"])
        )  # a validator's own sentence, when it has one
        prefix = f"setting RMA_{where.upper()}: " if where else ""
        err.print(f"[red]error:[/] {prefix}{msg}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
