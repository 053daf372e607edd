"""A donor's machine crashes or reboots: `rma join` again with the same (spent) token file rejoins as the same
donor with its node credential; once revoked, it is refused with the reason. Uses the package-scoped pool and
one donor host."""

from __future__ import annotations

import json
import signal

import psutil
import pytest

from tests.e2e.conftest import Donor, PoolUnderTest
from tests.support import GiveUp, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.ray]


def restart(pool: PoolUnderTest, donor: Donor, token_file: str) -> Donor:
    return pool.restart(donor, "--token-file", token_file)


def test_killed_donor_rejoins_with_its_spent_token_and_a_revoked_one_is_refused(pool: PoolUnderTest) -> None:
    token = pool.invite(tier="service")  # single use
    token_file = pool.root / "rejoin-token"
    token_file.write_text(token + "\n")
    donor = pool.join(token, "--token-file", str(token_file))
    first = pool.worker(donor.worker_id)
    m = json.loads((donor.data_dir / "membership.json").read_text())
    # a power cut: the agent and the whole Ray node die at once, nothing is cleaned up
    tree = [psutil.Process(m["ray_pid"]), *psutil.Process(m["ray_pid"]).children(recursive=True)]
    donor.proc.send_signal(signal.SIGKILL)
    for p in tree:
        p.kill()
    donor.proc.wait(10)
    again = restart(pool, donor, str(token_file))

    def rejoined() -> dict | None:  # type: ignore[type-arg]
        if again.proc.poll() is not None:
            raise GiveUp(f"rma join exited: {again.output()}")
        w = pool.worker(donor.worker_id)
        new_node = w["ray_node_id"] not in (None, first["ray_node_id"])
        return w if w["status"] == "healthy" and new_node else None

    w = wait_for(rejoined, timeout=120, interval=0.5, what="the killed donor to rejoin as the same donor")
    assert w["tier"] == "service" and "rejoining as donor" in again.output()
    assert any(n["labels"].get("rma.io/node") == donor.worker_id for n in pool.alive_nodes())
    assert json.loads((donor.data_dir / "membership.json").read_text())["worker_id"] == donor.worker_id

    # SIGTERM (a reboot, `systemctl stop`): the node stops, the membership stays; revoked while it is down,
    # its restart is refused with the reason, in one line, non-zero
    again.proc.send_signal(signal.SIGTERM)
    assert again.proc.wait(60) == 0, again.output()
    assert (donor.data_dir / "membership.json").exists() and again.pids() == []
    assert pool.worker(donor.worker_id)["status"] != "left"
    assert pool.admin("POST", f"/api/admin/workers/{donor.worker_id}/revoke").status_code == 200
    third = restart(pool, again, str(token_file))
    assert third.proc.wait(60) != 0
    out = third.output()
    assert "revoked by the pool admin" in out and "Traceback" not in out, out
    assert third.pids() == [] and not (donor.data_dir / "membership.json").exists()
