"""What every `rma` command shares: the consoles, one-line failures, the common options, and
printing what a donor or the server sent without letting it drive the terminal."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.text import Text

from rma_ray.settings import Settings

# click's plain help: it wraps at any width, where Rich's help tables cut long option names at 80 columns
HELP: dict[str, Any] = {"no_args_is_help": True, "rich_markup_mode": None}

out = Console(soft_wrap=True)  # never break a token across lines: people copy them
err = Console(stderr=True, soft_wrap=True)


class CliError(Exception):
    """A user mistake or an unmet precondition: one line, exit 1."""


def fail(message: str) -> NoReturn:
    raise CliError(message)


def settings() -> Settings:
    return Settings()


CoordinatorOpt = Annotated[
    str | None,
    typer.Option(
        "--coordinator",
        "-c",
        envvar="RMA_COORDINATOR_URL",
        help="coordinator URL (default: this pool's, or 127.0.0.1:8470)",
    ),
]
KeyFileOpt = Annotated[
    Path | None, typer.Option("--admin-key-file", help="file holding the admin key (mode 0600)")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", help="this machine's RMA data dir")]


def data_dir_of(data_dir: Path | None) -> Path:
    return data_dir or settings().data_dir


def say(message: str) -> None:
    out.print(message, highlight=False)


def shown(value: Any) -> Text:
    """A donor-supplied string for the terminal: literal (no Rich markup), control and escape characters shown
    escaped (`\\x1b`), so a name can neither break the table nor drive the admin's terminal."""
    text = "" if value is None else str(value)
    return Text("".join(repr(c)[1:-1] if unicodedata.category(c) in ("Cc", "Cf") else c for c in text))


def print_json(data: Any) -> None:
    out.print_json(json.dumps(data, default=str))
