"""How long `rma down` takes: `rma up` of the embedded default (every app and store, free ports, its own data
dir and HOME), wait until it is up, then time `rma down`; again on the same data dir (`--cycles`, default 2):
the second `rma up` is warm (models prepared). Prints one JSON line (with each cycle's `up_timeline`: the
seconds at which each line of `rma up` appeared); asserts nothing. Run it under
the heavy lock: `flock /tmp/rma-heavy.lock .venv/bin/python -m bench.pool_down` (~3-8 min on 2 cores).
`--root DIR` keeps HOME and the data dir there (a second run on it: every cycle warm); `--keep-ray-logs` copies
the core head's Ray session logs (Serve's controller and replicas, the workers, vLLM's engine process) to
`<root>/ray-logs-<cycle>` before `rma down` removes them: where a start's time goes. A later run on the same
`--root` reuses the first run's ports (`<root>/up-argv.json`), as a real pool keeps its ports from one start to
the next; `--up-arg=--no-edge` (repeatable) passes more options to `rma up` (an A/B of what the edge costs).
`edge_running_s`: when each edge head ran, from the same start (it starts after `rma up` says it is up).
Ray's workers import this checkout's code (PYTHONPATH), whichever venv the `ray` script beside the interpreter
belongs to.

Measured on the shared 2-core box (every app and store, idle pool): before issue 18, `rma down` gave up at
121.4 s ("did not stop within 120 s") while the supervisor went on to 147.7 s (the apps' undeploy alone 142.9 s);
after, 14.2 s (stores 4.2 s beside Serve's 5 s grace, coordinator 0.2 s, Ray head 7.8 s), exit 0."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from tests.support import GiveUp, wait_for

CHECKOUT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def up_argv(apps: str, stores: str, *extra: str) -> list[str]:
    """`rma up` of `apps` and `stores` on free ports of this machine (a bench's own pool)."""
    ports = [
        a for s in stores.split(",") if s and s != "none" for a in ("--store-port", f"{s}={free_port()}")
    ]
    return [
        sys.executable,
        "-m",
        "rma_ray.cli",
        "up",
        "--node-ip-address",
        "127.0.0.1",
        "--coordinator-port",
        str(free_port()),
        "--gcs-port",
        str(free_port()),
        "--dashboard-port",
        str(free_port()),
        "--serve-port",
        str(free_port()),
        *extra,
        "--apps",
        apps,
        "--stores",
        stores,
        *ports,
    ]


def _without_ports(argv: list[str]) -> list[str]:
    """`argv` less the port options' values (and the interpreter): what must match to reuse a run's ports."""
    out, skip = [], False
    for a in argv[1:]:
        if skip:
            skip = False
            continue
        out.append(a)
        skip = a.endswith("-port")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.pool_down")
    ap.add_argument("--apps", default="llm,services,vision")
    ap.add_argument("--stores", default="redis,postgres,chroma,graph")
    ap.add_argument("--up-timeout", type=float, default=1200)
    ap.add_argument(
        "--cycles", type=int, default=2, help="up+down cycles on one data dir (2nd+: warm `rma up`)"
    )
    ap.add_argument(
        "--cpu-top",
        type=int,
        default=0,
        help="with each cycle, the N process kinds that used the most CPU during `rma up` (cpu_by_process)",
    )
    ap.add_argument(
        "--root",
        type=Path,
        help="HOME and data dir under this folder, kept (again: every cycle warm); default: a fresh temp dir",
    )
    ap.add_argument(
        "--keep-ray-logs",
        action="store_true",
        help="copy the Ray head's session logs (serve/, worker-*, raylet) to <root>/ray-logs-<cycle> before "
        "`rma down` removes them",
    )
    ap.add_argument(
        "--up-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more argument for `rma up` (repeatable), e.g. --up-arg=--no-edge",
    )
    args = ap.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="rma-down-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HOME": str(root / "home"), "RMA_DATA_DIR": str(root / "data"), "COLUMNS": "200"}
    # this checkout's code in Ray's workers too: the `ray` script beside the venv's python may run another
    # checkout's venv (its shebang), whose editable install points at that checkout
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(CHECKOUT), os.environ.get("PYTHONPATH")) if p)
    # a pool's ports stay from one start to the next: a later run on the same --root starts with the same ones
    # (what a warm start reuses may be keyed on them, as Serve's controller env is)
    saved = root / "up-argv.json"
    argv = up_argv(args.apps, args.stores, *args.up_arg)
    try:
        old = json.loads(saved.read_text())
        if _without_ports(old) == _without_ports(argv):
            argv = old
    except (OSError, ValueError):
        pass
    saved.write_text(json.dumps(argv))
    cycles = [
        _cycle(
            argv,
            env,
            root / f"up-{i}.log",
            args.up_timeout,
            args.cpu_top,
            root / f"ray-logs-{i}" if args.keep_ray_logs else None,
        )
        for i in range(args.cycles)
    ]
    print(json.dumps({"apps": args.apps, "stores": args.stores, "root": str(root), "cycles": cycles}))
    return 0


def process_kind(p: psutil.Process) -> str:
    """What a process is, for `--cpu-top`: Ray's process title (`ray::ServeReplica:rma-llm:LLMServer`, `raylet`,
    ...) or the program and its `-m` module."""
    argv = [str(a) for a in p.cmdline()]
    if not argv:
        return str(p.name())
    if argv[0].startswith("ray::"):
        return argv[0].split(" ")[0]
    name = Path(argv[0]).name
    if name.startswith("python") and "-m" in argv[:-1]:
        return f"python -m {argv[argv.index('-m') + 1]}"
    if name.startswith("python") and len(argv) > 1:
        return f"python {Path(argv[1]).name}"
    return name


def cpu_by_process(root: int, top: int) -> dict[str, object]:
    """CPU seconds (user + system) of `root` (`rma up`) and every process under it alive now (Ray's heads,
    workers and Serve replicas, vLLM's engine, the stores, the edge head), summed by `process_kind`: where a
    start's CPU went; nothing else on the box counts. Processes that already exited are not seen but as far as
    a parent waited for them (`exited_children_s`); one that left the tree (a double fork) is not seen."""
    by_kind: dict[str, float] = {}
    count: dict[str, int] = {}
    waited = 0.0
    try:
        top_proc = psutil.Process(root)
        tree = [top_proc, *top_proc.children(recursive=True)]
    except psutil.Error:
        tree = []
    for p in tree:
        try:
            t = p.cpu_times()
            kind = process_kind(p)
        except (psutil.Error, OSError):
            continue
        by_kind[kind] = by_kind.get(kind, 0.0) + t.user + t.system
        count[kind] = count.get(kind, 0) + 1
        waited += t.children_user + t.children_system
    ranked = sorted(by_kind.items(), key=lambda kv: -kv[1])
    return {
        "total_s": round(sum(by_kind.values()), 1),
        "exited_children_s": round(waited, 1),
        "top": [f"{s:6.1f} s  x{count[k]:<3} {k}" for k, s in ranked[:top]],
    }


def session_dir(root: int) -> Path | None:
    """The Ray session dir of the core head under `root` (`rma up`), as its raylet's command line names it:
    `/tmp/rma-<8 random characters>/h/session_...` (rma_ray.raynode.private_temp_dir), not an edge head's; None
    when none is found."""
    try:
        tree = psutil.Process(root).children(recursive=True)
    except psutil.Error:
        return None
    for p in tree:
        try:
            argv = p.cmdline()
        except psutil.Error:
            continue
        for arg in argv:
            found = re.search(r"(/\S*/h/session_[0-9_-]+)(/|$)", arg)
            if found and Path(found.group(1), "logs").is_dir():
                return Path(found.group(1))
    return None


def _cycle(
    argv: list[str],
    env: dict[str, str],
    log: Path,
    up_timeout: float,
    cpu_top: int = 0,
    keep_logs: Path | None = None,
) -> dict[str, object]:
    """One `rma up` until it says it is up, then `rma down`, timed. The first cycle prepares the models
    (converted into the data dir); the next ones are warm starts. `keep_logs`: where the Ray session's logs
    are copied before the down."""
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    try:
        timeline: list[tuple[float, str]] = []  # when each line of `rma up` appeared (0.5 s resolution)

        def up() -> bool:
            if proc.poll() is not None:
                raise GiveUp(f"rma up exited {proc.returncode}: {log.read_text()[-3000:]}")
            text = log.read_text(errors="replace")
            for line in text.splitlines()[len(timeline) :]:
                timeline.append((round(time.monotonic() - t0, 1), line.strip()[:70]))
            return "stop with Ctrl-C or `rma down`" in text

        wait_for(up, timeout=up_timeout, interval=0.5, what="rma up to finish starting")
        up_s = time.monotonic() - t0
        cpu = cpu_by_process(proc.pid, cpu_top) if cpu_top else None
        # the edge heads start after `rma up` says it is up (Pool.up): when each runs, then the down
        edge_running_s: dict[str, float] = {}
        pool_json = Path(env["RMA_DATA_DIR"]) / "pool.json"

        def edges_running() -> bool:
            if proc.poll() is not None:
                raise GiveUp(f"rma up exited {proc.returncode}: {log.read_text()[-3000:]}")
            edges = json.loads(pool_json.read_text()).get("edges") or {}
            for name, e in edges.items():
                if e.get("error"):
                    raise GiveUp(f"the edge {name!r} did not start: {e['error']}")
                if e.get("head_pid") and name not in edge_running_s:
                    edge_running_s[name] = round(time.monotonic() - t0, 1)
            return len(edge_running_s) == len(edges)

        wait_for(edges_running, timeout=300, interval=0.5, what="the edge heads to run")
        session = session_dir(proc.pid) if keep_logs else None
        if keep_logs and session:
            shutil.copytree(session / "logs", keep_logs, dirs_exist_ok=True, ignore_dangling_symlinks=True)
        t1 = time.monotonic()
        down = subprocess.run(
            [sys.executable, "-m", "rma_ray.cli", "down"],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        down_s = time.monotonic() - t1
        proc.wait(120)
    finally:
        if proc.poll() is None:
            # a bench interrupted or failed: the supervisor stops what it started (also mid-start), where a
            # kill would leave the pool's processes behind
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(300)
            except subprocess.TimeoutExpired:
                proc.kill()
    return {
        "up_s": round(up_s, 1),
        "edge_running_s": edge_running_s,
        **({"cpu_during_up": cpu} if cpu else {}),
        "down_s": round(down_s, 1),
        "down_rc": down.returncode,
        "down_out": (down.stdout + down.stderr).strip()[-300:],
        "supervisor_tail": [ln.strip() for ln in log.read_text(errors="replace").splitlines()[-6:]],
        "up_timeline": [
            f"{t:6.1f} {line}" for t, line in timeline if not line.startswith(("join token", "admin key"))
        ],
    }


if __name__ == "__main__":
    sys.exit(main())
