"""A donor lends its machine on its own terms: `rma pause` drains and stops its Ray node while it stays a member
(the coordinator says `paused`, never offline), `rma resume` brings the node back and healthy. Uses the
package-scoped pool and one donor host (~40 s: a join, a drain, a node start)."""

from __future__ import annotations

import json
import os
import sys

import pytest

from tests.e2e.conftest import PoolUnderTest
from tests.support import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.ray]


def test_pause_and_resume(pool: PoolUnderTest) -> None:
    donor = pool.join(pool.invite(tier="service"))
    env = {**os.environ, "RMA_DATA_DIR": str(donor.data_dir), "HOME": str(donor.data_dir.parent / "home")}

    def rma(*args: str) -> str:
        r = donor.host.run([sys.executable, "-m", "rma_ray.cli", *args], env=env, check=False, timeout=150)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
        return r.stdout  # type: ignore[no-any-return]

    def live_node() -> bool:
        return any(n["labels"].get("rma.io/node") == donor.worker_id for n in pool.alive_nodes())

    assert live_node()
    assert "paused" in rma("pause")
    # the agent answered only after the node stopped; the beat saying so went out first
    assert pool.worker(donor.worker_id)["status"] == "paused"
    wait_for(
        lambda: not live_node(), timeout=30, interval=0.5, what="Ray to see the paused donor's node gone"
    )
    assert donor.proc.poll() is None  # the agent stays, heartbeating
    status = json.loads(rma("status", "--json"))
    assert status["state"] == "paused" and status["registry_status"] == "paused"
    assert not status["ray_node_running"] and status["agent_running"]
    # still paused after a few reconciler rounds and beats (heartbeat interval 2 s): never taken for offline
    wait_for(
        lambda: pool.worker(donor.worker_id)["ray_alive"] is False,
        timeout=30,
        what="the reconciler's reading",
    )
    assert pool.worker(donor.worker_id)["status"] == "paused"

    rma("resume")
    wait_for(live_node, timeout=60, interval=0.5, what="the resumed donor's node alive in Ray")
    wait_for(
        lambda: (
            pool.worker(donor.worker_id)["status"] == "healthy" and pool.worker(donor.worker_id)["ray_alive"]
        ),
        timeout=30,
        interval=0.5,
        what="the coordinator to show the resumed donor healthy",
    )
    assert json.loads((donor.data_dir / "membership.json").read_text())["extra"]["state"] == "active"
