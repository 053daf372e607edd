"""`rma up` and `rma down`: the pool's head machine.

`rma up` starts and supervises, until Ctrl-C: a Ray head with token auth (the cluster token generated once, kept
0600 in the data dir, never printed), Ray Serve (proxy on the head only), and the admission coordinator wired to
the head. It prints the URLs, the admin key (first start) and a join token, and writes the same to
`<data dir>/pool.json` (0600, rma_ray/poolinfo.py) for scripts. The data stores and the Serve apps come from
one child process, `python -m deployments up` (JSON lines; it applies deployments/serve_config.py's config
through Serve's declarative API). Code in Ray on the head (Serve replicas, store supervisors) gets a
service credential instead (`<data dir>/service.json`, 0600, minted anew on each start): keyring and store
reports only, never the admin key (rma_ray/identity.py). `rma down` asks the supervisor to stop, or stops what
it left, by PID.

Beside the core head, `rma up` starts one Ray head per edge cluster (`UpOptions.edges`; rma_ray/edges.py): the
cluster untrusted donors join. Each runs as its own unprivileged system user (`rma-edge`, `rma-edge-NAME`),
with its own data dir (root's, 0755: the token root:user 0640, and `home`, the user's 0700), its own token and
ports, an allowlisted env, no CPUs of its own (control plane only), and Serve with the edge's apps. Ray's
workers run as the raylet's user, so code an edge donor runs on the edge head reads nothing of the core's: the
core data dir is 0700 and root's, the core head's Ray temp dir lies under a 0700 parent of root's. Stopping an
edge kills every process of its user. `rma up` starts each edge once the core's apps run and does not wait for
it (pool.json and `rma status` say "starting" until its head runs; an untrusted donor asking meanwhile is told to
try again, its invite unspent). The edge head is restarted if it dies (the core serves meanwhile) and rotated
alone (`rma rotate-cluster-token --edge NAME`).

With `--overlay` each edge also gets its own WireGuard hub (rma_ray.overlay.edge_hub: its key, UDP port,
interface and subnet), up before the core's head and kept across the edge head's restarts and rotations; the
edge head's Ray binds that hub's address, the coordinator is told the hub (`RMA_EDGES`) and puts the edge's
donors on it only. The edge's Serve proxy listens on every address but its hub's table opens it (and every
other port of the edge's Ray) to loopback, the edge's own donors and the core's overlay only: the core's
gateway calls it on the core hub's address. The core hub's table has an output chain for the edges' users
(Pool.edge_local_deny): what they run on the head opens no connection to the core's Ray ports, the stores'
ports or the core's subnet, loopback included; only the coordinator's port stays open to them. Without the
overlay there is no hub, so `rma up` installs a table of its own for that chain (Pool.start_edge_guard,
rma_ray.overlay.EdgeGuard): for the edges' users, to the head's own addresses only (they still reach their
donors anywhere), the stores' ports, the core's GCS, dashboard and Ray's default worker range, and what the
core head's processes listen on (loopback included), added as they appear; no input chain, so LAN donors
reach the head as before. Without `nft` `rma up` says the edge users are not firewalled and goes on. `rma down`
takes each hub and its table away, and the edge guard's table; a stale one of a crashed run is replaced by
the next `rma up`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from rma_ray import credentials, poolinfo
from rma_ray import overlay as wg
from rma_ray.client import AdmissionClient, AdmissionError
from rma_ray.edges import (
    LABEL_CLUSTER,
    EdgeEndpoint,
    EdgeOverlay,
    EdgeSpec,
    default_edge_apps,
    valid_name,
)
from rma_ray.identity import service_file
from rma_ray.membership import write_private
from rma_ray.net import port_free
from rma_ray.poolinfo import APP_NAMES, STORE_NAMES, EdgeInfo, PoolInfo, pool_file
from rma_ray.raynode import (
    FAST_HEALTH_CHECKS,
    NodeSpec,
    NodeStartError,
    RayNode,
    as_user,
    kill_user_processes,
    private_temp_dir,
    ray_env,
    short_temp_dir,
    user_env,
)
from rma_ray.settings import read_or_create_secret
from rma_ray.tiers import LABEL_TIER, LABEL_TRUSTED
from rma_ray.waiting import GiveUp, WaitTimeout, wait_until

__all__ = [
    "APP_NAMES",
    "STORE_NAMES",
    "Pool",
    "UpError",
    "UpOptions",
    "pool_file",
    "read_pool",
    "signal_down",
    "signal_rotate",
]


class UpError(Exception):
    """One line for the admin."""


class StartInterrupted(UpError):
    """A stop (Ctrl-C, SIGTERM, `rma down`) came while `rma up` was starting the pool."""


@dataclass
class UpOptions:
    data_dir: Path
    node_ip: str
    coordinator_host: str
    coordinator_port: int = 8470
    gcs_port: int = 6380
    dashboard_port: int = 8265
    serve_port: int = 8000
    head_cpus: float | None = None
    heartbeat_interval_s: int = 3
    fast_health_checks: bool = True
    invite_ttl_s: int = 900
    extra_env: dict[str, str] = field(default_factory=dict)
    overlay: bool = False  # a WireGuard hub here; Ray on its address (rma_ray/overlay.py)
    overlay_port: int = wg.DEFAULT_PORT
    overlay_subnet: str = wg.DEFAULT_SUBNET
    overlay_interface: str = "rma-hub"
    stores: tuple[str, ...] = STORE_NAMES  # the embedded default's data stores
    store_runtime: str = "process"
    store_ports: dict[str, int] = field(default_factory=dict)  # instead of each store's default port
    apps: tuple[str, ...] = APP_NAMES
    apps_wait_s: float = 900.0  # the embedded model is converted once (first start) and vLLM warms up
    stores_wait_s: float = 240.0
    # edge clusters beside the core head (the CLI starts one by default; empty here: a single-cluster pool)
    edges: tuple[EdgeSpec, ...] = ()
    # the apps each edge runs (rma_ray.edges.EDGE_APPS); None: those of `apps` (edges.default_edge_apps)
    edge_apps: tuple[str, ...] | None = None

    @property
    def ray_ip(self) -> str:
        """Where Ray binds and what it advertises: the hub's overlay address, or node_ip without an overlay."""
        return wg.hub_address(self.overlay_subnet) if self.overlay else self.node_ip

    @property
    def coordinator_url(self) -> str:
        host = self.node_ip if self.coordinator_host in ("0.0.0.0", "::") else self.coordinator_host
        return f"http://{host}:{self.coordinator_port}"

    @property
    def gcs_address(self) -> str:
        return f"{self.ray_ip}:{self.gcs_port}"


SERVE_SHUTDOWN_S = 5.0  # Serve's grace on `rma down`: the pool is going away, HAProxy with it
EDGE_RETRY_S = 30.0  # an edge head that failed to start again is tried again this much later
ROTATE_REQUEST = "rotate-request"  # `rma rotate-cluster-token --edge NAME` names the edge here, then SIGHUPs


def read_pool(data_dir: Path) -> dict[str, Any]:
    """pool.json as a dict ({} when there is none); typed: `rma_ray.poolinfo.read(data_dir)`."""
    return poolinfo.read(data_dir).as_dict()


def wait_dashboard(url: str, token_file: Path, log_path: Path) -> None:
    """Wait until a head's dashboard answers its state API with the cluster's token."""
    token = token_file.read_text().strip()
    try:
        wait_until(
            lambda: (
                httpx.get(
                    url + "/api/v0/nodes", headers={"Authorization": f"Bearer {token}"}, timeout=5
                ).status_code
                == 200
            ),
            timeout=60,
            what="the Ray dashboard",
        )
    except WaitTimeout:
        raise UpError(f"the Ray dashboard at {url} did not answer; see {log_path}") from None


def shutdown_serve(dashboard_url: str, token_file: Path) -> None:
    """Serve's own shutdown (every app deleted, the controller stopped) through the dashboard's REST API, as
    `serve shutdown` does, but waiting at most SERVE_SHUTDOWN_S: a driver process would cost more than that in
    start-up alone, and what is left then ends with the Ray head."""
    try:
        token = token_file.read_text().strip()
        httpx.delete(
            dashboard_url + "/api/serve/applications/",
            headers={"Authorization": f"Bearer {token}"},
            timeout=SERVE_SHUTDOWN_S,
        )
    except (OSError, httpx.HTTPError):
        pass  # timed out (replicas still draining) or the dashboard is gone: the head's stop ends it


# The operator's model settings (RMA_LLM_*, RMA_EMBEDDINGS_*, RMA_VISION_*) an edge's apps follow too
# (deployments.serve_config.env_args), so that the model a forwarded request names is the one the edge serves.
# Not those naming a path on the head (the edge's user may not read it) nor any secret: the edge's code is not
# trusted with them.
EDGE_APP_ENV_PREFIXES = ("RMA_LLM_", "RMA_EMBEDDINGS_", "RMA_VISION_")
EDGE_APP_ENV_PATH_SUFFIXES = ("_DIR", "_FILE", "_PATH")
EDGE_APP_ENV_SERVICES = (  # deployments.serve_config.DOCUMENTS_FROM_SERVICES
    "RMA_SERVICES_UPLOAD_MAX_BYTES",
    "RMA_SERVICES_REQUEST_TIMEOUT_S",
    "RMA_SERVICES_RETRY_AFTER_S",
)
EDGE_APP_ENV_SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD")
# nor where the operator's own services are (an Ollama URL may carry credentials, and an edge donor's backend
# calls the Ollama beside it), nor an edge identity (the edge's deploy sets its own)
EDGE_APP_ENV_DENIED = ("RMA_VISION_OLLAMA_HOST",)
EDGE_APP_ENV_DENIED_WORDS = ("_EDGE",)


def edge_app_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The part of `environ` the edge's deployment child gets: RMA_LLM_*, RMA_EMBEDDINGS_* and RMA_VISION_*,
    less paths, secrets, hosts and edge identities (the lists above), and the services' limits the edge's
    documents app shares with the core's. Names are compared in upper case: the settings classes read the
    environment case-insensitively (pydantic-settings' default), so `RMA_LLM_api_key` is a key to them too."""

    def passes(name: str) -> bool:
        k = name.upper()
        return (
            k.startswith(EDGE_APP_ENV_PREFIXES)
            and not k.endswith(EDGE_APP_ENV_PATH_SUFFIXES)
            and not any(word in k for word in EDGE_APP_ENV_SECRET_WORDS)
            and k not in EDGE_APP_ENV_DENIED
            and not any(word in k for word in EDGE_APP_ENV_DENIED_WORDS)
        ) or k in EDGE_APP_ENV_SERVICES

    return {k: v for k, v in environ.items() if passes(k)}


def ensure_system_user(user: str) -> pwd.struct_passwd:
    """The edge head's system user (created when missing: no login, no home of its own)."""
    try:
        return pwd.getpwnam(user)
    except KeyError:
        pass
    r = subprocess.run(
        ["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin", user],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        raise UpError(f"could not create the system user {user!r} for the edge head: {r.stderr.strip()}")
    return pwd.getpwnam(user)


def _open_dir(path: Path, mode: int, owners: tuple[int, ...]) -> int:
    """A descriptor of the directory `path` (made with `mode` if missing), opened without following a link,
    and owned by one of `owners`; UpError otherwise. Ownership and mode are then set through the descriptor:
    these are fixed paths under /tmp, where another user may put a link or a directory of theirs first."""
    try:
        path.mkdir(mode=mode)
    except FileExistsError:
        pass  # made by us before, or by someone else (checked below); also a race with another `rma up`
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:  # ELOOP (a link), ENOTDIR (a file)
        raise UpError(
            f"{path} exists but is not the edge's directory (a link?); remove it and start again"
        ) from None
    uid = os.fstat(fd).st_uid
    if uid not in owners:
        os.close(fd)
        raise UpError(
            f"{path} exists but is not the edge's directory (owned by uid {uid}, not {owners}); "
            f"remove it and start again"
        )
    return fd


def own_dir(path: Path, pw: pwd.struct_passwd) -> None:
    """`path` as a directory of `pw`'s only (0700), made if missing. One that someone else made (a link,
    another user's directory) is refused."""
    fd = _open_dir(path, 0o700, (0, pw.pw_uid))
    try:
        os.fchown(fd, pw.pw_uid, pw.pw_gid)
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def root_dir(path: Path) -> None:
    """`path` as a directory of root's (0755), made if missing: an edge's data dir, which its user may enter
    but never change (no link of its can stand where root reads and writes the token). One that exists and is
    not root's (a link; the edge user's, as an older `rma up` made it) is refused."""
    fd = _open_dir(path, 0o755, (0,))
    try:
        os.fchown(fd, 0, 0)
        os.fchmod(fd, 0o755)
    finally:
        os.close(fd)


class EdgeHead:
    """One edge cluster's Ray head beside the core head, its Serve and its apps (see the module docstring)."""

    def __init__(self, spec: EdgeSpec, opts: UpOptions, say: Any) -> None:
        self.spec, self.o, self.say = spec, opts, say
        self.name = spec.name
        self.dir = spec.data_dir(opts.data_dir)  # root's, 0755 (EdgeSpec.data_dir)
        self.token_file = self.dir / "cluster_token"  # root:edge user, 0640, written by root only
        self.home = self.dir / "home"  # the edge user's (0700): its HOME and cwd
        self.log_path = opts.data_dir / "logs" / f"edge-{spec.name}-head.log"
        self.node: RayNode | None = None
        self.apps_wanted = opts.edge_apps if opts.edge_apps is not None else default_edge_apps(opts.apps)
        self.apps: dict[str, dict[str, Any]] = {}
        self.token_rotated_at: float | None = None
        self.error: str | None = None
        self.retry_at = 0.0
        self.deploying: threading.Thread | None = None  # the apps' deployment, beside the supervision
        self.deploy_proc: subprocess.Popen[str] | None = None
        self.restarting: threading.Thread | None = None  # the supervisor's restart of a dead head (30-60 s)
        self._lock = threading.Lock()  # `close()` against a restart that is about to start a node
        self.closed = False  # the pool is going down: no node may start any more
        self.hub: wg.Hub | None = None  # its own overlay hub (`rma up --overlay`)

    @property
    def ray_ip(self) -> str:
        """Where the edge head's Ray binds and what it advertises: its own hub's address under the overlay
        (never the core's subnet: edge donors are given none of it), the head's address otherwise."""
        return wg.hub_address(self.spec.overlay_subnet) if self.o.overlay else self.o.node_ip

    @property
    def ray_address(self) -> str:
        return f"{self.ray_ip}:{self.spec.ports.gcs}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.ray_ip}:{self.spec.ports.dashboard}"

    @property
    def serve_url(self) -> str:
        # under the overlay the edge's Serve port is open to the core only: its gateway (on the head, or a
        # trusted donor) calls it on the core hub's address, through the core's overlay
        return f"http://{self.o.ray_ip}:{self.spec.ports.serve}"

    def start_hub(self) -> None:
        """The edge's own overlay hub (rma_ray.overlay.edge_hub), before its head: Ray binds its address. It
        outlives restarts and rotations of the edge head (its peers are the edge's donors)."""
        if not self.o.overlay or self.hub is not None:
            return
        self.hub = wg.edge_hub(
            self.o.data_dir,
            self.name,
            self.spec.overlay_subnet,
            self.spec.overlay_port,
            wg.edge_interface(self.o.overlay_interface, self.name),
            self.spec.ports.ray_ports(),
            self.spec.ports.head_tcp(),
            core_interface=self.o.overlay_interface,
            core_subnet=self.o.overlay_subnet,
        )
        self.say(
            f"starting the edge {self.name!r}'s overlay hub {self.hub.name} on {self.hub.address} "
            f"(UDP {self.hub.port}) …"
        )
        try:
            self.hub.up()
        except wg.OverlayError as exc:
            self.hub = None
            raise UpError(f"the edge {self.name!r}'s overlay hub did not start: {exc}") from None

    def guard_ports(self) -> None:
        """Firewall any port the edge head's Ray opened outside the pinned ones (as Pool.guard_ports)."""
        if self.hub is None or self.node is None or not self.node.running():
            return
        self.node.track()
        try:
            self.hub.firewall.cover(wg.listening_ports(self.node.pids()))
        except wg.OverlayError as exc:
            self.say(f"[yellow]firewall of the edge {self.name!r}:[/] {exc}")

    def overlay_info(self) -> EdgeOverlay | None:
        if self.hub is None:
            return None
        return EdgeOverlay(
            interface=self.hub.name,
            public_key=self.hub.public_key,
            endpoint=f"{self.o.node_ip}:{self.hub.port}",
            subnet=self.hub.subnet,
        )

    def endpoint(self) -> EdgeEndpoint:
        return EdgeEndpoint(
            name=self.name,
            ray_address=self.ray_address,
            dashboard_url=self.dashboard_url,
            serve_url=self.serve_url,
            token_file=self.token_file,
            overlay=self.overlay_info(),
        )

    def info(self) -> EdgeInfo:
        return EdgeInfo(
            ray_address=self.ray_address,
            dashboard_url=self.dashboard_url,
            serve_url=self.serve_url,
            data_dir=str(self.dir),
            user=self.spec.user,
            head_pid=self.node.pid if self.node and self.node.running() else None,
            token_rotated_at=self.token_rotated_at,
            apps=dict(self.apps),
            error=self.error,
        )

    def ports(self) -> list[tuple[str, int]]:
        p = self.spec.ports
        return [
            (f"edge {self.name}'s {what}", port)
            for what, port in (
                ("Ray GCS", p.gcs),
                ("Ray dashboard", p.dashboard),
                ("Serve", p.serve),
                ("raylet", p.node_manager),
                ("object manager", p.object_manager),
                ("metrics export", p.metrics_export),
                ("dashboard agent gRPC", p.dashboard_agent_grpc),
                ("runtime env agent", p.runtime_env_agent),
                ("dashboard agent", p.dashboard_agent_listen),
                ("Ray client server", p.ray_client),
            )
        ]

    @property
    def haproxy_dir(self) -> Path:
        """The edge Serve's HAProxy files (short: Ray puts a node id and a socket name below it)."""
        digest = hashlib.sha256(str(self.dir).encode()).hexdigest()[:8]
        return Path("/tmp") / f"rma-hp-{digest}"

    def _user(self) -> pwd.struct_passwd:
        return pwd.getpwnam(self.spec.user)

    def prepare(self) -> None:
        """Before anything starts: the system user, the data dir (root's, 0755), the user's home in it and the
        HAProxy dir (the user's, 0700), the token (root:user, 0640; generated once, so the coordinator is told
        of the file before the edge head runs), and a check that the user can import the pool's code."""
        ensure_system_user(self.spec.user)
        pw = self._user()
        root_dir(self.dir)
        for path in (self.home, self.haproxy_dir):
            own_dir(path, pw)
        self._write_token(keep=True)
        self.check_importable()

    def _write_token(self, keep: bool) -> None:
        """The token file as root:user 0640, written by root in its own dir (atomically: a temp file, then
        rename); with `keep`, a token already there (a regular file, not a link) is kept."""
        gid = self._user().pw_gid
        if keep:
            try:
                fd = os.open(self.token_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except FileNotFoundError:
                fd = -1
            except OSError:  # a link (ELOOP): not ours
                raise UpError(f"{self.token_file} is not a regular file; remove it and start again") from None
            if fd >= 0:
                try:
                    st = os.fstat(fd)
                    if stat.S_ISREG(st.st_mode) and os.read(fd, 4096).strip():
                        os.fchown(fd, 0, gid)
                        os.fchmod(fd, 0o640)
                        return
                finally:
                    os.close(fd)
        tmp = self.token_file.with_name(self.token_file.name + ".tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchown(fd, 0, gid)
            os.fchmod(fd, 0o640)
            f.write(secrets.token_hex(32) + "\n")
        os.replace(tmp, self.token_file)

    def _child(self, args: list[str], **kwargs: Any) -> dict[str, Any]:
        """Popen arguments for a child of this edge run as its user: the edge's token only, in its home."""
        env = ray_env(self.token_file, base=user_env(self.spec.user, self.home))
        return {"args": args, "env": env, **as_user(self.spec.user, self.home), **kwargs}

    def check_importable(self) -> None:
        # The edge user runs this venv's Python, Ray and the pool's code: the install must be readable by every
        # user (a root-owned, world-readable install, e.g. /opt/rma/venv; not a venv under /root, 0700).
        try:
            r = subprocess.run(
                **self._child([sys.executable, "-c", "import deployments, ray"]),
                capture_output=True,
                text=True,
                timeout=180,
                check=False,
            )
            why = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1] if r.returncode else ""
        except OSError as exc:  # the interpreter itself is out of the user's reach (a venv under /root)
            why = exc.strerror or str(exc)
        if why:
            raise UpError(
                f"the edge user {self.spec.user!r} cannot run the pool's code ({sys.executable}: {why}); "
                f"install rma-pool where every user may read it (root-owned, world-readable, e.g. /opt/rma) "
                f"or pass --no-edge"
            )

    def start(self) -> None:
        """The edge head, then Serve on it (its proxy on the Serve port). UpError when either fails."""
        old_temp = self.node.spec.temp_dir if self.node else None
        spec = NodeSpec(
            node_ip=self.ray_ip,
            token_file=self.token_file,
            head=True,
            extra_args=self.spec.ports.argv(),
            temp_dir=short_temp_dir(f"e{self.name}-{secrets.token_hex(3)}"),
            labels={LABEL_TIER: "head", LABEL_TRUSTED: "false", LABEL_CLUSTER: self.name},
            gcs_port=self.spec.ports.gcs,
            dashboard_port=self.spec.ports.dashboard,
            num_cpus=0,  # control plane only: edge compute runs on edge donors
            drain_timeout_s=5,
            env=dict(FAST_HEALTH_CHECKS if self.o.fast_health_checks else {}),
            user=self.spec.user,
            home=self.home,
        )
        if old_temp is not None:
            shutil.rmtree(old_temp, ignore_errors=True)
        self.say(f"starting the edge head {self.name!r} on {self.ray_address} as {self.spec.user} …")
        with self._lock:  # a node started after close() would outlive `rma down`
            if self.closed:
                raise UpError(f"the edge {self.name!r} was not started: the pool is stopping")
            self.node = RayNode(spec, self.log_path)
            try:
                self.node.start()
            except NodeStartError as exc:
                self.node.kill()
                raise UpError(f"the edge head {self.name!r} did not start: {exc}") from None
        try:
            self.node.wait_started(120)
        except NodeStartError as exc:
            self.node.kill()
            raise UpError(f"the edge head {self.name!r} did not start: {exc}") from None
        wait_dashboard(self.dashboard_url, self.token_file, self.log_path)
        with self._lock:
            if self.closed:  # stopped meanwhile: no Serve started as the edge user after its processes went
                raise UpError(f"the edge {self.name!r} was not started: the pool is stopping")
        self.say(f"starting Ray Serve on the edge {self.name!r} (port {self.spec.ports.serve}) …")
        log = self.o.data_dir / "logs" / f"edge-{self.name}-serve.log"
        r = subprocess.run(
            **self._child(
                [
                    sys.executable,
                    "-m",
                    "rma_ray.serve_admin",
                    "start",
                    "--address",
                    self.ray_address,
                    "--host",
                    # the overlay: every address (HAProxy binds them all anyway), the edge hub's table lets
                    # only the core and the edge reach it
                    "0.0.0.0" if self.o.overlay else self.o.node_ip,
                    "--port",
                    str(self.spec.ports.serve),
                    "--haproxy-dir",
                    str(self.haproxy_dir),
                    # the core tells which donor answered a spot-checked request (rma_ray.upstream)
                    "--upstream-header",
                ]
            ),
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        if r.returncode != 0:
            log.write_text(r.stdout + r.stderr)
            raise UpError(f"Ray Serve did not start on the edge {self.name!r}; see {log}")
        self.error = None

    def deploy(self, coordinator_url: str, changed: Any = None) -> None:
        """The edge's apps (`python -m deployments up --profile edge`, run as the edge user with the edge's
        token): `apps` gets each one's result (`changed()` is called on each). A child that fails (an app that
        fails, an older `deployments` without the edge profile) leaves them failed; the core serves those apps
        meanwhile. It waits as long as an app waits for an edge donor: `Pool.deploy_edge` runs it in a
        thread."""
        if not self.apps_wanted:
            self.apps = {}
            return
        logs = self.o.data_dir / "logs" / f"edge-{self.name}-deployments.log"
        self.say(f"deploying the edge {self.name!r}'s apps ({', '.join(self.apps_wanted)}) …")
        child = self._child(
            [
                sys.executable,
                "-m",
                "deployments",
                "up",
                "--profile",
                "edge",
                "--edge",
                self.name,
                "--address",
                self.ray_address,
                "--dashboard",
                self.dashboard_url,
                "--stores",
                "none",
                "--apps",
                ",".join(self.apps_wanted),
                "--apps-wait",
                str(self.o.apps_wait_s),
                "--serve-host",
                self.o.node_ip,
                "--serve-port",
                str(self.spec.ports.serve),
            ]
        )
        # the operator's model settings (no path, no secret: edge_app_env): the edge serves the core's models
        child["env"].update(edge_app_env(os.environ))
        # where the edge's ingress fetches the coordinator's public keys (jwks_path): no secret
        child["env"]["RMA_COORDINATOR_URL"] = coordinator_url
        apps: dict[str, dict[str, Any]] = {}
        self.apps = {a: {"status": "deploying"} for a in self.apps_wanted}
        with open(logs, "a") as log:
            proc = self.deploy_proc = subprocess.Popen(
                **child, text=True, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL
            )
        watchdog = threading.Timer(self.o.apps_wait_s * len(self.apps_wanted) + 180, proc.kill)
        watchdog.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if isinstance(ev, dict) and "app" in ev:
                    apps[ev["app"]] = {k: ev[k] for k in ("status", "ready_s", "error") if k in ev}
                    self.apps = {**self.apps, **apps}
                    self.say(f"  edge {self.name}: {ev['app']}: {ev.get('status')}")
                    if changed is not None:
                        changed()
            proc.wait()
        finally:
            watchdog.cancel()
        if self.closed:  # `rma down` stopped the deploy (an edge with no donor yet waits for one): no failure
            return
        failed = {"status": "failed", "error": f"no result (exit code {proc.returncode}); see {logs}"}
        self.apps = {**{a: dict(failed) for a in self.apps_wanted}, **apps}
        if any(v.get("status") != "running" for v in self.apps.values()):
            self.say(f"[yellow]the edge {self.name!r}'s apps did not all start[/]; see {logs}")

    def running(self) -> bool:
        if self.node is None:
            return False
        self.node.track()
        return self.node.running()

    def close(self) -> None:
        """Stop for good (`rma down`): a restart in flight is cut short (its node and the edge user's
        processes, `serve_admin` included, are killed, so it fails at once) and no node starts after this."""
        with self._lock:
            self.closed = True
        if self.restarting is not None and self.restarting.is_alive():
            if self.node is not None:
                self.node.kill()
            self.kill_user_processes()
            self.restarting.join(30)
        self.stop()

    def stop(self) -> None:
        if self.deploy_proc is not None and self.deploy_proc.poll() is None:
            self.deploy_proc.kill()  # its cluster is going away: it would only wait for nothing
        if self.deploying is not None:
            self.deploying.join(30)
        if self.node is not None:
            if self.node.running():
                shutdown_serve(self.dashboard_url, self.token_file)
            self.node.stop_all(grace=5)  # its Serve is shut down: nothing left to drain
        self.kill_user_processes()
        if self.node is not None:
            shutil.rmtree(self.node.spec.temp_dir, ignore_errors=True)
        for node_dir in self.haproxy_dir.glob("*"):  # one per Ray node id: a new one each start
            shutil.rmtree(node_dir, ignore_errors=True)

    def kill_user_processes(self) -> None:
        """Every process of the edge's own user, not only the node's tree we track: a task that
        double-forked out of its worker would outlive the edge and read its next token (EdgeSpec.user: one
        user per edge)."""
        try:
            uid = self._user().pw_uid
        except KeyError:
            return  # never prepared: no such user, no process of it
        killed = kill_user_processes(uid)
        if killed:
            self.say(
                f"the edge {self.name!r}: {len(killed)} process(es) of {self.spec.user} were left; killed"
            )

    def new_token(self) -> None:
        self.kill_user_processes()  # nothing of the edge's user may be left to read the new token
        self._write_token(keep=False)


class Pool:
    def __init__(self, opts: UpOptions, say: Any) -> None:
        self.o, self.say = opts, say
        self.stop_event = threading.Event()
        self.rotate_event = threading.Event()
        self.starting: subprocess.Popen[str] | None = None  # `deployments up` while `up` waits for it
        self.token_file = opts.data_dir / "cluster_token"
        self.logs = opts.data_dir / "logs"
        self.head: RayNode | None = None
        self.coordinator: subprocess.Popen[bytes] | None = None
        self.admin_key = ""
        self.hub: wg.Hub | None = None
        self.edge_guard: wg.EdgeGuard | None = None  # no overlay, with edges: start_edge_guard
        self.edges = {spec.name: EdgeHead(spec, opts, say) for spec in opts.edges}
        # pool.json: the supervisor and the edges' deployments (threads) write it
        self.edges_lock = threading.RLock()

    def _check_ports(self) -> None:
        # first what clashes by configuration (the stores start later, but on the head like the edges' ports),
        # then what is taken on this machine now
        core = {port: f"the {name} store" for port, name in self.store_ports().items()}
        core.update(
            {
                self.o.gcs_port: "the Ray GCS",
                self.o.dashboard_port: "the Ray dashboard",
                self.o.coordinator_port: "the coordinator",
                self.o.serve_port: "Serve",
            }
        )
        for edge in self.edges.values():
            for what, port in edge.ports():
                if port in core:
                    raise UpError(
                        f"port {port} is both the {what} and {core[port]}'s: move the store "
                        f"(--store-port) or the core's port"
                    )
        for what, host, port in (
            ("Ray GCS", self.o.node_ip, self.o.gcs_port),
            ("Ray dashboard", self.o.node_ip, self.o.dashboard_port),
            ("coordinator", self.o.coordinator_host, self.o.coordinator_port),
            ("Serve", self.o.node_ip, self.o.serve_port),
        ):
            if not port_free(host, port):
                hint = " (a Redis on this box? use --gcs-port)" if port == 6379 else ""
                raise UpError(f"port {port} on {host} for the {what} is already in use{hint}")
        for edge in self.edges.values():
            for what, port in edge.ports():
                if not port_free(self.o.node_ip, port):
                    raise UpError(
                        f"port {port} on {self.o.node_ip} for the {what} is already in use "
                        f"(another pool's edge? pass --no-edge)"
                    )

    def _check_edges(self) -> None:
        names = [e.name for e in self.o.edges]
        bad = [n for n in names if not valid_name(n)]
        if bad:
            raise UpError(f"edge name {bad[0]!r}: use a-z, 0-9 and '-', up to 16 characters, not 'core'")
        if len(set(names)) != len(names):
            raise UpError("two edges share a name; give each its own")
        if self.edges and os.geteuid() != 0:
            raise UpError(
                "edge clusters need root (the edge head runs as its own system user "
                f"{self.o.edges[0].user!r}); run `rma up` as root, or pass --no-edge"
            )

    def start_head(self) -> None:
        # A fresh temp dir per start: `ray start --head` refuses to start where its temp dir says a cluster ran
        # and any process on the machine still names that GCS address (a donor on the same box, in tests).
        old_temp = self.head.spec.temp_dir if self.head else None
        spec = NodeSpec(
            node_ip=self.o.ray_ip,
            token_file=self.token_file,
            head=True,
            extra_args=wg.RayPorts().argv(head=True) if self.o.overlay else [],
            # under a fresh 0700 parent of root's: Ray makes the temp dir 0777, an edge's user must not enter
            temp_dir=private_temp_dir(),
            # the operator's own machine: trusted, so the embedded default may keep client data here
            labels={LABEL_TIER: "head", LABEL_TRUSTED: "true"},
            gcs_port=self.o.gcs_port,
            dashboard_port=self.o.dashboard_port,
            num_cpus=self.o.head_cpus,
            drain_timeout_s=5,
            env={
                **(FAST_HEALTH_CHECKS if self.o.fast_health_checks else {}),
                # actors on the head (store supervisors, Serve replicas) find service.json there
                "RMA_DATA_DIR": str(self.o.data_dir),
                **self.o.extra_env,
            },
        )
        if old_temp is not None:
            shutil.rmtree(old_temp.parent, ignore_errors=True)  # private_temp_dir's parent
        self.head = RayNode(spec, self.logs / "ray-head.log")
        self.say(f"starting the Ray head on {self.o.gcs_address} (token auth) …")
        self.head.start()
        try:
            self.head.wait_started(120)
        except NodeStartError as exc:
            self.head.kill()
            raise UpError(f"the Ray head did not start: {exc}") from None
        wait_dashboard(self.dashboard_url, self.token_file, self.head.log_path)

    def start_hub(self) -> None:
        """The overlay's hub, before Ray: the head's Ray binds to the hub's address."""
        if not self.o.overlay:
            return
        why = wg.missing_tools()
        if why:
            raise UpError(f"--overlay: {why}")
        self.hub = wg.Hub(
            self.o.data_dir,
            self.o.overlay_subnet,
            self.o.overlay_port,
            self.o.overlay_interface,
            extra_tcp=[self.o.gcs_port, self.o.dashboard_port],
            public_tcp={self.o.coordinator_port, self.o.serve_port},
            local_deny=self.edge_local_deny(),
        )
        self.say(
            f"starting the overlay hub {self.hub.name} on {self.hub.address} (UDP {self.o.overlay_port}) …"
        )
        try:
            self.hub.up()
        except wg.OverlayError as exc:
            self.hub = None
            raise UpError(f"the overlay hub did not start: {exc}") from None

    def store_ports(self) -> dict[int, str]:
        """Every TCP port the core's stores listen on, with the store's name (their defaults unless
        --store-port moved them; the graph store's HTTP port is its Bolt port + 1)."""
        import importlib

        # by name: rma_ray imports nothing of deployments/ statically (mypy checks rma_ray and admission only)
        kinds: dict[str, Any] = importlib.import_module("deployments.stores.kinds").KINDS
        ports: dict[int, str] = {}
        for name in self.o.stores:
            kind = kinds.get(name)
            port = self.o.store_ports.get(name, kind.default_port if kind else 0)
            if port:
                ports.update({p: name for p in ([port, port + 1] if name == "graph" else [port])})
        return ports

    def edge_local_deny(self) -> wg.LocalDeny | None:
        """What the edges' system users (known after EdgeHead.prepare) may not reach on the head: the core's
        Ray ports, the stores' and the core's overlay subnet (rma_ray.overlay.LocalDeny); the coordinator's
        HTTP port stays open to them (an edge's ingress fetches its public keys)."""
        if not self.edges:
            return None
        return wg.LocalDeny(
            uids=tuple(edge._user().pw_uid for edge in self.edges.values()),
            tcp=tuple(self.store_ports()),
            nets=(self.o.overlay_subnet,),
            allow_tcp=(self.o.coordinator_port,),
        )

    def edge_ports(self) -> set[int]:
        """Every port the edges' heads pin (their worker ranges included): never a core port to deny."""
        ports: set[int] = set()
        for edge in self.edges.values():
            ports.update(port for _, port in edge.ports())
            ports.update(range(edge.spec.ports.min_worker, edge.spec.ports.max_worker + 1))
        return ports

    def start_edge_guard(self) -> None:
        """Without the overlay (no hub table to hold Pool.edge_local_deny's chain), a table of its own
        (rma_ray.overlay.EdgeGuard) keeps what the edges' users run on the head off the core's ports on the
        head's own addresses: the stores', the core's GCS and dashboard, Ray's default worker range and
        client port, and what the core head's processes listen on (guard_ports, loopback included). The
        coordinator's port stays open to them; the core's Serve port (public) and the edges' own are never
        denied. Installed before any edge head starts; a stale table of a crashed run is replaced."""
        if self.o.overlay or not self.edges:
            return
        why = "it needs root" if os.geteuid() != 0 else None
        if why is None and not shutil.which("nft"):
            why = "`nft` is missing: apt-get install nftables"
        if why:
            self.say(
                f"[yellow]the edge users are not firewalled from the core's ports on this machine:[/] {why} "
                f"(see SECURITY.md)"
            )
            return
        guard = wg.EdgeGuard(
            "",
            wg.RayPorts().firewalled([self.o.gcs_port, self.o.dashboard_port]),
            table=wg.edge_guard_table(self.o.data_dir),
            allow={self.o.coordinator_port, self.o.serve_port},
            local_deny=wg.LocalDeny(
                uids=tuple(edge._user().pw_uid for edge in self.edges.values()),
                tcp=tuple(self.store_ports()),
                allow_tcp=(self.o.coordinator_port,),
                local_only=True,
            ),
        )
        try:
            guard.install()
        except wg.OverlayError as exc:
            self.say(f"[yellow]the edge users are not firewalled from the core's ports:[/] {exc}")
            return
        self.edge_guard = guard

    def guard_ports(self) -> None:
        """Firewall any port the head's Ray opened outside the pinned ones (autoscaler monitor, dashboard gRPC)."""
        for edge in self.edges.values():
            edge.guard_ports()
        if self.head is None:
            return
        self.head.track()
        if self.hub is not None:
            try:  # loopback listeners too: the table's output chain keeps the edges' users off them
                # (its input chain takes loopback before the set: covering them changes nothing there)
                loopback = bool(self.edges)
                self.hub.firewall.cover(wg.listening_ports(self.head.pids(), loopback=loopback))
            except wg.OverlayError as exc:
                self.say(f"[yellow]firewall:[/] {exc}")
        if self.edge_guard is not None:
            self.guard_edge_users()

    def guard_edge_users(self) -> None:
        """EdgeGuard: the core head's listeners, loopback ones included, denied to the edges' users. A port only
        an edge head listens on now (one the core let go may be Ray's random port of the edge's now) is taken
        out again; a port both listen on (on different addresses: an edge donor's task may bind the core's
        port number on loopback on purpose) stays denied: the core wins."""
        assert self.edge_guard is not None and self.head is not None
        edge_now: set[int] = set()
        for edge in self.edges.values():
            if edge.node is not None and edge.node.running():
                edge.node.track()
                edge_now |= wg.listening_ports(edge.node.pids(), loopback=True)
        try:
            core = wg.listening_ports(self.head.pids(), loopback=True)
            self.edge_guard.uncover(edge_now - core)
            self.edge_guard.cover(core)
        except wg.OverlayError as exc:
            self.say(f"[yellow]edge users' firewall:[/] {exc}")

    def hub_env(self) -> dict[str, str]:
        if self.hub is None:
            return {}
        return {
            "RMA_OVERLAY_HUB_INTERFACE": self.hub.name,
            "RMA_OVERLAY_HUB_PUBLIC_KEY": self.hub.public_key,
            "RMA_OVERLAY_HUB_ENDPOINT": f"{self.o.node_ip}:{self.hub.port}",
            "RMA_OVERLAY_SUBNET": self.hub.subnet,
        }

    def start_serve(self) -> None:
        self.say(f"starting Ray Serve (proxy on the head, port {self.o.serve_port}) …")
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "rma_ray.serve_admin",
                "start",
                "--address",
                self.o.gcs_address,
                "--host",
                self.o.node_ip,
                "--port",
                str(self.o.serve_port),
                # the servers that bind their ports after Serve's start
                *(
                    a
                    for port in sorted(
                        {self.o.coordinator_port, *self.store_ports()}
                        | {port for edge in self.edges.values() for _, port in edge.ports()}
                    )
                    for a in ("--avoid-port", str(port))
                ),
            ],
            env=ray_env(self.token_file),
            capture_output=True,
            text=True,
            timeout=180,
        )
        if r.returncode != 0:
            (self.logs / "serve-start.log").write_text(r.stdout + r.stderr)
            raise UpError(f"Ray Serve did not start; see {self.logs / 'serve-start.log'}")

    def coordinator_env(self) -> dict[str, str]:
        return {
            **ray_env(self.token_file),
            "RMA_ADMIN_KEY": self.admin_key,
            "RMA_DATA_DIR": str(self.o.data_dir / "coordinator"),
            "RMA_RAY_ADDRESS": self.o.gcs_address,
            "RMA_DONOR_KIT": "1",  # beside its head: this machine's Python and Ray are the head's
            "RMA_RAY_AUTH_TOKEN_FILE": str(self.token_file),
            "RMA_RAY_DASHBOARD_URL": f"http://{self.o.ray_ip}:{self.o.dashboard_port}",
            **self.hub_env(),
            "RMA_PUBLIC_URL": self.o.coordinator_url,
            "RMA_HEARTBEAT_INTERVAL_S": str(self.o.heartbeat_interval_s),
            # the edges' addresses and token files (root reads them; the edge users own them)
            "RMA_EDGES": json.dumps([e.endpoint().model_dump(mode="json") for e in self.edges.values()]),
            **self.o.extra_env,
        }

    def start_coordinator(self) -> None:
        env = self.coordinator_env()
        log = open(self.logs / "coordinator.log", "ab")
        self.coordinator = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "rma_ray.cli",
                "admission",
                "serve",
                "--host",
                self.o.coordinator_host,
                "--port",
                str(self.o.coordinator_port),
                "--quiet",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        coordinator = self.coordinator

        def healthy() -> bool:
            if coordinator.poll() is not None:
                raise GiveUp(f"the coordinator exited; see {self.logs / 'coordinator.log'}")
            return httpx.get(self.o.coordinator_url + "/healthz", timeout=2).status_code == 200

        try:
            wait_until(healthy, timeout=60, interval=0.3, what="the coordinator")
        except GiveUp as exc:
            raise UpError(str(exc)) from None
        except WaitTimeout:
            raise UpError(f"the coordinator did not answer on {self.o.coordinator_url}") from None

    def interrupt(self) -> None:
        """Ctrl-C or `rma down` (SIGINT/SIGTERM): once the pool is up, the supervision ends and the pool stops;
        during the start, the start is cut short at its next step (the stores' and apps' child, whose waits
        can take minutes, is ended now) and `up` raises StartInterrupted, after which the caller stops what was
        started. Called from a signal handler: sets a flag and sends a signal, nothing more."""
        self.stop_event.set()
        child = self.starting
        if child is not None and child.poll() is None:
            child.terminate()

    def _not_stopped(self) -> None:
        if self.stop_event.is_set():
            raise StartInterrupted(
                "stopped during the start (Ctrl-C or `rma down`); stopping what was started"
            )

    def up(self) -> dict[str, Any]:
        self.o.data_dir.mkdir(parents=True, exist_ok=True)
        self.o.data_dir.chmod(
            0o700
        )  # pool.json (the admin key), the token, service.json: the edge user reads none
        self.logs.mkdir(parents=True, exist_ok=True)
        old = poolinfo.read(self.o.data_dir)
        if old.supervisor_running():
            raise UpError(
                f"a pool is already running from {self.o.data_dir} (pid {old.supervisor_pid}); "
                f"`rma down` first"
            )
        self._check_edges()
        self._check_ports()
        for edge in self.edges.values():
            edge.prepare()
            prev = (old.edges or {}).get(edge.name)
            edge.token_rotated_at = prev.token_rotated_at if prev else None
        read_or_create_secret(self.token_file)  # the cluster token: generated once, 0600, never printed
        first_start = not old.admin_key
        self.admin_key = old.admin_key or credentials.mint(credentials.Kind.ADMIN).token
        self.start_hub()
        for edge in self.edges.values():
            edge.start_hub()  # before the coordinator: it is told each edge hub (RMA_EDGES)
        self.start_edge_guard()  # before any edge head: code of an edge's user never runs unguarded
        self._not_stopped()
        self.start_head()
        self._not_stopped()
        self.start_serve()
        self._not_stopped()
        self.start_coordinator()
        self._not_stopped()
        with AdmissionClient(self.o.coordinator_url, self.admin_key) as client:
            invite = client.create_invite(ttl_s=self.o.invite_ttl_s, uses=1, note="printed by rma up")
            self.write_service_credential(client)
        info = PoolInfo(
            coordinator_url=self.o.coordinator_url,
            registry_url=self.o.coordinator_url + "/registry",
            serve_url=f"http://{self.o.node_ip}:{self.o.serve_port}",
            ray_dashboard_url=self.dashboard_url,
            overlay=(
                poolinfo.OverlayInfo(
                    interface=self.hub.name,
                    address=self.hub.address,
                    subnet=self.hub.subnet,
                    public_key=self.hub.public_key,
                    endpoint=f"{self.o.node_ip}:{self.hub.port}",
                )
                if self.hub
                else None
            ),
            ray_address=self.o.gcs_address,
            admin_key=self.admin_key,
            join_token=invite["token"],
            join_token_expires_at=invite["expires_at"],
            data_dir=str(self.o.data_dir),
            supervisor_pid=os.getpid(),
            head_pid=self.head.pid if self.head else None,
            coordinator_pid=self.coordinator.pid if self.coordinator else None,
            first_start=first_start,
        )
        self.write(info)
        # store supervisors on the head report with service.json's credential
        if not self.stop_event.is_set():
            self.start_deployments(info)
        self._not_stopped()
        # Each edge head, its Serve and its apps start after the core's apps run, in a thread `rma up` does not
        # wait for: an edge serves no client until an edge donor joins, and starting it beside the core's apps
        # cost a warm `rma up` ~15-20 s of the 2 cores (bench.pool_down --up-arg=--no-edge). pool.json says
        # the edge is starting (no head pid, no error) until it runs; a start that fails is said, kept and
        # retried by the supervisor (watch_edges), as an edge head that died. (As edge.restarting: a stop
        # meanwhile cuts the start short, as it does a restart's.)
        self.guard_ports()  # the core's listeners so far, before the edges' users run anything
        for name, edge in self.edges.items():
            edge.restarting = threading.Thread(
                target=self._start_edge_quietly, args=(edge,), name=f"rma-edge-{name}-start", daemon=True
            )
            edge.restarting.start()
        return poolinfo.read(self.o.data_dir).as_dict()

    def write(self, info: PoolInfo) -> None:
        """pool.json from `info`, with the edges as they are now (an edge's deployment writes beside)."""
        with self.edges_lock:
            if self.edges:
                info.edges = {name: edge.info() for name, edge in self.edges.items()}
            poolinfo.write(self.o.data_dir, info)

    def write_edges(self) -> None:
        with self.edges_lock:
            self.write(poolinfo.read(self.o.data_dir))

    def deploy_edge(self, edge: EdgeHead) -> None:
        """The edge's apps, in a thread of their own: they may wait long for an edge donor, and neither `rma up`
        nor the supervision of the core waits for them."""
        if edge.deploying is not None and edge.deploying.is_alive():
            return

        def run() -> None:
            try:
                edge.deploy(self.o.coordinator_url, changed=self.write_edges)
            except (OSError, subprocess.SubprocessError) as exc:
                edge.apps = {a: {"status": "failed", "error": str(exc)} for a in edge.apps_wanted}
                self.say(f"[yellow]the edge {edge.name!r}'s apps were not deployed:[/] {exc}")
            finally:
                self.write_edges()

        edge.deploying = threading.Thread(target=run, name=f"rma-edge-{edge.name}-deploy", daemon=True)
        edge.deploying.start()

    def _start_edge_quietly(self, edge: EdgeHead) -> None:
        """start_edge in a thread of its own: whatever goes wrong is said and kept for a retry, as a failed
        start's error is (nothing in a thread reaches the caller)."""
        try:
            self.start_edge(edge)
        except Exception as exc:
            edge.error = f"the edge head {edge.name!r} did not start: {exc}"
            edge.retry_at = time.monotonic() + EDGE_RETRY_S
            self.say(f"[yellow]{edge.error}[/]; the core serves meanwhile")
            self.write_edges()

    def start_edge(self, edge: EdgeHead) -> bool:
        """Start (or start again) an edge head, its Serve and its apps. A failure is said and
        kept in pool.json (the core serves meanwhile); the supervisor tries again after EDGE_RETRY_S."""
        try:
            edge.start()
        except (UpError, OSError, subprocess.SubprocessError) as exc:
            edge.error = str(exc)
            edge.retry_at = time.monotonic() + EDGE_RETRY_S
            if edge.node is not None:
                edge.node.kill()
            self.say(f"[yellow]{exc}[/]; the core serves meanwhile")
            self.write_edges()
            return False
        self.write_edges()
        self.deploy_edge(edge)
        return True

    def rotate_edge(self, name: str) -> None:
        """A new token for one edge: its head restarts with it and its apps are deployed again; the core head,
        its Serve apps and the stores are not touched. Then the coordinator rotates that edge's credential."""
        edge = self.edges.get(name)
        if edge is None:
            self.say(f"[yellow]rotation: no edge {name!r} in this pool[/]")
            return
        if edge.restarting is not None:  # the supervisor's restart of a dead head ends first
            edge.restarting.join()
        self.say(f"rotating the edge {name!r}'s cluster token: restarting its head …")
        edge.stop()
        edge.new_token()
        started = self.start_edge(edge)
        try:
            with AdmissionClient(self.o.coordinator_url, self.admin_key) as client:
                client.request("POST", f"/api/admin/edges/{name}/rotate-credential")
        except AdmissionError as exc:
            if exc.status != 404:  # 404: a coordinator without edge credentials, nothing to rotate
                self.say(f"[yellow]the coordinator did not rotate the edge {name!r}'s credential:[/] {exc}")
        except httpx.HTTPError as exc:
            self.say(f"[yellow]the coordinator did not answer the edge credential's rotation:[/] {exc}")
        if not started:  # the new token is written, but no head runs with it: not a rotation to report done
            raise UpError(f"the edge {name!r} did not start again with its new token: {edge.error}")
        edge.token_rotated_at = time.time()
        self.write_edges()
        self.say(
            f"[green]the edge {name!r}'s cluster token is rotated[/]; its donors rejoin on their heartbeat"
        )

    def _rotate_requested(self) -> str | None:
        """The edge `rma rotate-cluster-token --edge NAME` asked for (None: the core)."""
        path = self.o.data_dir / ROTATE_REQUEST
        try:
            edge = json.loads(path.read_text()).get("edge")
        except (OSError, ValueError, AttributeError):
            return None
        finally:
            path.unlink(missing_ok=True)
        return str(edge) if edge else None

    def watch_edges(self) -> None:
        """Restart an edge head that died (same token), its Serve and its apps, in a thread: the restart
        takes 30-60 s, and meanwhile the supervision of the core (its head, the coordinator) and `rma down`
        must not wait for it."""
        for edge in self.edges.values():
            if edge.restarting is not None and edge.restarting.is_alive():
                continue
            if edge.closed or edge.running() or time.monotonic() < edge.retry_at:
                continue
            if edge.node is not None and edge.error is None:
                self.say(
                    f"[yellow]the edge head {edge.name!r} stopped; restarting it[/] (see {edge.log_path})"
                )
                edge.node.kill()  # whatever of its tree is left
            edge.restarting = threading.Thread(
                target=self.start_edge, args=(edge,), name=f"rma-edge-{edge.name}-restart", daemon=True
            )
            edge.restarting.start()

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.o.ray_ip}:{self.o.dashboard_port}"

    def write_service_credential(self, client: AdmissionClient) -> None:
        """Mint the head's service credential (keyring + store reports), write it 0600 where Ray actors on the
        head look (RMA_DATA_DIR), and revoke the one of the previous start."""
        path = service_file(self.o.data_dir)
        try:
            old_id = json.loads(path.read_text()).get("key_id")
        except (OSError, ValueError):
            old_id = None
        key = client.request("POST", "/api/admin/service-keys", json={"name": "rma up: head services"})
        # `overlay`: store supervisors on the head firewall their ports to trusted nodes (deployments/stores)
        write_private(
            path,
            json.dumps(
                {
                    "coordinator_url": self.o.coordinator_url,
                    "service_key": key["key"],
                    "key_id": key["id"],
                    "overlay": self.hub is not None,
                },
                indent=2,
            ),
        )
        if old_id and old_id != key["id"]:
            try:
                client.request("POST", f"/api/admin/service-keys/{old_id}/revoke")
            except AdmissionError as exc:  # a fresh coordinator database: nothing to revoke
                if exc.status != 404:
                    raise

    def _deployments(self, *args: str) -> subprocess.Popen[str]:
        """`python -m deployments <args>` against this pool: one JSON object a line on stdout (the child's
        other output goes to logs/deployments.log)."""
        log = open(self.logs / "deployments.log", "a")
        env = {**ray_env(self.token_file), "RMA_DATA_DIR": str(self.o.data_dir), **self.o.extra_env}
        try:
            return subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "deployments",
                    *args,
                    "--address",
                    self.o.gcs_address,
                    "--stores",
                    ",".join(self.o.stores) or "none",
                ],
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()

    def start_deployments(self, info: PoolInfo) -> None:
        """The data stores (under their Ray supervisors: on a trusted data donor when one is online, on the
        head otherwise) and then the Serve apps (LLM at /v1 and /api/inference, embeddings at /v1/embeddings,
        the RMA services at /api, the vision front at /api/inference/vision, whose backend waits for a GPU
        donor), from `python -m deployments up`; pool.json gets `stores` when they are done, then `apps`. A
        store or an app that fails is reported (registry, `rma status`, the log); the rest of the pool stays
        up."""
        if not (self.o.stores or self.o.apps):
            info.stores, info.apps = {}, {}
            self.write(info)
            return
        if self.o.stores:
            self.say(f"starting data stores ({', '.join(self.o.stores)}, {self.o.store_runtime} runtime) …")
        ports = [a for s, p in self.o.store_ports.items() for a in ("--store-port", f"{s}={p}")]
        proc = self._deployments(
            "up",
            "--store-runtime",
            self.o.store_runtime,
            "--stores-wait",
            str(self.o.stores_wait_s),
            *ports,
            "--apps",
            ",".join(self.o.apps) or "none",
            "--apps-wait",
            str(self.o.apps_wait_s),
            "--dashboard",
            self.dashboard_url,
            "--serve-host",
            self.o.node_ip,
            "--serve-port",
            str(self.o.serve_port),
        )
        self.starting = proc  # a stop during the start ends it (interrupt)
        if self.stop_event.is_set():  # the stop came before it was known
            proc.terminate()
        # the child waits for each part itself; this only ends a child that hangs past all of that
        limit = self.o.stores_wait_s + self.o.apps_wait_s * len(self.o.apps) + 180
        watchdog = threading.Timer(limit, proc.kill)
        watchdog.start()
        stores: dict[str, Any] = {}
        apps: dict[str, Any] = {}
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if "store" in ev:
                    stores[ev["store"]] = {
                        k: ev.get(k) for k in ("status", "where", "node_ip", "port", "error")
                    }
                    self._said_store(ev)
                elif ev.get("done") == "stores":
                    info.stores = stores
                    self.write(info)
                elif "app" in ev:
                    apps[ev["app"]] = {k: ev[k] for k in ("status", "ready_s", "error") if k in ev}
                    self._said_app(ev)
                elif ev.get("done") == "apps" and self.o.apps:
                    self.say("  the Serve apps are applied")
                elif "error" in ev:
                    self.say(f"[yellow]{ev['error']}[/]; see {self.logs / 'deployments.log'}")
            proc.wait()
        finally:
            watchdog.cancel()
            self.starting = None
        if self.stop_event.is_set():
            return  # up() says why, and the caller stops what was started
        if proc.returncode < 0:
            self.say(
                f"[yellow]the stores and apps did not report in time[/]; see {self.logs / 'deployments.log'}"
            )
        if info.stores is None:  # the child ended before its stores were done
            info.stores = stores
        missing = {"status": "failed", "error": f"no result; see {self.logs / 'deployments.log'}"}
        info.apps = {**{a: dict(missing) for a in self.o.apps}, **apps}
        self.write(info)

    def _said_store(self, ev: dict[str, Any]) -> None:
        if ev.get("status") == "ready":
            self.say(
                f"  {ev['store']}: ready on {ev['where']} ({ev['node_ip']}:{ev['port']}, "
                f"{ev['ready_s']:.1f} s)"
            )
        elif ev.get("status") not in ("stopped", None):
            self.say(f"  [yellow]{ev['store']}: {ev['status']}[/] — {ev.get('error')}")

    def _said_app(self, ev: dict[str, Any]) -> None:
        if ev["status"] == "running":
            self.say(f"  {ev['app']}: running ({ev['ready_s']} s)")
        else:
            self.say(
                f"  [yellow]{ev['app']}: {ev['status']}[/] — {ev.get('error')} "
                f"(log: {self.logs / 'deployments.log'})"
            )

    def stop_stores(self) -> bool:
        if not (self.o.stores and self.head is not None and self.head.running()):
            return False
        proc = self._deployments("down", "--stores-wait", "60")
        try:
            proc.communicate(timeout=150)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            self.say("[yellow]the data stores did not stop in time[/]")
        return True

    def rotate(self) -> None:
        """A new cluster token: restart the Ray head with it. Live donors learn of it from their heartbeat
        reply and fetch it with their node token; revoked donors cannot, so the old token is worthless.
        Serve's state lives in the head's GCS and starts again empty."""
        self.say("rotating the cluster token: stopping the apps, the stores, Serve and the Ray head …")
        if self.o.apps:
            self._shutdown_serve()  # the apps go with Serve (short grace), as in `rma down`
        self.stop_stores()
        subprocess.run(
            [sys.executable, "-m", "rma_ray.serve_admin", "shutdown", "--address", self.o.gcs_address],
            env=ray_env(self.token_file),
            capture_output=True,
            timeout=60,
            check=False,
        )
        if self.head is not None:
            self.head.stop(timeout=30)
        write_private(self.token_file, secrets.token_hex(32) + "\n")
        self.start_head()
        self.start_serve()
        info = poolinfo.read(self.o.data_dir)
        info.head_pid = self.head.pid if self.head else None
        info.cluster_token_rotated_at = time.time()
        self.write(info)
        self.start_deployments(info)  # the new cluster starts empty: the stores (same volumes), the apps
        self.say("[green]cluster token rotated[/]; live donors rejoin on their next heartbeat")

    def supervise(self) -> bool:
        """Restart the coordinator if it dies; the head's death ends the pool (donors would have to rejoin).

        True when asked to stop (signal, `rma down`); False when the pool ended by itself (the head died, a rotation
        failed), so that `rma up` exits non-zero and a service manager restarts it."""
        while not self.stop_event.wait(2):
            self.guard_ports()
            if self.rotate_event.is_set():
                self.rotate_event.clear()
                edge = self._rotate_requested()
                try:
                    if edge:
                        self.rotate_edge(edge)
                    else:
                        self.rotate()
                except UpError as exc:
                    self.say(f"[red]rotation failed:[/] {exc}")
                    if not edge:
                        return False
                    # an edge that did not start again is retried by watch_edges (EDGE_RETRY_S);
                    # the core goes on
                except (OSError, subprocess.SubprocessError) as exc:
                    self.say(f"[red]rotation failed:[/] {exc}")
                    return False
            if self.head is not None:
                self.head.track()
                if not self.head.running():
                    self.say("[red]the Ray head stopped[/]; see " + str(self.head.log_path))
                    return False
            if self.coordinator is not None and self.coordinator.poll() is not None:
                self.say("[yellow]the coordinator stopped; restarting it[/]")
                try:
                    self.start_coordinator()
                except UpError as exc:
                    self.say(f"[red]{exc}[/]")
            self.watch_edges()
        return True

    def _progress(self, step: str) -> None:
        """What the stop is doing now (`<data dir>/stopping`): `rma down` waits as long as this moves on."""
        self.say(f"  {step}")
        try:
            (self.o.data_dir / "stopping").write_text(f"{time.time():.1f} {step}\n")
        except OSError:
            pass

    def _shutdown_serve(self) -> None:
        shutdown_serve(self.dashboard_url, self.token_file)

    def down(self) -> None:
        """Stop the whole pool in seconds: Serve is shut down at once with a short grace (no app-by-app
        undeploy: each ingress replica would drain for HAProxy's 30 s), beside the data stores (which do stop
        gracefully: Postgres checkpoints, Redis fsyncs) and the edge heads (each in a thread of its own); then
        the coordinator and the Ray head; any process of the head's tree that lingers (vLLM's engine, whose
        replica was killed) is stopped by PID."""
        t0 = time.monotonic()
        live = self.head is not None and self.head.running()
        if self.head is not None:
            self.head.track()  # every process of the head's tree now, vLLM's engines included
        self._progress("stopping Serve and the data stores …")
        serve_stop = None
        if live and self.o.apps:
            serve_stop = threading.Thread(target=self._shutdown_serve, daemon=True)
            serve_stop.start()
        # the edges share nothing with the core's stop: each goes down beside it (its own Serve grace, its node)
        edge_stops = {
            name: threading.Thread(target=edge.close, daemon=True, name=f"rma-edge-stop-{name}")
            for name, edge in self.edges.items()
        }
        for thread in edge_stops.values():
            thread.start()
        if self.stop_stores():
            self._progress(f"data stores stopped ({time.monotonic() - t0:.1f} s)")
        if serve_stop is not None:
            serve_stop.join(SERVE_SHUTDOWN_S + 2)
            self._progress(f"Serve given {SERVE_SHUTDOWN_S:.0f} s to finish ({time.monotonic() - t0:.1f} s)")
        for name, thread in edge_stops.items():
            thread.join()  # as long as it takes, as when it ran in turn (its node stop is bounded)
            self._progress(f"edge head {name!r} stopped ({time.monotonic() - t0:.1f} s)")
        if self.coordinator is not None and self.coordinator.poll() is None:
            self.coordinator.terminate()
            try:
                self.coordinator.wait(15)
            except subprocess.TimeoutExpired:
                self.coordinator.kill()
            self._progress(f"coordinator stopped ({time.monotonic() - t0:.1f} s)")
        if self.head is not None:
            self.head.stop_all(grace=5)  # Serve and the stores are done: nothing on the head needs draining
            shutil.rmtree(self.head.spec.temp_dir.parent, ignore_errors=True)  # private_temp_dir's parent
            self._progress(f"Ray head stopped ({time.monotonic() - t0:.1f} s)")
        for edge in self.edges.values():
            if edge.hub is not None:
                edge.hub.down()  # its interface and its table
        if self.hub is not None:
            self.hub.down()
        if self.edge_guard is not None:
            self.edge_guard.remove()
            self.edge_guard = None
        with self.edges_lock:  # after any edge thread's last write
            poolinfo.write(self.o.data_dir, poolinfo.read(self.o.data_dir).without_processes())
        (self.o.data_dir / "stopping").unlink(missing_ok=True)


def signal_rotate(data_dir: Path, timeout: float = 240, edge: str | None = None) -> str:
    """`rma rotate-cluster-token [--edge NAME]`: SIGHUP the supervisor and wait until it has restarted the head
    (the core's, or only that edge's: the edge is named in `<data dir>/rotate-request` first)."""
    info = poolinfo.read(data_dir)
    pid = info.supervisor_pid
    if not pid or not info.supervisor_running():
        raise UpError(f"no pool is running from {data_dir}")
    edges = info.edges or {}
    if edge is not None and edge not in edges:
        known = ", ".join(edges) or "none: it was started with --no-edge"
        raise UpError(f"--edge {edge}: this pool has no such edge (edges: {known})")

    def stamp() -> float | None:
        now = poolinfo.read(data_dir)
        if edge is None:
            return now.cluster_token_rotated_at
        e = (now.edges or {}).get(edge)
        return e.token_rotated_at if e else None

    before = stamp()

    def rotated() -> bool:
        if stamp() != before:
            return True
        if not psutil.pid_exists(pid):
            raise GiveUp("the pool supervisor stopped during the rotation; see its logs")
        return False

    request = data_dir / ROTATE_REQUEST
    if edge is not None:
        write_private(request, json.dumps({"edge": edge}))
    else:
        request.unlink(missing_ok=True)
    os.kill(pid, signal.SIGHUP)
    try:
        wait_until(rotated, timeout=timeout, what="the rotation")
    except GiveUp as exc:
        raise UpError(str(exc)) from None
    except WaitTimeout:
        raise UpError(f"the rotation did not finish within {timeout:.0f} s") from None
    if edge is not None:
        return (
            f"the edge {edge!r}'s cluster token rotated; its head restarted with it (the core untouched), "
            f"its live donors rejoin on their next heartbeat"
        )
    return "cluster token rotated; the Ray head restarted with it, live donors rejoin on their next heartbeat"


def signal_down(data_dir: Path, patience_s: float = 120) -> str:
    """`rma down`: SIGTERM the supervisor and wait for it to finish its clean shutdown, for as long as it
    makes progress (each step of the stop writes `<data dir>/stopping`); it gives up only after `patience_s`
    without a step."""
    info = poolinfo.read(data_dir)
    pid = info.supervisor_pid
    if not pid or not info.supervisor_running():
        raise UpError(f"no pool is running from {data_dir}")
    proc = psutil.Process(pid)
    proc.send_signal(signal.SIGTERM)
    marker = data_dir / "stopping"
    last: dict[str, Any] = {"step": "", "at": time.monotonic()}

    # not proc.wait(): for a process that is not our child it waits until the PID is gone, and a finished
    # supervisor stays a zombie until its own parent (a shell, a test harness) reaps it
    def stopped() -> bool:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        try:
            step = marker.read_text()
        except OSError:
            step = last["step"]
        if step != last["step"]:
            last.update(step=step, at=time.monotonic())
        elif time.monotonic() - last["at"] > patience_s:  # no deadline of its own: as long as it moves on
            doing = last["step"].partition(" ")[2].strip() or "the first step"
            raise GiveUp(
                f"the pool supervisor (pid {pid}) made no progress for {patience_s:.0f} s (last: "
                f"{doing}); see its output"
            )
        return False

    try:
        wait_until(stopped, timeout=float("inf"), interval=0.2, what="the pool supervisor to stop")
    except GiveUp as exc:
        raise UpError(str(exc)) from None
    return f"pool stopped (supervisor pid {pid})"
