"""The batch queue's figures on a real coordinator (SQLite: the figures live in memory, the database only
holds the credentials): a batches replica's report with a service credential shows in
`GET /api/admin/batch-queue` and on the registry page, the last report of a replica wins, a stale one is
dropped. The figures' SQL runs on a real Postgres in tests/unit/test_batches.py."""

from __future__ import annotations

import pytest

from admission.services import batch_queue
from rma_ray import credentials
from tests.integration.conftest import Coordinator


def body(replica: str = "services/batches#a", **over: object) -> dict[str, object]:
    return {
        "replica": replica,
        "waiting": 12,
        "running": 2,
        "batches": 3,
        "oldest_waiting_s": 200.5,
        "finished_10min": 45,
        **over,
    }


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_batch_queue_reports_show_per_replica_and_go_stale(
    coordinator: Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch_queue._replicas.clear()
    login = coordinator.http.post("/registry/login", data={"admin_key": coordinator.admin_key})
    assert login.status_code == 303, login.text

    def page() -> str:
        return coordinator.http.get("/registry", params={"partial": True}).text

    assert coordinator.admin("GET", "/api/admin/batch-queue").json() == {"replicas": []}
    assert 'id="no-batch-queue"' in page() and "no report yet" in page()

    svc = coordinator.admin("POST", "/api/admin/service-keys", json={"name": "batches-test"}).json()
    auth = {"Authorization": f"Bearer {svc['key']}"}

    def report(b: dict[str, object], headers: dict[str, str] | None = auth) -> int:
        return coordinator.http.post("/api/service/batch-queue", json=b, headers=headers).status_code

    assert report(body(waiting=99)) == 204
    assert report(body()) == 204  # the last report of a replica wins
    assert report(body("services/batches#b", waiting=0, running=0, oldest_waiting_s=None)) == 204
    got = coordinator.admin("GET", "/api/admin/batch-queue").json()["replicas"]
    assert [(r["replica"], r["waiting"], r["running"], r["batches"], r["oldest_waiting_s"]) for r in got] == [
        ("services/batches#a", 12, 2, 3, 200.5),
        ("services/batches#b", 0, 0, 3, None),
    ]
    assert got[0]["finished_10min"] == 45 and got[0]["per_minute"] == 4.5 and got[0]["reported_at"]
    html = page()
    assert 'id="batch-queue"' in html and 'data-replica="services/batches#a"' in html
    assert ">3 min<" in html and "4.5 items/min" in html and 'id="no-batch-queue"' not in html
    assert 'id="job-queue"' not in html  # no replica reported jobs' figures (an older one): no table
    jobs = {"queued": 4, "running": 1, "oldest_queued_s": 130.0, "succeeded_10min": 3, "failed_10min": 1,
            "pages_10min": 57}  # fmt: skip
    assert report(body(jobs=jobs)) == 204
    assert coordinator.admin("GET", "/api/admin/batch-queue").json()["replicas"][0]["jobs"] == jobs
    html = page()
    assert 'id="job-queue"' in html and 'data-queued="4"' in html
    assert "3 succeeded" in html and "1 failed" in html and "5.7 pages/min" in html and ">2 min<" in html
    assert report(body(jobs={**jobs, "queued": -1})) == 422

    # nobody without a credential; a body out of shape or bounds is a 422 that names the field
    assert report(body(), headers=None) == 401
    unknown = credentials.mint(credentials.Kind.SERVICE).token  # the right shape, no such key
    assert report(body(), headers={"Authorization": f"Bearer {unknown}"}) == 401
    # a donor's node credential: a trusted core donor may report (the batches store runs there), an untrusted
    # one may not, even in a pool without edges
    trusted = coordinator.join(trusted=True)["node_token"]
    untrusted = coordinator.join(trusted=False)["node_token"]
    assert report(body("services/batches#t"), headers={"Authorization": f"Bearer {trusted}"}) == 204
    assert report(body(), headers={"Authorization": f"Bearer {untrusted}"}) == 403
    assert report(body(extra=1), headers={"Authorization": f"Bearer {untrusted}"}) == 403  # before the body
    # a bounded number of replicas: a new name past it is a 429 until one goes quiet
    monkeypatch.setattr(batch_queue, "MAX_REPLICAS", 3)
    assert report(body("services/batches#new")) == 429
    assert report(body()) == 204  # a known replica still reports
    batch_queue._replicas.pop("services/batches#t")
    for bad, field in (
        (body(extra=1), "extra"),
        (body(waiting=-1), "waiting"),
        (body(""), "replica"),
        (body(oldest_waiting_s="soon"), "oldest_waiting_s"),
        ({"replica": "x"}, "running"),
    ):
        r = coordinator.http.post("/api/service/batch-queue", json=bad, headers=auth)
        assert r.status_code == 422 and field in r.text, (bad, r.text)
    assert coordinator.admin("GET", "/api/admin/batch-queue").json()["replicas"][0]["waiting"] == 12

    # a replica silent past the staleness window is dropped (the window made zero: every report is old)
    monkeypatch.setattr(batch_queue, "STALE_S", 0.0)
    assert coordinator.admin("GET", "/api/admin/batch-queue").json() == {"replicas": []}
    assert 'id="no-batch-queue"' in page()
