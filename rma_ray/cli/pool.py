"""The head machine's commands: `rma up` (rma_ray/head.py starts and supervises the pool), `rma down` and
`rma rotate-cluster-token`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from rma_ray.cli.common import DataDirOpt, data_dir_of, fail, out, say

if TYPE_CHECKING:
    from rma_ray.edges import EdgeSpec
from rma_ray.settings import check_overlay_subnet

commands = typer.Typer()  # merged into the root `rma` app by rma_ray/cli/__init__.py


def _name_list(value: str, known: tuple[str, ...], option: str, what: str) -> tuple[str, ...]:
    """A comma-separated choice of `known` names, or 'none'."""
    names = tuple(s.strip() for s in value.split(",") if s.strip() and s.strip() != "none")
    unknown = [n for n in names if n not in known]
    if unknown:
        fail(f"{option}: unknown {what} {', '.join(unknown)}; choose from {', '.join(known)} or 'none'")
    return names


def _store_list(value: str) -> tuple[str, ...]:
    from rma_ray.poolinfo import STORE_NAMES

    return _name_list(value, STORE_NAMES, "--stores", "store")


def _app_list(value: str) -> tuple[str, ...]:
    from rma_ray.poolinfo import APP_NAMES

    return _name_list(value, APP_NAMES, "--apps", "app")


def _edge_app_list(value: str | None, apps: tuple[str, ...]) -> tuple[str, ...] | None:
    """--edge-apps: edge apps (rma_ray.edges.EDGE_APPS), or None (those of --apps). An edge app takes over
    routes of a core app, whose replicas serve what the edge cannot: that core app must run too."""
    from rma_ray.edges import EDGE_APP_CORE, EDGE_APPS

    if value is None:
        return None
    names = _name_list(value, EDGE_APPS, "--edge-apps", "edge app")
    missing = [n for n in names if EDGE_APP_CORE[n] not in apps]
    if missing:
        fail(
            f"--edge-apps {missing[0]}: the core serves its requests when the edge cannot, so --apps must "
            f"name {EDGE_APP_CORE[missing[0]]} too"
        )
    return names


def _store_ports(items: list[str]) -> dict[str, int]:
    from rma_ray.poolinfo import STORE_NAMES

    ports = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in STORE_NAMES or not value.isdigit() or not 0 < int(value) < 65536:
            fail(
                f"--store-port {item!r}: use STORE=PORT, e.g. postgres=5441 "
                f"(stores: {', '.join(STORE_NAMES)})"
            )
        ports[name] = int(value)
    return ports


def _edges(names: list[str], overlay_port: int = 51820) -> tuple[EdgeSpec, ...]:
    """One EdgeSpec per --edge-name: the first on the default ports and overlay subnet, each next one moved up
    (ports by EdgePorts.shifted, subnet by one /16); each edge's overlay hub on the UDP port after the one
    before (the core's hub on `overlay_port`)."""
    import ipaddress

    from rma_ray.edges import EdgePorts, EdgeSpec, valid_name

    for name in names:
        if not valid_name(name):
            fail(f"--edge-name {name!r}: use a-z, 0-9 and '-' (a letter first, up to 16), not 'core'")
    if len(set(names)) != len(names):
        fail("--edge-name: each edge needs a name of its own")
    base = ipaddress.ip_network(EdgeSpec().overlay_subnet)
    return tuple(
        EdgeSpec(
            name=name,
            ports=EdgePorts().shifted(i),
            overlay_subnet=str(ipaddress.ip_network((int(base.network_address) + i * 2**16, base.prefixlen))),
            overlay_port=overlay_port + 1 + i,
        )
        for i, name in enumerate(names)
    )


def _overlapping_edge(core_subnet: str, edges: tuple[EdgeSpec, ...]) -> EdgeSpec | None:
    """The first edge whose overlay subnet overlaps the core's (each cluster's donors get a subnet apart)."""
    import ipaddress

    core = ipaddress.ip_network(core_subnet, strict=False)
    return next((e for e in edges if ipaddress.ip_network(e.overlay_subnet).overlaps(core)), None)


@commands.command("up")
def up(
    node_ip_address: Annotated[
        str | None, typer.Option("--node-ip-address", help="address donors reach this head on")
    ] = None,
    coordinator_host: Annotated[
        str | None, typer.Option(help="bind the coordinator here (default: node IP)")
    ] = None,
    coordinator_port: Annotated[int, typer.Option(min=1, max=65535)] = 8470,
    gcs_port: Annotated[
        int, typer.Option(help="Ray GCS port (6379 is Redis's too)", min=1, max=65535)
    ] = 6380,
    dashboard_port: Annotated[int, typer.Option(min=1, max=65535)] = 8265,
    serve_port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    head_cpus: Annotated[float | None, typer.Option(help="CPUs the head offers to Ray work")] = None,
    heartbeat_interval: Annotated[int, typer.Option(help="donor heartbeat interval, seconds", min=1)] = 3,
    overlay: Annotated[
        bool,
        typer.Option(
            "--overlay/--no-overlay",
            help="run a WireGuard hub: donors behind NAT join through it, Ray talks "
            "only over it, revocation cuts a donor off at once (root)",
        ),
    ] = False,
    overlay_port: Annotated[
        int, typer.Option(help="the hub's UDP port (open it to donors)", min=1, max=65535)
    ] = 51820,
    overlay_subnet: Annotated[
        str, typer.Option(help="overlay addresses (hub takes the first)")
    ] = "10.88.0.0/16",
    overlay_interface: Annotated[str, typer.Option(help="the hub's interface name")] = "rma-hub",
    stores: Annotated[
        str, typer.Option(help="data stores to start, comma-separated, or 'none'")
    ] = "redis,postgres,chroma,graph",
    store_runtime: Annotated[
        str, typer.Option(help="process (the stores' own binaries) or docker")
    ] = "process",
    apps: Annotated[
        str,
        typer.Option(
            help="Serve apps to deploy, comma-separated (llm, embeddings, services, vision), or 'none'"
        ),
    ] = "llm,embeddings,services,vision",
    store_port: Annotated[
        list[str] | None,
        typer.Option(help="STORE=PORT instead of the store's default port (repeatable), e.g. postgres=5441"),
    ] = None,
    edge: Annotated[
        bool | None,
        typer.Option(
            "--edge/--no-edge",
            help="start an edge cluster beside the core head for untrusted donors: its own Ray head, run as "
            "its own system user (rma-edge; rma-edge-NAME for another --edge-name) with its own token "
            "and ports (root); with --overlay also its own hub, subnet (10.89.0.0/16) and firewall; "
            "--no-edge: one cluster. Default: on",
            show_default=False,
        ),
    ] = None,
    edge_name: Annotated[
        list[str] | None,
        typer.Option(
            help="name an edge cluster (repeatable: one edge head each, its ports 10 up from the one before; "
            "an untrusted invite chooses one with --edge NAME)",
        ),
    ] = None,
    edge_apps: Annotated[
        str | None,
        typer.Option(
            help="Serve apps each edge cluster runs, comma-separated (llm, embeddings, documents: OCR and "
            "document parsing, vision: only when named), or 'none'. Default: those of --apps (documents "
            "with services; not vision)",
            show_default=False,
        ),
    ] = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Start the pool on this machine (Ray head, Serve, coordinator) and supervise it until Ctrl-C."""
    from rma_ray import logs
    from rma_ray.edges import DEFAULT_EDGE
    from rma_ray.head import Pool, StartInterrupted, UpError, UpOptions
    from rma_ray.net import local_ip_towards

    ip = node_ip_address or local_ip_towards("192.0.2.1")
    if store_runtime not in ("process", "docker"):
        fail(f"--store-runtime {store_runtime!r}: use 'process' or 'docker'")
    opts = UpOptions(
        data_dir=data_dir_of(data_dir),
        node_ip=ip,
        coordinator_host=coordinator_host or ip,
        coordinator_port=coordinator_port,
        gcs_port=gcs_port,
        dashboard_port=dashboard_port,
        serve_port=serve_port,
        head_cpus=head_cpus,
        heartbeat_interval_s=heartbeat_interval,
        overlay=overlay,
        overlay_port=overlay_port,
        overlay_subnet=overlay_subnet,
        overlay_interface=overlay_interface,
        stores=_store_list(stores),
        store_runtime=store_runtime,
        store_ports=_store_ports(store_port or []),
        apps=_app_list(apps),
        edge_apps=_edge_app_list(edge_apps, _app_list(apps)),
        # with --overlay each edge gets its own hub, subnet and firewall (rma_ray.overlay.edge_hub)
        edges=_edges(edge_name or [DEFAULT_EDGE], overlay_port) if edge is not False else (),
    )
    if overlay:
        try:
            check_overlay_subnet(overlay_subnet)
        except ValueError as exc:
            fail(f"--overlay-subnet {exc}")
        clash = _overlapping_edge(overlay_subnet, opts.edges)
        if clash:
            fail(
                f"--overlay-subnet {overlay_subnet} overlaps the subnet {clash.overlay_subnet} of the edge "
                f"{clash.name!r} (each edge's donors get a subnet of their own); choose one outside it"
            )
    logs.configure("up")
    pool = Pool(opts, say)

    def stop(signum: int, _frame: object) -> None:
        pool.interrupt()

    import signal as _signal

    _signal.signal(_signal.SIGINT, stop)
    _signal.signal(_signal.SIGTERM, stop)
    _signal.signal(_signal.SIGHUP, lambda *_: pool.rotate_event.set())
    try:
        info = pool.up()
    except StartInterrupted as exc:
        out.print(f"[yellow]{exc}[/]")
        pool.down()
        out.print("pool stopped")
        raise typer.Exit(1) from None  # the start did not finish: not a pool that ran and stopped
    except UpError as exc:
        pool.down()
        fail(str(exc))
    except Exception as exc:  # anything else: the hubs, tables and processes started so far go too
        import logging

        logging.getLogger("rma.up").exception("rma up failed")  # the traceback to the log, not the terminal
        pool.down()
        fail(f"rma up failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300])
    out.print("[bold green]RMA Pool is up[/]")
    for key, label in (
        ("coordinator_url", "coordinator"),
        ("registry_url", "registry page"),
        ("serve_url", "Serve (clients)"),
        ("ray_dashboard_url", "Ray dashboard"),
    ):
        out.print(f"  {label:<16} {info[key]}")
    for name, e in (info.get("edges") or {}).items():
        if e.get("head_pid"):
            state = "running"
        elif e.get("error"):
            state = f"not running ({e['error']})"
        else:  # started after the core's apps, beside the supervision (Pool.up): `rma status` says when it runs
            state = "starting (its head, Serve and apps come up now; `rma status` shows it)"
        out.print(
            f"  edge {name:<11} Ray {e['ray_address']}, Serve {e['serve_url']}, as {e['user']}: {state}"
        )
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


@commands.command("down")
def down(data_dir: DataDirOpt = None) -> None:
    """Stop the pool that `rma up` started from this data dir."""
    from rma_ray.head import UpError, signal_down

    try:
        out.print(signal_down(data_dir_of(data_dir)))
    except UpError as exc:
        fail(str(exc))


@commands.command("rotate-cluster-token")
def rotate_cluster_token(
    edge: Annotated[
        str | None,
        typer.Option(
            "--edge",
            help="rotate only this edge cluster's token: its head restarts, the core's head, Serve apps and "
            "stores keep running",
        ),
    ] = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Give the pool a new Ray cluster token: the head restarts with it, live donors fetch it with their node
    token and rejoin, revoked donors are locked out (their copy of the old token is worthless)."""
    from rma_ray.head import UpError, signal_rotate

    try:
        out.print(signal_rotate(data_dir_of(data_dir), edge=edge))
    except UpError as exc:
        fail(str(exc))
