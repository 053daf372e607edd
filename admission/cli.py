"""The coordinator's `rma` commands (`rma admission serve|create-admin-key`). `admission` registers this
Typer app itself, as the `admission` entry of the `rma.commands` entry-point group (pyproject.toml), and the
CLI loads that group: rma_ray never names admission, not even in a string."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from rma_ray.cli.common import HELP, fail, out

app = typer.Typer(help="Run the admission coordinator.", **HELP)


@app.command("serve")
def admission_serve(
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to bind", min=1, max=65535)] = 8470,
    data_dir: Annotated[Path | None, typer.Option(help="where the SQLite registry and secrets live")] = None,
    forwarded_allow_ips: Annotated[
        str | None,
        typer.Option(
            help="proxy addresses/CIDRs trusted for X-Forwarded-For (default RMA_TRUSTED_PROXIES, 127.0.0.1)"
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="print only the first admin key")] = False,
) -> None:
    """Run the coordinator alone (as on a free-tier host). On first start it prints an admin key, once."""
    import socket as _socket

    from admission.serve import serve

    try:  # uvicorn would log a bind failure after the migrations, and not as one line
        with _socket.create_server((host, port)):
            pass
    except OSError as exc:
        fail(
            f"cannot listen on {host}:{port}: {exc.strerror}; is a coordinator already running there? "
            f"choose another --port"
        )
    try:
        serve(host, port, data_dir, forwarded_allow_ips, quiet)
    except ValidationError:
        raise  # settings: main() names the variable
    except ValueError as exc:  # the bootstrap's refusals (a malformed or mismatched RMA_ADMIN_KEY): one line
        fail(str(exc))


@app.command("create-admin-key")
def admission_create_admin_key(
    name: Annotated[str, typer.Option(help="what the key is for")] = "created on the coordinator host",
    data_dir: Annotated[Path | None, typer.Option(help="the coordinator's data dir")] = None,
) -> None:
    """Mint an admin key directly in the database (for the operator of the coordinator host)."""
    from admission.serve import create_admin_key

    out.print(create_admin_key(name, data_dir))
