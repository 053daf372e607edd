"""The pool's WireGuard overlay: a hub on the head, one spoke per donor, and the firewall that keeps Ray's ports
off every address but the overlay's.

Why: a donor behind a home NAT accepts no inbound connection, yet Ray needs the head to reach every raylet; and
Ray's cluster token is one shared secret, so cutting one donor off must happen below Ray. Each donor dials out to
the hub (keepalive keeps its NAT mapping open), Ray advertises the overlay address, and removing a donor's peer
on the hub cuts it off at once. Donor-to-donor traffic goes through the hub (allowed-ips on a spoke is the whole
overlay subnet; on the hub, each peer's one /32).

Tools, not a home-made tunnel: `wg` (wireguard-tools) configures the interface; the kernel's WireGuard is used
where `ip link add ... type wireguard` works, `wireguard-go` (userspace) otherwise; `ip` sets addresses;
`nft` (nftables) holds the firewall. Keys are X25519 from the `cryptography` package. A private key is written
0600 where it is made and reaches `wg` as a file path, never a command line or a log.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from rma_ray.membership import write_private

DEFAULT_SUBNET = "10.88.0.0/16"
DEFAULT_PORT = 51820
KEEPALIVE_S = 25  # under the 30 s most NATs keep an idle UDP mapping
MTU = 1280  # donors sit on unknown uplinks: 1420 only works where the path MTU allows it (DESIGN.md)
WG_SOCKET_DIR = Path("/var/run/wireguard")
NFT_TABLE = "rma_overlay"


class OverlayError(Exception):
    """The overlay could not be set up or changed: one line for a person."""


# ---- keys -----------------------------------------------------------------------------------------------


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def public_key_of(private_b64: str) -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    key = X25519PrivateKey.from_private_bytes(base64.b64decode(private_b64))
    return _b64(key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def is_key(text: str) -> bool:
    """A WireGuard key as `wg` writes it: base64 of exactly 32 bytes."""
    try:
        return len(text) == 44 and len(base64.b64decode(text, validate=True)) == 32
    except (ValueError, TypeError):
        return False


def load_or_create_key(path: Path) -> str:
    """The private key in `path` (created 0600 if absent); returns the public key. The private key stays put."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    if not path.exists():
        raw = X25519PrivateKey.generate().private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        write_private(path, _b64(raw) + "\n")
    if path.stat().st_mode & 0o077:
        raise OverlayError(f"{path} is readable by others; it must be mode 0600")
    return public_key_of(path.read_text().strip())


# ---- addresses ------------------------------------------------------------------------------------------


def hub_address(subnet: str) -> str:
    """The hub holds the first host address of the overlay subnet."""
    return str(next(ipaddress.ip_network(subnet).hosts()))


def next_free(subnet: str, taken: Iterable[str]) -> str:
    """The lowest host address of the subnet that is neither the hub's nor taken."""
    net = ipaddress.ip_network(subnet)
    used = {ipaddress.ip_address(a) for a in taken} | {ipaddress.ip_address(hub_address(subnet))}
    for addr in net.hosts():
        if addr not in used:
            return str(addr)
    raise OverlayError(
        f"the overlay subnet {subnet} is full ({net.num_addresses - 2} addresses); "
        f"set RMA_OVERLAY_SUBNET to a larger one"
    )


def interface_name(key: str, prefix: str = "rma") -> str:
    """A per-machine unique interface name within Linux's 15 characters (wireguard-go's control socket lives
    in /var/run/wireguard/<name>.sock, which every network namespace on a machine shares)."""
    name = f"{prefix}{key}"[:15]
    if not all(c.isalnum() or c in "-_" for c in name):
        raise OverlayError(f"bad interface name {name!r}")
    return name


# ---- Ray's ports ----------------------------------------------------------------------------------------


# Serve's direct-ingress ports (HAProxy mode, rma_ray.serve_admin): the controller gives each ingress replica an
# HTTP port from the first range on the replica's node, and a gRPC port from the second where gRPC is on. These
# are Ray 2.60's defaults, pinned in the controller's environment (serve_admin.proxy_env) so that a donor's
# firewall covers them from the start: `Firewall.cover` would add a replica's port on the agent's next pass only,
# and until then the replica answered on the donor's LAN address (a rehearsal saw it).
SERVE_INGRESS_HTTP_PORTS = (30000, 31000)
SERVE_INGRESS_GRPC_PORTS = (40000, 41000)


def serve_ingress_env() -> dict[str, str]:
    """The Serve controller's environment that keeps its direct-ingress ports in the ranges above."""
    (http_lo, http_hi), (grpc_lo, grpc_hi) = SERVE_INGRESS_HTTP_PORTS, SERVE_INGRESS_GRPC_PORTS
    return {
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(http_lo),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(http_hi),
        "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(grpc_lo),
        "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(grpc_hi),
    }


@dataclass(frozen=True)
class RayPorts:
    """Every port Ray listens on, pinned, so the firewall can name them all. Ray would otherwise pick random
    ones for most of them (raylet, object manager, agents, metrics)."""

    node_manager: int = 6391
    object_manager: int = 6392
    metrics_export: int = 6393
    dashboard_agent_grpc: int = 6394
    runtime_env_agent: int = 6395
    dashboard_agent_listen: int = 52365
    min_worker: int = 10002
    max_worker: int = 19999
    ray_client: int = 10001  # head only

    def argv(self, head: bool) -> list[str]:
        args = [
            "--node-manager-port",
            str(self.node_manager),
            "--object-manager-port",
            str(self.object_manager),
            "--metrics-export-port",
            str(self.metrics_export),
            "--dashboard-agent-grpc-port",
            str(self.dashboard_agent_grpc),
            "--dashboard-agent-listen-port",
            str(self.dashboard_agent_listen),
            "--runtime-env-agent-port",
            str(self.runtime_env_agent),
            "--min-worker-port",
            str(self.min_worker),
            "--max-worker-port",
            str(self.max_worker),
        ]
        if head:
            args += ["--ray-client-server-port", str(self.ray_client)]
        return args

    def firewalled(self, extra: Iterable[int] = (), serve: bool = False) -> list[str]:
        """nft set elements: single ports and ranges (an interval set refuses overlapping elements, so ranges
        that touch are merged and a single port inside a range is left to it). `serve`: Serve's direct-ingress
        ranges too (a donor, where ingress replicas run; the head's own replicas are covered by its agent loop)."""
        ranges = [(self.min_worker, self.max_worker)]
        if serve:
            ranges += [SERVE_INGRESS_HTTP_PORTS, SERVE_INGRESS_GRPC_PORTS]
        merged: list[tuple[int, int]] = []
        for lo, hi in sorted(ranges):
            if merged and lo <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
            else:
                merged.append((lo, hi))
        singles = sorted(
            {
                self.node_manager,
                self.object_manager,
                self.metrics_export,
                self.dashboard_agent_grpc,
                self.runtime_env_agent,
                self.dashboard_agent_listen,
                self.ray_client,
                *extra,
            }
        )
        singles = [p for p in singles if not any(lo <= p <= hi for lo, hi in merged)]
        return [str(p) for p in singles] + [f"{lo}-{hi}" for lo, hi in merged]


def render_firewall(
    interface: str,
    elements: list[str],
    table: str = NFT_TABLE,
    isolate: bool = False,
    also_from: Iterable[str] = (),
    no_reach: Iterable[str] = (),
    local_deny: LocalDeny | None = None,
) -> str:
    """An nftables table that drops TCP to Ray's ports unless it arrives on the overlay interface or loopback.
    Only Ray's ports: a donor's own services (ssh, ...) are none of the pool's business.

    `isolate` (the hub): the head routes spoke to spoke, and nothing else. Without a forward chain a donor
    could send through the hub to anything the head's other interfaces reach (its LAN, a cloud's metadata
    address, Docker's bridges), and the head's networks could reach donors through it wherever the head
    forwards. Packets between the overlay and the head's other interfaces are dropped both ways; towards the
    overlay, replies to connections already made pass. What the head itself sends is output, not forwarded.

    An edge's hub (`edge_hub`) adds two things. `also_from`: the core's overlay interface may reach the edge's
    Ray ports too (the core's gateway calls the edge's Serve, the coordinator reads its dashboard). `no_reach`:
    subnets (the core's) that nothing arriving on this interface may reach on the head at all, whatever the
    port. Each hub's table only drops: nftables runs every table's chain on a packet and a drop in any is
    final, so the core's table keeps an edge donor off the core's ports and the edge's table keeps everyone but
    the core and its own donors off the edge's.

    `local_deny` (the core's hub, with edges): an output chain for what the edges' system users run on the
    head itself (an edge donor's Ray task runs on the edge head as that user), which the input chain's
    `iifname "lo" accept` would let through: see LocalDeny."""
    forward = (
        ""
        if not isolate
        else f"  chain forward {{\n"
        f"    type filter hook forward priority filter - 5; policy accept;\n"
        f'    iifname "{interface}" oifname "{interface}" accept\n'
        f'    iifname "{interface}" counter drop\n'
        f'    oifname "{interface}" ct state established,related accept\n'
        f'    oifname "{interface}" counter drop\n'
        f"  }}\n"
    )
    denied = "".join(
        f'    iifname "{interface}" {_family(net)} daddr {net} counter drop\n' for net in no_reach
    )
    trusted = "".join(f'    iifname "{other}" accept\n' for other in also_from)
    return (
        f"table inet {table} {{\n"
        f"  set ray_tcp {{ type inet_service; flags interval; elements = {{ {', '.join(elements)} }} }}\n"
        f"  chain input {{\n"
        f"    type filter hook input priority filter - 5; policy accept;\n"
        f'    iifname "lo" accept\n'
        f"{denied}"
        f'    iifname "{interface}" accept\n'
        f"{trusted}"
        f"    tcp dport @ray_tcp counter drop\n"
        f"  }}\n"
        f"{forward}"
        f"{local_deny.render() if local_deny and local_deny.uids else ''}"
        f"}}\n"
    )


@dataclass(frozen=True)
class LocalDeny:
    """What processes of the edges' system users (`uids`) on the head may not reach, whatever the address
    (loopback, the head's own, the core hub's): new TCP connections to the core's Ray ports (the table's
    `ray_tcp` set, kept current by Firewall.cover) and to `tcp` (the stores' ports), and anything new to the
    `nets` (the core's overlay subnet). `allow_tcp` (the coordinator's HTTP port: an edge's ingress fetches the
    coordinator's public keys) passes first. Replies of the edge's own sockets (the core's gateway calling the
    edge's Serve) are established connections and pass.

    `local_only` (EdgeGuard, no overlay): the Ray ports' rule matches local destinations only (`fib daddr type
    local`: loopback and every address of the head), so the edge head still reaches its own donors on other
    machines on any Ray port; the stores' ports are refused on any address (a store on a data donor accepts
    the head's address)."""

    uids: tuple[int, ...]
    tcp: tuple[int, ...] = ()
    nets: tuple[str, ...] = ()
    allow_tcp: tuple[int, ...] = ()
    local_only: bool = False

    def render(self) -> str:
        who = f"meta skuid {{ {', '.join(str(u) for u in sorted(set(self.uids)))} }}"
        lines = [
            "  chain output {\n",
            "    type filter hook output priority filter - 5; policy accept;\n",
            "    ct state established,related accept\n",
        ]
        if self.allow_tcp:
            ports = ", ".join(str(p) for p in sorted(set(self.allow_tcp)))
            lines.append(f"    {who} tcp dport {{ {ports} }} accept\n")
        where = f"{who} fib daddr type local" if self.local_only else who
        lines.append(f"    {where} tcp dport @ray_tcp counter reject with tcp reset\n")
        if self.tcp:  # the stores' ports on any address: a store on a data donor trusts the head's address
            ports = ", ".join(str(p) for p in sorted(set(self.tcp)))
            lines.append(f"    {who} tcp dport {{ {ports} }} counter reject with tcp reset\n")
        lines += [f"    {who} {_family(net)} daddr {net} counter reject\n" for net in self.nets]
        lines.append("  }\n")
        return "".join(lines)


def _family(net: str) -> str:
    return "ip" if ipaddress.ip_network(net).version == 4 else "ip6"


def _run(argv: list[str], what: str, input: str | None = None, timeout: float = 20) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, input=input, timeout=timeout)
    except FileNotFoundError:
        raise OverlayError(
            f"{what}: `{argv[0]}` is not installed (Debian: wireguard-tools, wireguard-go, "
            f"nftables, iproute2)"
        ) from None
    except subprocess.TimeoutExpired:
        raise OverlayError(f"{what}: `{argv[0]}` did not finish in {timeout:.0f} s") from None
    if r.returncode != 0:
        lines = (r.stderr or r.stdout).strip().splitlines()
        raise OverlayError(f"{what}: {lines[-1] if lines else 'failed'}"[:300])
    return r.stdout


def listening_ports(pids: Iterable[int], loopback: bool = False) -> set[int]:
    """TCP ports these processes listen on, on any address but loopback (the input chains accept loopback);
    with `loopback`, on loopback too (an output chain, EdgeGuard, sees what local users connect to). One scan of
    the machine's sockets (the supervisor asks every 2 s for dozens of Ray processes: one /proc/net/tcp parse
    per process would be dozens); per process where that scan may not see other processes' owners."""
    wanted = set(pids)
    if not wanted:
        return set()
    try:
        conns = [c for c in psutil.net_connections(kind="tcp") if c.pid in wanted]
    except psutil.Error:
        conns = []
        for pid in wanted:
            try:
                conns += psutil.Process(pid).net_connections(kind="tcp")
            except psutil.Error:
                continue
    return {
        c.laddr.port
        for c in conns
        if c.status == psutil.CONN_LISTEN
        and c.laddr
        and (loopback or (not c.laddr.ip.startswith("127.") and c.laddr.ip != "::1"))
    }


@dataclass
class Firewall:
    """Ray's pinned ports from the start; `cover()` adds any port a Ray process opened at random (the
    autoscaler monitor, the dashboard's gRPC server), except the ones meant for the public (`allow`)."""

    interface: str
    elements: list[str]
    table: str = NFT_TABLE
    allow: set[int] = field(default_factory=set)
    isolate: bool = False  # the hub: forward spoke to spoke only (render_firewall)
    also_from: tuple[str, ...] = ()  # an edge's hub: the core's interface reaches the edge's ports too
    no_reach: tuple[str, ...] = ()  # an edge's hub: subnets (the core's) its donors never reach
    local_deny: LocalDeny | None = None  # the core's hub with edges: what the edges' users may not reach

    def render(self) -> str:
        return render_firewall(
            self.interface,
            self.elements,
            self.table,
            self.isolate,
            self.also_from,
            self.no_reach,
            self.local_deny,
        )

    def install(self) -> None:
        self.remove()
        _run(["nft", "-f", "-"], "installing the Ray firewall", input=self.render())
        self._covered: set[int] = _ports_in(self.elements)

    def cover(self, ports: Iterable[int]) -> list[int]:
        new = sorted(set(ports) - getattr(self, "_covered", set()) - self.allow)
        if new:
            _run(
                [
                    "nft",
                    "add",
                    "element",
                    "inet",
                    self.table,
                    "ray_tcp",
                    "{ " + ", ".join(map(str, new)) + " }",
                ],
                "firewalling Ray's ports",
            )
            self._covered.update(new)
        return new

    def uncover(self, ports: Iterable[int]) -> list[int]:
        """Take ports `cover()` added out of the set again (never the pinned elements)."""
        gone = sorted((set(ports) & getattr(self, "_covered", set())) - _ports_in(self.elements))
        if gone:
            _run(
                [
                    "nft",
                    "delete",
                    "element",
                    "inet",
                    self.table,
                    "ray_tcp",
                    "{ " + ", ".join(map(str, gone)) + " }",
                ],
                "unfirewalling a port",
            )
            self._covered.difference_update(gone)
        return gone

    def remove(self) -> None:
        subprocess.run(["nft", "delete", "table", "inet", self.table], capture_output=True, timeout=20)


def _ports_in(elements: Iterable[str]) -> set[int]:
    """Every port nft set elements name ("6380", "10002-19999")."""
    ports: set[int] = set()
    for e in elements:
        lo, _, hi = e.partition("-")
        ports.update(range(int(lo), int(hi or lo) + 1))
    return ports


def render_edge_guard(table: str, elements: list[str], local_deny: LocalDeny) -> str:
    """EdgeGuard's table: the core's Ray ports (`ray_tcp`) and the output chain of `local_deny` only. No input
    or forward chain: donors on the LAN reach the core head as without it."""
    return (
        f"table inet {table} {{\n"
        f"  set ray_tcp {{ type inet_service; flags interval; elements = {{ {', '.join(elements)} }} }}\n"
        f"{local_deny.render()}"
        f"}}\n"
    )


def edge_guard_table(data_dir: Path) -> str:
    """EdgeGuard's table name: one per pool (data dir) on a machine, so a pool's `rma up` replaces its own
    stale table of a crashed run and never another live pool's."""
    return f"rma_edge_guard_{hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:8]}"


@dataclass
class EdgeGuard(Firewall):
    """Without the overlay (no hub, so no hub table to hold LocalDeny): a table of its own with only the output
    chain that keeps what the edges' system users run on the head (an edge donor's Ray task) off the core's
    ports on the head's own addresses, loopback included (`local_deny.local_only`). `elements` are the core's
    Ray ports known up front, `cover()` adds what the core head's processes listen on as they appear, `allow`
    (public ports, the edge's own) is never added. Its `interface` is unused ("")."""

    def render(self) -> str:
        if self.local_deny is None or not self.local_deny.uids:
            raise OverlayError("the edge guard has no edge user to keep off the core's ports")
        return render_edge_guard(self.table, self.elements, self.local_deny)


def missing_tools() -> str | None:
    """Why this machine cannot run the overlay, or None."""
    if os.geteuid() != 0:
        return "the overlay needs root (to create a network interface and firewall rules)"
    for tool, pkg in (("wg", "wireguard-tools"), ("ip", "iproute2"), ("nft", "nftables")):
        if not shutil.which(tool):
            return f"`{tool}` is missing: apt-get install {pkg}"
    return None


# ---- interfaces -----------------------------------------------------------------------------------------


@dataclass
class Peer:
    public_key: str
    allowed_ips: list[str]
    endpoint: str | None
    latest_handshake: int
    rx_bytes: int
    tx_bytes: int


@dataclass
class Interface:
    """One WireGuard interface on this machine: kernel module where available, wireguard-go otherwise."""

    name: str
    address: str  # e.g. 10.88.0.5/16
    key_file: Path
    listen_port: int | None = None
    mtu: int = MTU
    userspace: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def up(self) -> None:
        if missing_tools():
            raise OverlayError(str(missing_tools()))
        self.down()  # a stale interface of a previous run would hold the name
        if subprocess.run(
            ["ip", "link", "add", self.name, "type", "wireguard"], capture_output=True
        ).returncode:
            self._start_userspace()
        cmd = ["wg", "set", self.name, "private-key", str(self.key_file)]
        if self.listen_port:
            cmd += ["listen-port", str(self.listen_port)]
        try:
            _run(cmd, f"configuring {self.name}")
            _run(["ip", "address", "add", self.address, "dev", self.name], f"addressing {self.name}")
            _run(["ip", "link", "set", self.name, "mtu", str(self.mtu), "up"], f"bringing {self.name} up")
        except OverlayError:
            self.down()
            raise

    def _start_userspace(self) -> None:
        exe = shutil.which("wireguard-go")
        if not exe:
            raise OverlayError(
                "no kernel WireGuard here and `wireguard-go` is missing: apt-get install wireguard-go"
            )
        env = {**os.environ, "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1", "LOG_LEVEL": "error"}
        # foreground (-f): a child we stop by PID, not a daemon we would have to hunt for
        self.userspace = subprocess.Popen(
            [exe, "-f", self.name],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        sock = WG_SOCKET_DIR / f"{self.name}.sock"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.userspace.poll() is not None:
                err = (
                    self.userspace.stderr.read().decode(errors="replace") if self.userspace.stderr else ""
                ).strip()
                raise OverlayError(
                    f"wireguard-go could not create {self.name}: {err[-200:] or 'no reason given'}"
                )
            if sock.exists() and os.path.exists(f"/sys/class/net/{self.name}"):
                return
            time.sleep(0.05)
        raise OverlayError(f"wireguard-go did not create {self.name} within 10 s")

    def down(self) -> None:
        """Delete the interface (wireguard-go exits with it) and stop our wireguard-go by PID."""
        if os.path.exists(f"/sys/class/net/{self.name}"):
            subprocess.run(["ip", "link", "del", self.name], capture_output=True, timeout=20)
        if self.userspace is not None:
            if self.userspace.poll() is None:
                self.userspace.send_signal(signal.SIGTERM)
                try:
                    self.userspace.wait(5)
                except subprocess.TimeoutExpired:
                    self.userspace.kill()
                    self.userspace.wait(5)
            self.userspace = None

    def exists(self) -> bool:
        return os.path.exists(f"/sys/class/net/{self.name}")

    def set_peer(
        self, public_key: str, allowed_ips: str, endpoint: str | None = None, keepalive_s: int | None = None
    ) -> None:
        cmd = ["wg", "set", self.name, "peer", public_key, "allowed-ips", allowed_ips]
        if endpoint:
            cmd += ["endpoint", endpoint]
        if keepalive_s:
            cmd += ["persistent-keepalive", str(keepalive_s)]
        _run(cmd, f"adding a peer to {self.name}")

    def remove_peer(self, public_key: str) -> None:
        _run(["wg", "set", self.name, "peer", public_key, "remove"], f"removing a peer from {self.name}")

    def peers(self) -> list[Peer]:
        return parse_dump(_run(["wg", "show", self.name, "dump"], f"reading {self.name}"))


def parse_dump(text: str) -> list[Peer]:
    """`wg show <if> dump`: the interface line first, then one tab-separated line per peer."""
    peers = []
    for line in text.strip().splitlines()[1:]:
        f = line.split("\t")
        if len(f) < 8:
            continue
        peers.append(
            Peer(
                public_key=f[0],
                endpoint=None if f[2] == "(none)" else f[2],
                allowed_ips=[] if f[3] == "(none)" else f[3].split(","),
                latest_handshake=int(f[4]),
                rx_bytes=int(f[5]),
                tx_bytes=int(f[6]),
            )
        )
    return peers


def set_peer(interface: str, public_key: str, allowed_ips: str) -> None:
    """Add or update a peer on an interface this process does not own (the coordinator on the head)."""
    _run(
        ["wg", "set", interface, "peer", public_key, "allowed-ips", allowed_ips],
        f"adding a peer to {interface}",
    )


def remove_peer(interface: str, public_key: str) -> None:
    _run(["wg", "set", interface, "peer", public_key, "remove"], f"removing a peer from {interface}")


def peers_of(interface: str) -> list[Peer]:
    return parse_dump(_run(["wg", "show", interface, "dump"], f"reading {interface}"))


# ---- the two ends ---------------------------------------------------------------------------------------


@dataclass
class Hub:
    """The head's end: listens on UDP `port`, holds the subnet's first address, forwards spoke to spoke."""

    data_dir: Path
    subnet: str = DEFAULT_SUBNET
    port: int = DEFAULT_PORT
    name: str = "rma-hub"
    ports: RayPorts = field(default_factory=RayPorts)
    extra_tcp: list[int] = field(default_factory=list)  # the head's own Ray ports: GCS, dashboard
    public_tcp: set[int] = field(default_factory=set)  # open to all: the coordinator, Serve's HTTP proxy
    key_name: str = "hub"  # <data dir>/overlay/<key_name>.key: an edge's hub has a key of its own
    table: str = NFT_TABLE
    also_from: tuple[str, ...] = ()  # Firewall.also_from
    no_reach: tuple[str, ...] = ()  # Firewall.no_reach
    local_deny: LocalDeny | None = None  # Firewall.local_deny

    def __post_init__(self) -> None:
        self.key_file = self.data_dir / "overlay" / f"{self.key_name}.key"
        prefix = ipaddress.ip_network(self.subnet).prefixlen
        self.address = hub_address(self.subnet)
        self.iface = Interface(self.name, f"{self.address}/{prefix}", self.key_file, listen_port=self.port)
        self.firewall = Firewall(
            self.name,
            self.ports.firewalled(self.extra_tcp),
            table=self.table,
            allow=self.public_tcp,
            isolate=True,
            also_from=self.also_from,
            no_reach=self.no_reach,
            local_deny=self.local_deny,
        )
        self.public_key = ""

    def up(self) -> None:
        # the hub key lives as long as the data dir: donors were handed it at registration
        self.public_key = load_or_create_key(self.key_file)
        self.iface.up()
        try:
            # route spoke-to-spoke packets back out of the hub; the firewall's forward chain keeps them there
            Path(f"/proc/sys/net/ipv4/conf/{self.name}/forwarding").write_text("1")
            self.firewall.install()
        except (OSError, OverlayError) as exc:
            self.down()
            raise OverlayError(f"hub set-up failed: {exc}") from None

    def down(self) -> None:
        self.firewall.remove()
        self.iface.down()


def edge_interface(core_interface: str, edge: str) -> str:
    """An edge hub's interface name, made from the core hub's (unique per pool on a machine: wireguard-go's
    sockets share one directory) and the edge's name; hashed where the two exceed Linux's 15 characters."""
    name = f"{core_interface}-{edge}"
    if len(name) > 15:
        name = f"{core_interface[:6]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return interface_name(name, prefix="")


def edge_table(edge: str) -> str:
    """The nftables table an edge's hub owns (nft names: letters, digits, '_')."""
    return f"{NFT_TABLE}_edge_{edge.replace('-', '_')}"


def edge_hub(
    data_dir: Path,
    edge: str,
    subnet: str,
    port: int,
    interface: str,
    ports: RayPorts,
    extra_tcp: Iterable[int],
    core_interface: str,
    core_subnet: str,
) -> Hub:
    """An edge cluster's own hub on the head, beside the core's (DESIGN.md, "Trust domains"): its own key,
    UDP port, interface and subnet, so edge donors get addresses and a peer here and never on the core's hub.
    Its table lets the edge's Ray ports (`ports` plus `extra_tcp`: GCS, dashboard, Serve) be reached from
    loopback, its own interface and the core's interface only, and drops anything from its donors to the
    core's subnet; forwarding is spoke to spoke within the edge (render_firewall). The core's own table keeps
    the core's Ray ports from the edge's interface like from any other."""
    return Hub(
        data_dir,
        subnet,
        port,
        interface,
        ports=ports,
        extra_tcp=list(extra_tcp),
        key_name=f"edge-{edge}",
        table=edge_table(edge),
        also_from=(core_interface,),
        no_reach=(core_subnet,),
    )


@dataclass
class Spoke:
    """A donor's end: its own key (made here, never sent), one peer (the hub), keepalive through the NAT."""

    name: str
    key_file: Path
    address: str
    prefix: int
    hub_public_key: str
    hub_endpoint: str
    hub_address: str
    keepalive_s: int = KEEPALIVE_S
    mtu: int = MTU
    ports: RayPorts = field(default_factory=RayPorts)

    def __post_init__(self) -> None:
        self.iface = Interface(self.name, f"{self.address}/{self.prefix}", self.key_file, mtu=self.mtu)
        self.firewall = Firewall(self.name, self.ports.firewalled(serve=True))

    @property
    def subnet(self) -> str:
        return str(ipaddress.ip_network(f"{self.address}/{self.prefix}", strict=False))

    def up(self, timeout: float = 30) -> None:
        self.iface.up()
        try:
            self.iface.set_peer(
                self.hub_public_key, self.subnet, endpoint=self.hub_endpoint, keepalive_s=self.keepalive_s
            )
            self.firewall.install()
            self.wait_handshake(timeout)
        except OverlayError:
            self.down()
            raise

    def wait_handshake(self, timeout: float) -> None:
        """The tunnel is up once the hub answered a handshake (the keepalive starts one at once)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.latest_handshake for p in self.iface.peers()):
                return
            time.sleep(0.1)
        raise OverlayError(
            f"no handshake with the pool's hub at {self.hub_endpoint} within {timeout:.0f} s: "
            f"is UDP to it blocked on this network?"
        )

    def down(self) -> None:
        self.firewall.remove()
        self.iface.down()
