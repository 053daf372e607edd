"""The coordinator with edge clusters (issue 17): untrusted donors are admitted into their edge and get nothing
of the core; the edge credential (EdDSA JWTs, the JWKS route, rotation); what only trusted core credentials may
read. A real coordinator on a real port (uvicorn in a thread, ~0.3 s on SQLite, ~1 s on PostgreSQL); each
cluster's "GCS" is a listening TCP socket (registration only checks that it answers; no Ray is started here:
tests/integration/test_edge_reconcile.py runs the real heads)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from admission.services import edges as edge_service
from rma_ray.credentials import fingerprint
from rma_ray.edges import EDGE_ISSUER, EDGE_TOKEN_TTL_S, LABEL_CLUSTER, EdgeEndpoint, edge_audience, jwks_path
from tests.integration.conftest import CPU_BOX, Coordinator, make_settings, serve
from tests.support import wait_for

CORE_TOKEN = "core-token-" + "c" * 40
EDGE_TOKENS = {"edge": "edge-token-" + "e" * 40, "west": "west-token-" + "w" * 40}


def _listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s


@pytest.fixture
def pool(db_url: str, tmp_path: Path) -> Iterator[Coordinator]:
    """A coordinator wired to a core and two edges, each with its own token file."""
    sockets = [_listener() for _ in range(3)]
    core_addr, *edge_addrs = (f"127.0.0.1:{s.getsockname()[1]}" for s in sockets)
    (tmp_path / "core-token").write_text(CORE_TOKEN)
    endpoints = []
    for (name, token), addr in zip(EDGE_TOKENS.items(), edge_addrs, strict=True):
        (tmp_path / f"{name}-token").write_text(token)
        endpoints.append(
            EdgeEndpoint(
                name=name,
                ray_address=addr,
                dashboard_url="http://127.0.0.1:9",  # nothing answers: the edge reports unhealthy
                serve_url=f"http://127.0.0.1:9/{name}",
                token_file=tmp_path / f"{name}-token",
            )
        )
    settings = make_settings(
        db_url,
        tmp_path / "data",
        ray_address=core_addr,
        ray_auth_token_file=tmp_path / "core-token",
        edges=endpoints,
        admit_without_ray=False,
    )
    try:
        with serve(settings) as coordinator:
            yield coordinator
    finally:
        for s in sockets:
            s.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_untrusted_donor_joins_its_edge_and_gets_nothing_of_the_core(pool: Coordinator) -> None:
    reg = pool.register(pool.invite()["token"])
    assert reg.status_code == 201, reg.text
    body = reg.json()
    edge = pool.state.settings.edges[0]
    assert body["cluster"] == "edge" and body["ray"]["cluster"] == "edge"
    assert body["ray"]["address"] == edge.ray_address and body["ray"]["auth_token"] == EDGE_TOKENS["edge"]
    assert body["labels"][LABEL_CLUSTER] == "edge" and body["labels"]["rma.io/trusted"] == "false"
    assert CORE_TOKEN not in reg.text and pool.state.settings.ray_address not in reg.text
    # the invite chooses the edge; the rejoin and the token re-fetch stay in it
    west = pool.register(pool.invite(edge="west")["token"]).json()
    assert west["ray"]["auth_token"] == EDGE_TOKENS["west"] and west["labels"][LABEL_CLUSTER] == "west"
    again = pool.http.post(
        "/api/worker/rejoin",
        json={"name": "donor", "capabilities": CPU_BOX},
        headers=bearer(west["node_token"]),
    )
    assert again.status_code == 200, again.text
    assert again.json()["cluster"] == "west" and again.json()["ray"]["auth_token"] == EDGE_TOKENS["west"]
    info = pool.http.get("/api/worker/ray", headers=bearer(west["node_token"])).json()
    assert info == {"address": pool.state.settings.edges[1].ray_address, "auth_token": EDGE_TOKENS["west"],
                    "cluster": "west"}  # fmt: skip
    rows = pool.admin("GET", "/api/admin/workers", params={"cluster": "west"}).json()
    assert [(w["id"], w["cluster"]) for w in rows] == [(west["worker_id"], "west")]


def test_an_untrusted_donor_left_in_the_core_from_before_edges_gets_nothing_of_it(pool: Coordinator) -> None:
    """Migration 0007 put every donor in 'core': an untrusted one registered before the pool had edges is
    told to leave by its next heartbeat and refused the core's address and token (rejoin, `GET
    /api/worker/ray`) once edges exist; it needs a new invite (which admits it into an edge). A trusted core
    donor rejoins as before."""
    from admission.models import Worker

    donor = pool.register(pool.invite()["token"]).json()
    with pool.state.sessions() as session:  # as the migration left it
        worker = session.get(Worker, donor["worker_id"])
        assert worker is not None
        worker.cluster = "core"
        session.commit()
    with pool.state.nodes_lock:
        pool.state.nodes.pop(donor["worker_id"], None)
    token = bearer(donor["node_token"])
    # still running in the core (its agent heartbeats): told to leave, the core is not for strangers
    beat = pool.http.post("/api/worker/heartbeat", headers=token, json={})
    assert beat.status_code == 200 and beat.json()["action"] == "leave", beat.text
    again = pool.http.post(
        "/api/worker/rejoin", json={"name": "donor", "capabilities": CPU_BOX}, headers=token
    )
    info = pool.http.get("/api/worker/ray", headers=token)
    for r in (again, info):
        assert r.status_code == 409, r.text
        assert r.json()["error"]["code"] == "untrusted_in_core"
        assert "ask the admin for a new invite" in r.json()["error"]["message"]
        assert CORE_TOKEN not in r.text and pool.state.settings.ray_address not in r.text
    trusted = pool.join(trusted=True)
    ok = pool.http.post(
        "/api/worker/rejoin",
        json={"name": "donor", "capabilities": CPU_BOX},
        headers=bearer(trusted["node_token"]),
    )
    assert ok.status_code == 200 and ok.json()["ray"]["auth_token"] == CORE_TOKEN


def test_trusted_donor_joins_the_core(pool: Coordinator) -> None:
    body = pool.join(trusted=True)
    assert body["cluster"] == "core" and body["ray"]["auth_token"] == CORE_TOKEN
    assert body["labels"][LABEL_CLUSTER] == "core"
    assert not any(t in str(body) for t in EDGE_TOKENS.values())


def test_invite_edge_is_checked(pool: Coordinator) -> None:
    r = pool.admin("POST", "/api/invites", json={"trusted": True, "edge": "edge"})
    assert r.status_code == 422 and "trusted donor joins the core" in r.json()["error"]["message"]
    r = pool.admin("POST", "/api/invites", json={"edge": "north"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_edge"
    assert "known edges: edge, west" in r.json()["error"]["message"]
    r = pool.admin("POST", "/api/invites", json={"edge": "Bad Name"})
    assert r.status_code == 422
    listed = pool.admin("GET", "/api/invites").json()
    assert listed == []  # nothing was written by the refusals
    pool.invite(edge="west")
    assert [i["edge"] for i in pool.admin("GET", "/api/invites").json()] == ["west"]


def test_heartbeat_carries_the_donors_own_cluster_epoch(pool: Coordinator, tmp_path: Path) -> None:
    edge_donor = pool.join()
    core_donor = pool.join(trusted=True)

    def epoch(token: str) -> str:
        r = pool.http.post("/api/worker/heartbeat", headers=bearer(token), json={})
        assert r.status_code == 200, r.text
        return r.json()["cluster"]  # type: ignore[no-any-return]

    assert epoch(edge_donor["node_token"]) == fingerprint(EDGE_TOKENS["edge"])
    assert epoch(core_donor["node_token"]) == fingerprint(CORE_TOKEN)
    # the edge rotates its token: its donors see a new epoch and fetch the new token; the core's see nothing
    (tmp_path / "edge-token").write_text("rotated-" + "r" * 40)
    wait_for(
        lambda: epoch(edge_donor["node_token"]) == fingerprint("rotated-" + "r" * 40),
        timeout=10,
        what="the edge donor's heartbeat to carry the rotated edge token's epoch",
    )
    assert epoch(core_donor["node_token"]) == fingerprint(CORE_TOKEN)
    info = pool.http.get("/api/worker/ray", headers=bearer(edge_donor["node_token"])).json()
    assert info["auth_token"] == "rotated-" + "r" * 40 and info["cluster"] == "edge"


def test_keyring_and_edge_routes_are_for_trusted_core_credentials_only(pool: Coordinator) -> None:
    sensitive = pool.admin("POST", "/api/admin/clients", json={"name": "clinic", "sensitive": True})
    assert sensitive.status_code == 201 and sensitive.json()["sensitive"] is True
    plain = pool.admin("POST", "/api/admin/clients", json={"name": "web"}).json()
    edge_donor, core_untrusted = pool.join(), pool.join(trusted=True)
    trusted = pool.join(trusted=True)
    service = pool.admin("POST", "/api/admin/service-keys", json={"name": "head"}).json()["key"]
    with pool.state.sessions() as s, s.begin():  # an untrusted core donor: a pool admitted before its edges
        from admission.models import Worker

        w = s.get(Worker, core_untrusted["worker_id"])
        assert w is not None
        w.trusted = False
    for path, method in (("/api/clients/keyring", "GET"), ("/api/service/edge-routes", "POST")):
        for who in (edge_donor, core_untrusted):
            r = pool.http.request(method, path, headers=bearer(who["node_token"]))
            assert r.status_code == 403 and r.json()["error"]["code"] == "not_trusted_core", (path, r.text)
            assert "rma_client" not in r.text and "token" not in r.json()["error"]
        for cred in (trusted["node_token"], service):
            assert pool.http.request(method, path, headers=bearer(cred)).status_code == 200, path
        assert pool.http.request(method, path).status_code == 401
    ring = pool.http.get("/api/clients/keyring", headers=bearer(service)).json()
    flags = {k["name"]: k["sensitive"] for k in ring["keys"]}
    assert flags == {"clinic": True, "web": False}
    assert {c["name"]: c["sensitive"] for c in pool.admin("GET", "/api/admin/clients").json()} == flags
    assert plain["sensitive"] is False


def _routes(pool: Coordinator, cred: str) -> dict[str, Any]:
    r = pool.http.post("/api/service/edge-routes", headers=bearer(cred))
    assert r.status_code == 200, r.text
    return {e["name"]: e for e in r.json()["edges"]}


def test_edge_credential_verifies_with_the_jwks_route_and_only_for_its_edge(pool: Coordinator) -> None:
    service = pool.admin("POST", "/api/admin/service-keys", json={"name": "head"}).json()["key"]
    routes = _routes(pool, service)
    assert set(routes) == {"edge", "west"}
    assert routes["edge"]["serve_url"].endswith("/edge") and routes["edge"]["healthy"] is False
    assert routes["edge"]["apps"] == {}  # its dashboard does not answer: the core serves
    token = routes["edge"]["token"]
    client = jwt.PyJWKClient(pool.url + jwks_path("edge"), cache_keys=False, cache_jwk_set=False)

    def verify(tok: str, edge: str = "edge", jwks: jwt.PyJWKClient = client) -> dict[str, Any]:
        key = jwks.get_signing_key_from_jwt(tok)
        return jwt.decode(  # type: ignore[no-any-return]
            tok,
            key.key,
            algorithms=["EdDSA"],
            audience=edge_audience(edge),
            issuer=EDGE_ISSUER,
            options={"require": ["exp", "iat", "aud", "iss"]},
        )

    claims = verify(token)
    assert claims["sub"] == "gateway" and claims["exp"] - claims["iat"] == EDGE_TOKEN_TTL_S
    assert set(claims) == {"iss", "aud", "sub", "iat", "exp", "jti"}  # no client, no client key
    assert routes["edge"]["token"] != routes["west"]["token"]
    # the other edge's credential: another key, another audience
    with pytest.raises(jwt.PyJWTError):
        verify(routes["west"]["token"])
    west_client = jwt.PyJWKClient(pool.url + jwks_path("west"), cache_keys=False, cache_jwk_set=False)
    with pytest.raises(jwt.PyJWTError):
        verify(token, "west", west_client)
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(
            token,
            client.get_signing_key_from_jwt(token).key,
            algorithms=["EdDSA"],
            audience=edge_audience("west"),
        )
    # an expired credential
    old, _ = edge_service.mint(pool.state.settings, "edge", now=time.time() - EDGE_TOKEN_TTL_S - 60)
    with pytest.raises(jwt.ExpiredSignatureError):
        verify(old)
    # the public route is public, and speaks only of known edges
    assert pool.http.get(jwks_path("north")).status_code == 404
    assert all("d" not in k for k in pool.http.get(jwks_path("edge")).json()["keys"])  # no private part


def test_rotation_keeps_the_old_key_for_one_token_lifetime(pool: Coordinator) -> None:
    service = pool.admin("POST", "/api/admin/service-keys", json={"name": "head"}).json()["key"]
    before = _routes(pool, service)["edge"]["token"]
    west_before = _routes(pool, service)["west"]["token"]
    assert pool.http.post("/api/admin/edges/edge/rotate-credential").status_code == 401
    r = pool.admin("POST", "/api/admin/edges/edge/rotate-credential")
    assert r.status_code == 200, r.text
    rotated = r.json()
    assert rotated["previous_kid"] == jwt.get_unverified_header(before)["kid"] != rotated["current_kid"]
    after = _routes(pool, service)["edge"]["token"]
    assert jwt.get_unverified_header(after)["kid"] == rotated["current_kid"]
    client = jwt.PyJWKClient(pool.url + jwks_path("edge"), cache_keys=False, cache_jwk_set=False)
    for tok in (before, after):  # during the grace both verify
        key = client.get_signing_key_from_jwt(tok)
        jwt.decode(tok, key.key, algorithms=["EdDSA"], audience=edge_audience("edge"), issuer=EDGE_ISSUER)
    # the other edge is untouched
    assert jwt.get_unverified_header(_routes(pool, service)["west"]["token"]) == jwt.get_unverified_header(
        west_before
    )
    # one token lifetime later the old key is gone from the set (the key file's age is the rotation's time)
    current = edge_service.key_dir(pool.state.settings, "edge") / edge_service.CURRENT
    aged = time.time() - EDGE_TOKEN_TTL_S - 1
    os.utime(current, (aged, aged))
    kids = [k["kid"] for k in pool.http.get(jwks_path("edge")).json()["keys"]]
    assert kids == [rotated["current_kid"]]
    with pytest.raises(jwt.PyJWKClientError):
        client.get_signing_key_from_jwt(before)
    assert pool.admin("POST", "/api/admin/edges/north/rotate-credential").status_code == 404
    audit = pool.admin("GET", "/api/admin/audit", params={"action": "edge.credential.rotate"}).json()
    assert [a["subject"] for a in audit] == ["edge"]


def test_signing_keys_are_private_files(pool: Coordinator) -> None:
    edge_service.load_keys(pool.state.settings, "edge")
    d = edge_service.key_dir(pool.state.settings, "edge")
    assert d.stat().st_mode & 0o077 == 0
    assert (d / edge_service.CURRENT).stat().st_mode & 0o777 == 0o600


def test_an_edge_donor_cannot_report_a_store(pool: Coordinator) -> None:
    donor = pool.join()
    report = {
        "runtime": "process",
        "status": "ready",
        "node_id": "ab" * 28,
        "node_ip": "127.0.0.1",
        "port": 5432,
        "size_bytes": 1,
    }
    r = pool.http.put("/api/stores/postgres", json=report, headers=bearer(donor["node_token"]))
    assert r.status_code == 403


def test_without_edges_untrusted_donors_join_the_core_as_before(coordinator: Coordinator) -> None:
    body = coordinator.join()
    assert body["cluster"] == "core" and LABEL_CLUSTER not in body["labels"]
    r = coordinator.admin("POST", "/api/invites", json={"edge": "edge"})
    assert r.status_code == 422 and "this pool runs without edges" in r.json()["error"]["message"]
    routes = coordinator.admin("POST", "/api/service/edge-routes")
    assert routes.status_code == 200 and routes.json() == {
        "edges": [],
        "spot_check_rate": 0.02,
        "quarantined": [],
    }


def test_reconcile_pass_per_cluster(pool: Coordinator) -> None:
    """One pass over the edge's nodes: its donor is matched, a node claiming a core donor is the edge's
    intruder, a mislabelled cluster quarantines, and the edge's demand is its own."""
    from admission.models import TierDemand, Worker
    from admission.services import workers as worker_service
    from admission.services.reconcile import RayView, apply

    edge_donor, liar, core_donor = pool.join(), pool.join(), pool.join(trusted=True)

    def node(node_id: str, labels: dict[str, str]) -> dict[str, Any]:
        return {
            "node_id": node_id,
            "node_ip": "10.0.0.9",
            "is_head_node": False,
            "state": "ALIVE",
            "labels": labels,
            "start_time_ms": 1,
            "resources_total": {"CPU": 1, "memory": 2**30, "object_store_memory": 2**29},
        }

    nodes = [
        node("a" * 56, edge_donor["labels"]),
        node("b" * 56, {**liar["labels"], LABEL_CLUSTER: "core"}),
        node("c" * 56, core_donor["labels"]),
    ]
    view = RayView()
    state = pool.state
    with state.sessions() as s, s.begin():
        to_drain = apply(state, s, nodes, [{"label_selector": {"rma.io/tier": "gpu"}}], view, "edge")
    assert [i["node_id"] for i in view.intruders] == ["c" * 56]
    assert "belongs to cluster 'core'" in view.intruders[0]["reason"]
    assert {n for n, _ in to_drain} == {"b" * 56, "c" * 56}
    with state.sessions() as s:
        e, lw, cw = (s.get(Worker, x["worker_id"]) for x in (edge_donor, liar, core_donor))
        assert e is not None and e.ray_alive is True and e.quarantine_reason is None
        assert lw is not None and lw.quarantine_reason and LABEL_CLUSTER in lw.quarantine_reason
        assert cw is not None and cw.ray_alive is None  # the edge's reading says nothing of core donors
        assert worker_service.demand(s, "edge")["gpu"] == 1
        assert worker_service.demand(s, "core") == {}
        assert s.get(TierDemand, ("edge", "gpu")) is not None
    audit = pool.admin("GET", "/api/admin/audit", params={"action": "ray.intruder"}).json()
    assert [a["detail"].get("cluster") for a in audit] == ["edge"]
