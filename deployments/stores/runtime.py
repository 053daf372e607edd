"""Runtimes a store runs in. `process`: the store's own binary as a child process (donors without Docker and
the embedded default). Ray normally kills a dead actor's children with it; when a store process survives its
supervisor anyway, the restarted supervisor adopts it by the pid file in its volume (matching pid and start
time) instead of starting a second copy on the same data."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import psutil

from rma_ray.net import port_free

MIN_FREE_BYTES = 200 * 1024 * 1024


class StoreError(Exception):
    """A situation the operator must fix, in one line (port taken, disk full, binary missing)."""


class ProcessRuntime:
    name = "process"

    def __init__(self, kind: Any, volume: Path, host: str, port: int, creds: dict[str, str]) -> None:
        self.kind, self.volume, self.host, self.port, self.creds = kind, volume, host, port, creds
        self.pidfile = volume / ".rma-pid.json"
        self.proc: psutil.Process | None = None
        self._popen: subprocess.Popen[bytes] | None = None

    def adopt(self) -> bool:
        """Take over a store process a previous supervisor left running on this volume."""
        try:
            info = json.loads(self.pidfile.read_text())
            p = psutil.Process(info["pid"])
            if abs(p.create_time() - info["created"]) < 0.01 and p.is_running():
                self.proc = p
                return True
        except (OSError, ValueError, KeyError, psutil.Error):
            pass
        return False

    def start(self) -> None:
        if shutil.disk_usage(self.volume).free < MIN_FREE_BYTES:
            raise StoreError(f"disk full: less than {MIN_FREE_BYTES >> 20} MiB free under {self.volume}")
        if not port_free(self.host, self.port):
            raise StoreError(
                f"port {self.port} on {self.host} is taken by another program; "
                f"free it or give the {self.kind.name} store another port "
                f"(rma up --store-port {self.kind.name}=<port>)"
            )
        try:
            self.kind.prepare(self.volume, self.creds)
            argv, as_user = self.kind.argv(self.volume, self.host, self.port, self.creds)
        except FileNotFoundError as exc:
            raise StoreError(str(exc)) from None
        except subprocess.CalledProcessError as exc:
            raise StoreError(
                f"{self.kind.name}: {exc.cmd[0]} failed: {(exc.stderr or b'').decode()[-300:]}"
            ) from None
        log = open(self.volume / f"{self.kind.name}.log", "ab")
        self._popen = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=self.volume,
            **as_user,
        )
        log.close()
        self.proc = psutil.Process(self._popen.pid)
        tmp = self.pidfile.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": self.proc.pid, "created": self.proc.create_time()}))
        os.replace(tmp, self.pidfile)

    def alive(self) -> bool:
        if self._popen is not None and self._popen.poll() is not None:
            return False
        return self.proc is not None and self.proc.is_running() and self.proc.status() != psutil.STATUS_ZOMBIE

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stop(self, timeout: float = 30) -> None:
        if self.proc is None:
            return
        try:
            self.proc.send_signal(getattr(self.kind, "stop_signal", signal.SIGTERM))
            self.proc.wait(timeout)
        except psutil.TimeoutExpired:
            self.proc.kill()
        except psutil.Error:
            pass
        if self._popen is not None:
            self._popen.poll()
        self.pidfile.unlink(missing_ok=True)


RUNTIMES = ("process", "docker")


def make_runtime(name: str, kind: Any, volume: Path, host: str, port: int, creds: dict[str, str]) -> Any:
    """The runtime a supervisor runs its store in: `process` here, `docker` where the donor has Docker."""
    if name == "process":
        return ProcessRuntime(kind, volume, host, port, creds)
    if name == "docker":
        try:
            from deployments.stores.docker_runtime import DockerRuntime
        except ImportError as exc:
            raise StoreError(f"the docker runtime is not available on this node: {exc}") from None
        return DockerRuntime(kind, volume, host, port, creds)
    raise StoreError(f"unknown runtime {name!r}; use one of: {', '.join(RUNTIMES)}")
