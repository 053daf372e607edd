"""The coordinator's view of data stores: supervisors report, admins list; untrusted donors cannot report."""

from __future__ import annotations

from typing import Any

from tests.integration.conftest import Coordinator

REPORT = {
    "runtime": "process",
    "status": "ready",
    "node_id": "n" * 56,
    "node_ip": "10.0.0.7",
    "port": 5440,
    "size_bytes": 41_000_000,
    "restarts": 1,
    "ready_s": 2.5,
}


def node(coordinator: Coordinator, **invite: Any) -> dict[str, str]:
    reg = coordinator.join(**invite)
    return {"Authorization": f"Bearer {reg['node_token']}", "X-Worker": reg["worker_id"]}


def test_trusted_data_donor_reports_and_admin_lists(coordinator: Coordinator) -> None:
    headers = node(coordinator, tier="data", trusted=True)
    worker = headers.pop("X-Worker")
    r = coordinator.http.put("/api/stores/postgres", json=REPORT, headers=headers)
    assert r.status_code == 204, r.text
    r = coordinator.admin("PUT", "/api/stores/redis", json={**REPORT, "port": 6390, "status": "starting"})
    assert r.status_code == 204, r.text
    listed = {s["name"]: s for s in coordinator.admin("GET", "/api/admin/stores").json()}
    assert listed["postgres"]["node"] == worker and listed["postgres"]["status"] == "ready"
    assert listed["postgres"]["size_bytes"] == 41_000_000 and listed["postgres"]["runtime"] == "process"
    assert listed["redis"]["node"] == "head" and listed["redis"]["status"] == "starting"
    assert "password" not in str(listed)
    # a later report replaces the earlier one
    coordinator.http.put(
        "/api/stores/postgres", json={**REPORT, "status": "failed", "error": "disk full"}, headers=headers
    )
    pg = next(s for s in coordinator.admin("GET", "/api/admin/stores").json() if s["name"] == "postgres")
    assert (pg["status"], pg["error"]) == ("failed", "disk full")
    # a moved store before its restore: its own state, listed and on the registry page
    moving = "redis is being moved to w-b: waiting for its data"
    r = coordinator.admin(
        "PUT",
        "/api/stores/redis",
        json={**REPORT, "port": 6390, "status": "awaiting-restore", "error": moving},
    )
    assert r.status_code == 204, r.text
    rd = next(s for s in coordinator.admin("GET", "/api/admin/stores").json() if s["name"] == "redis")
    assert (rd["status"], rd["error"]) == ("awaiting-restore", moving)
    coordinator.http.post("/registry/login", data={"admin_key": coordinator.admin_key})
    page = coordinator.http.get("/registry", params={"partial": True})
    assert page.status_code == 200 and 'data-store="redis" data-status="awaiting-restore"' in page.text


def test_untrusted_or_non_data_donor_cannot_report(coordinator: Coordinator) -> None:
    for invite in ({"tier": "data", "trusted": False}, {"tier": "service", "trusted": True}):
        headers = node(coordinator, **invite)
        headers.pop("X-Worker")
        r = coordinator.http.put("/api/stores/postgres", json=REPORT, headers=headers)
        assert r.status_code == 403 and "trusted data-tier" in r.json()["error"]["message"]
    assert coordinator.admin("GET", "/api/admin/stores").json() == []


def test_bad_reports_are_422_and_anonymous_401(coordinator: Coordinator) -> None:
    assert coordinator.http.put("/api/stores/postgres", json=REPORT).status_code == 401
    assert coordinator.http.get("/api/admin/stores").status_code == 401
    for bad in ({**REPORT, "port": 0}, {**REPORT, "status": "great"}, {**REPORT, "password": "x"}, {}):
        r = coordinator.admin("PUT", "/api/stores/postgres", json=bad)
        assert r.status_code == 422, (bad, r.text)
    assert coordinator.admin("PUT", "/api/stores/Bad Name", json=REPORT).status_code == 422
    assert coordinator.admin("GET", "/api/admin/stores").json() == []


def test_silent_supervisor_shows_unknown(coordinator: Coordinator) -> None:
    from datetime import timedelta

    from admission.models import Store

    coordinator.admin("PUT", "/api/stores/chroma", json=REPORT)
    with coordinator.state.sessions() as s:  # the supervisor's last word was 10 minutes ago
        row = s.get(Store, "chroma")
        row.reported_at = row.reported_at - timedelta(minutes=10)
        s.commit()
    chroma = coordinator.admin("GET", "/api/admin/stores").json()[0]
    assert chroma["status"] == "unknown" and chroma["reported_status"] == "ready"


def test_pending_supervisor_is_listed_with_what_it_waits_for(coordinator: Coordinator) -> None:
    """A store supervisor that Ray cannot place (no trusted data donor) shows as pending, with its selector."""
    from admission.services import stores
    from admission.services.reconcile import RayView, apply

    coordinator.admin("PUT", "/api/stores/redis", json=REPORT)  # redis ran before; its node is gone now
    pending = [
        {"name": "rma-store-postgres", "label_selector": {"rma.io/tier": "data", "rma.io/trusted": "true"}},
        {"name": "rma-store-redis", "label_selector": {"rma.io/tier": "data", "rma.io/trusted": "true"}},
        {"name": "SERVE_REPLICA::x", "label_selector": {"rma.io/tier": "service"}},
        {  # pinned to its donor, which is gone (deployments/stores/supervisor.py: pinning)
            "name": "rma-store-chroma",
            "label_selector": {"rma.io/tier": "data", "rma.io/trusted": "true", "rma.io/node": "w-gone"},
        },
    ]
    view = RayView()
    with coordinator.state.sessions() as s, s.begin():
        apply(coordinator.state, s, [], pending, view)
    assert set(view.pending_stores) == {"postgres", "redis", "chroma"}
    with coordinator.state.sessions() as s:
        rows = {r.name: r for r in stores.list_all(s, view.pending_stores)}
    assert rows["postgres"].status == "pending" and "rma.io/trusted=true" in (rows["postgres"].error or "")
    assert "--trusted --tier data" in (rows["postgres"].error or "")
    assert rows["redis"].status == "pending" and rows["redis"].reported_status == "ready"
    assert rows["chroma"].status == "waiting" and (rows["chroma"].error or "").startswith(
        "waiting for w-gone"
    )


def service_key(coordinator: Coordinator) -> dict[str, Any]:
    r = coordinator.admin("POST", "/api/admin/service-keys", json={"name": "head services"})
    assert r.status_code == 201, r.text
    assert r.json()["key"].startswith("rma_service_")
    return r.json()  # type: ignore[no-any-return]


def test_service_credential_reads_keyring_and_reports_but_no_admin_route(coordinator: Coordinator) -> None:
    from fastapi.routing import APIRoute

    from admission.main import create_app

    key = service_key(coordinator)
    svc = {"Authorization": f"Bearer {key['key']}"}
    assert coordinator.http.get("/api/clients/keyring", headers=svc).status_code == 200
    assert coordinator.http.put("/api/stores/redis", json=REPORT, headers=svc).status_code == 204
    assert next(s for s in coordinator.admin("GET", "/api/admin/stores").json())["node"] == "head"
    refused = 0
    for route in create_app(state=coordinator.state).routes:
        if isinstance(route, APIRoute) and (route.openapi_extra or {}).get("x-rma-auth") == "admin":
            path = route.path.replace("{worker_id}", "abc123abc123").replace("{key_id}", "abc123abc123")
            for method in route.methods:
                r = coordinator.http.request(method, path, json={"name": "x"}, headers=svc)
                assert r.status_code == 401, (method, path, r.status_code)
                refused += 1
    assert refused >= 20
    assert coordinator.admin("GET", "/api/admin/service-keys").json()[0]["id"] == key["id"]
    assert coordinator.admin("POST", f"/api/admin/service-keys/{key['id']}/revoke").status_code == 200
    r = coordinator.http.get("/api/clients/keyring", headers=svc)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_service_key"


def test_store_rows_are_bound_to_their_reporter(coordinator: Coordinator) -> None:
    from datetime import timedelta

    from admission.models import Store, Worker

    a, b = node(coordinator, tier="data", trusted=True), node(coordinator, tier="data", trusted=True)
    a_id, b_id = a.pop("X-Worker"), b.pop("X-Worker")
    head = {"Authorization": f"Bearer {service_key(coordinator)['key']}"}
    big = 5 * 2**40  # 5 TiB: past a 32-bit column
    assert (
        coordinator.http.put(
            "/api/stores/postgres", json={**REPORT, "size_bytes": big}, headers=a
        ).status_code
        == 204
    )
    assert coordinator.http.put("/api/stores/chroma", json=REPORT, headers=head).status_code == 204
    # another donor, or the head, cannot overwrite a row its owner still reports; a donor not the head's
    for who, name in ((b, "postgres"), (head, "postgres"), (a, "chroma")):
        r = coordinator.http.put(f"/api/stores/{name}", json={**REPORT, "status": "failed"}, headers=who)
        assert r.status_code == 403 and r.json()["error"]["code"] == "store_elsewhere", r.text
    # no new rows under made-up names
    for i in range(3):
        r = coordinator.http.put(f"/api/stores/fake-{i}", json=REPORT, headers=b)
        assert r.status_code == 404
        assert "known: redis, postgres, chroma, graph" in r.json()["error"]["message"]
    listed = {s["name"]: s for s in coordinator.admin("GET", "/api/admin/stores").json()}
    assert set(listed) == {"postgres", "chroma"}
    assert (listed["postgres"]["node"], listed["postgres"]["size_bytes"], listed["postgres"]["status"]) == (
        a_id,
        big,
        "ready",
    )
    assert listed["chroma"]["node"] == "head"
    with coordinator.state.sessions() as s:  # the reconciler saw donor b's Ray node; a report names another
        s.get(Worker, b_id).ray_node_id = "b" * 56
        s.get(Store, "postgres").reported_at -= timedelta(minutes=10)  # a went silent: Ray moved postgres
        s.commit()
    r = coordinator.http.put("/api/stores/postgres", json=REPORT, headers=b)
    assert r.status_code == 403 and r.json()["error"]["code"] == "not_your_node"
    r = coordinator.http.put("/api/stores/postgres", json={**REPORT, "node_id": "b" * 56}, headers=b)
    assert r.status_code == 204, r.text
    assert coordinator.http.put("/api/stores/postgres", json=REPORT, headers=a).status_code == 403
    pg = next(s for s in coordinator.admin("GET", "/api/admin/stores").json() if s["name"] == "postgres")
    assert pg["node"] == b_id
