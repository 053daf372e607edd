"""How fast donors come into service and how fast the pool notices they are gone, on real hosts (network namespaces).

    cd /work/main && .venv/bin/python -m bench.membership        # as root: it builds a netns test bed

One run: `rma up` on the head (heartbeat interval 2 s; the head's Ray health checks are tuned to a 1 s period,
2 s timeout, failure threshold 3: `rma_ray.raynode.FAST_HEALTH_CHECKS`), four hosts, donors joined with
`rma join --cpus 1` on service-tier invites. The probe app answers with the labels of the node its replica runs
on; each replica asks for 1 CPU, so one donor holds exactly one replica. Figures (seconds from the event):

* join A, join B: from starting `rma join` to the Ray node being up (membership.json has a ray node id), to the
  registry calling the donor `healthy`, and to the first 200 from a replica on that donor. The app (1 replica,
  `label_selector={"rma.io/tier": "service"}`) is deployed first, while no donor can take it, so it waits in
  PENDING; B gets its own pending app because A is full.
* SIGKILL A: every process in A's namespace is SIGKILLed while A hosts the app's replica; B is free (its app was
  deleted). Time until the registry shows A `offline`, and until a request is answered 200 by a replica on B;
  `failed` counts the polls that got no 200 in between.
* SIGSTOP B: a fresh donor C joins (free); B, now hosting the replica that moved off A, has every process in its
  namespace SIGSTOPped. Same two times, the replica coming back on C. (Simplest way to have the stopped donor
  host the replica with a free donor to fall back on; the stopped processes are SIGKILLed, then SIGCONTed.)
* memory, per donor hosting one replica: RSS of the `rma join` agent process (pid from membership.json) versus
  the summed RSS of every other process in the donor's namespace (raylet, dashboard agent, runtime env agent,
  Ray workers/replica). PSS is shown too: summed RSS counts shared pages once per process.

Prints a table; asserts nothing about time. Takes about 3–5 minutes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psutil
import ray

from rma_ray.raynode import FAST_HEALTH_CHECKS
from tests.e2e.conftest import PY, Donor, PoolUnderTest
from tests.e2e.netns import TestBed, available
from tests.support import wait_for

HEARTBEAT_S = 2
POLL_S = 0.2
MIB = 1024 * 1024
PROBE_APP = """
import ray
from ray import serve
ray.init(address="auto", namespace="rma", logging_level="ERROR")

@serve.deployment(num_replicas=1, ray_actor_options={{"num_cpus": 1, "label_selector": {{"rma.io/tier": "service"}}}})
class Where:
    def __call__(self, request):
        return {{"labels": ray.get_runtime_context().get_node_labels()}}

serve._run(Where.bind(), name="{name}", route_prefix="/{name}", _blocking=False)  # stays PENDING: no donor yet
"""


# -- the pool -----------------------------------------------------------------------------------------------

def launch_pool(bed: TestBed, root: Path) -> PoolUnderTest:
    """Start `rma up` as the e2e fixture does (own HOME and data dir); `wait_ready` waits for pool.json."""
    env = {**os.environ, "HOME": str(root / "hhome"), "RMA_DATA_DIR": str(root / "head"), "COLUMNS": "200"}
    log = root / "up.log"
    proc = subprocess.Popen([PY, "-m", "rma_ray.cli", "up", "--node-ip-address", bed.head_ip,
                             "--heartbeat-interval", str(HEARTBEAT_S)], env=env, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT)
    return PoolUnderTest(bed, {}, root, proc, free_hosts=list(bed.hosts))


def wait_ready(put: PoolUnderTest) -> None:
    log, proc, root = put.root / "up.log", put.proc, put.root

    def ready() -> dict[str, Any] | None:
        assert proc.poll() is None, f"rma up exited: {log.read_text()}"
        p = root / "head" / "pool.json"
        return json.loads(p.read_text()) if p.exists() and "join_token" in p.read_text() else None

    put.info = wait_for(ready, timeout=240, interval=0.5, what="rma up to write pool.json")


def stop_pool(put: PoolUnderTest) -> None:
    """Donors leave first (SIGTERM, they drain), then SIGINT to `rma up`, which stops Serve and the head."""
    live = [d for d in put.donors if d.proc.poll() is None]
    for d in live:
        d.proc.send_signal(signal.SIGTERM)
    for d in live:
        try:
            d.proc.wait(30)
        except subprocess.TimeoutExpired:
            d.proc.kill()
    put.proc.send_signal(signal.SIGINT)
    try:
        put.proc.wait(120)
    except subprocess.TimeoutExpired:
        put.proc.kill()
        put.proc.wait(10)


def run_driver(put: PoolUnderTest, script: str) -> None:
    r = put.driver(script)
    if r.returncode != 0:
        raise RuntimeError(f"driver failed: {r.stderr[-3000:]}")


def deploy_pending(put: PoolUnderTest, name: str) -> None:
    run_driver(put, PROBE_APP.format(name=name))


def delete_app(put: PoolUnderTest, name: str) -> None:
    run_driver(put, f'import ray; from ray import serve; ray.init(address="auto", namespace="rma", '
                    f'logging_level="ERROR"); serve.delete("{name}")')


# -- probes -------------------------------------------------------------------------------------------------

def served_by(put: PoolUnderTest, app: str, http: httpx.Client) -> str | None:
    """The registry id of the donor whose replica answered, or None when the request did not succeed."""
    try:
        r = http.get(f"{put.info['serve_url']}/{app}")
    except httpx.HTTPError:
        return None
    return r.json()["labels"].get("rma.io/node") if r.status_code == 200 else None


def membership(donor: Donor) -> dict[str, Any]:
    m = donor.data_dir / "membership.json"
    try:
        return json.loads(m.read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return {}


def signal_donor(donor: Donor, sig: signal.Signals) -> None:
    for pid in donor.pids():
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


# -- measurements -------------------------------------------------------------------------------------------

def measure_join(put: PoolUnderTest, app: str, timeout: float = 180) -> tuple[Donor, dict[str, float]]:
    """Start `rma join` and poll every POLL_S until the registry says healthy and the app answers from it."""
    token = put.invite(tier="service")
    t0 = time.monotonic()
    donor = put.start_join(token)
    got: dict[str, float] = {}
    with httpx.Client(timeout=5) as http:
        while len(got) < 3:
            now = time.monotonic() - t0
            if donor.proc.poll() is not None or now > timeout:
                raise RuntimeError(f"join on {donor.host.name} failed after {now:.0f} s: {donor.output()[-2000:]}")
            m = membership(donor)
            donor.worker_id = m.get("worker_id", "")
            if m.get("ray_node_id"):
                got.setdefault("node up", now)
            if donor.worker_id and "healthy" not in got and put.worker(donor.worker_id)["status"] == "healthy":
                got["healthy"] = time.monotonic() - t0
            if donor.worker_id and "served" not in got and served_by(put, app, http) == donor.worker_id:
                got["served"] = time.monotonic() - t0
            time.sleep(POLL_S)
    return donor, got


def measure_loss(put: PoolUnderTest, victim: Donor, survivor: Donor, app: str, sig: signal.Signals,
                 timeout: float = 120) -> dict[str, float]:
    """Signal every process of the victim's namespace; time registry `offline` and the first 200 from survivor."""
    got: dict[str, float] = {"failed": 0}
    t0 = time.monotonic()
    signal_donor(victim, sig)
    with httpx.Client(timeout=2) as http:
        while "offline" not in got or "served" not in got:
            now = time.monotonic() - t0
            if now > timeout:
                raise RuntimeError(f"{sig.name} of {victim.host.name}: not recovered after {timeout} s ({got})")
            if "offline" not in got and put.worker(victim.worker_id)["status"] == "offline":
                got["offline"] = time.monotonic() - t0
            if "served" not in got:
                node = served_by(put, app, http)
                if node == survivor.worker_id:
                    got["served"] = time.monotonic() - t0
                elif node is None:
                    got["failed"] += 1
            time.sleep(POLL_S)
    return got


def memory(donor: Donor) -> dict[str, Any]:
    agent_pid = int(membership(donor)["agent_pid"])
    agent = psutil.Process(agent_pid).memory_full_info()
    rss = pss = 0
    names: Counter[str] = Counter()
    for pid in donor.pids():
        if pid == agent_pid:
            continue
        try:
            p = psutil.Process(pid)
            info = p.memory_full_info()
            names[p.name()] += 1
        except psutil.NoSuchProcess:
            continue
        rss, pss = rss + info.rss, pss + info.pss
    return {"agent_rss": agent.rss / MIB, "agent_pss": agent.pss / MIB, "ray_rss": rss / MIB, "ray_pss": pss / MIB,
            "procs": ", ".join(f"{n}×{c}" if c > 1 else n for n, c in sorted(names.items()))}


# -- report -------------------------------------------------------------------------------------------------

def report(joins: dict[str, dict[str, float]], losses: dict[str, dict[str, float]], mem: dict[str, dict[str, Any]],
           elapsed: float) -> None:
    hc = FAST_HEALTH_CHECKS
    print(f"\nRMA Pool membership — Ray {ray.__version__}, {os.cpu_count()} cores, donors `rma join --cpus 1`, "
          f"heartbeat {HEARTBEAT_S} s, head health checks {int(hc['RAY_health_check_period_ms']) / 1000:g} s "
          f"period / {int(hc['RAY_health_check_timeout_ms']) / 1000:g} s timeout / threshold "
          f"{hc['RAY_health_check_failure_threshold']}, poll {POLL_S} s")
    print(f"\n{'join (from process start)':<28}{'node up s':>10}{'healthy s':>11}{'first 200 s':>13}")
    for name, g in joins.items():
        print(f"{name:<28}{g['node up']:>10.1f}{g['healthy']:>11.1f}{g['served']:>13.1f}")
    print(f"\n{'loss (from the signal)':<28}{'offline s':>10}{'200 elsewhere s':>17}{'failed polls':>14}")
    for name, g in losses.items():
        print(f"{name:<28}{g['offline']:>10.1f}{g['served']:>17.1f}{int(g['failed']):>14}")
    print(f"\n{'memory (MiB)':<14}{'agent RSS':>10}{'Ray RSS':>9}{'Ray/agent':>10}{'agent PSS':>11}{'Ray PSS':>9}"
          "  Ray processes")
    for name, m in mem.items():
        print(f"{name:<14}{m['agent_rss']:>10.0f}{m['ray_rss']:>9.0f}{m['ray_rss'] / m['agent_rss']:>9.1f}x"
              f"{m['agent_pss']:>11.0f}{m['ray_pss']:>9.0f}  {m['procs']}")
    print(f"\ntotal run {elapsed:.0f} s")


def scenario(put: PoolUnderTest) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    joins, losses, mem = {}, {}, {}
    deploy_pending(put, "probe")
    a, joins["A (app pending)"] = measure_join(put, "probe")
    deploy_pending(put, "probe-b")  # A is full (1 CPU): this one waits for B
    b, joins["B (app pending)"] = measure_join(put, "probe-b")
    mem["A"], mem["B"] = memory(a), memory(b)
    delete_app(put, "probe-b")
    losses["SIGKILL A -> B"] = measure_loss(put, a, b, "probe", signal.SIGKILL)
    c = put.join(put.invite(tier="service"))
    try:
        losses["SIGSTOP B -> C"] = measure_loss(put, b, c, "probe", signal.SIGSTOP)
    finally:
        signal_donor(b, signal.SIGKILL)
        signal_donor(b, signal.SIGCONT)
    return joins, losses, mem


def main() -> int:
    reason = available()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="rma-bench-membership-"))
    try:
        with TestBed(4) as bed:
            put = launch_pool(bed, root)
            try:
                wait_ready(put)
                results = scenario(put)
            finally:
                stop_pool(put)
    except BaseException:
        print(f"bench failed; logs kept under {root}", file=sys.stderr)
        raise
    report(*results, elapsed=time.monotonic() - started)
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
