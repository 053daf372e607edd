"""The coordinator's overlay contract on a real hub interface: a donor's public key in, its overlay address and
the hub's key and endpoint out; the peer on the hub at once; revocation removes it at once and the key can
never join again; a restarted coordinator puts the live donors' peers back. SQLite and Postgres.

The hub is a real `wireguard-go` interface with no address (so it changes nothing of this machine's routing)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from admission.main import build_state, create_app, prepare_database
from admission.services import overlay as overlay_service
from rma_ray import overlay
from tests.integration.conftest import CPU_BOX, Coordinator, make_settings
from tests.support import ServerThread

pytestmark = [
    pytest.mark.overlay,
    pytest.mark.skipif(
        overlay.missing_tools() is not None or not overlay.shutil.which("wireguard-go"),
        reason=f"overlay tools: {overlay.missing_tools() or 'wireguard-go missing'}",
    ),
]


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[overlay.Interface]:
    """A real WireGuard interface (wireguard-go, ~0.1 s) without an address; deleted afterwards."""
    key = tmp_path / "hub.key"
    overlay.load_or_create_key(key)
    iface = overlay.Interface(f"rmat{secrets.token_hex(4)}", "", key)
    if overlay.subprocess.run(
        ["ip", "link", "add", iface.name, "type", "wireguard"], capture_output=True
    ).returncode:
        iface._start_userspace()
    overlay._run(["wg", "set", iface.name, "private-key", str(key), "listen-port", "0"], "hub")
    try:
        yield iface
    finally:
        iface.down()


@pytest.fixture
def ov(db_url: str, tmp_path: Path, hub: overlay.Interface) -> Iterator[Coordinator]:
    settings = make_settings(
        db_url,
        tmp_path / "data",
        overlay_hub_interface=hub.name,
        overlay_hub_public_key=overlay.public_key_of((tmp_path / "hub.key").read_text().strip()),
        overlay_hub_endpoint="203.0.113.7:51820",
        overlay_subnet="10.77.0.0/16",
        overlay_keepalive_s=5,
    )
    state = build_state(settings)
    key = prepare_database(state)
    assert key
    with (
        ServerThread(create_app(state=state)) as server,
        httpx.Client(base_url=server.url, timeout=30) as http,
    ):
        yield Coordinator(server.url, key, state, http)
    state.engine.dispose()


def register(c: Coordinator, token: str, public_key: str | None) -> httpx.Response:
    body: dict[str, object] = {"name": "donor", "capabilities": CPU_BOX}
    if public_key is not None:
        body["overlay"] = {"public_key": public_key}
    return c.http.post("/api/worker/register", json=body, headers={"Authorization": f"Bearer {token}"})


def new_key(tmp_path: Path) -> str:
    return overlay.load_or_create_key(tmp_path / f"k{secrets.token_hex(4)}")


def test_register_allocates_an_address_and_adds_the_peer(
    ov: Coordinator, hub: overlay.Interface, tmp_path: Path
) -> None:
    k1, k2 = new_key(tmp_path), new_key(tmp_path)
    r1 = register(ov, ov.invite()["token"], k1)
    assert r1.status_code == 201, r1.text
    info = r1.json()["overlay"]
    assert info["address"] == "10.77.0.2" and info["prefix"] == 16 and info["hub_address"] == "10.77.0.1"
    assert info["hub_endpoint"] == "203.0.113.7:51820" and info["keepalive_s"] == 5 and info["mtu"] == 1280
    assert overlay.is_key(info["hub_public_key"])
    assert r1.json()["ray"] is None
    r2 = register(ov, ov.invite()["token"], k2)
    assert r2.json()["overlay"]["address"] == "10.77.0.3"
    peers = {p.public_key: p.allowed_ips for p in hub.peers()}
    assert peers == {k1: ["10.77.0.2/32"], k2: ["10.77.0.3/32"]}
    w = ov.admin("GET", f"/api/admin/workers/{r1.json()['worker_id']}").json()
    assert w["overlay_ip"] == "10.77.0.2"


def test_revoke_removes_the_peer_at_once_and_the_key_never_rejoins(
    ov: Coordinator, hub: overlay.Interface, tmp_path: Path
) -> None:
    k = new_key(tmp_path)
    wid = register(ov, ov.invite()["token"], k).json()["worker_id"]
    assert [p.public_key for p in hub.peers()] == [k]
    assert ov.admin("POST", f"/api/admin/workers/{wid}/revoke").status_code == 200
    assert hub.peers() == []  # gone before the admin's request returned
    assert ov.admin("GET", f"/api/admin/workers/{wid}").json()["overlay_ip"] is None
    inv = ov.invite()
    r = register(ov, inv["token"], k)
    assert r.status_code == 403 and r.json()["error"]["code"] == "overlay_key_revoked"
    assert wid in r.json()["error"]["message"]
    # the refusal did not spend the invite, and a fresh key joins with it (and gets the released address)
    r = register(ov, inv["token"], new_key(tmp_path))
    assert r.status_code == 201 and r.json()["overlay"]["address"] == "10.77.0.2"


def test_leaving_releases_the_address_and_the_peer(
    ov: Coordinator, hub: overlay.Interface, tmp_path: Path
) -> None:
    k = new_key(tmp_path)
    node_token = register(ov, ov.invite()["token"], k).json()["node_token"]
    assert (
        ov.http.delete(
            "/api/worker/unregister", headers={"Authorization": f"Bearer {node_token}"}
        ).status_code
        == 204
    )
    assert hub.peers() == []
    r = register(ov, ov.invite()["token"], k)  # an honest donor makes a new key per join
    assert r.status_code == 409 and r.json()["error"]["code"] == "overlay_key_reused"


def test_keys_missing_or_malformed_are_refused_clearly(ov: Coordinator, hub: overlay.Interface) -> None:
    inv = ov.invite()
    r = register(ov, inv["token"], None)
    assert r.status_code == 422 and r.json()["error"]["code"] == "overlay_required"
    assert "update rma" in r.json()["error"]["message"]
    r = register(ov, inv["token"], "not-a-key")
    assert r.status_code == 422 and "WireGuard public key" in r.json()["error"]["message"]
    assert ov.admin("GET", "/api/invites").json()[0]["uses_left"] == 1
    assert hub.peers() == []


def test_a_hub_that_is_gone_refuses_the_join_and_keeps_the_token(
    ov: Coordinator, hub: overlay.Interface, tmp_path: Path
) -> None:
    hub.down()
    inv = ov.invite()
    r = register(ov, inv["token"], new_key(tmp_path))
    assert r.status_code == 503 and r.json()["error"]["code"] == "overlay_unavailable"
    assert ov.admin("GET", "/api/invites").json()[0]["uses_left"] == 1


def test_sync_puts_live_donors_back_on_a_fresh_hub(
    ov: Coordinator, hub: overlay.Interface, tmp_path: Path
) -> None:
    keys = [new_key(tmp_path) for _ in range(3)]
    ids = [register(ov, ov.invite()["token"], k).json()["worker_id"] for k in keys]
    ov.admin("POST", f"/api/admin/workers/{ids[2]}/revoke")
    stranger = new_key(tmp_path)
    overlay.set_peer(hub.name, stranger, "10.77.9.9/32")
    overlay.remove_peer(hub.name, keys[0])  # as if the head restarted with an empty hub
    with ov.state.sessions() as session:
        added, removed = overlay_service.sync(ov.state, session)
    assert (added, removed) == (1, 1)
    assert {p.public_key: p.allowed_ips for p in hub.peers()} == {
        keys[0]: ["10.77.0.2/32"],
        keys[1]: ["10.77.0.3/32"],
    }


def test_without_an_overlay_the_key_is_ignored(tmp_path: Path) -> None:
    state = build_state(make_settings(f"sqlite:///{tmp_path / 'db'}", tmp_path / "d"))
    key = prepare_database(state)
    with (
        ServerThread(create_app(state=state)) as server,
        httpx.Client(base_url=server.url, timeout=30) as http,
    ):
        c = Coordinator(server.url, key or "", state, http)
        r = register(c, c.invite()["token"], new_key(tmp_path))
        assert r.status_code == 201 and r.json()["overlay"] is None
    state.engine.dispose()


def test_rejoin_keeps_a_surviving_key_replaces_a_lost_one_and_aborts_cut_the_peer(
    ov: Coordinator, hub: overlay.Interface, tmp_path: Path
) -> None:
    k1, k2, k3 = new_key(tmp_path), new_key(tmp_path), new_key(tmp_path)
    reg = register(ov, ov.invite()["token"], k1).json()
    node = {"Authorization": f"Bearer {reg['node_token']}"}

    def rejoin(key: str) -> httpx.Response:
        return ov.http.post(
            "/api/worker/rejoin",
            headers=node,
            json={"name": "donor", "capabilities": CPU_BOX, "overlay": {"public_key": key}},
        )

    r = rejoin(k1)  # a restart that kept its key
    assert r.status_code == 200 and r.json()["overlay"]["address"] == "10.77.0.2", r.text
    assert {p.public_key: p.allowed_ips for p in hub.peers()} == {k1: ["10.77.0.2/32"]}
    r = rejoin(k2)  # the key is gone (a new disk, a new container): the new one replaces it on the hub
    assert r.status_code == 200, r.text
    assert [p.public_key for p in hub.peers()] == [k2]
    # a replaced key was never revoked, so the registry no longer holds it (only the audit trail does)
    other = register(ov, ov.invite()["token"], k1)
    assert other.status_code == 201
    assert rejoin(k3).status_code == 200 and {p.public_key for p in hub.peers()} == {k1, k3}
    # an aborted registration leaves the hub at once
    r = ov.http.post("/api/worker/abort", headers={"Authorization": f"Bearer {other.json()['node_token']}"})
    assert r.json() == {"refunded": True}
    assert [p.public_key for p in hub.peers()] == [k3]
