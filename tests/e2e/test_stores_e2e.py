"""Data stores in the real pool (network-namespace hosts, `rma up` + `rma join`): all four stores land on the
trusted data donor, report to the registry, and come back with all 1,000 acknowledged records each after a power
cut of the donor: every process of its host (agent, Ray node, the stores themselves) SIGKILLed at once. `rma
join` starts again with its saved membership (as systemd would), Ray restarts each supervisor on the new node,
and each store process is a new one (its PID changed) on the same volume."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.e2e.conftest import PY, Donor, PoolUnderTest
from tests.support import GiveUp, wait_for

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.ray,
    pytest.mark.skipif(not shutil.which("redis-server"), reason="Debian redis-server not installed"),
]

STORES = ("redis", "postgres", "chroma", "graph")
ENSURE = """
import json, ray
from deployments.stores import supervisor
ray.init(logging_level="ERROR", log_to_driver=False)
for s in %r:
    supervisor.ensure(s, selector={**supervisor.TRUSTED_DATA, "rma.io/node": %r})
print(json.dumps({s: supervisor.endpoint(s, 240).__dict__ for s in %r}))
"""


@pytest.fixture(scope="module")
def data_donor(pool: PoolUnderTest) -> Iterator[tuple[Donor, dict[str, Any]]]:
    stores_dir = Path(tempfile.mkdtemp(prefix="rma-e2e-stores-"))
    stores_dir.chmod(0o755)  # the postgres user must traverse it
    token_file = pool.root / "stores-donor-token"
    token_file.write_text(pool.invite(tier="data", trusted=True) + "\n")
    token_file.chmod(0o600)
    donor = pool.join(
        token_file.read_text().strip(),
        "--token-file",
        str(token_file),
        env={"RMA_STORES_DIR": str(stores_dir)},
    )
    donor.stores_dir = stores_dir  # type: ignore[attr-defined]
    donor.token_file = token_file  # type: ignore[attr-defined]
    try:
        # pinned to this donor: other trusted data donors of the session's pool (test_membership's) stay out of it
        r = pool.driver(ENSURE % (STORES, donor.worker_id, STORES), timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        yield donor, json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        pool.driver(
            """
import ray
ray.init(logging_level="ERROR", log_to_driver=False)
for s in %r:
    try:
        a = ray.get_actor("rma-store-" + s, namespace="rma")
        ray.get(a.stop.remote(), timeout=60)
        ray.kill(a, no_restart=True)
    except Exception:
        pass
"""
            % (STORES,),
            timeout=150,
        )
        for pidfile in stores_dir.glob("*/.rma-pid.json"):
            try:
                psutil.Process(json.loads(pidfile.read_text())["pid"]).kill()
            except (psutil.Error, OSError, ValueError):
                pass
        shutil.rmtree(stores_dir, ignore_errors=True)


def records(donor: Donor, action: str, eps: dict[str, Any]) -> dict[str, int]:
    """Write or count the 1,000 records of every store from the donor's own host (endpoints on stdin)."""
    out = donor.host.run(
        [PY, "-m", "tests.support.records", action],
        check=False,
        timeout=300,
        input=json.dumps(eps),
        cwd=str(Path(__file__).resolve().parents[2]),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def store_pids(stores_dir: Path) -> dict[str, int]:
    return {s: json.loads((stores_dir / s / ".rma-pid.json").read_text())["pid"] for s in STORES}


def test_stores_land_on_the_trusted_data_donor_and_report(
    pool: PoolUnderTest, data_donor: tuple[Donor, dict[str, Any]]
) -> None:
    donor, eps = data_donor
    for s in STORES:
        assert eps[s]["host"] == donor.host.ip
    listed = wait_for(
        lambda: (
            lambda rows: rows if {r["name"] for r in rows if r["status"] == "ready"} >= set(STORES) else None
        )(pool.admin("GET", "/api/admin/stores").json()),
        timeout=60,
        what="the supervisors to report to the coordinator",
    )
    for row in listed:
        if row["name"] in STORES:
            assert (
                row["node"] == donor.worker_id and row["node_ip"] == donor.host.ip and row["size_bytes"] > 0
            )


def test_1000_records_each_survive_a_power_cut_of_the_data_donor(
    pool: PoolUnderTest, data_donor: tuple[Donor, dict[str, Any]]
) -> None:
    donor, eps = data_donor
    stores_dir: Path = donor.stores_dir  # type: ignore[attr-defined]
    assert records(donor, "write", eps) == {s: 1000 for s in STORES}
    old_node = pool.worker(donor.worker_id)["ray_node_id"]
    before = store_pids(stores_dir)
    assert all(psutil.pid_exists(p) for p in before.values()), before
    # the power cut: every process of the donor's host, the agent and the store processes included, at once
    victims = donor.pids()
    assert donor.proc.pid in victims and set(before.values()) <= set(victims), (victims, before)
    donor.power_cut(victims)

    again = pool.restart(
        donor,
        "--token-file",
        str(donor.token_file),  # type: ignore[attr-defined]
        env={"RMA_STORES_DIR": str(stores_dir)},
    )

    def new_node() -> bool:
        if again.proc.poll() is not None:
            raise GiveUp(f"rma join exited: {again.output()}")
        return any(
            n["labels"].get("rma.io/node") == donor.worker_id and n["node_id"] != old_node
            for n in pool.alive_nodes()
        )

    wait_for(new_node, timeout=120, interval=1, what="the restarted donor to bring up a new Ray node")
    r = pool.driver(
        ENSURE % (STORES, donor.worker_id, STORES), timeout=600
    )  # until every store answers again
    assert r.returncode == 0, r.stderr[-3000:]
    eps2 = json.loads(r.stdout.strip().splitlines()[-1])
    assert {s: eps2[s]["host"] for s in STORES} == {s: donor.host.ip for s in STORES}
    after = store_pids(stores_dir)
    assert all(after[s] != before[s] and psutil.pid_exists(after[s]) for s in STORES), (before, after)
    assert set(after.values()) <= set(again.pids())  # on the donor's host, under its new Ray node
    assert records(again, "count", eps2) == {s: 1000 for s in STORES}
