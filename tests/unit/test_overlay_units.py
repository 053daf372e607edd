"""The overlay's pure parts: addresses, keys, the firewall and `wg` output (no Ray, no interface)."""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from rma_ray import overlay
from rma_ray.edges import EdgePorts
from rma_ray.overlay import RayPorts


def test_hub_takes_the_first_address_and_donors_the_lowest_free() -> None:
    assert overlay.hub_address("10.88.0.0/16") == "10.88.0.1"
    assert overlay.next_free("10.88.0.0/16", []) == "10.88.0.2"
    assert overlay.next_free("10.88.0.0/16", ["10.88.0.2", "10.88.0.4"]) == "10.88.0.3"
    # a released address is handed out again
    assert overlay.next_free("10.88.0.0/16", ["10.88.0.3"]) == "10.88.0.2"


def test_a_full_subnet_says_how_to_grow_it() -> None:
    taken = ["10.9.0.2", "10.9.0.3", "10.9.0.4", "10.9.0.5", "10.9.0.6"]
    assert overlay.next_free("10.9.0.0/29", taken[:-1]) == "10.9.0.6"
    with pytest.raises(overlay.OverlayError, match="RMA_OVERLAY_SUBNET"):
        overlay.next_free("10.9.0.0/29", taken)


def test_interface_names_fit_linux_limit() -> None:
    assert overlay.interface_name("0123456789abcdef") == "rma0123456789ab"
    assert len(overlay.interface_name("0123456789abcdef")) == 15
    with pytest.raises(overlay.OverlayError):
        overlay.interface_name("a b")


def test_private_key_is_made_0600_and_stays(tmp_path: Path) -> None:
    key = tmp_path / "overlay" / "private.key"
    pub = overlay.load_or_create_key(key)
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert overlay.is_key(pub) and overlay.is_key(key.read_text().strip())
    assert overlay.load_or_create_key(key) == pub  # the same key on the next start
    assert pub not in key.read_text()


def test_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "k"
    overlay.load_or_create_key(key)
    key.chmod(0o644)
    with pytest.raises(overlay.OverlayError, match="0600"):
        overlay.load_or_create_key(key)


@pytest.mark.skipif(not shutil.which("wg"), reason="wireguard-tools not installed")
def test_public_key_matches_wg_pubkey(tmp_path: Path) -> None:
    key = tmp_path / "k"
    pub = overlay.load_or_create_key(key)
    with open(key) as f:  # the private key reaches wg on stdin, as it would reach `wg set` as a file
        out = subprocess.run(
            ["wg", "pubkey"], stdin=f, capture_output=True, text=True, check=True
        ).stdout.strip()
    assert out == pub


@pytest.mark.parametrize(
    "text,ok",
    [
        (base64.b64encode(bytes(32)).decode(), True),
        (base64.b64encode(bytes(31)).decode(), False),
        ("not base64 at all, not at all, not at all!!", False),
        ("", False),
    ],
)
def test_is_key(text: str, ok: bool) -> None:
    assert overlay.is_key(text) is ok


def test_every_pinned_ray_port_is_firewalled() -> None:
    ports = RayPorts()
    argv = ports.argv(head=True)
    pinned = {int(argv[i + 1]) for i, a in enumerate(argv) if a.endswith("-port") and "worker" not in a}
    elements = ports.firewalled([6380, 8265])
    singles = {int(e) for e in elements if "-" not in e}
    lo, hi = map(int, next(e for e in elements if "-" in e).split("-"))
    assert (lo, hi) == (ports.min_worker, ports.max_worker)
    assert pinned | {6380, 8265} <= singles | set(range(lo, hi + 1))
    assert "--ray-client-server-port" not in ports.argv(head=False)


def test_a_donors_firewall_covers_serves_direct_ingress_ports_from_the_start() -> None:
    """The ranges the Serve controller is told to use (serve_admin.proxy_env) are in a donor's set at install,
    not one agent pass after a replica opens them; the head's set leaves them to its agent loop."""
    from rma_ray import serve_admin

    env = serve_admin.proxy_env(cpus=2)
    http = (
        int(env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"]),
        int(env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]),
    )
    grpc = (
        int(env["RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT"]),
        int(env["RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT"]),
    )
    spoke = overlay.Spoke(
        "rmaabc", Path("/nonexistent.key"), "10.77.0.2", 24, "k" * 43 + "=", "h:51820", "10.77.0.1"
    )
    covered = overlay._ports_in(spoke.firewall.elements)
    assert set(range(http[0], http[1] + 1)) | set(range(grpc[0], grpc[1] + 1)) <= covered
    assert not set(range(http[0], http[1] + 1)) & overlay._ports_in(RayPorts().firewalled([6380]))
    assert overlay.render_firewall("rmaabc", spoke.firewall.elements).count("30000-31000") == 1


def test_ranges_that_touch_are_one_element_and_a_port_inside_one_is_left_to_it() -> None:
    """nft refuses overlapping elements in an interval set: an edge's worker range shifted onto Serve's
    (EdgePorts.shifted) must still make a valid set."""
    ports = RayPorts(min_worker=29000, max_worker=30500, ray_client=30400)
    elements = ports.firewalled(serve=True)
    ranges = sorted(tuple(map(int, e.split("-"))) for e in elements if "-" in e)
    assert ranges == [(29000, 31000), (40000, 41000)]
    assert "30400" not in elements
    assert all(a[1] < b[0] for a, b in zip(ranges, ranges[1:], strict=False))


def test_firewall_drops_only_ray_ports_off_the_overlay() -> None:
    text = overlay.render_firewall("rmaabc", ["6391", "10002-19999"])
    assert 'iifname "rmaabc" accept' in text and 'iifname "lo" accept' in text
    assert "elements = { 6391, 10002-19999 }" in text
    assert "tcp dport @ray_tcp counter drop" in text
    assert "policy accept" in text  # a donor's own services are not the pool's business


def test_hub_forwards_spoke_to_spoke_only() -> None:
    text = overlay.render_firewall("rma-hub", ["6391"], isolate=True)
    chain = text[text.index("chain forward") :]
    rules = [line.strip() for line in chain.splitlines()[2:] if line.strip() not in ("}", "")]
    # order matters: spoke to spoke first, then everything in or out of the overlay dropped, replies excepted
    assert rules == [
        'iifname "rma-hub" oifname "rma-hub" accept',
        'iifname "rma-hub" counter drop',
        'oifname "rma-hub" ct state established,related accept',
        'oifname "rma-hub" counter drop',
    ]
    assert "type filter hook forward" in chain and "policy accept" in chain  # the head's other routing stays
    assert "chain forward" not in overlay.render_firewall("rmaabc", ["6391"])  # a donor routes nothing
    hub = overlay.Hub(Path("/nonexistent"), name="rma-hub")
    assert (
        hub.firewall.isolate
        and not overlay.Spoke("rmaabc", Path("/x"), "10.88.0.2", 16, "k", "h:1", "10.88.0.1").firewall.isolate
    )


def test_core_table_keeps_edge_users_off_core_ports_on_the_head() -> None:
    deny = overlay.LocalDeny(uids=(999, 998), tcp=(5440, 8010), nets=("10.88.0.0/16",), allow_tcp=(8470,))
    text = overlay.render_firewall("rma-hub", ["6380", "6391"], isolate=True, local_deny=deny)
    chain = text[text.index("chain output") :]
    rules = [line.strip() for line in chain.splitlines()[2:] if line.strip() not in ("}", "")]
    who = "meta skuid { 998, 999 }"
    # order matters: replies of the edge's own sockets and the coordinator first, then the core's ports and
    # subnet, from any address (loopback included: the input chain accepts lo)
    assert rules == [
        "ct state established,related accept",
        f"{who} tcp dport {{ 8470 }} accept",
        f"{who} tcp dport @ray_tcp counter reject with tcp reset",
        f"{who} tcp dport {{ 5440, 8010 }} counter reject with tcp reset",
        f"{who} ip daddr 10.88.0.0/16 counter reject",
    ]
    assert "type filter hook output" in chain and "policy accept" in chain
    assert "chain output" not in overlay.render_firewall("rma-hub", ["6391"], isolate=True)  # no edges
    empty = overlay.LocalDeny(uids=())
    assert "chain output" not in overlay.render_firewall("rma-hub", ["6391"], local_deny=empty)


@pytest.mark.skipif(
    not shutil.which("nft") or not Path("/proc/self").exists(), reason="nftables not installed"
)
@pytest.mark.parametrize("isolate", [False, True])
@pytest.mark.parametrize("deny", [None, overlay.LocalDeny((999,), (5440,), ("10.88.0.0/16",), (8470,))])
def test_firewall_is_valid_nftables(isolate: bool, deny: overlay.LocalDeny | None) -> None:
    text = overlay.render_firewall(
        "rmaabc", RayPorts().firewalled([6380, 8265]), isolate=isolate, local_deny=deny
    )
    r = subprocess.run(["nft", "-c", "-f", "-"], input=text, capture_output=True, text=True)
    if r.returncode and "Operation not permitted" in r.stderr:
        pytest.skip("nft -c needs CAP_NET_ADMIN here")
    assert r.returncode == 0, r.stderr


def test_parse_wg_dump() -> None:
    dump = (
        "PRIV\tPUB\t51820\toff\n"
        "peerA=\t(none)\t(none)\t10.88.0.2/32\t0\t0\t0\toff\n"
        "peerB=\t(none)\t10.1.1.5:40000\t10.88.0.3/32,10.88.1.0/24\t1700000000\t1200\t900\t25\n"
    )
    a, b = overlay.parse_dump(dump)
    assert a.public_key == "peerA=" and a.endpoint is None and a.latest_handshake == 0
    assert b.endpoint == "10.1.1.5:40000" and b.allowed_ips == ["10.88.0.3/32", "10.88.1.0/24"]
    assert (b.rx_bytes, b.tx_bytes, b.latest_handshake) == (1200, 900, 1700000000)


def test_firewall_covers_random_ray_ports_once_and_never_public_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(overlay, "_run", lambda argv, what, input=None, timeout=20: calls.append(argv) or "")
    monkeypatch.setattr(overlay.subprocess, "run", lambda *a, **k: None)  # remove() before install()
    fw = overlay.Firewall("rmaabc", RayPorts().firewalled([6380]), allow={8000, 8470})
    fw.install()
    assert calls[-1][:3] == ["nft", "-f", "-"]
    assert fw.cover([6391, 12000, 8000, 8470]) == []  # pinned, in the workers' range, or public
    assert fw.cover([44217, 44227, 8000]) == [44217, 44227]
    assert calls[-1] == ["nft", "add", "element", "inet", "rma_overlay", "ray_tcp", "{ 44217, 44227 }"]
    assert fw.cover([44217]) == []
    assert len(calls) == 2


# ---- edges on the overlay: each edge its own hub, subnet and table ----------------------------------------


def _edge_hub(edge: str = "edge", core_if: str = "rma-hub") -> overlay.Hub:
    from rma_ray.edges import EdgePorts

    ports = EdgePorts()
    return overlay.edge_hub(
        Path("/nonexistent"),
        edge,
        "10.89.0.0/16",
        51821,
        overlay.edge_interface(core_if, edge),
        ports.ray_ports(),
        ports.head_tcp(),
        core_interface=core_if,
        core_subnet="10.88.0.0/16",
    )


def test_edge_hub_firewall_admits_the_core_and_its_own_donors_only() -> None:
    from rma_ray.edges import EdgePorts

    hub = _edge_hub()
    assert hub.address == "10.89.0.1" and hub.port == 51821 and hub.key_file.name == "edge-edge.key"
    text = hub.firewall.render()
    assert text.startswith("table inet rma_overlay_edge_edge {")  # its own table, apart from the core's
    rules = [line.strip() for line in text[text.index("chain input") :].splitlines()[2:7]]
    # order matters: its donors' packets to the core's subnet die before its own interface is accepted
    assert rules == [
        'iifname "lo" accept',
        f'iifname "{hub.name}" ip daddr 10.88.0.0/16 counter drop',
        f'iifname "{hub.name}" accept',
        'iifname "rma-hub" accept',  # the core: its gateway calls the edge's Serve
        "tcp dport @ray_tcp counter drop",
    ]
    p = EdgePorts()
    elements = hub.firewall.elements
    for port in (p.gcs, p.dashboard, p.serve, p.node_manager, p.object_manager, p.ray_client):
        assert str(port) in elements
    assert f"{p.min_worker}-{p.max_worker}" in elements
    # nothing of the core's: its Ray ports are the core table's, which drops them from every interface
    # but loopback and the core's own
    assert not {"6379", "6380", "6391", "10002-19999"} & set(elements)
    forward = text[text.index("chain forward") :]
    assert f'iifname "{hub.name}" oifname "{hub.name}" accept' in forward
    assert f'iifname "{hub.name}" counter drop' in forward  # nothing routed from the edge to the core


def test_edge_hub_names_are_unique_and_fit_linux() -> None:
    assert overlay.edge_interface("rma-hub", "edge") == "rma-hub-edge"
    long_a = overlay.edge_interface("rmah0123abcd", "west-europe-1")
    long_b = overlay.edge_interface("rmah0123abcd", "west-europe-2")
    assert len(long_a) <= 15 and len(long_b) <= 15 and long_a != long_b
    assert overlay.edge_table("eu-west") == "rma_overlay_edge_eu_west"


@pytest.mark.skipif(not shutil.which("nft"), reason="nftables not installed")
def test_edge_firewall_is_valid_nftables() -> None:
    r = subprocess.run(
        ["nft", "-c", "-f", "-"], input=_edge_hub().firewall.render(), capture_output=True, text=True
    )
    if r.returncode and "Operation not permitted" in r.stderr:
        pytest.skip("nft -c needs CAP_NET_ADMIN here")
    assert r.returncode == 0, r.stderr


def test_edge_donors_get_addresses_and_a_peer_on_their_edge_hub_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """admission.services.overlay on an SQLite database: the edge's subnet and hub, never the core's."""
    from types import SimpleNamespace

    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from admission import schemas
    from admission.models import Base, Worker
    from admission.services import overlay as service
    from rma_ray.edges import EdgeEndpoint, EdgeOverlay
    from rma_ray.settings import Settings

    peers: list[tuple[str, ...]] = []
    monkeypatch.setattr(overlay, "set_peer", lambda iface, key, ips: peers.append(("add", iface, key, ips)))
    monkeypatch.setattr(overlay, "remove_peer", lambda iface, key: peers.append(("remove", iface, key)))
    edge_key = overlay.load_or_create_key(tmp_path / "edge.key")
    settings = Settings(
        overlay_hub_interface="rma-hub",
        overlay_hub_public_key=overlay.load_or_create_key(tmp_path / "hub.key"),
        overlay_hub_endpoint="192.0.2.1:51820",
        edges=[
            EdgeEndpoint(
                name="edge",
                ray_address="10.89.0.1:6480",
                dashboard_url="http://10.89.0.1:8275",
                serve_url="http://10.88.0.1:8030",
                token_file=tmp_path / "token",
                overlay=EdgeOverlay(
                    interface="rma-hub-edge",
                    public_key=edge_key,
                    endpoint="192.0.2.1:51821",
                    subnet="10.89.0.0/16",
                ),
            ),
            EdgeEndpoint(  # an edge without a hub of its own: its donors get no overlay part
                name="bare",
                ray_address="192.0.2.1:6490",
                dashboard_url="http://192.0.2.1:8276",
                serve_url="http://192.0.2.1:8011",
                token_file=tmp_path / "token2",
            ),
        ],
    )
    state = SimpleNamespace(settings=settings)
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    Base.metadata.create_all(engine)

    def worker(wid: str, cluster: str) -> Worker:
        return Worker(
            id=wid, name=wid, tier="service", capabilities={}, labels={}, node_token_hash="x", cluster=cluster
        )

    def req() -> schemas.OverlayRequest:
        return schemas.OverlayRequest(public_key=overlay.load_or_create_key(tmp_path / secrets.token_hex(4)))

    with Session(engine) as session:
        core, e1, e2, bare = (
            worker("c1", "core"),
            worker("e1", "edge"),
            worker("e2", "edge"),
            worker("b1", "bare"),
        )
        session.add_all([core, e1, e2, bare])
        session.flush()
        got_core = service.admit(state, session, core, req())  # type: ignore[arg-type]
        got_e1 = service.admit(state, session, e1, req())  # type: ignore[arg-type]
        got_e2 = service.admit(state, session, e2, req())  # type: ignore[arg-type]
        assert service.admit(state, session, bare, req()) is None  # type: ignore[arg-type]
        assert got_core and got_e1 and got_e2
        assert (got_core.address, got_core.hub_address, got_core.hub_endpoint) == (
            "10.88.0.2",
            "10.88.0.1",
            "192.0.2.1:51820",
        )
        assert (got_e1.address, got_e2.address, got_e1.hub_address) == ("10.89.0.2", "10.89.0.3", "10.89.0.1")
        assert got_e1.hub_public_key == edge_key and got_e1.hub_endpoint == "192.0.2.1:51821"
        assert got_e1.prefix == 16
        assert [(p[1], p[3]) for p in peers] == [
            ("rma-hub", "10.88.0.2/32"),
            ("rma-hub-edge", "10.89.0.2/32"),
            ("rma-hub-edge", "10.89.0.3/32"),
        ]
        peers.clear()
        key = e1.wg_public_key
        service.cut(state, e1)  # type: ignore[arg-type]
        assert peers == [("remove", "rma-hub-edge", key)] and e1.overlay_ip is None
        assert service.hubs(settings).keys() == {"core", "edge"}

        # sync at a coordinator start: an untrusted donor that joined the core before edges existed, and a row
        # whose stored address lies outside its hub's subnet, are gone (peer removed, address cleared)
        legacy, trusted, stray = worker("c2", "core"), worker("c3", "core"), worker("e3", "edge")
        trusted.trusted = True
        core.trusted = True
        for w, ip in ((legacy, "10.88.0.7"), (trusted, "10.88.0.8"), (stray, "10.88.0.9")):
            w.overlay_ip, w.wg_public_key = ip, req().public_key
        session.add_all([legacy, trusted, stray])
        session.flush()
        on_hub = {
            "rma-hub": [(legacy.wg_public_key, "10.88.0.7/32"), (core.wg_public_key, "10.88.0.2/32")],
            "rma-hub-edge": [(stray.wg_public_key, "10.88.0.9/32"), (e2.wg_public_key, "10.89.0.3/32")],
        }
        monkeypatch.setattr(
            overlay,
            "peers_of",
            lambda iface: [overlay.Peer(k, [ips], None, 0, 0, 0) for k, ips in on_hub[iface]],
        )
        peers.clear()
        assert service.sync(state, session) == (1, 2)  # type: ignore[arg-type]
        assert sorted(peers) == sorted(
            [
                ("remove", "rma-hub", legacy.wg_public_key),
                ("add", "rma-hub", trusted.wg_public_key, "10.88.0.8/32"),
                ("remove", "rma-hub-edge", stray.wg_public_key),
            ]
        )
        assert legacy.overlay_ip is None and stray.overlay_ip is None and trusted.overlay_ip == "10.88.0.8"
        assert e2.overlay_ip == "10.89.0.3" and not [
            p for p in peers if p[1] == "rma-hub" and "10.89" in p[-1]
        ]
        # no edges: an untrusted core donor keeps its peer on the core's hub
        alone = SimpleNamespace(settings=Settings(**{**settings.model_dump(), "edges": []}))
        legacy.overlay_ip = "10.88.0.7"
        on_hub["rma-hub"] = [(legacy.wg_public_key, "10.88.0.7/32")]
        peers.clear()
        service.sync(alone, session)  # type: ignore[arg-type]
        assert ("remove", "rma-hub", legacy.wg_public_key) not in peers and legacy.overlay_ip == "10.88.0.7"


# ---- edges without the overlay: the edge guard's table ---------------------------------------------------


def _guard_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n_edges: int = 2, **kw: Any) -> Any:
    """A Pool with edges and no overlay whose edge users are stood in (uids 990, 991...): nothing is created."""
    import pwd

    from rma_ray.edges import EdgeSpec
    from rma_ray.head import EdgeHead, Pool, UpOptions

    edges = tuple(
        EdgeSpec(name="edge" if i == 0 else f"edge{i}", ports=EdgePorts().shifted(i)) for i in range(n_edges)
    )
    opts = UpOptions(tmp_path / "data", "127.0.0.1", "127.0.0.1", apps=(), edges=edges, **kw)
    uids = {spec.user: 990 + i for i, spec in enumerate(edges)}
    monkeypatch.setattr(
        EdgeHead,
        "_user",
        lambda self: pwd.struct_passwd((self.spec.user, "x", uids[self.spec.user], 0, "", "", "")),
    )
    return Pool(opts, lambda _: None)


def _ports_of(elements: Iterable[str]) -> set[int]:
    out: set[int] = set()
    for e in elements:
        lo, _, hi = e.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def test_edge_guard_is_an_output_chain_for_the_edge_users_to_local_core_ports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rma_ray.poolinfo import STORE_NAMES

    installed: list[str] = []
    monkeypatch.setattr(
        overlay, "_run", lambda argv, what, input=None, timeout=20: installed.append(input) or ""
    )
    monkeypatch.setattr(overlay.subprocess, "run", lambda *a, **k: None)  # remove() before install()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    pool = _guard_pool(tmp_path, monkeypatch, stores=STORE_NAMES)
    pool.start_edge_guard()
    guard = pool.edge_guard
    assert guard is not None and installed == [guard.render()]
    text = guard.render()
    assert text.startswith(f"table inet {overlay.edge_guard_table(tmp_path / 'data')} {{")
    assert "chain input" not in text and "chain forward" not in text  # LAN donors reach the head as before
    chain = text[text.index("chain output") :]
    rules = [line.strip() for line in chain.splitlines()[2:] if line.strip() not in ("}", "")]
    who = "meta skuid { 990, 991 }"
    stores = ", ".join(str(p) for p in sorted(pool.store_ports()))
    # order matters: replies and the coordinator first, then the core's ports on the head's own addresses
    assert rules == [
        "ct state established,related accept",
        f"{who} tcp dport {{ {pool.o.coordinator_port} }} accept",
        f"{who} fib daddr type local tcp dport @ray_tcp counter reject with tcp reset",
        f"{who} tcp dport {{ {stores} }} counter reject with tcp reset",  # a store on a donor too
    ]
    assert "type filter hook output" in chain and "policy accept" in chain
    denied = _ports_of(guard.elements) | set(pool.store_ports())
    assert {pool.o.gcs_port, pool.o.dashboard_port, 10001, 10002, 19999} <= denied
    assert pool.o.coordinator_port not in denied and pool.o.serve_port not in denied
    # the edges' own ports are never a core port, for a further edge either
    assert not denied & pool.edge_ports()
    for i in range(4):
        p = EdgePorts().shifted(i)
        pinned = {getattr(p, f) for f in p.__dataclass_fields__ if f not in ("min_worker", "max_worker")}
        assert not denied & (pinned | set(range(p.min_worker, p.max_worker + 1)))
    # what the core head listens on is added, never a public port (guard_edge_users passes the core's only)
    assert guard.cover([44217, pool.o.coordinator_port, pool.o.serve_port]) == [44217]


def test_edge_guard_is_only_for_edges_without_the_overlay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(overlay, "_run", lambda *a, **k: pytest.fail("nothing to install"))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    for pool in (
        _guard_pool(tmp_path, monkeypatch, n_edges=0),
        _guard_pool(tmp_path, monkeypatch, overlay=True),  # the core hub's table holds the chain
    ):
        pool.start_edge_guard()
        assert pool.edge_guard is None


def test_without_nft_rma_up_says_the_edge_users_are_not_firewalled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rma_ray.head

    said: list[str] = []
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(rma_ray.head.shutil, "which", lambda name: None)
    pool = _guard_pool(tmp_path, monkeypatch)
    pool.say = said.append
    pool.start_edge_guard()
    assert pool.edge_guard is None
    assert len(said) == 1 and "edge users are not firewalled" in said[0] and "nftables" in said[0]


def test_edge_guard_gives_back_a_port_an_edge_now_listens_on(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(overlay, "_run", lambda argv, what, input=None, timeout=20: calls.append(argv) or "")
    monkeypatch.setattr(overlay.subprocess, "run", lambda *a, **k: None)
    deny = overlay.LocalDeny((990,), allow_tcp=(8470,), local_only=True)
    guard = overlay.EdgeGuard("", RayPorts().firewalled([6380]), table="rma_edge_guard_x", local_deny=deny)
    guard.install()
    assert guard.cover([44217, 44227]) == [44217, 44227]
    assert guard.uncover([44217, 6380, 12000, 50000]) == [44217]  # never a pinned port
    assert calls[-1] == ["nft", "delete", "element", "inet", "rma_edge_guard_x", "ray_tcp", "{ 44217 }"]
    assert guard.uncover([44217]) == [] and guard.cover([44217]) == [44217]


def test_edge_guard_is_valid_nftables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(overlay.EdgeGuard, "install", lambda self: None)
    pool = _guard_pool(tmp_path, monkeypatch, stores=("chroma",))
    pool.start_edge_guard()
    assert pool.edge_guard is not None
    r = subprocess.run(
        ["nft", "-c", "-f", "-"], input=pool.edge_guard.render(), capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr


def test_the_supervisor_denies_the_core_heads_listeners_and_not_the_edges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pool.guard_ports without the overlay: what the core head listens on (loopback included) is added to the
    edge guard, a port both heads listen on too (the core wins: an edge task may bind the core's port number on
    loopback on purpose); a port only an edge head listens on now is taken out if the core had it before."""
    from types import SimpleNamespace

    calls: list[list[str]] = []
    monkeypatch.setattr(overlay, "_run", lambda argv, what, input=None, timeout=20: calls.append(argv) or "")
    monkeypatch.setattr(overlay.subprocess, "run", lambda *a, **k: None)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    pool = _guard_pool(tmp_path, monkeypatch, n_edges=1)
    pool.start_edge_guard()
    listens = {1: {44217, 44227}, 2: {44227, 50001}}  # pid 1: the core head's; pid 2: the edge head's
    loopback_asked: list[bool] = []

    def listening(pids: Iterable[int], loopback: bool = False) -> set[int]:
        loopback_asked.append(loopback)
        return set().union(*(listens[p] for p in pids))

    monkeypatch.setattr(overlay, "listening_ports", listening)
    node = lambda pid: SimpleNamespace(track=lambda: None, running=lambda: True, pids=lambda: [pid])  # noqa: E731
    pool.head = node(1)
    pool.edges["edge"].node = node(2)
    pool.guard_ports()
    assert all(loopback_asked)
    assert calls[-1] == [
        "nft",
        "add",
        "element",
        "inet",
        pool.edge_guard.table,
        "ray_tcp",
        "{ 44217, 44227 }",
    ]
    listens[2] = {44217}  # the core let 44217 go, the edge's Ray took it
    listens[1] = set()
    pool.guard_ports()
    assert calls[-1] == ["nft", "delete", "element", "inet", pool.edge_guard.table, "ray_tcp", "{ 44217 }"]
