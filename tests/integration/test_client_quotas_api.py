"""Client quotas and usage on a real coordinator (SQLite and PostgreSQL): `rma clients quota` sets a key's
overrides, the keyring carries each key's effective quota, the gateway's usage reports land in
`GET /api/admin/usage` (absolute counters: repeated reports change nothing) with the replicas' quota state.
No Ray: the gateway side runs against a real pool in test_services.py and test_llm.py."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from typer.testing import CliRunner

from admission.services import usage as usage_service
from rma_ray.cli import app as rma_app
from tests.integration.conftest import Coordinator


def rma(coordinator: Coordinator, *args: str) -> tuple[int, str]:
    env = {"RMA_COORDINATOR_URL": coordinator.url, "RMA_ADMIN_KEY": coordinator.admin_key, "COLUMNS": "200"}
    r = CliRunner().invoke(rma_app, list(args), env=env)
    # a person's mistake is a CliError (the `rma` entry point prints its one line)
    return r.exit_code, r.output + (str(r.exception) if r.exception else "")


def ring_quota(coordinator: Coordinator, key_id: str) -> dict[str, object]:
    ring = coordinator.admin("GET", "/api/clients/keyring").json()
    return next(e["quota"] for e in ring["keys"] if e["id"] == key_id)  # type: ignore[no-any-return]


def test_quota_overrides_keyring_and_usage_reports(coordinator: Coordinator) -> None:
    coordinator.state.settings.client_tokens_per_day = 50_000  # the pool's default for every key
    app = coordinator.admin("POST", "/api/admin/clients", json={"name": "app"}).json()
    other = coordinator.admin("POST", "/api/admin/clients", json={"name": "other"}).json()
    assert ring_quota(coordinator, app["id"]) == {
        "requests_per_minute": None,
        "tokens_per_day": 50_000,
        "upload_bytes_per_day": None,
    }

    code, out = rma(coordinator, "clients", "quota", "app", "--requests-per-minute", "3",
                    "--upload-bytes-per-day", "2MiB")  # fmt: skip
    assert code == 0, out
    assert "3 req/min" in out and "50,000 tokens/day" in out
    assert ring_quota(coordinator, app["id"]) == {
        "requests_per_minute": 3,
        "tokens_per_day": 50_000,
        "upload_bytes_per_day": 2 * 2**20,
    }
    assert ring_quota(coordinator, other["id"])["requests_per_minute"] is None  # only that key

    # people's mistakes: one line that says what to do, never a traceback
    code, out = rma(coordinator, "clients", "quota", "app")
    assert code != 0 and "nothing to change" in out
    code, out = rma(coordinator, "clients", "quota", "app", "--upload-bytes-per-day", "lots")
    assert code != 0 and "not a size" in out
    code, out = rma(coordinator, "clients", "quota", "nobody", "--tokens-per-day", "5")
    assert code != 0 and "no live client key named" in out
    bad = coordinator.admin("PUT", f"/api/admin/clients/{app['id']}/quota", json={"tokens_per_day": 0})
    assert bad.status_code == 422 and "tokens_per_day" in bad.text
    assert (
        coordinator.admin("PUT", "/api/admin/clients/000000000000/quota", json={"reset": True}).status_code
        == 404
    )
    assert (
        coordinator.http.put(f"/api/admin/clients/{app['id']}/quota", json={"reset": True}).status_code == 401
    )

    # the gateway's reports: absolute counters from Redis, the highest wins; a key the pool does not know
    # is dropped
    day = datetime.now(UTC).date().isoformat()

    def report(replica: str, shared: bool, requests: int, **more: object) -> int:
        body = {
            "replica": replica,
            "day": day,
            "shared": shared,
            "error": None if shared else "ConnectionError: Connection refused",
            "usage": {
                app["id"]: {"requests": requests, "tokens_in": 10, "tokens_out": 20, "upload_bytes": 5},
                "ffffffffffff": {"requests": 1},
            },
            **more,
        }
        return coordinator.admin("POST", "/api/clients/usage", json=body).status_code

    usage_service._replicas.clear()
    assert report("gw#1", True, 7) == 204
    assert report("gw#2", False, 5) == 204  # a replica counting on its own, behind: no step back
    assert report("gw#2", False, 5, extra=1) == 422  # the report's shape is strict
    got = coordinator.admin("GET", "/api/admin/usage").json()
    assert [(c["name"], c["requests"], c["tokens_in"], c["tokens_out"], c["upload_bytes"])
            for c in got["clients"]] == [("app", 7, 10, 20, 5)]  # fmt: skip
    assert got["clients"][0]["quota"]["requests_per_minute"] == 3
    assert got["shared"] is False
    assert {(r["replica"], r["shared"]) for r in got["replicas"]} == {("gw#1", True), ("gw#2", False)}
    # the registry page: the per-client table, and the per-replica alert
    login = coordinator.http.post("/registry/login", data={"admin_key": coordinator.admin_key})
    assert login.status_code == 303, login.text
    page = coordinator.http.get("/registry", params={"partial": True}).text
    assert 'id="client-usage"' in page and f'data-key="{app["id"]}"' in page
    assert 'id="quotas-per-replica"' in page and "gw#2" in page and "Connection refused" in page
    code, out = rma(coordinator, "clients", "usage")
    assert code == 0 and "app" in out and "quotas are per replica on gw#2" in out
    # who may report is who may read the keyring (the Serve side: the head's service credential, or a core
    # node where the pool has no edges, as here); nobody without a credential
    assert coordinator.http.post("/api/clients/usage", json={}).status_code == 401
    node = coordinator.join()
    r = coordinator.http.post(
        "/api/clients/usage",
        json={"replica": "x", "day": day, "shared": True, "usage": {}},
        headers={"Authorization": f"Bearer {node['node_token']}"},
    )
    assert r.status_code == 204

    code, out = rma(coordinator, "clients", "quota", app["id"], "--reset")
    assert code == 0 and "50,000 tokens/day" in out and "req/min" not in out
    assert ring_quota(coordinator, app["id"])["requests_per_minute"] is None


def test_a_key_is_born_with_its_quota(coordinator: Coordinator) -> None:
    """`rma clients create --requests-per-minute ...` (and `quota` in POST /api/admin/clients): the key's
    overrides are set in the same transaction, so the keyring never carries the key without them."""
    coordinator.state.settings.client_tokens_per_day = 50_000
    code, out = rma(coordinator, "clients", "create", "born-metered", "--requests-per-minute", "5",
                    "--upload-bytes-per-day", "1MB", "--json")  # fmt: skip
    assert code == 0, out
    key_id = json.loads(out)["id"]
    assert ring_quota(coordinator, key_id) == {
        "requests_per_minute": 5,
        "tokens_per_day": 50_000,  # not given: the default
        "upload_bytes_per_day": 1_000_000,
    }
    (row,) = [k for k in coordinator.admin("GET", "/api/admin/clients").json() if k["id"] == key_id]
    assert (
        row["quota_overrides"]["requests_per_minute"] == 5
        and row["quota_overrides"]["tokens_per_day"] is None
    )
    code, out = rma(coordinator, "clients", "create", "plain")
    assert code == 0 and "quota" not in out, out
    # mistakes: a 422 that names the field, and nothing created
    before = len(coordinator.admin("GET", "/api/admin/clients").json())
    for quota in ({"tokens_per_day": 0}, {"tokens_per_minute": 5}):
        r = coordinator.admin("POST", "/api/admin/clients", json={"name": "bad", "quota": quota})
        assert r.status_code == 422 and next(iter(quota)) in r.text, r.text
    code, out = rma(coordinator, "clients", "create", "bad", "--upload-bytes-per-day", "lots")
    assert code != 0 and "not a size" in out
    code, out = rma(coordinator, "clients", "create", "bad", "--requests-per-minute", str(10**10))
    assert code != 0 and "--requests-per-minute" in out and "Traceback" not in out, out
    assert len(coordinator.admin("GET", "/api/admin/clients").json()) == before


@pytest.mark.parametrize("body", [{"replica": "", "day": "2026-12-05", "shared": True}, {"day": "today"}])
def test_bad_usage_reports_are_422(coordinator: Coordinator, body: dict[str, object]) -> None:
    assert coordinator.admin("POST", "/api/clients/usage", json=body).status_code == 422


def test_a_key_linked_to_a_giving_donor_gets_the_bonus_quota(coordinator: Coordinator) -> None:
    """`rma clients create --donor` / `rma clients link`: while the donor is live and earned
    `client_donor_min_credits_7d` in 7 days (its ledger rows), the key's default quotas are multiplied by
    `client_donor_quota_factor`, in the keyring the replicas enforce; an override stays as set."""
    from admission.models import ContributionMinute, Worker, utcnow

    s = coordinator.state.settings
    s.client_requests_per_minute, s.client_tokens_per_day = 60, 10_000
    s.client_donor_quota_factor, s.client_donor_min_credits_7d = 3.0, 2.0
    donor = coordinator.join()["worker_id"]
    code, out = rma(coordinator, "clients", "create", "donor-app", "--donor", donor)
    assert code == 0 and f"linked to donor {donor}" in out, out
    (key,) = [k for k in coordinator.admin("GET", "/api/admin/clients").json() if k["name"] == "donor-app"]
    assert (key["donor_id"], key["donor_bonus"]) == (donor, False)  # nothing given yet: no bonus
    assert ring_quota(coordinator, key["id"])["requests_per_minute"] == 60

    def give(cpu_hours: float) -> None:  # the ledger's rows, as the collector writes them (1 credit/CPU-hour)
        with coordinator.state.sessions() as db, db.begin():
            db.add(ContributionMinute(minute=utcnow(), worker_id=donor, cpu_s=cpu_hours * 3600))

    give(1.0)  # 1 credit: under the 2 asked
    assert ring_quota(coordinator, key["id"])["requests_per_minute"] == 60
    give(1.5)
    assert ring_quota(coordinator, key["id"]) == {
        "requests_per_minute": 180,
        "tokens_per_day": 30_000,
        "upload_bytes_per_day": None,  # no limit stays no limit
    }
    # the usage figures show the quota the replicas enforce
    day = datetime.now(UTC).date().isoformat()
    report = {"replica": "gw#1", "day": day, "shared": True, "usage": {key["id"]: {"requests": 3}}}
    assert coordinator.admin("POST", "/api/clients/usage", json=report).status_code == 204
    (row,) = [
        c for c in coordinator.admin("GET", "/api/admin/usage").json()["clients"] if c["key_id"] == key["id"]
    ]
    assert row["quota"]["requests_per_minute"] == 180
    s.client_tokens_per_day = 10**15  # the bonus stops at what a quota may be (the keyring stays valid)
    assert ring_quota(coordinator, key["id"])["tokens_per_day"] == 10**15
    s.client_tokens_per_day = 10_000
    code, out = rma(coordinator, "clients", "quota", "donor-app", "--tokens-per-day", "500")
    assert code == 0, out
    assert ring_quota(coordinator, key["id"])["tokens_per_day"] == 500  # the admin's override wins
    code, out = rma(coordinator, "clients", "list")
    assert f"{donor} (bonus)" in out, out

    # another key: linked later, unlinked; mistakes are one line each
    other = coordinator.admin("POST", "/api/admin/clients", json={"name": "plain"}).json()
    code, out = rma(coordinator, "clients", "link", "plain", "--donor", donor)
    assert code == 0 and "bonus quota" in out, out
    assert ring_quota(coordinator, other["id"])["requests_per_minute"] == 180
    code, out = rma(coordinator, "clients", "link", "plain", "--unlink")
    assert code == 0 and "no donor" in out, out
    assert ring_quota(coordinator, other["id"])["requests_per_minute"] == 60
    code, out = rma(coordinator, "clients", "link", "plain")
    assert code != 0 and "exactly one of --donor" in out
    code, out = rma(coordinator, "clients", "link", "plain", "--donor", "nosuchdonor1")
    assert code != 0 and "no donor nosuchdonor1" in out and "Traceback" not in out
    r = coordinator.admin("POST", "/api/admin/clients", json={"name": "x", "donor_id": "nosuchdonor1"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_donor", r.text
    assert not [k for k in coordinator.admin("GET", "/api/admin/clients").json() if k["name"] == "x"]

    # a donor that left (`rma leave`): no bonus, no new link to it
    gone = coordinator.join()["worker_id"]
    code, out = rma(coordinator, "clients", "link", "plain", "--donor", gone)
    assert code == 0, out
    with coordinator.state.sessions() as db, db.begin():
        db.add(ContributionMinute(minute=utcnow(), worker_id=gone, cpu_s=3 * 3600))
    assert ring_quota(coordinator, other["id"])["requests_per_minute"] == 180
    with coordinator.state.sessions() as db, db.begin():
        db.get(Worker, gone).left_at = utcnow()
    assert ring_quota(coordinator, other["id"])["requests_per_minute"] == 60
    code, out = rma(coordinator, "clients", "link", "plain", "--donor", gone)
    assert code != 0 and "has left the pool" in out, out

    # the donor revoked: no more bonus, and no new link to it
    assert coordinator.admin("POST", f"/api/admin/workers/{donor}/revoke").status_code == 200
    assert ring_quota(coordinator, key["id"])["requests_per_minute"] == 60
    r = coordinator.admin("PUT", f"/api/admin/clients/{other['id']}/donor", json={"donor_id": donor})
    assert r.status_code == 409 and "revoked" in r.json()["error"]["message"], r.text
