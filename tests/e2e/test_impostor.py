"""A node posing as a donor (issue 16, finding 7): anyone holding the cluster token can start a raylet with any
`rma.io/node` label. The reconciler holds a label to the donor's address: an impostor on another host gets the
donor quarantined, an audit row naming both nodes, and both drained. Uses the package's pool (tests/e2e/
conftest.py); one donor and one impostor host (~40 s)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from rma_ray.raynode import format_labels, ray_executable
from tests.e2e.conftest import PoolUnderTest
from tests.support import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.ray]
# it leaves a drained impostor raylet and a quarantined donor in the shared pool: after every other module
RUNS_LAST = True


def test_a_raylet_with_a_stolen_node_label_is_quarantined(pool: PoolUnderTest) -> None:
    donor = pool.join(pool.invite(tier="service"))
    w = pool.worker(donor.worker_id)
    assert w["status"] == "healthy"
    host = pool.free_hosts.pop(0)
    temp = Path(f"/tmp/rma-imp-{host.name[-6:]}")
    labels = {"rma.io/tier": "service", "rma.io/node": donor.worker_id, "rma.io/trusted": "false"}
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(pool.root / "head" / "cluster_token"),
        "RAY_USAGE_STATS_ENABLED": "0",
        "HOME": str(pool.root / "imphome"),
    }
    log = open(pool.root / "impostor.log", "wb")
    impostor = host.popen(
        [
            ray_executable(),
            "start",
            "--block",
            "--address",
            pool.info["ray_address"],
            "--node-ip-address",
            host.ip,
            "--temp-dir",
            str(temp),
            "--disable-usage-stats",
            "--num-cpus",
            "1",
            "--labels",
            format_labels(labels),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:

        def quarantined() -> dict | None:  # type: ignore[type-arg]
            assert impostor.poll() is None, (pool.root / "impostor.log").read_text()[-3000:]
            got = pool.worker(donor.worker_id)
            return got if got["status"] == "quarantined" else None

        got = wait_for(
            quarantined,
            timeout=90,
            interval=0.5,
            what="the reconciler to quarantine the donor whose label an impostor stole",
        )
        assert f"at {host.ip} claims donor {donor.worker_id}" in got["quarantine_reason"], got
        assert got["action"] == "drain"
        events = pool.admin("GET", "/api/admin/audit", params={"action": "worker.quarantine"}).json()
        row = next(e for e in events if e["subject"] == donor.worker_id)
        assert row["detail"]["kind"] == "claim"
        assert {n["node_ip"] for n in row["detail"]["nodes"]} == {donor.host.ip, host.ip}
        # the donor's agent hears "drain" on its next heartbeat; Ray was asked to drain the impostor too
        wait_for(lambda: "draining" in donor.output(), timeout=20, what="the donor's agent to drain")
    finally:
        impostor.send_signal(signal.SIGTERM)
        try:
            impostor.wait(30)
        except subprocess.TimeoutExpired:
            impostor.kill()
            impostor.wait(10)
        for pid in subprocess.run(
            ["ip", "netns", "pids", host.name], capture_output=True, text=True
        ).stdout.split():  # what the impostor's raylet left in its namespace
            subprocess.run(["kill", "-KILL", pid], check=False)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
