"""The `rma` command line (Typer + Rich).

Admins: `rma admission serve`, `rma invite create`, `rma donors list|revoke|drain`, `rma clients create|list|revoke`.
Anyone: `rma probe`. A user mistake prints one line and exits non-zero; tracebacks are for bugs.
Secrets are read from the environment, a 0600 file or a prompt, never from the command line.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from rma_ray import capabilities
from rma_ray.client import AdmissionClient, AdmissionError
from rma_ray.settings import Settings

app = typer.Typer(help="RMA Pool: a compute pool of donated machines on Ray.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
admission_app = typer.Typer(help="Run the admission coordinator.", no_args_is_help=True)
invite_app = typer.Typer(help="Invites (join tokens) for donors.", no_args_is_help=True)
donors_app = typer.Typer(help="The donors in the registry.", no_args_is_help=True)
clients_app = typer.Typer(help="Client API keys for the pool's HTTP routes.", no_args_is_help=True)
app.add_typer(admission_app, name="admission")
app.add_typer(invite_app, name="invite")
app.add_typer(donors_app, name="donors")
app.add_typer(clients_app, name="clients")

out = Console()
err = Console(stderr=True, soft_wrap=True)


class CliError(Exception):
    """A user mistake or an unmet precondition: one line, exit 1."""


def fail(message: str) -> NoReturn:
    raise CliError(message)


def settings() -> Settings:
    return Settings()


CoordinatorOpt = Annotated[str | None, typer.Option("--coordinator", "-c", envvar="RMA_COORDINATOR_URL",
                                                    help="coordinator URL (default: this pool's, or 127.0.0.1:8470)")]
KeyFileOpt = Annotated[Path | None, typer.Option("--admin-key-file", help="file holding the admin key (mode 0600)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]


def _pool_file(s: Settings) -> dict[str, Any]:
    path = s.data_dir / "pool.json"
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        return {}


def admin_client(coordinator: str | None, key_file: Path | None) -> AdmissionClient:
    """An admin-authenticated client: key from RMA_ADMIN_KEY, --admin-key-file, this pool's pool.json, or a prompt."""
    s = settings()
    pool = _pool_file(s)
    url = coordinator or pool.get("coordinator_url") or s.coordinator_url
    if s.admin_key is not None:
        key = s.admin_key.get_secret_value()
    elif key_file is not None:
        try:
            key = key_file.read_text().strip()
        except OSError as exc:
            fail(f"cannot read the admin key file {key_file}: {exc.strerror}")
    elif pool.get("admin_key"):
        key = pool["admin_key"]
    elif sys.stdin.isatty():
        key = typer.prompt("Admin key", hide_input=True).strip()
    else:
        fail("no admin key: set RMA_ADMIN_KEY or pass --admin-key-file")
    return AdmissionClient(url, key)


def parse_duration(text: str) -> int:
    from pytimeparse2 import parse as parse_time

    seconds = parse_time(text) if not text.isdigit() else int(text)
    if seconds is None or int(seconds) <= 0:
        fail(f"cannot read the duration {text!r}; use e.g. 90s, 15m, 2h or 7d")
    return int(seconds)


def _print_json(data: Any) -> None:
    out.print_json(json.dumps(data, default=str))


# ---- admission -------------------------------------------------------------------------------------------


def _admission(name: str) -> Any:
    """The coordinator, reached by import path (as uvicorn reaches an app): rma_ray never imports admission."""
    import pkgutil

    return pkgutil.resolve_name(f"admission.serve:{name}")


@admission_app.command("serve")
def admission_serve(
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to bind", min=1, max=65535)] = 8470,
    data_dir: Annotated[Path | None, typer.Option(help="where the SQLite registry and secrets live")] = None,
    forwarded_allow_ips: Annotated[str, typer.Option(help="proxies trusted for X-Forwarded-For")] = "127.0.0.1",
    quiet: Annotated[bool, typer.Option("--quiet", help="print only the first admin key")] = False,
) -> None:
    """Run the coordinator alone (as on a free-tier host). On first start it prints an admin key, once."""
    _admission("serve")(host, port, data_dir, forwarded_allow_ips, quiet)


@admission_app.command("create-admin-key")
def admission_create_admin_key(
    name: Annotated[str, typer.Option(help="what the key is for")] = "created on the coordinator host",
    data_dir: Annotated[Path | None, typer.Option(help="the coordinator's data dir")] = None,
) -> None:
    """Mint an admin key directly in the database (for the operator of the coordinator host)."""
    out.print(_admission("create_admin_key")(name, data_dir))


# ---- invites ---------------------------------------------------------------------------------------------


@invite_app.command("create")
def invite_create(
    ttl: Annotated[str, typer.Option(help="lifetime, e.g. 15m, 2h, 7d")] = "15m",
    uses: Annotated[int, typer.Option(help="how many donors may join with it", min=1)] = 1,
    trusted: Annotated[bool, typer.Option("--trusted", help="donors may host data stores")] = False,
    tier: Annotated[str | None, typer.Option(help="pin the tier: gpu, service or data")] = None,
    note: Annotated[str, typer.Option(help="a note for the registry")] = "",
    coordinator: CoordinatorOpt = None, admin_key_file: KeyFileOpt = None, as_json: JsonOpt = False,
) -> None:
    """Create a join token for a donor."""
    if tier is not None and tier not in ("gpu", "service", "data"):
        fail(f"unknown tier {tier!r}; use gpu, service or data")
    with admin_client(coordinator, admin_key_file) as client:
        inv = client.create_invite(ttl_s=parse_duration(ttl), uses=uses, trusted=trusted, tier=tier, note=note)
        if as_json:
            return _print_json(inv)
        out.print(f"invite {inv['id']}: {inv['uses']} use(s), expires {inv['expires_at']}")
        out.print(f"join token (shown once): [bold]{inv['token']}[/]")
        out.print(f"on the donor: rma join {client.base_url} --token <join token>")


@invite_app.command("list")
def invite_list(coordinator: CoordinatorOpt = None, admin_key_file: KeyFileOpt = None,
                as_json: JsonOpt = False) -> None:
    """List invites (tokens are never shown again)."""
    with admin_client(coordinator, admin_key_file) as client:
        rows = client.request("GET", "/api/invites")
    if as_json:
        return _print_json(rows)
    table = Table("id", "status", "uses left", "tier", "trusted", "expires", "note")
    for r in rows:
        table.add_row(r["id"], r["status"], f"{r['uses_left']}/{r['uses']}", r["tier"] or "auto",
                      "yes" if r["trusted"] else "no", r["expires_at"], r["note"])
    out.print(table)


@invite_app.command("revoke")
def invite_revoke(invite_id: str, coordinator: CoordinatorOpt = None, admin_key_file: KeyFileOpt = None) -> None:
    """Revoke an unused invite."""
    with admin_client(coordinator, admin_key_file) as client:
        client.request("POST", f"/api/invites/{invite_id}/revoke")
    out.print(f"invite {invite_id} revoked")


# ---- donors ----------------------------------------------------------------------------------------------


@donors_app.command("list")
def donors_list(
    tier: Annotated[str | None, typer.Option(help="only this tier")] = None,
    status: Annotated[str | None, typer.Option(help="only this status")] = None,
    coordinator: CoordinatorOpt = None, admin_key_file: KeyFileOpt = None, as_json: JsonOpt = False,
) -> None:
    """List donors with tier, status, load and last heartbeat."""
    with admin_client(coordinator, admin_key_file) as client:
        rows = client.workers(tier=tier, status=status)
    if as_json:
        return _print_json(rows)
    table = Table("id", "name", "tier", "trusted", "status", "load", "last seen")
    for w in rows:
        load = f"{w['current_load']:.2f}" if w["current_load"] is not None else "-"
        table.add_row(w["id"], w["name"], w["tier"], "yes" if w["trusted"] else "no", w["status"], load,
                      w["last_seen_at"] or "never")
    out.print(table)


@donors_app.command("revoke")
def donors_revoke(worker_id: str, coordinator: CoordinatorOpt = None, admin_key_file: KeyFileOpt = None) -> None:
    """Revoke a donor: its node token dies at once, its node is told to leave, it cannot rejoin with it."""
    with admin_client(coordinator, admin_key_file) as client:
        w = client.revoke_worker(worker_id)
    out.print(f"donor {w['id']} ({w['name']}) revoked")


@donors_app.command("drain")
def donors_drain(worker_id: str, coordinator: CoordinatorOpt = None, admin_key_file: KeyFileOpt = None) -> None:
    """Ask a donor to drain its work (it stays registered)."""
    with admin_client(coordinator, admin_key_file) as client:
        client.request("POST", f"/api/admin/workers/{worker_id}/drain")
    out.print(f"donor {worker_id} asked to drain")


# ---- clients ---------------------------------------------------------------------------------------------


@clients_app.command("create")
def clients_create(name: str, coordinator: CoordinatorOpt = None, admin_key_file: KeyFileOpt = None,
                   as_json: JsonOpt = False) -> None:
    """Create an API key for a client of the pool's HTTP routes."""
    with admin_client(coordinator, admin_key_file) as client:
        created = client.create_client(name)
    if as_json:
        return _print_json(created)
    out.print(f"client {created['id']} ({created['name']})")
    out.print(f"API key (shown once): [bold]{created['key']}[/]")


@clients_app.command("list")
def clients_list(coordinator: CoordinatorOpt = None, admin_key_file: KeyFileOpt = None,
                 as_json: JsonOpt = False) -> None:
    """List client API keys (never the keys themselves)."""
    with admin_client(coordinator, admin_key_file) as client:
        rows = client.clients()
    if as_json:
        return _print_json(rows)
    table = Table("id", "name", "created", "revoked")
    for r in rows:
        table.add_row(r["id"], r["name"], r["created_at"], r["revoked_at"] or "")
    out.print(table)


@clients_app.command("revoke")
def clients_revoke(key_id: str, coordinator: CoordinatorOpt = None, admin_key_file: KeyFileOpt = None) -> None:
    """Revoke a client API key (the Serve side stops accepting it within 30 s)."""
    with admin_client(coordinator, admin_key_file) as client:
        client.revoke_client(key_id)
    out.print(f"client key {key_id} revoked")


# ---- probe -----------------------------------------------------------------------------------------------


@app.command("probe")
def probe(disk: Annotated[Path, typer.Option(help="measure free disk here")] = Path("/")) -> None:
    """Print this machine's capabilities as JSON (what `rma join` sends), and the tiers it qualifies for."""
    from rma_ray import tiers

    if not disk.exists():
        fail(f"{disk} does not exist")
    caps = capabilities.probe(disk)
    data = caps.model_dump()
    data["qualifies_for"] = [str(t) for t in tiers.eligible(caps)]
    print(json.dumps(data, indent=2))


def main() -> None:
    try:
        app()
    except (CliError, AdmissionError) as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False)
        sys.exit(1)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        msg = str(first.get("ctx", {}).get("error", first["msg"]))  # a validator's own sentence, when it has one
        prefix = f"setting RMA_{where.upper()}: " if where else ""
        err.print(f"[red]error:[/] {prefix}{msg}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
