"""A private `dockerd` for tests and benches, and the store images built into it.

The daemon has its own data root (kept between runs, so built images are reused), exec root, pid file and unix
socket; `--bridge=none --iptables=false` so it creates no docker0 and no iptables rules (stores use host
networking, image builds `--network host`). Only one test session uses it at a time (a file lock); it is
stopped by its PID at the end.

Costs on the 2-core box: cold (empty data root) ~2.5 min alone (debootstrap ~36 s, postgres ~20-30 s, redis
~5-8 s, chroma ~45 s, graph ~25 s), 7 min with the other test suites running beside it; with the data root kept,
the daemon starts in ~1 s and the build script finds every image in under a second."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support import free_port, wait_for

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("RMA_TEST_DOCKER_ROOT", "/var/lib/rma-test-docker"))
RUN_DIR = Path("/run/rma-test-docker")
SOCKET = RUN_DIR / "docker.sock"
DOCKER_HOST = f"unix://{SOCKET}"
TOOLS = ("dockerd", "docker", "containerd", "runc", "debootstrap")


def missing() -> str | None:
    """Why a private dockerd cannot run here, or None."""
    if os.geteuid() != 0:
        return "a private dockerd and debootstrap need root"
    absent = [t for t in TOOLS if not shutil.which(t)]
    if absent:
        return (
            f"{', '.join(absent)} not installed (Debian docker.io and debootstrap; `make test` installs them)"
        )
    try:
        import docker  # noqa: F401
    except ImportError:
        return "the docker SDK is not installed (pip extra `stores`)"
    return None


@dataclass
class Dockerd:
    host: str
    pid: int
    started_s: float  # from exec to the first answered ping
    build_s: float  # scripts/build-store-images.sh, cold or cached
    build_output: str

    def client(self) -> Any:
        import docker

        return docker.DockerClient(base_url=self.host, timeout=60)


def _ping() -> bool:
    import docker

    c = docker.DockerClient(base_url=DOCKER_HOST, timeout=5)
    try:
        return bool(c.ping())
    finally:
        c.close()


@contextlib.contextmanager
def _exclusive(lock: Path, timeout: float) -> Iterator[None]:
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o600)
    try:

        def take() -> bool:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False

        wait_for(take, timeout=timeout, interval=0.5, what=f"another session to release {lock}")
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def private_dockerd(build: bool = True) -> Iterator[Dockerd]:
    """Start the private dockerd (and build the store images into it); stop it by PID afterwards."""
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    DATA_ROOT.mkdir(parents=True, exist_ok=True)
    pidfile = RUN_DIR / "dockerd.pid"
    with _exclusive(RUN_DIR / "session.lock", timeout=900):
        _stop_stale(pidfile)
        t0 = time.monotonic()
        with open(RUN_DIR / "dockerd.log", "ab") as log:
            proc = subprocess.Popen(
                [
                    "dockerd",
                    "--data-root",
                    str(DATA_ROOT),
                    "--exec-root",
                    str(RUN_DIR / "exec"),
                    "--pidfile",
                    str(pidfile),
                    "-H",
                    DOCKER_HOST,
                    "--bridge=none",
                    "--iptables=false",
                    "--ip6tables=false",
                    "--containerd-namespace",
                    "rma-test",
                    "--containerd-plugins-namespace",
                    "rma-test-plugins",
                    "--log-level",
                    "warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            wait_for(
                lambda: proc.poll() is None and _ping(),
                timeout=90,
                interval=0.2,
                what=f"dockerd to answer on {SOCKET} (log: {RUN_DIR / 'dockerd.log'})",
            )
            started = time.monotonic() - t0
            out, build_s = "", 0.0
            if build:
                t1 = time.monotonic()
                r = subprocess.run(
                    [str(REPO / "scripts" / "build-store-images.sh")],
                    check=False,
                    capture_output=True,
                    text=True,
                    timeout=1500,
                    env={**os.environ, "DOCKER_HOST": DOCKER_HOST},
                )
                build_s = time.monotonic() - t1
                out = r.stdout + r.stderr
                if r.returncode != 0:
                    raise RuntimeError(f"building the store images failed:\n{out[-3000:]}")
            yield Dockerd(DOCKER_HOST, proc.pid, started, build_s, out)
        finally:
            _remove_store_containers()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            _unmount_under(RUN_DIR)


def _unmount_under(root: Path) -> None:
    """dockerd leaves its default network namespace bind-mounted under the exec root when it stops."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in reversed(points):
        if point.startswith(f"{root}/"):
            subprocess.run(["umount", point], check=False, capture_output=True)


def _stop_stale(pidfile: Path) -> None:
    """A private dockerd left running by a session that was killed (we hold the lock, so it serves nobody)."""
    try:
        pid = int(pidfile.read_text().strip())
        p = psutil.Process(pid)
        if p.name() != "dockerd":
            return
    except (OSError, ValueError, psutil.Error):
        return
    p.terminate()
    try:
        p.wait(60)
    except psutil.TimeoutExpired:
        p.kill()


def _remove_store_containers() -> None:
    """Containers of stores that a failed test left behind (this daemon is private to the session)."""
    import docker

    try:
        c = docker.DockerClient(base_url=DOCKER_HOST, timeout=30)
        for ctr in c.containers.list(all=True, filters={"label": "rma.io/store"}):
            ctr.remove(force=True)
        c.close()
    except docker.errors.DockerException:
        pass


def dockerd_for_session() -> Iterator[Dockerd]:
    """The body of a session fixture (`yield from dockerd_for_session()`): skips with the reason when this machine
    cannot run a private dockerd, else starts it with the store images built, and points DOCKER_HOST at it for
    the session (and for Ray nodes started with this environment)."""
    reason = missing()
    if reason:
        pytest.skip(reason)
    before = os.environ.get("DOCKER_HOST")
    with private_dockerd() as d:
        print(
            f"\n[docker] daemon up in {d.started_s:.1f} s; store images ready in {d.build_s:.1f} s\n"
            + d.build_output.strip()
        )
        os.environ["DOCKER_HOST"] = d.host
        try:
            yield d
        finally:
            if before is None:
                os.environ.pop("DOCKER_HOST", None)
            else:
                os.environ["DOCKER_HOST"] = before


def start_to_ready(runtime: Any, kind: Any, endpoint: Any, timeout: float = 120) -> float:
    """Seconds from runtime.start() to the first answered query (kind.ready), failing if the store dies."""
    t0 = time.monotonic()
    runtime.start()

    def ready() -> bool:
        if not runtime.alive():
            raise AssertionError(f"{kind.name} under {runtime.name} exited while starting")
        try:
            return bool(kind.ready(endpoint))
        except Exception:
            return False

    deadline = t0 + timeout
    while time.monotonic() < deadline:
        if ready():
            return time.monotonic() - t0
        time.sleep(0.05)
    raise TimeoutError(f"{kind.name} under {runtime.name} not ready within {timeout} s")


def bench_docker(
    stores: tuple[str, ...] = ("redis", "postgres", "chroma", "graph"), host: str = "127.0.0.1"
) -> dict[str, Any]:
    """Start-to-ready per store under docker (first start on an empty volume, then a restart on the kept
    volume), with the process runtime measured the same way in the same process as the baseline. Needs root,
    docker.io and debootstrap; starts and stops its own private dockerd. Prints and returns the figures."""
    from deployments.stores.docker_runtime import DockerRuntime
    from deployments.stores.kinds import KINDS, credentials
    from deployments.stores.runtime import ProcessRuntime, StoreError

    reason = missing()
    if reason:
        raise SystemExit(f"bench_docker: {reason}")
    results: dict[str, Any] = {}
    before = os.environ.get("DOCKER_HOST")
    with private_dockerd() as d:
        os.environ["DOCKER_HOST"] = d.host
        client = d.client()
        sizes = {
            min(img.tags, key=lambda t: not t.endswith((":latest", ":bookworm"))): round(
                img.attrs["Size"] / 2**20, 1
            )
            for img in client.images.list()
            if any(t.startswith(("rma-store-", "rma-base:")) for t in img.tags)
        }
        print(
            f"dockerd up in {d.started_s:.1f} s; build script {d.build_s:.1f} s; image sizes (MiB): {sizes}"
        )
        root = Path(tempfile.mkdtemp(prefix="rma-bench-docker-"))
        root.chmod(0o755)  # the postgres user must traverse it (process runtime)
        try:
            for store in stores:
                kind = KINDS[store]
                row: dict[str, float] = {}
                for rt_name, cls in (("process", ProcessRuntime), ("docker", DockerRuntime)):
                    vol = root / rt_name / store
                    vol.mkdir(parents=True)
                    creds = credentials(vol)
                    port = free_port(host)
                    ep = kind.endpoint(host, port, creds)
                    for attempt in ("first", "restart"):
                        rt = cls(kind, vol, host, port, creds)
                        try:
                            row[f"{rt_name}_{attempt}_s"] = round(start_to_ready(rt, kind, ep), 3)
                        except StoreError as exc:  # e.g. the store's binary is not installed for `process`
                            print(f"{store} under {rt_name}: {exc}")
                            break
                        finally:
                            rt.stop(30)
                results[store] = row
                ratio = (
                    f"; docker/process on restart {row['docker_restart_s'] / row['process_restart_s']:.2f}x"
                    if row.get("process_restart_s")
                    else ""
                )
                print(f"{store}: start->ready " + ", ".join(f"{k}={v:.2f}" for k, v in row.items()) + ratio)
        finally:
            shutil.rmtree(root, ignore_errors=True)
            client.close()
            if before is None:
                os.environ.pop("DOCKER_HOST", None)
            else:
                os.environ["DOCKER_HOST"] = before
    results["images_mib"] = sizes
    results["dockerd_start_s"] = round(d.started_s, 2)
    results["build_script_s"] = round(d.build_s, 2)
    return results
