"""How fast a donor comes into service, how fast the pool notices it gone, and how fast a restarted donor is
back, on real hosts (netns test bed).

    cd /work/main && timeout 900 .venv/bin/python -m bench.membership [--part join|restart] [--reps N]  # root

`--part join` (about 1.5 min on 2 cores) prints the join, loss and memory figures, `--part restart` the donor
restart figures (about 2 min with 3 restarts of each kind), the default both (about 3.5 min), restart after join
in the same pool.

`rma up` runs on the head with heartbeat interval 2 s; its Ray head runs with tuned health checks (1 s period,
2 s timeout, failure threshold 3: `rma_ray.raynode.FAST_HEALTH_CHECKS`). Donors are `rma join --cpus 1` on
service-tier invites, each on its own host. The probe app (1 replica, `label_selector={"rma.io/tier":
"service"}`, num_cpus=1 so one donor holds exactly one replica) answers with its node's labels, so a 200 says
which donor served it. Requests are polled every 0.2 s. Figures, in seconds from the event:

* join A, join B (event: `rma join` process start). The app is deployed first and waits PENDING, as no
  service donor exists; B gets its own pending app, as A is full. `admitted`: membership.json has the worker
  id; `ray start`: the agent saw `ray start` finish (it records the node id); `healthy`: the registry
  (GET /api/admin/workers/{id}) says healthy; `first 200`: a request is served by a replica on that donor
  (labels["rma.io/node"] == worker id). Ray can place the replica before `ray start` itself returns.
* SIGKILL A -> B (event: SIGKILL of every pid in A's namespace while A hosts the replica; B is free, its own
  app deleted): `offline` = the registry shows A offline; `200 elsewhere` = a request served by a replica on
  B; `failed polls` = polls in between that got no 200 (1 s request timeout, so resolution is about 1.2 s).
* SIGSTOP B -> C: what we did to have the stopped donor host the replica with a free donor to fall back on: a
  third donor C joins after the SIGKILL above, so B (which now hosts the replica that moved off A) is the one
  SIGSTOPped (every pid in its namespace); same figures, the replica coming back on C. Afterwards B's
  processes are SIGKILLed and SIGCONTed.
* memory, for A and B while each hosts one replica: RSS of the `rma join` agent process (`agent_pid` from
  membership.json) versus the summed RSS of every other process in the donor's namespace (`ray start`, raylet,
  dashboard agent, runtime env agent, log monitor, the replica worker), and their ratio. Summed RSS counts
  shared pages once per process, so summed PSS is shown too.

* restart (issue 18's "donor restart -> healthy again"): a donor D joins with `--token-file` (its invite is
  single use, so the file holds a spent token afterwards, as a donor's unit file would) while its own probe app
  waits PENDING; every other service donor is dead or full, so the replica can only come back on D. A power
  cut is a SIGKILL of every pid in D's namespace (the agent and the whole Ray node, nothing cleaned up); a
  graceful restart is a SIGTERM to the agent, as systemd sends it, which drains and stops the node. Once no
  process is left in the namespace (`stop`, in seconds from the signal), `rma join` starts again in the same
  namespace with the same data dir and the same token file. In seconds from that start: `admitted again`:
  membership.json names the same worker id and the new agent's pid; `ray start`: it records a new Ray node id;
  `healthy`: the registry says healthy with that new node id; `first 200`: a request served by a replica on
  D. Each kind `--reps` times, then the median.

Prints tables and the load average, and asserts nothing about time. Donors' Ray temp dirs (/tmp/rma-<worker
id>) are removed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
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

from rma_ray.raynode import FAST_HEALTH_CHECKS, short_temp_dir
from tests.e2e.conftest import PY, Donor, PoolUnderTest
from tests.e2e.netns import TestBed, available
from tests.support import wait_for

HEARTBEAT_S, POLL_S, MIB = 2, 0.2, 1024 * 1024
Times = dict[str, float]
PROBE_APP = """
import ray
from ray import serve
ray.init(address="auto", namespace="rma", logging_level="ERROR")
opts = {{"num_cpus": 1, "label_selector": {{"rma.io/tier": "service"}}}}

@serve.deployment(num_replicas=1, ray_actor_options=opts)
class Where:
    def __call__(self, request):
        return {{"labels": ray.get_runtime_context().get_node_labels()}}

serve._run(Where.bind(), name="{name}", route_prefix="/{name}", _blocking=False)  # returns while PENDING
"""
DELETE_APP = (
    'import ray; from ray import serve; ray.init(address="auto", namespace="rma"); serve.delete("{name}")'
)


# -- the pool (as tests/e2e/conftest.py's `pool` fixture does it) -------------------------------------------


def launch_pool(bed: TestBed, root: Path) -> PoolUnderTest:
    env = {**os.environ, "HOME": str(root / "hhome"), "RMA_DATA_DIR": str(root / "head"), "COLUMNS": "200"}
    argv = [
        PY,
        "-m",
        "rma_ray.cli",
        "up",
        "--node-ip-address",
        bed.head_ip,
        "--heartbeat-interval",
        str(HEARTBEAT_S),
        "--stores",
        "none",
        "--apps",
        "none",
        "--no-edge",  # the core's membership figures: its donors join the core
    ]
    proc = subprocess.Popen(argv, env=env, stdout=open(root / "up.log", "wb"), stderr=subprocess.STDOUT)
    return PoolUnderTest(bed, {}, root, proc, free_hosts=list(bed.hosts))


def wait_ready(put: PoolUnderTest) -> None:
    def ready() -> dict[str, Any]:  # empty (falsy) until rma up has written it
        assert put.proc.poll() is None, f"rma up exited: {(put.root / 'up.log').read_text()}"
        p = put.root / "head" / "pool.json"
        return dict(json.loads(p.read_text())) if p.exists() and "join_token" in p.read_text() else {}

    put.info = wait_for(ready, timeout=240, interval=0.5, what="rma up to write pool.json")


def stop_pool(put: PoolUnderTest) -> None:
    """Live donors leave (SIGTERM: they drain), then SIGINT to `rma up`, which stops Serve and the head."""
    live = [d for d in put.donors if d.proc.poll() is None]
    for d in live:
        d.proc.send_signal(signal.SIGTERM)
    for d in live:
        stop(d.proc, 30)
    put.proc.send_signal(signal.SIGINT)
    stop(put.proc, 120)


def stop(proc: subprocess.Popen[bytes], grace: float) -> None:
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def driver(put: PoolUnderTest, script: str) -> None:
    r = put.driver(script)
    if r.returncode != 0:
        raise RuntimeError(f"driver failed: {r.stderr[-3000:]}")


# -- probes -------------------------------------------------------------------------------------------------


def served_by(put: PoolUnderTest, app: str, http: httpx.Client) -> str | None:
    """The worker id of the donor whose replica answered 200; None when no 200 came back."""
    try:
        r = http.get(f"{put.info['serve_url']}/{app}")
    except httpx.HTTPError:
        return None
    return r.json()["labels"].get("rma.io/node") if r.status_code == 200 else None


def membership(donor: Donor) -> dict[str, Any]:
    try:
        return json.loads((donor.data_dir / "membership.json").read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return {}


def signal_donor(donor: Donor, sig: signal.Signals) -> None:
    for pid in donor.pids():
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


# -- measurements -------------------------------------------------------------------------------------------


def measure_join(put: PoolUnderTest, app: str, timeout: float = 180) -> tuple[Donor, Times]:
    token = put.invite(tier="service")
    t0 = time.monotonic()
    donor = put.start_join(token)
    got: Times = {}
    with httpx.Client(timeout=5) as http:
        while len(got) < 4:
            if donor.proc.poll() is not None or time.monotonic() - t0 > timeout:
                raise RuntimeError(f"join on {donor.host.name} failed: {donor.output()[-2000:]}")
            m = membership(donor)
            donor.worker_id = m.get("worker_id", "")
            if donor.worker_id:
                got.setdefault("admitted", time.monotonic() - t0)
                if m.get("ray_node_id"):
                    got.setdefault("ray start", time.monotonic() - t0)
                if "healthy" not in got and put.worker(donor.worker_id)["status"] == "healthy":
                    got["healthy"] = time.monotonic() - t0
                if "served" not in got and served_by(put, app, http) == donor.worker_id:
                    got["served"] = time.monotonic() - t0
            time.sleep(POLL_S)
    return donor, got


def measure_loss(
    put: PoolUnderTest, victim: Donor, survivor: Donor, app: str, sig: signal.Signals, timeout: float = 120
) -> Times:
    got: Times = {"failed": 0}
    t0 = time.monotonic()
    signal_donor(victim, sig)
    with httpx.Client(timeout=1) as http:
        while "offline" not in got or "served" not in got:
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"{sig.name} of {victim.host.name}: not recovered in {timeout} s ({got})")
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


def measure_restart(
    put: PoolUnderTest, donor: Donor, app: str, token_file: Path, graceful: bool, timeout: float = 180
) -> tuple[Donor, Times]:
    """Stop the donor (SIGTERM to the agent, or SIGKILL of its whole namespace), then `rma join` it again
    with its data dir and token file; the figures are in the module docstring. Returns the restarted donor."""
    old_node = membership(donor).get("ray_node_id")
    t = time.monotonic()
    if graceful:
        donor.proc.send_signal(signal.SIGTERM)
        if donor.proc.wait(90) != 0:
            raise RuntimeError(f"SIGTERM of {donor.host.name}: the agent failed: {donor.output()[-2000:]}")
    else:
        signal_donor(donor, signal.SIGKILL)
        donor.proc.wait(10)
    wait_for(lambda: not donor.pids(), timeout=60, interval=0.1, what=f"{donor.host.name} to have no process")
    got: Times = {"stop": time.monotonic() - t}
    t0 = time.monotonic()
    again = put.restart(donor, "--token-file", str(token_file))

    def new_node(node: str | None) -> bool:
        return node not in (None, old_node)

    with httpx.Client(timeout=2) as http:
        while len(got) < 5:
            if again.proc.poll() is not None or time.monotonic() - t0 > timeout:
                raise RuntimeError(f"restart on {donor.host.name} failed ({got}): {again.output()[-2000:]}")
            m = membership(again)
            if m.get("worker_id") == donor.worker_id and m.get("agent_pid") == again.proc.pid:
                got.setdefault("admitted", time.monotonic() - t0)
                if new_node(m.get("ray_node_id")):
                    got.setdefault("ray start", time.monotonic() - t0)
            if "healthy" not in got:
                w = put.worker(donor.worker_id)
                if w["status"] == "healthy" and new_node(w["ray_node_id"]):
                    got["healthy"] = time.monotonic() - t0
            # every process of the old node is gone, so a 200 from this donor is the new node's replica
            if "served" not in got and served_by(put, app, http) == donor.worker_id:
                got["served"] = time.monotonic() - t0
            time.sleep(POLL_S)
    return again, got


def label(p: psutil.Process) -> str:
    """A readable name: the script for python processes, `ray start` for the ray CLI."""
    name, argv = str(p.name()), [str(a) for a in p.cmdline()]
    if name.startswith("python"):
        return next((os.path.basename(a) for a in argv[1:] if a.endswith(".py")), name)
    return "ray start" if name == "ray" else name


def memory(donor: Donor) -> dict[str, Any]:
    agent_pid = int(membership(donor)["agent_pid"])
    agent = psutil.Process(agent_pid).memory_full_info()
    rss = pss = 0
    names: Counter[str] = Counter()
    for pid in set(donor.pids()) - {agent_pid}:
        try:
            p = psutil.Process(pid)
            info, name = p.memory_full_info(), label(p)
        except psutil.NoSuchProcess:
            continue
        rss += info.rss
        pss += info.pss
        names[name] += 1
    procs = ", ".join(f"{n}×{c}" if c > 1 else n for n, c in sorted(names.items()))
    return {
        "agent": agent.rss / MIB,
        "ray": rss / MIB,
        "agent_pss": agent.pss / MIB,
        "ray_pss": pss / MIB,
        "procs": procs,
    }


# -- the run ------------------------------------------------------------------------------------------------


def scenario(put: PoolUnderTest) -> tuple[dict[str, Times], dict[str, Times], dict[str, dict[str, Any]]]:
    joins, losses = {}, {}
    driver(put, PROBE_APP.format(name="probe"))
    a, joins["A (app pending)"] = measure_join(put, "probe")
    driver(put, PROBE_APP.format(name="probe-b"))  # A is full (1 CPU): this one waits for B
    b, joins["B (app pending)"] = measure_join(put, "probe-b")
    mem = {"A": memory(a), "B": memory(b)}
    driver(put, DELETE_APP.format(name="probe-b"))
    losses["SIGKILL A -> B"] = measure_loss(put, a, b, "probe", signal.SIGKILL)
    c = put.join(put.invite(tier="service"))
    try:
        losses["SIGSTOP B -> C"] = measure_loss(put, b, c, "probe", signal.SIGSTOP)
    finally:
        signal_donor(b, signal.SIGKILL)
        signal_donor(b, signal.SIGCONT)
    return joins, losses, mem


def restart_scenario(put: PoolUnderTest, reps: int) -> dict[str, list[Times]]:
    """D joins with a token file under its own pending probe app, then is restarted `reps` times each way."""
    token_file = put.root / "restart-token"
    token_file.write_text(put.invite(tier="service") + "\n")
    driver(put, PROBE_APP.format(name="probe-d"))  # pending: every service donor is dead or full
    d = put.join(token_file.read_text().strip(), "--token-file", str(token_file))
    with httpx.Client(timeout=2) as http:
        wait_for(
            lambda: served_by(put, "probe-d", http) == d.worker_id,
            timeout=120,
            interval=POLL_S,
            what="the first request served by D's replica",
        )
    runs: dict[str, list[Times]] = {"power cut": [], "SIGTERM": []}
    for kind, graceful in (("power cut", False), ("SIGTERM", True)):
        for _ in range(reps):
            d, got = measure_restart(put, d, "probe-d", token_file, graceful)
            runs[kind].append(got)
    return runs


def table(header: list[str], rows: list[list[str]]) -> None:
    """First column left-aligned, the figures right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print()
    for r in [header, *rows]:
        print(
            "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        )


def header(part: str) -> None:
    hc = {k.removeprefix("RAY_health_check_"): int(v) for k, v in FAST_HEALTH_CHECKS.items()}
    what = {"join": "donor join, donor loss, donor memory", "restart": "donor restart"}
    print(
        f"\nRMA Pool membership bench: {what.get(part, what['join'] + ', ' + what['restart'])}. Ray "
        f"{ray.__version__} on {os.cpu_count()} cores (head and every donor on this machine, in network "
        f"namespaces); heartbeat interval {HEARTBEAT_S} s; head health checks: {hc['period_ms'] / 1000:g} s "
        f"period, {hc['timeout_ms'] / 1000:g} s timeout, threshold {hc['failure_threshold']}; "
        f"polled every {POLL_S} s"
    )


def report(joins: dict[str, Times], losses: dict[str, Times], mem: dict[str, dict[str, Any]]) -> None:
    table(
        ["join (s after rma join starts)", "admitted", "ray start", "healthy", "first 200"],
        [
            [n, *(f"{g[k]:.1f}" for k in ("admitted", "ray start", "healthy", "served"))]
            for n, g in joins.items()
        ],
    )
    table(
        ["loss (s after the signal)", "offline", "200 elsewhere", "failed polls"],
        [[n, f"{g['offline']:.1f}", f"{g['served']:.1f}", f"{g['failed']:.0f}"] for n, g in losses.items()],
    )
    table(
        ["memory (MiB)", "agent RSS", "Ray RSS", "Ray/agent", "agent PSS", "Ray PSS"],
        [
            [
                n,
                *(f"{m[k]:.0f}" for k in ("agent", "ray")),
                f"{m['ray'] / m['agent']:.1f}x",
                *(f"{m[k]:.0f}" for k in ("agent_pss", "ray_pss")),
            ]
            for n, m in mem.items()
        ],
    )
    for n, m in mem.items():
        print(f"  Ray side of {n}: {m['procs']}")


def report_restarts(runs: dict[str, list[Times]]) -> None:
    keys = ("stop", "admitted", "ray start", "healthy", "served")
    rows = []
    for kind, reps in runs.items():
        rows += [[f"{kind} #{i}", *(f"{g[k]:.1f}" for k in keys)] for i, g in enumerate(reps, 1)]
        rows.append([f"{kind} median", *(f"{statistics.median(g[k] for g in reps):.1f}" for k in keys)])
    table(
        ["restart (s after rma join starts)", "stop", "admitted again", "ray start", "healthy", "first 200"],
        rows,
    )
    print("  stop: s from the signal until no process is left in the donor's namespace (before the restart)")


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.membership")
    ap.add_argument("--part", choices=["all", "join", "restart"], default="all")
    ap.add_argument("--reps", type=int, default=3, help="restarts of each kind (--part restart or all)")
    args = ap.parse_args()
    if args.reps < 1:
        ap.error("--reps: at least 1")
    reason = available()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    started, root = time.monotonic(), Path(tempfile.mkdtemp(prefix="rma-bench-membership-"))
    load_before = os.getloadavg()
    joined, restarts = None, None
    try:
        # join uses three hosts and keeps one free, as it always did; restart's donor takes the fourth
        with TestBed(1 if args.part == "restart" else 4) as bed:
            put = launch_pool(bed, root)
            try:
                wait_ready(put)
                if args.part != "restart":
                    joined = scenario(put)
                if args.part != "join":
                    restarts = restart_scenario(put, args.reps)
            finally:
                stop_pool(put)
                for d in put.donors:
                    if d.worker_id:
                        shutil.rmtree(short_temp_dir(d.worker_id), ignore_errors=True)
    except BaseException:
        print(f"bench failed; logs kept under {root}", file=sys.stderr)
        raise
    header(args.part)
    if joined:
        report(*joined)
    if restarts:
        report_restarts(restarts)
    load_after = os.getloadavg()
    print(
        f"\nwhole run {time.monotonic() - started:.0f} s; load average (1, 5, 15 min) "
        f"{' '.join(f'{x:.1f}' for x in load_before)} before, {' '.join(f'{x:.1f}' for x in load_after)} after"
    )
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
