"""Data stores in the real pool (network-namespace hosts, `rma up` + `rma join`): a store lands on the trusted
data donor, reports to the registry, and comes back with all 1,000 acknowledged records after the donor's Ray node
is SIGKILLed (the agent restarts the node; Ray restarts the supervisor there; the store reopens its volume)."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.e2e.conftest import Donor, PoolUnderTest
from tests.support import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.ray,
              pytest.mark.skipif(not shutil.which("redis-server"), reason="Debian redis-server not installed")]

STORES = ("redis", "postgres")
ENSURE = """
import json, ray
from deployments.stores import supervisor
ray.init(logging_level="ERROR")
for s in %r:
    supervisor.ensure(s, selector={**supervisor.TRUSTED_DATA, "rma.io/node": %r})
print(json.dumps({s: supervisor.endpoint(s, 180).__dict__ for s in %r}))
"""
WRITE = """
import json, psycopg, redis
eps = json.loads(%r)
r = eps["redis"]
cli = redis.Redis(host=r["host"], port=r["port"], password=r["password"])
acked = {"redis": sum(1 for i in range(1000) if cli.set(f"rec:{i}", f"v{i}"))}
p = eps["postgres"]
with psycopg.connect(host=p["host"], port=p["port"], user=p["user"], password=p["password"], dbname=p["database"],
                     autocommit=True) as c:
    c.execute("CREATE TABLE IF NOT EXISTS recs (id int PRIMARY KEY, v text)")
    n = 0
    for i in range(1000):
        c.execute("INSERT INTO recs VALUES (%%s, %%s) ON CONFLICT DO NOTHING", (i, f"v{i}"))
        n += 1
acked["postgres"] = n
print(json.dumps(acked))
"""
COUNT = """
import json, psycopg, redis
eps = json.loads(%r)
r = eps["redis"]
cli = redis.Redis(host=r["host"], port=r["port"], password=r["password"])
out = {"redis": sum(1 for i in range(1000) if cli.get(f"rec:{i}") == f"v{i}".encode())}
p = eps["postgres"]
with psycopg.connect(host=p["host"], port=p["port"], user=p["user"], password=p["password"], dbname=p["database"]) as c:
    out["postgres"] = c.execute("SELECT count(*) FROM recs WHERE v = 'v' || id").fetchone()[0]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def data_donor(pool: PoolUnderTest) -> Iterator[tuple[Donor, dict[str, Any]]]:
    stores_dir = Path(tempfile.mkdtemp(prefix="rma-e2e-stores-"))
    stores_dir.chmod(0o755)  # the postgres user must traverse it
    donor = pool.join(pool.invite(tier="data", trusted=True), env={"RMA_STORES_DIR": str(stores_dir)})
    try:
        # pinned to this donor: other trusted data donors of the session's pool (test_membership's) stay out of it
        r = pool.driver(ENSURE % (STORES, donor.worker_id, STORES), timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        yield donor, json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        pool.driver("""
import ray
ray.init(logging_level="ERROR")
for s in %r:
    try:
        a = ray.get_actor("rma-store-" + s, namespace="rma")
        ray.get(a.stop.remote(), timeout=60)
        ray.kill(a, no_restart=True)
    except Exception:
        pass
""" % (STORES,), timeout=150)
        for pidfile in stores_dir.glob("*/.rma-pid.json"):
            try:
                psutil.Process(json.loads(pidfile.read_text())["pid"]).kill()
            except (psutil.Error, OSError, ValueError):
                pass
        shutil.rmtree(stores_dir, ignore_errors=True)


def run_on(donor: Donor, script: str) -> dict[str, Any]:
    from tests.e2e.conftest import PY

    out = donor.host.run([PY, "-c", script], check=False, timeout=180, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_stores_land_on_the_trusted_data_donor_and_report(pool: PoolUnderTest,
                                                          data_donor: tuple[Donor, dict[str, Any]]) -> None:
    donor, eps = data_donor
    for s in STORES:
        assert eps[s]["host"] == donor.host.ip
    listed = wait_for(lambda: (lambda rows: rows if {r["name"] for r in rows if r["status"] == "ready"} >= set(STORES)
                               else None)(pool.admin("GET", "/api/admin/stores").json()),
                      timeout=60, what="the supervisors to report to the coordinator")
    for row in listed:
        if row["name"] in STORES:
            assert row["node"] == donor.worker_id and row["node_ip"] == donor.host.ip and row["size_bytes"] > 0


def test_1000_records_survive_a_sigkill_of_the_donors_ray_node(pool: PoolUnderTest,
                                                                data_donor: tuple[Donor, dict[str, Any]]) -> None:
    donor, eps = data_donor
    assert run_on(donor, WRITE % json.dumps(eps)) == {s: 1000 for s in STORES}
    old_node = pool.worker(donor.worker_id)["ray_node_id"]
    raylets = [p for p in map(psutil.Process, donor.pids()) if p.name() == "raylet"]
    assert len(raylets) == 1
    raylets[0].kill()
    wait_for(lambda: any(n["labels"].get("rma.io/node") == donor.worker_id and n["node_id"] != old_node
                         for n in pool.alive_nodes()), timeout=120, interval=1,
             what="the agent to bring up a new Ray node")
    r = pool.driver(ENSURE % (STORES, donor.worker_id, STORES), timeout=300)  # until both answer queries again
    assert r.returncode == 0, r.stderr[-3000:]
    eps2 = json.loads(r.stdout.strip().splitlines()[-1])
    assert {s: eps2[s]["host"] for s in STORES} == {s: donor.host.ip for s in STORES}
    assert run_on(donor, COUNT % json.dumps(eps2)) == {s: 1000 for s in STORES}
