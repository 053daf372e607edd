"""The `rma` command line (Typer + Rich).

Admins: `rma admission serve`, `rma invite create`, `rma donors list|revoke|drain`, `rma clients create|list|revoke`.
Anyone: `rma probe`. A user mistake prints one line and exits non-zero; tracebacks are for bugs.
Secrets are read from the environment, a 0600 file or a prompt, never from the command line.
"""

from __future__ import annotations

import json
import os
import sys
import unicodedata
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from rich.text import Text

from rma_ray import capabilities
from rma_ray.client import AdmissionClient, AdmissionError
from rma_ray.settings import Settings

# click's plain help: it wraps at any width, where Rich's help tables cut long option names at 80 columns
_HELP: dict[str, Any] = {"no_args_is_help": True, "rich_markup_mode": None}
app = typer.Typer(help="RMA Pool: a compute pool of donated machines on Ray.", pretty_exceptions_enable=False,
                  add_completion=False, **_HELP)
admission_app = typer.Typer(help="Run the admission coordinator.", **_HELP)
invite_app = typer.Typer(help="Invites (join tokens) for donors.", **_HELP)
donors_app = typer.Typer(help="The donors in the registry.", **_HELP)
clients_app = typer.Typer(help="Client API keys for the pool's HTTP routes.", **_HELP)
app.add_typer(admission_app, name="admission")
app.add_typer(invite_app, name="invite")
app.add_typer(donors_app, name="donors")
app.add_typer(clients_app, name="clients")

out = Console(soft_wrap=True)  # never break a token across lines: people copy them
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


def shown(value: Any) -> Text:
    """A donor-supplied string for the terminal: literal (no Rich markup), control and escape characters shown
    escaped (`\\x1b`), so a name can neither break the table nor drive the admin's terminal."""
    text = "" if value is None else str(value)
    return Text("".join(repr(c)[1:-1] if unicodedata.category(c) in ("Cc", "Cf") else c for c in text))


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
    forwarded_allow_ips: Annotated[str | None, typer.Option(
        help="proxy addresses/CIDRs trusted for X-Forwarded-For (default RMA_TRUSTED_PROXIES, 127.0.0.1)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="print only the first admin key")] = False,
) -> None:
    """Run the coordinator alone (as on a free-tier host). On first start it prints an admin key, once."""
    import socket as _socket

    try:  # uvicorn would log a bind failure after the migrations, and not as one line
        with _socket.create_server((host, port)):
            pass
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror}; is a coordinator already running there? "
             f"choose another --port")
    try:
        _admission("serve")(host, port, data_dir, forwarded_allow_ips, quiet)
    except ValidationError:
        raise  # settings: main() names the variable
    except ValueError as exc:  # the bootstrap's refusals (a malformed or mismatched RMA_ADMIN_KEY): one line
        fail(str(exc))


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
                      "yes" if r["trusted"] else "no", r["expires_at"], shown(r["note"]))
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
        table.add_row(w["id"], shown(w["name"]), w["tier"], "yes" if w["trusted"] else "no", w["status"], load,
                      w["last_seen_at"] or "never")
    out.print(table)


@donors_app.command("revoke")
def donors_revoke(worker_id: str, coordinator: CoordinatorOpt = None, admin_key_file: KeyFileOpt = None) -> None:
    """Revoke a donor: its node token dies at once, its node is told to leave, it cannot rejoin with it."""
    with admin_client(coordinator, admin_key_file) as client:
        w = client.revoke_worker(worker_id)
    out.print(Text.assemble(f"donor {w['id']} (", shown(w["name"]), ") revoked"))


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
        table.add_row(r["id"], shown(r["name"]), r["created_at"], r["revoked_at"] or "")
    out.print(table)


@clients_app.command("revoke")
def clients_revoke(key_id: str, coordinator: CoordinatorOpt = None, admin_key_file: KeyFileOpt = None) -> None:
    """Revoke a client API key (the Serve side stops accepting it within 30 s)."""
    with admin_client(coordinator, admin_key_file) as client:
        client.revoke_client(key_id)
    out.print(f"client key {key_id} revoked")


# ---- the pool: head and donors -----------------------------------------------------------------------

DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", help="this machine's RMA data dir")]


def _data_dir(data_dir: Path | None) -> Path:
    return data_dir or settings().data_dir


def _say(message: str) -> None:
    out.print(message, highlight=False)


def _store_list(value: str) -> tuple[str, ...]:
    from rma_ray.head import STORE_NAMES

    names = tuple(s.strip() for s in value.split(",") if s.strip() and s.strip() != "none")
    unknown = [n for n in names if n not in STORE_NAMES]
    if unknown:
        fail(f"--stores: unknown store {', '.join(unknown)}; choose from {', '.join(STORE_NAMES)} or 'none'")
    return names


def _app_list(value: str) -> tuple[str, ...]:
    from rma_ray.head import APP_NAMES

    names = tuple(s.strip() for s in value.split(",") if s.strip() and s.strip() != "none")
    unknown = [n for n in names if n not in APP_NAMES]
    if unknown:
        fail(f"--apps: unknown app {', '.join(unknown)}; choose from {', '.join(APP_NAMES)} or 'none'")
    return names


def _store_ports(items: list[str]) -> dict[str, int]:
    from rma_ray.head import STORE_NAMES

    ports = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in STORE_NAMES or not value.isdigit() or not 0 < int(value) < 65536:
            fail(f"--store-port {item!r}: use STORE=PORT, e.g. postgres=5441 (stores: {', '.join(STORE_NAMES)})")
        ports[name] = int(value)
    return ports


@app.command("up")
def up(
    node_ip_address: Annotated[str | None, typer.Option("--node-ip-address",
                                                        help="address donors reach this head on")] = None,
    coordinator_host: Annotated[str | None, typer.Option(help="bind the coordinator here (default: node IP)")] = None,
    coordinator_port: Annotated[int, typer.Option(min=1, max=65535)] = 8470,
    gcs_port: Annotated[int, typer.Option(help="Ray GCS port (6379 is Redis's too)", min=1, max=65535)] = 6380,
    dashboard_port: Annotated[int, typer.Option(min=1, max=65535)] = 8265,
    serve_port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    head_cpus: Annotated[float | None, typer.Option(help="CPUs the head offers to Ray work")] = None,
    heartbeat_interval: Annotated[int, typer.Option(help="donor heartbeat interval, seconds", min=1)] = 3,
    overlay: Annotated[bool, typer.Option("--overlay/--no-overlay",
                                          help="run a WireGuard hub: donors behind NAT join through it, Ray talks "
                                               "only over it, revocation cuts a donor off at once (root)")] = False,
    overlay_port: Annotated[int, typer.Option(help="the hub's UDP port (open it to donors)", min=1,
                                              max=65535)] = 51820,
    overlay_subnet: Annotated[str, typer.Option(help="overlay addresses (hub takes the first)")] = "10.88.0.0/16",
    overlay_interface: Annotated[str, typer.Option(help="the hub's interface name")] = "rma-hub",
    stores: Annotated[str, typer.Option(help="data stores to start, comma-separated, or 'none'")]
    = "redis,postgres,chroma,graph",
    store_runtime: Annotated[str, typer.Option(help="process (the stores' own binaries) or docker")] = "process",
    apps: Annotated[str, typer.Option(help="Serve apps to deploy, comma-separated (llm, embeddings, services, "
                                           "vision), or 'none'")]
    = "llm,embeddings,services,vision",
    store_port: Annotated[list[str] | None, typer.Option(help="STORE=PORT instead of the store's default port "
                                                          "(repeatable), e.g. postgres=5441")] = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Start the pool on this machine (Ray head, Serve, coordinator) and supervise it until Ctrl-C."""
    from rma_ray.net import local_ip_towards
    from rma_ray.head import Pool, UpError, UpOptions

    ip = node_ip_address or local_ip_towards("192.0.2.1")
    if store_runtime not in ("process", "docker"):
        fail(f"--store-runtime {store_runtime!r}: use 'process' or 'docker'")
    opts = UpOptions(data_dir=_data_dir(data_dir), node_ip=ip, coordinator_host=coordinator_host or ip,
                     coordinator_port=coordinator_port, gcs_port=gcs_port, dashboard_port=dashboard_port,
                     serve_port=serve_port, head_cpus=head_cpus, heartbeat_interval_s=heartbeat_interval,
                     overlay=overlay, overlay_port=overlay_port, overlay_subnet=overlay_subnet,
                     overlay_interface=overlay_interface, stores=_store_list(stores), store_runtime=store_runtime,
                     store_ports=_store_ports(store_port or []), apps=_app_list(apps))
    if overlay:
        import ipaddress

        try:
            net = ipaddress.ip_network(overlay_subnet)
        except ValueError:
            fail(f"--overlay-subnet {overlay_subnet!r} is not a network; use e.g. 10.88.0.0/16")
        if not net.is_private or net.version != 4 or net.prefixlen > 28:
            fail(f"--overlay-subnet {overlay_subnet}: use a private IPv4 network of /28 or larger")
    pool = Pool(opts, _say)

    def stop(signum: int, _frame: object) -> None:
        pool.stop_event.set()

    import signal as _signal

    _signal.signal(_signal.SIGINT, stop)
    _signal.signal(_signal.SIGTERM, stop)
    _signal.signal(_signal.SIGHUP, lambda *_: pool.rotate_event.set())
    try:
        info = pool.up()
    except UpError as exc:
        pool.down()
        fail(str(exc))
    out.print("[bold green]RMA Pool is up[/]")
    for key, label in (("coordinator_url", "coordinator"), ("registry_url", "registry page"),
                       ("serve_url", "Serve (clients)"), ("ray_dashboard_url", "Ray dashboard")):
        out.print(f"  {label:<16} {info[key]}")
    if info["first_start"]:
        out.print(f"  [bold yellow]admin key (first start; kept 0600 in pool.json):[/] {info['admin_key']}")
    out.print(f"  join token (1 use, expires {info['join_token_expires_at']}): {info['join_token']}")
    out.print(f"  on a donor: rma join {info['coordinator_url']} --token <join token>")
    out.print(f"  details for scripts: {opts.data_dir / 'pool.json'}   stop with Ctrl-C or `rma down`")
    clean = False
    try:
        clean = pool.supervise()
    finally:
        out.print("stopping the pool …")
        pool.down()
        out.print("pool stopped")
    if not clean:
        raise typer.Exit(1)  # the pool ended by itself: a service manager's Restart=on-failure brings it back


@app.command("down")
def down(data_dir: DataDirOpt = None) -> None:
    """Stop the pool that `rma up` started from this data dir."""
    from rma_ray.head import UpError, signal_down

    try:
        out.print(signal_down(_data_dir(data_dir)))
    except UpError as exc:
        fail(str(exc))


@app.command("rotate-cluster-token")
def rotate_cluster_token(data_dir: DataDirOpt = None) -> None:
    """Give the pool a new Ray cluster token: the head restarts with it, live donors fetch it with their node
    token and rejoin, revoked donors are locked out (their copy of the old token is worthless)."""
    from rma_ray.head import UpError, signal_rotate

    try:
        out.print(signal_rotate(_data_dir(data_dir)))
    except UpError as exc:
        fail(str(exc))


def _read_caps_file(path: Path) -> capabilities.Capabilities:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        fail(f"cannot read capabilities from {path}: {exc}")
    try:
        if isinstance(raw, dict) and ({"psutil", "psutil_equivalent", "nvml"} & raw.keys()):
            return capabilities.from_readings(raw)
        return capabilities.Capabilities.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        fail(f"capabilities in {path}: {'.'.join(map(str, first['loc'])) or 'file'}: {first['msg']}")
    except (KeyError, TypeError, ValueError) as exc:
        fail(f"capabilities in {path}: not a probe reading ({exc!r}); `rma probe` prints one")


@app.command("join")
def join(
    coordinator_url: Annotated[str, typer.Argument(help="the pool's coordinator, e.g. https://pool.example.org")],
    token: Annotated[str | None, typer.Option(envvar="RMA_JOIN_TOKEN",
                                              help="the join token from the admin (first join only)")] = None,
    token_file: Annotated[Path | None, typer.Option(help="file holding the join token")] = None,
    name: Annotated[str | None, typer.Option(help="how this machine shows in the registry")] = None,
    cpus: Annotated[float | None, typer.Option(help="most CPUs Ray may use here", min=1)] = None,
    memory: Annotated[str | None, typer.Option(help="most memory Ray may use here, e.g. 8GB")] = None,
    gpus: Annotated[int | None, typer.Option(help="most GPUs Ray may use here", min=0)] = None,
    node_ip_address: Annotated[str | None, typer.Option(
        "--node-ip-address", help="address Ray advertises (default: the overlay address, or the one towards "
                                  "the head in a pool without an overlay)")] = None,
    drain_deadline: Annotated[float, typer.Option(help="seconds to drain work when leaving", min=0)] = 30,
    capabilities_file: Annotated[Path | None, typer.Option(help="send these capabilities instead of probing")] = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Donate this machine: register, start a Ray worker node in the assigned tier, stay until Ctrl-C.

    After a reboot or a restart (SIGTERM) it rejoins as the same donor; the join token is needed only once."""
    from rma_ray.agent import Agent, AgentError, JoinOptions

    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            fail(f"cannot read {token_file}: {exc.strerror}")
    if not coordinator_url.startswith(("http://", "https://")):
        fail(f"coordinator URL must start with http:// or https:// (got {coordinator_url!r})")
    memory_bytes = None
    if memory is not None:
        try:
            memory_bytes = capabilities._BYTES.validate_python(memory)
        except ValidationError:
            fail(f"cannot read the memory size {memory!r}; use e.g. 8GB or 512MiB")
    d = _data_dir(data_dir)
    caps = _read_caps_file(capabilities_file) if capabilities_file else capabilities.probe(d if d.exists() else "/")
    import socket as _socket

    opts = JoinOptions(coordinator_url=coordinator_url.rstrip("/"), join_token=token or None, data_dir=d,
                       name=name or _socket.gethostname(), capabilities=caps, node_ip=node_ip_address, cpus=cpus,
                       memory_bytes=memory_bytes, gpus=gpus, drain_deadline_s=drain_deadline)
    _say(f"probed: {caps.cpu_cores} cores, {caps.ram_mb} MiB RAM, {caps.disk_free_gb:g} GiB free disk, "
         f"{len(caps.gpus)} GPU(s)"
         + (f", Ollama at {caps.ollama.url} with vision models {', '.join(caps.ollama.vision_models) or 'none'}"
            if caps.ollama else ""))
    try:
        agent = Agent.join(opts, _say)
    except AgentError as exc:
        fail(str(exc))
    agent.install_signal_handlers()
    _say(f"in the pool; heartbeating every {agent.m.heartbeat_interval_s} s. Ctrl-C or `rma leave` to leave.")
    code = agent.run()
    if code:
        sys.exit(code)


@app.command("leave")
def leave(data_dir: DataDirOpt = None,
          timeout: Annotated[float, typer.Option(help="seconds to wait for the agent")] = 120) -> None:
    """Leave the pool: the running `rma join` drains, unregisters and stops its Ray node."""
    import signal as _signal

    import psutil

    from rma_ray import membership
    from rma_ray.client import AdmissionClient

    d = _data_dir(data_dir)
    m = membership.load(d)
    if m is None:
        fail(f"this machine is not in a pool (no {membership.path(d)})")
    if membership.alive(m.agent_pid, m.agent_started):
        agent = psutil.Process(m.agent_pid)
        agent.send_signal(_signal.SIGINT)  # a leave, like Ctrl-C (SIGTERM would keep the membership)
        try:
            agent.wait(timeout)
        except psutil.TimeoutExpired:
            fail(f"the agent (pid {m.agent_pid}) did not finish leaving within {timeout:.0f} s")
        out.print(f"left the pool (donor {m.worker_id})")
        return
    # the agent is gone (killed): unregister and stop what it left behind ourselves
    from rma_ray.raynode import stop_process_tree

    if m.ray_pid:
        stop_process_tree(m.ray_pid)
    ov = (m.extra or {}).get("overlay")
    if ov:  # the agent's overlay interface and firewall outlive it; its wireguard-go exits with the interface
        from rma_ray import overlay as wg

        wg.Firewall(ov["interface"], []).remove()
        wg.Interface(ov["interface"], "", d / "overlay" / "private.key").down()
        (d / "overlay" / "private.key").unlink(missing_ok=True)
    with AdmissionClient(m.coordinator_url) as client:
        try:
            client.unregister(m.node_token)
        except AdmissionError as exc:
            if exc.code != "worker_revoked":
                err.print(f"[yellow]could not unregister:[/] {exc}")
    membership.clear(d)
    out.print(f"left the pool (donor {m.worker_id}; its agent was not running)")


@app.command("status")
def status(data_dir: DataDirOpt = None, as_json: JsonOpt = False) -> None:
    """This machine's membership: donor id, tier, labels, agent and Ray node, and what the coordinator says."""
    from rma_ray import membership
    from rma_ray.client import AdmissionClient

    d = _data_dir(data_dir)
    m = membership.load(d)
    if m is None:
        fail(f"this machine is not in a pool (no {membership.path(d)}); join with `rma join URL --token T`")
    view: dict[str, Any] = {"worker_id": m.worker_id, "tier": m.tier, "trusted": m.trusted, "labels": m.labels,
                            "coordinator_url": m.coordinator_url, "node_ip": m.node_ip,
                            "ray_address": m.ray_address, "ray_node_id": m.ray_node_id,
                            "agent_running": membership.alive(m.agent_pid, m.agent_started),
                            "ray_node_running": membership.alive(m.ray_pid,
                                                                 (m.extra or {}).get("ray_started"))}
    ov = (m.extra or {}).get("overlay")
    if ov:
        import time as _time

        from rma_ray import overlay as wg

        try:
            shake = max((p.latest_handshake for p in wg.peers_of(ov["interface"])), default=0)
            view["overlay"] = {"address": ov["address"], "interface": ov["interface"],
                               "last_handshake_s": round(_time.time() - shake) if shake else None}
        except wg.OverlayError as exc:
            view["overlay"] = {"address": ov["address"], "interface": ov["interface"], "error": str(exc)}
    with AdmissionClient(m.coordinator_url, m.node_token, timeout=5) as client:
        try:
            me = client.request("GET", "/api/worker/me")
            view.update(registry_status=me["status"], action=me["action"], last_seen_at=me["last_seen_at"])
        except AdmissionError as exc:
            view["registry_status"] = f"unknown ({exc})"
    if as_json:
        return _print_json(view)
    for k, v in view.items():
        out.print(Text.assemble(f"{k:<16} ", shown(v)), highlight=False)


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
    except (CliError, AdmissionError) as exc:  # may quote what a donor or the server sent: shown literally
        err.print(Text.assemble(("error:", "red"), " ", shown(exc)), highlight=False)
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
