"""Starting and stopping Ray nodes (head and donor) as supervised child processes.

A node is one `ray start --block` process: it starts the node's Ray processes, watches them, and on SIGTERM
drains the node (Ray >= 2.60: Serve moves replicas off it, for up to RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S) and
then stops them. We never run `ray stop` (it would kill every Ray process on the machine, other nodes' too):
we stop our own process tree, by PID. The cluster token reaches Ray through RAY_AUTH_TOKEN_PATH (a 0600 file),
never a command line.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil

# Health checks the head uses to declare a node dead (DESIGN.md: 62.6 s by default, 8.6 s with these).
FAST_HEALTH_CHECKS = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "2000",
    "RAY_health_check_failure_threshold": "3",
}


class NodeStartError(Exception):
    """Ray could not start or join: the message is one line for a person."""


def ray_executable() -> str:
    exe = Path(sys.executable).with_name("ray")
    return str(exe) if exe.exists() else (shutil.which("ray") or "ray")


def short_temp_dir(key: str) -> Path:
    """Ray's Unix sockets live under the temp dir and must fit in 107 bytes: keep the path short."""
    return Path("/tmp") / f"rma-{key}"


def private_temp_dir() -> Path:
    """A Ray temp dir for the core head, under a fresh parent only its creator may enter (0700, made by
    mkdtemp: a random name, never a path someone else could have made first). Ray chmods the temp dir it is
    given (and its session, logs and sockets) 0777; the parent keeps other users (an edge head's `rma-edge`)
    out of them all. Short, like short_temp_dir: `/tmp/rma-<8 random characters>/h`. Remove `path.parent` when done."""
    return Path(tempfile.mkdtemp(prefix="rma-", dir="/tmp")) / "h"


# What a process run as another user (an edge head, rma_ray/head.py) may inherit from ours: an allowlist,
# since the operator's env may hold anything (HF_TOKEN, cloud credentials, PGPASSWORD, the core's RMA_*
# settings), and any code an edge donor runs may run on the edge head as that user. Names, then prefixes;
# Ray's own settings (RAY_AUTH_*, the health checks) are set by ray_env and NodeSpec.env, never inherited.
USER_ENV_NAMES = frozenset(
    {
        "PATH",
        "LANG",
        "LANGUAGE",
        "TZ",
        "VIRTUAL_ENV",
        "PYTHONPATH",
        "OMP_NUM_THREADS",
        "TOKENIZERS_PARALLELISM",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
    }
)
USER_ENV_PREFIXES = ("LC_",)


# What a Ray node never inherits from ours, whoever started it: the secrets RMA_* settings may carry (the
# agent's RMA_JOIN_TOKEN, which the rma-node image passes in its env; the operator's RMA_ADMIN_KEY and
# RMA_SECRET_KEY; RMA_DATABASE_URL with its password). Every task and actor on the node inherits the raylet's
# env, and a join token that has uses left admits another machine. A path to a secret (`_FILE`), a public key
# and a limit counted in tokens (RMA_EMBEDDINGS_TOKEN_IDS, RMA_CLIENT_TOKENS_PER_DAY) are no secrets; what a
# node needs is set by name in NodeSpec.env, which is never filtered. Names in upper case: the settings read
# them case-insensitively.
CREDENTIAL_ENV_SUFFIXES = ("_KEY", "_TOKEN", "_SECRET", "_PASSWORD")
CREDENTIAL_ENV_NAMES = frozenset({"RMA_DATABASE_URL"})


def is_secret_setting(name: str) -> bool:
    k = name.upper()
    return k.startswith("RMA_") and (
        k in CREDENTIAL_ENV_NAMES or (k.endswith(CREDENTIAL_ENV_SUFFIXES) and not k.endswith("_PUBLIC_KEY"))
    )


def without_secrets(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` less the RMA_* settings that carry a secret (is_secret_setting)."""
    return {k: v for k, v in environ.items() if not is_secret_setting(k)}


def ray_env(
    token_file: Path, extra: dict[str, str] | None = None, base: dict[str, str] | None = None
) -> dict[str, str]:
    """The env of a Ray process of the cluster whose token is in `token_file`: ours (or `base`), with the token
    by path and no other cluster's address or token."""
    source = os.environ if base is None else base
    env = {k: v for k, v in source.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(
        {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file), "RAY_USAGE_STATS_ENABLED": "0"}
    )
    # Ray refuses a node whose Python differs from the head's down to the patch release by default; donors run
    # whatever their distribution ships (3.11.2 on Debian 12 beside a head on 3.11.7), which pickles alike.
    env.setdefault("RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL", "minor")
    env.update(extra or {})
    return env


def user_env(user: str, home: Path) -> dict[str, str]:
    """The env of a child run as `user`: only the allowlisted part of ours (USER_ENV_NAMES,
    USER_ENV_PREFIXES),
    its own HOME, USER and LOGNAME."""
    env = {k: v for k, v in os.environ.items() if k in USER_ENV_NAMES or k.startswith(USER_ENV_PREFIXES)}
    env.update(HOME=str(home), USER=user, LOGNAME=user)
    return env


def kill_user_processes(uid: int, rounds: int = 20, grace: float = 5.0) -> list[int]:
    """SIGKILL every process whose real uid is `uid` (an edge's own system user) and wait until they are gone:
    a task that double-forked out of its Ray worker (setsid, reparented to init) is no child of the node we
    track, and would go on reading the edge's next token. Several rounds: one may fork while we kill. Returns
    the PIDs killed. Never for root or our own uid."""
    if uid in (0, os.getuid()):
        raise ValueError(f"refusing to kill every process of uid {uid}")
    killed: list[int] = []
    for _ in range(rounds):
        procs = []
        for p in psutil.process_iter(["uids", "status"]):
            uids = p.info.get("uids")
            # a zombie (dead, not yet reaped by its parent: one of our children) runs nothing: not waited on
            if uids is not None and uids.real == uid and p.info.get("status") != psutil.STATUS_ZOMBIE:
                procs.append(p)
        if not procs:
            break
        for p in procs:
            try:
                p.kill()
                killed.append(p.pid)
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=grace)
    return killed


def as_user(user: str, home: Path) -> dict[str, object]:
    """subprocess.Popen's arguments that run a child as `user` (its primary group only, no supplementary
    groups of ours) in `home`."""
    pw = pwd.getpwnam(user)
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": [], "cwd": str(home)}


def format_labels(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in labels.items())


@dataclass
class NodeSpec:
    node_ip: str
    token_file: Path
    temp_dir: Path
    labels: dict[str, str]
    head: bool = False
    address: str | None = None  # GCS address to join (worker nodes)
    gcs_port: int = 6380  # Ray's default 6379 is Redis's too
    dashboard_port: int = 8265
    num_cpus: float | None = None
    num_gpus: int | None = None
    memory_bytes: int | None = None
    drain_timeout_s: float = 30.0
    env: dict[str, str] = field(default_factory=dict)
    extra_args: list[str] = field(default_factory=list)  # e.g. pinned ports (rma_ray.overlay.RayPorts)
    # run Ray as this system user (an edge head): with `home` as HOME and cwd, none of our env's secrets, and
    # a temp dir it owns (Ray's workers run as the raylet's user, so its tasks read only what that user may)
    user: str | None = None
    home: Path | None = None

    def argv(self) -> list[str]:
        args = [
            ray_executable(),
            "start",
            "--block",
            "--node-ip-address",
            self.node_ip,
            "--temp-dir",
            str(self.temp_dir),
            "--disable-usage-stats",
            "--labels",
            format_labels(self.labels),
        ]
        if self.head:
            args += [
                "--head",
                "--port",
                str(self.gcs_port),
                "--dashboard-host",
                self.node_ip,
                "--dashboard-port",
                str(self.dashboard_port),
            ]
        else:
            assert self.address, "a worker node needs the head's address"
            args += ["--address", self.address]
        if self.num_cpus is not None:
            args += ["--num-cpus", str(int(self.num_cpus))]
        if self.num_gpus is not None:
            args += ["--num-gpus", str(self.num_gpus)]
        if self.memory_bytes is not None:
            args += ["--memory", str(self.memory_bytes)]
        return args + self.extra_args


_FAILURES = [
    (
        re.compile(r"InvalidAuthToken|Authentication token is missing or incorrect"),
        "the Ray head refused the cluster token (revoked, rotated, or not this pool's)",
    ),
    (
        re.compile(r"Failed to connect to GCS|Timed out while waiting for GCS|Failed to get cluster ID"),
        "cannot reach the Ray head at {address}: check the network path (firewall, NAT) to it",
    ),
    (
        re.compile(r"Address already in use|port .* is already in use|already in use", re.I),
        "a port Ray needs is already in use on this machine",
    ),
    (
        re.compile(r"version mismatch|Version mismatch", re.I),
        "this machine's Ray or Python version differs from the head's (Ray must match exactly, Python to the minor "
        "release, e.g. 3.11)",
    ),
    (
        re.compile(r"The current node timed out during startup"),
        "the Ray node did not register with the head within Ray's 30 s (this machine or the head is overloaded)",
    ),
]


class RayNode:
    """One supervised `ray start --block` process and everything it starts."""

    def __init__(self, spec: NodeSpec, log_path: Path) -> None:
        self.spec, self.log_path = spec, log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._seen: dict[int, float] = {}  # pid -> create_time of every descendant seen, to stop orphans too
        self._log_offset = 0  # failure() reads only what this start wrote

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        extra = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": str(self.spec.drain_timeout_s), **self.spec.env}
        kwargs: dict[str, object] = {}
        base = None
        if self.spec.user:
            home = self.spec.home or self.spec.temp_dir
            pw = pwd.getpwnam(self.spec.user)
            # A fresh dir made here (never one found: under /tmp another user may have put a link there
            # first), handed to the user through its descriptor, so no link is followed.
            self.spec.temp_dir.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.spec.temp_dir.mkdir(mode=0o700)
            except FileExistsError:
                raise NodeStartError(
                    f"{self.spec.temp_dir} exists already; remove it and start again"
                ) from None
            fd = os.open(self.spec.temp_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                os.fchown(fd, pw.pw_uid, pw.pw_gid)
                os.fchmod(fd, 0o700)
            finally:
                os.close(fd)
            base, kwargs = user_env(self.spec.user, home), as_user(self.spec.user, home)
        else:
            self.spec.temp_dir.mkdir(parents=True, exist_ok=True)
        env = ray_env(self.spec.token_file, extra, without_secrets(os.environ if base is None else base))
        log = open(self.log_path, "ab")
        self._log_offset = log.tell()
        self.proc = subprocess.Popen(  # type: ignore[call-overload]
            self.spec.argv(),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            **kwargs,
        )
        log.close()
        self.track()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pids(self) -> list[int]:
        """Every process of this node seen so far (call track() first for the newest)."""
        return list(self._seen)

    def track(self) -> None:
        """Remember the process tree (called while it runs), so stop() can end orphans by PID."""
        if not self.running():
            return
        try:
            root = psutil.Process(self.proc.pid)  # type: ignore[union-attr]
            for p in [root, *root.children(recursive=True)]:
                self._seen.setdefault(p.pid, p.create_time())
        except psutil.Error:
            pass

    def failure(self) -> str | None:
        """Why the node failed, as one line, read from its log; None when nothing known went wrong."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                text = f.read()[-20000:].decode(errors="replace")
        except OSError:
            return None
        for pattern, message in _FAILURES:
            if pattern.search(text):
                return message.format(address=self.spec.address)
        return None

    def wait_started(self, timeout: float) -> str:
        """Wait until `ray start` reports the node up; return its node id (read from the raylet's own command
        line). No GCS client in this process: Ray caches the cluster token per process, and a rotated token
        must reach the next `ray start` from the file alone."""
        deadline = time.monotonic() + timeout
        offset = self._log_offset
        while time.monotonic() < deadline:
            if not self.running():
                raise NodeStartError(
                    self.failure()
                    or f"ray start exited with code {self.proc.returncode}; "  # type: ignore[union-attr]
                    f"see {self.log_path}"
                )
            self.track()
            known = self.failure()
            if known and "refused the cluster token" in known:
                raise NodeStartError(known)
            if self._started_since(offset):
                node_id = self.raylet_node_id()
                if node_id:
                    return node_id
            time.sleep(0.3)
        raise NodeStartError(
            self.failure() or f"the Ray node did not come up within {timeout:.0f} s; see {self.log_path}"
        )

    def _started_since(self, offset: int) -> bool:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return b"Ray runtime started" in f.read()
        except OSError:
            return False

    def raylet_node_id(self) -> str | None:
        if not self.running():
            return None
        try:
            for p in psutil.Process(self.proc.pid).children(recursive=True):  # type: ignore[union-attr]
                if p.name() == "raylet":
                    for arg in p.cmdline():
                        if arg.startswith("--node_id="):
                            return str(arg.split("=", 1)[1])
        except psutil.Error:
            return None
        return None

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM (Ray drains, then stops its processes); after `timeout`, SIGKILL whatever of ours is left."""
        timeout = self.spec.drain_timeout_s + 15 if timeout is None else timeout
        self.track()
        if self.running():
            self.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            try:
                self.proc.wait(timeout)  # type: ignore[union-attr]
            except subprocess.TimeoutExpired:
                pass
        self.kill_leftovers()

    def stop_all(self, grace: float = 5.0) -> None:
        """Stop a node with nothing left to drain (its Serve and stores already stopped) in about two seconds:
        SIGTERM to every process of the node at once but the GCS (`ray start`, the raylet, the dashboard,
        the agents, the workers), the GCS once the raylet has gone, SIGKILL to what is left after `grace`.
        The GCS last: a raylet whose GCS went first waits ~10 s for it before it exits (measured: all at once
        12 s, GCS last 2 s); `ray start`'s own shutdown stops them one by one, waiting on each."""
        self.track()
        procs = self._tracked()
        gcs = [p for p in procs if _name(p) == "gcs_server"]
        for p in procs:
            if p not in gcs:
                _signal(p, signal.SIGTERM)
        psutil.wait_procs([p for p in procs if _name(p) == "raylet"], timeout=grace)
        for p in gcs:
            _signal(p, signal.SIGTERM)
        self.kill_leftovers(sig=signal.SIGTERM, grace=grace)

    def kill(self) -> None:
        self.track()
        self.kill_leftovers(sig=signal.SIGKILL, grace=0)

    def _tracked(self) -> list[psutil.Process]:
        """The processes seen in the node's tree that still run (the same processes: not a reused PID)."""
        procs = []
        for pid, created in self._seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created:
                    procs.append(p)
            except psutil.Error:
                continue
        return procs

    def kill_leftovers(self, sig: int = signal.SIGTERM, grace: float = 5.0) -> None:
        procs = self._tracked()
        for p in procs:
            _signal(p, sig)
        _, alive = psutil.wait_procs(procs, timeout=grace)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)
        if self.proc is not None:
            try:
                self.proc.wait(1)
            except subprocess.TimeoutExpired:
                pass


def _name(p: psutil.Process) -> str:
    try:
        return str(p.name())
    except psutil.Error:
        return ""


def _signal(p: psutil.Process, sig: int) -> None:
    try:
        p.send_signal(sig)
    except psutil.Error:
        pass


def stop_process_tree(pid: int, grace: float = 10.0) -> None:
    """Stop a `ray start` process left by an agent that died, and everything under it (SIGTERM, then SIGKILL)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


def drain_node(
    gcs_address: str, token_file: Path, node_id: str, message: str, deadline_s: float = 60.0
) -> bool:
    """Ask the GCS to drain a node (no new work; Serve moves its replicas off it). Runs Ray's own
    `ray drain-node` in a child process, which reads the current cluster token from its file."""
    r = subprocess.run(
        [
            ray_executable(),
            "drain-node",
            "--address",
            gcs_address,
            "--node-id",
            node_id,
            "--reason",
            "DRAIN_NODE_REASON_PREEMPTION",
            "--reason-message",
            message,
            "--deadline-remaining-seconds",
            str(int(deadline_s)),
        ],
        env=ray_env(token_file),
        capture_output=True,
        text=True,
        timeout=60,
    )
    return r.returncode == 0
