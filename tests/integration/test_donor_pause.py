"""A donor that steps aside on purpose (`rma pause`, outside its --schedule, yielding to its owner) on the real
coordinator, SQLite and PostgreSQL: the heartbeat's state is what the admin API, the registry page and the
/metrics gauge show, with an off-schedule donor's next window, and Ray reporting its node gone does not make
it offline. ~1 s per database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy import update

from admission.models import Worker
from admission.services import stats
from tests.integration.conftest import Coordinator
from tests.support import wait_for


def test_paused_and_off_schedule_donors_are_never_offline(coordinator: Coordinator) -> None:
    a, b = coordinator.join(), coordinator.join()
    beat = coordinator.http.post
    r = beat(
        "/api/worker/heartbeat",
        headers={"Authorization": f"Bearer {a['node_token']}"},
        json={"status": "paused"},
    )
    assert r.status_code == 200 and r.json()["action"] == "none"
    window = (datetime.now(UTC) + timedelta(hours=3)).replace(microsecond=0)
    r = beat(
        "/api/worker/heartbeat",
        headers={"Authorization": f"Bearer {b['node_token']}"},
        json={"status": "off_schedule", "resume_at": window.isoformat()},
    )
    assert r.status_code == 200
    # a window without a zone, or years away, would poison the bulk flush of every donor's beats: refused
    for bad in ("2026-12-08T19:00:00", "2999-01-01T00:00:00Z"):
        r = beat(
            "/api/worker/heartbeat",
            headers={"Authorization": f"Bearer {b['node_token']}"},
            json={"status": "off_schedule", "resume_at": bad},
        )
        assert r.status_code == 422 and "resume_at" in r.json()["error"]["message"], r.text

    def admin_view(worker_id: str) -> dict[str, object]:
        return coordinator.admin("GET", f"/api/admin/workers/{worker_id}").json()  # type: ignore[no-any-return]

    # flushed to the database, then Ray reports both nodes gone after the beats (their agents stopped them)
    def flushed() -> bool:
        with coordinator.state.sessions() as s:
            return all((s.get(Worker, w["worker_id"]) or Worker()).heartbeat_status for w in (a, b))

    wait_for(flushed, timeout=10, what="the heartbeat flush")
    with coordinator.state.sessions() as s, s.begin():
        s.execute(
            update(Worker)
            .where(Worker.id.in_([a["worker_id"], b["worker_id"]]))
            .values(ray_alive=False, ray_seen_at=datetime.now(UTC) + timedelta(seconds=1))
        )
    assert admin_view(a["worker_id"])["status"] == "paused"
    vb = admin_view(b["worker_id"])
    assert vb["status"] == "off_schedule"
    assert datetime.fromisoformat(str(vb["resume_at"])) == window
    listed = coordinator.admin("GET", "/api/admin/workers", params={"status": "paused"}).json()
    assert [w["id"] for w in listed] == [a["worker_id"]]

    # the gauge /metrics serves (its SQL twin of the status rules) counts them as such, not offline
    coordinator.state.gauges_at = 0.0
    stats.refresh_gauges(coordinator.state)
    metrics = coordinator.http.get("/metrics").text
    assert 'rma_workers{status="paused",tier="service"} 1.0' in metrics, metrics
    assert 'rma_workers{status="off_schedule",tier="service"} 1.0' in metrics
    assert 'rma_workers{status="offline",tier="service"} 0.0' in metrics

    # the registry page: the state and the next window, no offline row
    with httpx.Client(base_url=coordinator.url, timeout=30) as browser:
        r = browser.post("/registry/login", data={"admin_key": coordinator.admin_key}, follow_redirects=False)
        assert r.status_code == 303, r.text
        page = browser.get("/registry", params={"partial": "true"}).text
    assert f'data-worker="{a["worker_id"]}" data-status="paused"' in page
    assert f'data-worker="{b["worker_id"]}" data-status="off_schedule"' in page
    assert f'off schedule (next window <time datetime="{window.isoformat()}">' in page
    assert 'data-status="offline"' not in page

    # back: a healthy beat, and Ray sees the node again
    beat("/api/worker/heartbeat", headers={"Authorization": f"Bearer {a['node_token']}"}, json={})
    with coordinator.state.sessions() as s, s.begin():
        s.execute(update(Worker).where(Worker.id == a["worker_id"]).values(ray_alive=True))
    assert admin_view(a["worker_id"])["status"] == "healthy"
    assert admin_view(a["worker_id"])["resume_at"] is None
