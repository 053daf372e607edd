"""Admin commands, run with the admin key: invites, donors, client API keys and edges' spot-checks. The
coordinator's own commands (`rma admission serve|create-admin-key`) are registered by `admission` itself (the
`rma.commands` entry points), so that rma_ray never reaches into it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ByteSize, TypeAdapter, ValidationError
from rich.table import Table
from rich.text import Text

from rma_ray import poolinfo
from rma_ray.cli.common import (
    HELP,
    CoordinatorOpt,
    JsonOpt,
    KeyFileOpt,
    fail,
    out,
    print_json,
    settings,
    shown,
)
from rma_ray.client import AdmissionClient

invite_app = typer.Typer(help="Invites (join tokens) for donors.", **HELP)
donors_app = typer.Typer(help="The donors in the registry.", **HELP)
clients_app = typer.Typer(help="Client API keys for the pool's HTTP routes.", **HELP)
edges_app = typer.Typer(help="Edge clusters (untrusted donors): spot-check verdicts and quarantine.", **HELP)
GROUPS = {  # added by rma_ray/cli/__init__
    "invite": invite_app,
    "donors": donors_app,
    "clients": clients_app,
    "edges": edges_app,
}


def admin_client(coordinator: str | None, key_file: Path | None) -> AdmissionClient:
    """An admin-authenticated client: key from RMA_ADMIN_KEY, --admin-key-file, this pool's pool.json, or a
    prompt."""
    s = settings()
    pool = poolinfo.try_read(s.data_dir)
    url = coordinator or pool.coordinator_url or s.coordinator_url
    if s.admin_key is not None:
        key = s.admin_key.get_secret_value()
    elif key_file is not None:
        try:
            key = key_file.read_text().strip()
        except OSError as exc:
            fail(f"cannot read the admin key file {key_file}: {exc.strerror}")
    elif pool.admin_key:
        key = pool.admin_key
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


# ---- invites ---------------------------------------------------------------------------------------------


@invite_app.command("create")
def invite_create(
    ttl: Annotated[str, typer.Option(help="lifetime, e.g. 15m, 2h, 7d")] = "15m",
    uses: Annotated[int, typer.Option(help="how many donors may join with it", min=1)] = 1,
    trusted: Annotated[bool, typer.Option("--trusted", help="donors may host data stores")] = False,
    tier: Annotated[str | None, typer.Option(help="pin the tier: gpu, service or data")] = None,
    note: Annotated[str, typer.Option(help="a note for the registry")] = "",
    edge: Annotated[
        str | None,
        typer.Option(help="the edge cluster an untrusted donor joins (default: the pool's first edge)"),
    ] = None,
    coordinator: CoordinatorOpt = None,
    admin_key_file: KeyFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a join token for a donor."""
    if tier is not None and tier not in ("gpu", "service", "data"):
        fail(f"unknown tier {tier!r}; use gpu, service or data")
    if edge is not None and trusted:
        fail("a trusted donor joins the core cluster; drop --edge or --trusted")
    fields = {"edge": edge} if edge is not None else {}
    with admin_client(coordinator, admin_key_file) as client:
        inv = client.create_invite(
            ttl_s=parse_duration(ttl), uses=uses, trusted=trusted, tier=tier, note=note, **fields
        )
        if as_json:
            return print_json(inv)
        out.print(f"invite {inv['id']}: {inv['uses']} use(s), expires {inv['expires_at']}")
        out.print(f"join token (shown once): [bold]{inv['token']}[/]")
        out.print(f"on the donor: rma join {client.base_url} --token <join token>")


@invite_app.command("list")
def invite_list(
    coordinator: CoordinatorOpt = None, admin_key_file: KeyFileOpt = None, as_json: JsonOpt = False
) -> None:
    """List invites (tokens are never shown again)."""
    with admin_client(coordinator, admin_key_file) as client:
        rows = client.request("GET", "/api/invites")
    if as_json:
        return print_json(rows)
    table = Table("id", "status", "uses left", "tier", "trusted", "expires", "note")
    for r in rows:
        table.add_row(
            r["id"],
            r["status"],
            f"{r['uses_left']}/{r['uses']}",
            r["tier"] or "auto",
            "yes" if r["trusted"] else "no",
            r["expires_at"],
            shown(r["note"]),
        )
    out.print(table)


@invite_app.command("revoke")
def invite_revoke(
    invite_id: str, coordinator: CoordinatorOpt = None, admin_key_file: KeyFileOpt = None
) -> None:
    """Revoke an unused invite."""
    with admin_client(coordinator, admin_key_file) as client:
        client.request("POST", f"/api/invites/{invite_id}/revoke")
    out.print(f"invite {invite_id} revoked")


# ---- donors ----------------------------------------------------------------------------------------------


@donors_app.command("list")
def donors_list(
    tier: Annotated[str | None, typer.Option(help="only this tier")] = None,
    status: Annotated[str | None, typer.Option(help="only this status")] = None,
    cluster: Annotated[str | None, typer.Option(help="only this cluster: core or an edge's name")] = None,
    coordinator: CoordinatorOpt = None,
    admin_key_file: KeyFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List donors with tier, status, load and last heartbeat (and cluster, where the pool has edges)."""
    with admin_client(coordinator, admin_key_file) as client:
        rows = client.workers(tier=tier, status=status, cluster=cluster)
    if as_json:
        return print_json(rows)
    edges = cluster is not None or any(w.get("cluster", "core") != "core" for w in rows)
    columns = [
        "id",
        "name",
        *(["cluster"] if edges else []),
        "tier",
        "trusted",
        "status",
        "load",
        "last seen",
    ]
    table = Table(*columns)
    for w in rows:
        load = f"{w['current_load']:.2f}" if w["current_load"] is not None else "-"
        table.add_row(
            w["id"],
            shown(w["name"]),
            *([w.get("cluster", "core")] if edges else []),
            w["tier"],
            "yes" if w["trusted"] else "no",
            w["status"] + (f" (next window {w['resume_at']})" if w.get("resume_at") else ""),
            load,
            w["last_seen_at"] or "never",
        )
    out.print(table)


@donors_app.command("revoke")
def donors_revoke(
    worker_id: str, coordinator: CoordinatorOpt = None, admin_key_file: KeyFileOpt = None
) -> None:
    """Revoke a donor: its node token dies at once, its node is told to leave, it cannot rejoin with it."""
    with admin_client(coordinator, admin_key_file) as client:
        w = client.revoke_worker(worker_id)
    out.print(Text.assemble(f"donor {w['id']} (", shown(w["name"]), ") revoked"))


@donors_app.command("drain")
def donors_drain(
    worker_id: str, coordinator: CoordinatorOpt = None, admin_key_file: KeyFileOpt = None
) -> None:
    """Ask a donor to drain its work (it stays registered)."""
    with admin_client(coordinator, admin_key_file) as client:
        client.request("POST", f"/api/admin/workers/{worker_id}/drain")
    out.print(f"donor {worker_id} asked to drain")


# ---- clients ---------------------------------------------------------------------------------------------


@clients_app.command("create")
def clients_create(
    name: str,
    sensitive: Annotated[
        bool,
        typer.Option("--sensitive", help="its requests never leave the core cluster (no edge serves them)"),
    ] = False,
    donor: Annotated[
        str | None,
        typer.Option(
            "--donor",
            metavar="DONOR_ID",
            help="the donor this client belongs to: a larger default quota while the donor gives",
        ),
    ] = None,
    requests_per_minute: Annotated[
        int | None, typer.Option(min=1, help="its own quota: requests in any 60 s, across every replica")
    ] = None,
    tokens_per_day: Annotated[
        int | None, typer.Option(min=1, help="its own quota: LLM tokens (prompt + completion) per UTC day")
    ] = None,
    upload_bytes_per_day: Annotated[
        str | None, typer.Option(metavar="SIZE", help="its own quota: uploaded bytes per UTC day, e.g. 500MB")
    ] = None,
    coordinator: CoordinatorOpt = None,
    admin_key_file: KeyFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an API key for a client of the pool's HTTP routes (with quota options: the key has them from its
    first request; unset ones are the defaults)."""
    from rma_ray.wire import Quota

    size = _size(upload_bytes_per_day) if upload_bytes_per_day is not None else None
    given = requests_per_minute is not None or tokens_per_day is not None or size is not None
    try:
        quota = Quota(
            requests_per_minute=requests_per_minute, tokens_per_day=tokens_per_day, upload_bytes_per_day=size
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        fail(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}")
    with admin_client(coordinator, admin_key_file) as client:
        created = client.create_client(
            name, sensitive=sensitive, donor_id=donor, quota=quota if given else None
        )
    if as_json:
        return print_json(created)
    linked = f" linked to donor {created['donor_id']}" if created.get("donor_id") else ""
    own = f"; quota {quota_text(quota.model_dump())}" if given else ""
    out.print(
        f"client {created['id']} ({created['name']}){' sensitive: core only' if sensitive else ''}{linked}{own}"
    )
    out.print(f"API key (shown once): [bold]{created['key']}[/]")


@clients_app.command("list")
def clients_list(
    coordinator: CoordinatorOpt = None, admin_key_file: KeyFileOpt = None, as_json: JsonOpt = False
) -> None:
    """List client API keys (never the keys themselves)."""
    with admin_client(coordinator, admin_key_file) as client:
        rows = client.clients()
    if as_json:
        return print_json(rows)
    table = Table("id", "name", "created", "revoked", "sensitive", "donor", "quota")
    for r in rows:
        table.add_row(
            r["id"],
            shown(r["name"]),
            r["created_at"],
            r["revoked_at"] or "",
            "yes" if r.get("sensitive") else "",
            donor_text(r),
            quota_text(r.get("quota")),
        )
    out.print(table)


def donor_text(r: dict[str, Any]) -> str:
    if not r.get("donor_id"):
        return ""
    return f"{r['donor_id']} (bonus)" if r.get("donor_bonus") else str(r["donor_id"])


def quota_text(q: dict[str, Any] | None) -> str:
    if not q:
        return ""
    parts = []
    if q.get("requests_per_minute"):
        parts.append(f"{q['requests_per_minute']:,} req/min")
    if q.get("tokens_per_day"):
        parts.append(f"{q['tokens_per_day']:,} tokens/day")
    if q.get("upload_bytes_per_day"):
        parts.append(f"{ByteSize(q['upload_bytes_per_day']).human_readable()} uploads/day")
    return ", ".join(parts) or "no limit"


def _size(text: str) -> int:
    try:
        return int(TypeAdapter(ByteSize).validate_python(text.strip()))
    except ValidationError:
        raise typer.BadParameter(f"{text!r} is not a size; write e.g. 500MB, 2GiB or 1000000") from None


def _client_key_id(client: AdmissionClient, name: str) -> str:
    """A live client key by id or by name (a name shared by several keys must be given as an id)."""
    live = [r for r in client.clients() if not r["revoked_at"]]
    if any(r["id"] == name for r in live):
        return name
    named = [str(r["id"]) for r in live if r["name"] == name]
    if len(named) == 1:
        return named[0]
    if not named:
        fail(f"no live client key named or with id {name!r}; `rma clients list` shows them")
    fail(f"{len(named)} live keys are named {name!r} ({', '.join(named)}): give the key id instead")


@clients_app.command("quota")
def clients_quota(
    name: Annotated[str, typer.Argument(help="the client key's name or id")],
    requests_per_minute: Annotated[
        int | None, typer.Option(min=1, help="requests in any 60 s, across every replica")
    ] = None,
    tokens_per_day: Annotated[
        int | None, typer.Option(min=1, help="LLM tokens (prompt + completion) per UTC day")
    ] = None,
    upload_bytes_per_day: Annotated[
        str | None, typer.Option(metavar="SIZE", help="uploaded bytes per UTC day, e.g. 500MB or 2GiB")
    ] = None,
    reset: Annotated[
        bool, typer.Option("--reset", help="drop this key's overrides first (back on the defaults)")
    ] = False,
    coordinator: CoordinatorOpt = None,
    admin_key_file: KeyFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Set a client key's quotas (the pool's gateway applies them within 10 s); over a quota the client gets
    429 with Retry-After."""
    from rma_ray.wire import QuotaPatch

    size = _size(upload_bytes_per_day) if upload_bytes_per_day is not None else None
    if requests_per_minute is None and tokens_per_day is None and size is None and not reset:
        fail(
            "nothing to change: give --requests-per-minute, --tokens-per-day, --upload-bytes-per-day or --reset"
        )
    patch = QuotaPatch(
        requests_per_minute=requests_per_minute,
        tokens_per_day=tokens_per_day,
        upload_bytes_per_day=size,
        reset=reset,
    )
    with admin_client(coordinator, admin_key_file) as client:
        key_id = _client_key_id(client, name)
        row = client.set_client_quota(key_id, patch)
    if as_json:
        return print_json(row)
    out.print(f"client {row['id']} ({shown(row['name'])}): {quota_text(row.get('quota'))}")


@clients_app.command("link")
def clients_link(
    name: Annotated[str, typer.Argument(help="the client key's name or id")],
    donor: Annotated[
        str | None, typer.Option("--donor", metavar="DONOR_ID", help="the donor the client belongs to")
    ] = None,
    unlink: Annotated[bool, typer.Option("--unlink", help="the client belongs to no donor")] = False,
    coordinator: CoordinatorOpt = None,
    admin_key_file: KeyFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Link a client key to the donor it belongs to: while that donor gives to the pool, the key's default
    quotas are multiplied (the coordinator's `client_donor_quota_factor`)."""
    if (donor is None) == (not unlink):
        fail("give exactly one of --donor DONOR_ID or --unlink")
    with admin_client(coordinator, admin_key_file) as client:
        key_id = _client_key_id(client, name)
        row = client.link_client_donor(key_id, donor)
    if as_json:
        return print_json(row)
    if not row.get("donor_id"):
        out.print(f"client {row['id']} ({shown(row['name'])}): no donor; {quota_text(row.get('quota'))}")
        return
    state = "gives to the pool: bonus quota" if row.get("donor_bonus") else "no bonus yet (too few credits)"
    out.print(
        f"client {row['id']} ({shown(row['name'])}) linked to donor {row['donor_id']} ({state}): "
        f"{quota_text(row.get('quota'))}"
    )


@clients_app.command("usage")
def clients_usage(
    days: Annotated[int, typer.Option(min=1, max=90, help="the last N UTC days, today first")] = 1,
    coordinator: CoordinatorOpt = None,
    admin_key_file: KeyFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Requests, LLM tokens and uploaded bytes per client key and day (as the gateway last reported them)."""
    with admin_client(coordinator, admin_key_file) as client:
        got = client.usage(days)
    if as_json:
        return print_json(got)
    table = Table("day", "id", "name", "requests", "tokens in", "tokens out", "uploaded", "quota")
    for r in got["clients"]:
        table.add_row(
            r["day"],
            r["key_id"],
            shown(r["name"]),
            f"{r['requests']:,}",
            f"{r['tokens_in']:,}",
            f"{r['tokens_out']:,}",
            ByteSize(r["upload_bytes"]).human_readable(),
            quota_text(r["quota"]),
        )
    out.print(table)
    if not got["shared"]:
        down = [r["replica"] for r in got["replicas"] if not r["shared"]]
        out.print(f"[yellow]quotas are per replica on {', '.join(down)}: the pool's Redis is unreachable[/]")


@clients_app.command("revoke")
def clients_revoke(
    key_id: str, coordinator: CoordinatorOpt = None, admin_key_file: KeyFileOpt = None
) -> None:
    """Revoke a client API key (the Serve side stops accepting it within 30 s)."""
    with admin_client(coordinator, admin_key_file) as client:
        client.revoke_client(key_id)
    out.print(f"client key {key_id} revoked")


# ---- edges -----------------------------------------------------------------------------------------------


@edges_app.command("checks")
def edges_checks(
    failures: Annotated[int, typer.Option(min=0, max=100, help="recent failures shown per edge")] = 3,
    coordinator: CoordinatorOpt = None,
    admin_key_file: KeyFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Spot-checks per edge: checks, decayed pass rate, quarantine and its reason, each donor's own record,
    recent failures (with the donor that answered, where the edge head named it)."""
    with admin_client(coordinator, admin_key_file) as client:
        got = client._object("GET", "/api/admin/spot-checks", params={"failures": failures})
    if as_json:
        return print_json(got)
    out.print(
        f"{got['rate']:.1%} of edge answers re-checked; quarantine under {got['quarantine_below']:.0%} "
        f"after {got['min_checks']} checks (half-life {got['half_life_checks']:g} checks)"
    )
    if not got["edges"]:
        out.print("no edge cluster in this pool (`rma up --no-edge`): nothing is spot-checked")
        return None
    table = Table("edge", "checks", "failed", "pass rate", "state", "samples kept")
    for e in got["edges"]:
        rate = "-" if e["pass_rate"] is None else f"{e['pass_rate']:.1%}"
        state = f"[red]quarantined since {e['since']}[/]" if e["quarantined"] else "routed"
        table.add_row(
            e["edge"], f"{e['checks']:,}", f"{e['failures']:,}", rate, state, str(e["samples_kept"])
        )
    out.print(table)
    for e in got["edges"]:
        if e["quarantined"]:
            out.print(Text.assemble((f"{e['edge']}: ", "bold"), shown(e["reason"] or "")))
        for d in e.get("donors", []):  # the donors the edge head's HAProxy named (rma_ray.upstream)
            rate = "-" if d["pass_rate"] is None else f"{d['pass_rate']:.1%}"
            out.print(
                Text.assemble(
                    f"  {e['edge']} donor {d['id']} ",
                    shown(d["name"] or "(gone)"),
                    f": {d['failures']:,} of {d['checks']:,} checks failed, pass rate {rate}",
                    (" quarantined" if d["quarantined"] else "", "red"),
                )
            )
        for f in e["recent_failures"]:
            out.print(
                Text.assemble(
                    f"  {e['edge']} failed {f['at']}: {f['app']} ",
                    shown(f["path"]),
                    f" scored {f['score']:.4g} (a pass needs {f['threshold']:.4g}),",
                    f" request {f['request_sha256'][:12]}",
                    f", donor {f['donor']}" if f.get("donor") else "",
                )
            )


@edges_app.command("trust")
def edges_trust(
    name: Annotated[str, typer.Argument(help="the edge cluster's name")],
    coordinator: CoordinatorOpt = None,
    admin_key_file: KeyFileOpt = None,
) -> None:
    """Clear an edge's quarantine and start its pass rate again (review `rma edges checks` first)."""
    with admin_client(coordinator, admin_key_file) as client:
        e = client._object("POST", f"/api/admin/edges/{name}/trust")
    out.print(f"edge {e['edge']} trusted again: routed, its pass rate starts anew")
