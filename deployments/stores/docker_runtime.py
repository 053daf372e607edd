"""The `docker` runtime: the store runs in a container from a locally built image (images/stores/<store>,
scripts/build-store-images.sh), driven with the official `docker` SDK (DOCKER_HOST is honoured). Same interface as
`ProcessRuntime`; the supervisor does the restarting (restart policy `no`) and the readiness query.

- Host networking: the store binds the node's address and port exactly as under the process runtime, so the
  endpoint does not change with the runtime and no bridge, NAT or iptables rule is needed on the donor.
- Data lives on the node: `<volume>/container` is bind-mounted at `/data`, owned by the image's fixed uid.
- Secrets stay out of `docker inspect`: Redis reads `requirepass` from a 0600 config file in the volume, Postgres
  gets its password once, through `initdb --pwfile` in a one-shot container; Cmd and Env carry no password.
- Backups (backup.py) work on `data` (the bind mount's host side) as on a process runtime's volume, and give
  what they write there to `spec.uid`; `image_version` is the store's version in the image, for their manifest.
- Every container carries labels (store, volume, supervisor incarnation, host, port): a restarted supervisor
  adopts the store container it finds running on its volume, and `reconcile_orphans` removes the rest.

Importing this module is cheap: the SDK is imported on first use."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deployments.stores.runtime import MIN_FREE_BYTES, StoreError
from rma_ray.membership import write_private
from rma_ray.net import port_free

LABEL_STORE = "rma.io/store"
LABEL_VOLUME = "rma.io/volume"
LABEL_SUPERVISOR = "rma.io/supervisor"
LABEL_ENDPOINT = "rma.io/endpoint"  # host:port the store binds (host networking)
LABEL_ROLE = "rma.io/role"  # `store` (the long-running one) or `init` (a one-shot preparation step)
BUILD_HINT = "scripts/build-store-images.sh"
MOUNT = "/data"
LOG_KEEP_BYTES = 4 * 1024 * 1024  # <store>.log rolls over to <store>.log.1 past this


@dataclass(frozen=True)
class ContainerSpec:
    """How one store runs under Docker. `prepare` readies `<volume>/container` (config, first-time init) and
    returns the container's command and environment; neither may contain a secret. `version`: a command run in
    the store's container that prints the store's version (where the server itself does not say it)."""

    image: str
    uid: int
    prepare: Callable[[DockerRuntime, Path], tuple[list[str], dict[str, str]]]
    stop_timeout: int = 30
    side_ports: Callable[[DockerRuntime], list[tuple[str, int]]] | None = (
        None  # bound besides the store's port
    )
    version: list[str] | None = None


def _write_private(path: Path, text: str, uid: int) -> None:
    """`text` into `path`, 0600 and the store's user's, written by root into a directory that user owns: never an
    open or chown by name of what is there (a link the store's user left at `path` would have root write through
    it and hand the link's target to that user), but a new temp file chowned by its descriptor and renamed over
    `path` (rma_ray.membership.write_private)."""
    write_private(path, text, owner=uid)


def _prepare_redis(rt: DockerRuntime, data: Path) -> tuple[list[str], dict[str, str]]:
    _write_private(
        data / "redis.conf",
        f"bind {rt.host}\nport {rt.port}\ndir {MOUNT}\nrequirepass {rt.creds['password']}\n"
        'appendonly yes\nappendfsync everysec\nprotected-mode yes\ndaemonize no\nsave ""\n'
        "unixsocket /run/redis/redis.sock\nunixsocketperm 700\n",
        rt.spec.uid,
    )
    return ["redis-server", f"{MOUNT}/redis.conf"], {}


def _prepare_postgres(rt: DockerRuntime, data: Path) -> tuple[list[str], dict[str, str]]:
    if not (data / "pgdata" / "PG_VERSION").exists():
        shutil.rmtree(data / "pgdata", ignore_errors=True)  # a half-done initdb from a crashed supervisor
        pwfile = data / ".pwfile"
        _write_private(pwfile, rt.creds["password"] + "\n", rt.spec.uid)
        try:
            rt.run_once(
                "init",
                [
                    "initdb",
                    "-D",
                    f"{MOUNT}/pgdata",
                    "-U",
                    rt.creds["user"],
                    "--pwfile",
                    f"{MOUNT}/.pwfile",
                    "--auth=scram-sha-256",
                    "-E",
                    "UTF8",
                ],
            )
        finally:
            pwfile.unlink(missing_ok=True)
        # initdb lets only local addresses in; services connect over the network, with the password
        with open(data / "pgdata" / "pg_hba.conf", "a") as f:
            f.write("host all all all scram-sha-256\n")
    return (
        [
            "postgres",
            "-D",
            f"{MOUNT}/pgdata",
            "-p",
            str(rt.port),
            "-c",
            f"listen_addresses={rt.host}",
            "-k",
            "/run/postgresql",
        ],
        {"PGPORT": str(rt.port)},
    )


def _prepare_chroma(rt: DockerRuntime, data: Path) -> tuple[list[str], dict[str, str]]:
    # Chroma 1.x has no authentication: bound to the node's pool address only, as under the process runtime
    return (
        ["run", "--path", f"{MOUNT}/chroma", "--host", rt.host, "--port", str(rt.port)],
        {"RMA_HOST": rt.host, "RMA_PORT": str(rt.port)},
    )


def _prepare_graph(rt: DockerRuntime, data: Path) -> tuple[list[str], dict[str, str]]:
    kind = rt.kind
    pw = data / ".root-password"
    if not pw.exists():  # read by ArcadeDB when it creates the root user (kept hashed after that)
        _write_private(pw, rt.creds["password"], rt.spec.uid)
    props = {
        "arcadedb.server.rootPath": f"{MOUNT}/arcadedb",
        "arcadedb.server.rootPasswordPath": f"{MOUNT}/.root-password",
        "arcadedb.server.mode": "production",
        # HTTP stays on loopback (the health check uses it): services use Bolt only
        "arcadedb.server.httpIncomingHost": "127.0.0.1",
        "arcadedb.server.httpIncomingPort": rt.port + 1,
        "arcadedb.server.plugins": "Bolt:com.arcadedb.bolt.BoltProtocolPlugin",
        "arcadedb.bolt.host": rt.host,
        "arcadedb.bolt.port": rt.port,
        "arcadedb.server.defaultDatabases": f"{kind.database}[root]",
    }
    return (
        [
            f"-Xmx{kind.heap}",
            "-cp",
            "/opt/arcadedb/jars/*",
            *(f"-D{k}={v}" for k, v in props.items()),
            "com.arcadedb.server.ArcadeDBServer",
        ],
        {"RMA_HTTP_PORT": str(rt.port + 1)},
    )


SPECS: dict[str, ContainerSpec] = {
    "redis": ContainerSpec("rma-store-redis:latest", 999, _prepare_redis),
    "postgres": ContainerSpec("rma-store-postgres:latest", 999, _prepare_postgres, stop_timeout=60),
    "chroma": ContainerSpec(
        "rma-store-chroma:latest",
        999,
        _prepare_chroma,
        # the Rust server's own /api/v2/version says 1.0.0 whatever the release: the wheel's version
        version=[
            "/opt/chroma/bin/python",
            "-c",
            "import importlib.metadata as m; print(m.version('chromadb'))",
        ],
    ),
    "graph": ContainerSpec(
        "rma-store-graph:latest",
        999,
        _prepare_graph,
        stop_timeout=60,
        side_ports=lambda rt: [("127.0.0.1", rt.port + 1)],  # ArcadeDB's HTTP
        version=["ls", "/opt/arcadedb/jars"],  # backup.arcadedb_version reads the engine jar's name
    ),
}


def _default_incarnation() -> str:
    """Who starts containers when the caller does not say: this Ray actor, else this process."""
    if "ray" in sys.modules:
        try:
            actor = sys.modules["ray"].get_runtime_context().get_actor_id()
            if actor:
                return f"{actor}:{os.getpid()}"
        except Exception:  # not connected to Ray
            pass
    return f"{socket.gethostname()}:{os.getpid()}"


def docker_client() -> Any:
    """A client for DOCKER_HOST (or the default socket) that has answered a ping, or a StoreError saying so."""
    import docker

    where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    try:
        client = docker.from_env(timeout=60)
        client.ping()
        return client
    except docker.errors.DockerException as exc:
        raise StoreError(
            f"docker daemon unreachable at {where} ({_short(exc)}): start dockerd or set DOCKER_HOST "
            f"for the Ray node, or run the store with runtime 'process'"
        ) from None


def _short(exc: BaseException) -> str:
    text = str(getattr(exc, "explanation", None) or exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


class DockerRuntime:
    name = "docker"

    def __init__(self, kind: Any, volume: Path, host: str, port: int, creds: dict[str, str]) -> None:
        if kind.name not in SPECS:
            raise StoreError(
                f"no container image for the {kind.name} store yet; known: {', '.join(SPECS)}; "
                f"run it with runtime 'process'"
            )
        self.kind, self.volume, self.host, self.port, self.creds = kind, Path(volume), host, port, creds
        self.spec = SPECS[kind.name]
        self.data = self.volume / "container"
        digest = hashlib.sha256(str(self.volume.resolve()).encode()).hexdigest()[:10]
        self.container_name = f"rma-store-{kind.name}-{digest}"
        self.supervisor = _default_incarnation()
        self.container: Any = None
        self._client: Any = None
        self._pid: int | None = None

    # -- docker plumbing -----------------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = docker_client()
        return self._client

    def labels(self, role: str = "store") -> dict[str, str]:
        return {
            LABEL_STORE: self.kind.name,
            LABEL_VOLUME: str(self.volume),
            LABEL_SUPERVISOR: self.supervisor,
            LABEL_ENDPOINT: f"{self.host}:{self.port}",
            LABEL_ROLE: role,
        }

    def _ours(self, all_states: bool = True) -> list[Any]:
        """Containers labelled for this store on this volume (any supervisor)."""
        return list(
            self.client.containers.list(
                all=all_states,
                filters={"label": [f"{LABEL_STORE}={self.kind.name}", f"{LABEL_VOLUME}={self.volume}"]},
            )
        )

    def _save_logs(self, container: Any) -> None:
        """Keep the container's last output next to the data: the supervisor's errors point at this file."""
        try:
            out = container.logs(tail=400)
        except Exception:
            return
        if out:
            log = self.volume / f"{self.kind.name}.log"
            if log.exists() and log.stat().st_size > LOG_KEEP_BYTES:
                os.replace(log, log.with_suffix(".log.1"))
            with open(log, "ab") as f:
                f.write(f"--- container {container.name} ({container.short_id})\n".encode() + out)

    def _remove(self, container: Any) -> None:
        import docker

        self._save_logs(container)
        try:
            container.remove(force=True)
        except docker.errors.NotFound:
            pass

    def run_once(self, step: str, command: list[str], timeout: float = 300) -> None:
        """A one-shot step in the store's image on its volume (e.g. initdb), labelled so a crash leaves no
        unclaimed container behind."""
        import docker

        try:
            self._remove(self.client.containers.get(f"{self.container_name}-{step}"))  # left by a crash
        except docker.errors.NotFound:
            pass
        c = self.client.containers.create(
            self.spec.image,
            command,
            name=f"{self.container_name}-{step}",
            labels=self.labels(step),
            user=f"{self.spec.uid}:{self.spec.uid}",
            network_mode="none",
            healthcheck={"Test": ["NONE"]},
            volumes={str(self.data): {"bind": MOUNT, "mode": "rw"}},
        )
        try:
            c.start()
            code = c.wait(timeout=timeout).get("StatusCode")
            if code != 0:
                tail = c.logs(tail=20).decode(errors="replace").strip()[-300:]
                raise StoreError(
                    f"{self.kind.name}: {command[0]} in the container failed (exit {code}): {tail}"
                )
        finally:
            try:
                c.remove(force=True)
            except docker.errors.NotFound:
                pass

    # -- the runtime interface ----------------------------------------------------------------------------------

    def adopt(self) -> bool:
        """Take over this store's container that a previous supervisor left running on this volume (same name,
        same endpoint, not unhealthy)."""
        try:
            for c in self._ours(all_states=False):
                labels = c.labels
                health = c.attrs["State"].get("Health", {}).get("Status")
                if (
                    c.name == self.container_name
                    and labels.get(LABEL_ROLE) == "store"
                    and labels.get(LABEL_ENDPOINT) == f"{self.host}:{self.port}"
                    and health != "unhealthy"
                ):
                    self.container, self._pid = c, c.attrs["State"].get("Pid") or None
                    return True
        except StoreError:
            return False
        except Exception:  # the daemon went away between calls: nothing to adopt
            return False
        return False

    def reconcile_orphans(self, current_supervisor: str) -> list[str]:
        """Remove this store's containers (on this volume) that no live supervisor owns: started by another
        incarnation and not the one just adopted. From now on, containers are labelled with `current_supervisor`.
        Returns the names removed."""
        self.supervisor = current_supervisor
        removed = []
        held = self.container.id if self.container is not None else None
        for c in self._ours():
            if c.id != held and c.labels.get(LABEL_SUPERVISOR) != current_supervisor:
                self._remove(c)
                removed.append(c.name)
        return removed

    def start(self) -> None:
        import docker

        client = self.client
        try:
            client.ping()
        except docker.errors.DockerException:
            self._client = None
            client = self.client  # raises the one-line StoreError when the daemon is really gone
        self._check_disk(client)
        try:
            self._remove(client.containers.get(self.container_name))  # an exited or unadoptable predecessor
        except docker.errors.NotFound:
            pass
        for host, port in [
            (self.host, self.port),
            *(self.spec.side_ports(self) if self.spec.side_ports else []),
        ]:
            if not port_free(host, port):
                raise StoreError(
                    f"port {port} on {host} is taken by another program; free it or give the "
                    f"{self.kind.name} store another port (rma up --store-port {self.kind.name}=<port>)"
                )
        try:
            client.images.get(self.spec.image)
        except docker.errors.ImageNotFound:
            raise StoreError(
                f"image {self.spec.image} is missing on this node's Docker: build it with "
                f"`{BUILD_HINT} {self.kind.name}` (DOCKER_HOST={os.environ.get('DOCKER_HOST', '')!s})"
            ) from None
        self.data.mkdir(parents=True, exist_ok=True)
        os.chown(self.data, self.spec.uid, self.spec.uid)
        self.data.chmod(0o700)
        try:
            command, env = self.spec.prepare(self, self.data)
            self.container = client.containers.create(
                self.spec.image,
                command,
                name=self.container_name,
                labels=self.labels(),
                environment=env,
                user=f"{self.spec.uid}:{self.spec.uid}",
                network_mode="host",
                volumes={str(self.data): {"bind": MOUNT, "mode": "rw"}},
                restart_policy={"Name": "no"},
                log_config={"Type": "json-file", "Config": {"max-size": "10m", "max-file": "2"}},
            )
            self.container.start()
            self.container.reload()
            self._pid = self.container.attrs["State"].get("Pid") or None
        except docker.errors.APIError as exc:
            raise self._explain(exc) from None

    def alive(self) -> bool:
        if self.container is None:
            return False
        try:
            self.container.reload()
        except Exception:  # removed, or the daemon is gone: either way the store is not running
            return False
        state = self.container.attrs["State"]
        self._pid = state.get("Pid") or None
        return bool(state.get("Status") == "running" and state.get("Health", {}).get("Status") != "unhealthy")

    @property
    def pid(self) -> int | None:
        """The store's main process, as the host sees it."""
        return self._pid if self.container is not None else None

    def stop(self, timeout: float | None = None) -> None:
        if self.container is None:
            return
        import docker

        try:
            self.container.stop(timeout=int(self.spec.stop_timeout if timeout is None else timeout))
        except docker.errors.NotFound:
            pass
        except docker.errors.DockerException:
            pass  # removed below with force
        try:
            self._remove(self.container)
        except docker.errors.DockerException:
            pass
        self.container, self._pid = None, None

    def image_version(self) -> str:
        """The store's version in its image (Chroma, ArcadeDB), asked inside the running container."""
        if self.spec.version is None:
            raise StoreError(f"the {self.kind.name} image has no version command: ask the store itself")
        if self.container is None:
            raise StoreError(f"{self.kind.name} is not running: no container to ask its version")
        code, output = self.container.exec_run(self.spec.version, user=f"{self.spec.uid}:{self.spec.uid}")
        text = str(output.decode(errors="replace")).strip()
        if code != 0:
            raise StoreError(
                f"{self.spec.version[0]} in the {self.kind.name} container failed: {text[-200:]}"
            )
        if self.kind.name == "graph":
            from deployments.stores.backup import arcadedb_version

            return arcadedb_version(text.split())
        return text

    # -- errors for operators -----------------------------------------------------------------------------------

    def _check_disk(self, client: Any) -> None:
        places = [self.volume]
        try:
            root = Path(client.info().get("DockerRootDir", ""))
            if root.is_dir():
                places.append(root)
        except Exception:
            pass
        for place in places:
            if shutil.disk_usage(place).free < MIN_FREE_BYTES:
                raise StoreError(f"disk full: less than {MIN_FREE_BYTES >> 20} MiB free under {place}")

    def _explain(self, exc: Exception) -> StoreError:
        text = _short(exc)
        low = text.lower()
        if "no space left" in low:
            return StoreError(f"disk full while starting the {self.kind.name} container: {text}")
        if "address already in use" in low:
            return StoreError(
                f"port {self.port} on {self.host} is taken by another program; free it or give the "
                f"{self.kind.name} store another port (rma up --store-port {self.kind.name}=<port>)"
            )
        if "no such image" in low:
            return StoreError(
                f"image {self.spec.image} is missing on this node's Docker: build it with "
                f"`{BUILD_HINT} {self.kind.name}`"
            )
        return StoreError(f"docker could not start the {self.kind.name} container: {text}")
