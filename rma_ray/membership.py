"""What a donor machine remembers about its membership (`<data dir>/membership.json`, mode 0600): enough for
`rma status`, `rma leave` and an agent restart (`rma join` after a reboot
or a crash rejoins as the same donor with the node token kept here; only a clean leave removes the file).
Holds the node token, so it is written like a secret."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil


@dataclass
class Membership:
    coordinator_url: str
    worker_id: str
    node_token: str
    tier: str
    labels: dict[str, str]
    trusted: bool
    heartbeat_interval_s: int
    ray_address: str | None
    node_ip: str
    agent_pid: int | None = None
    agent_started: float | None = None
    ray_pid: int | None = None
    ray_node_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def path(data_dir: Path) -> Path:
    return data_dir / "membership.json"


def write_private(file: Path, data: str | bytes, owner: int | None = None) -> None:
    """Write a secret-bearing file atomically with mode 0600 from the first byte. The temp file is a new one
    of a random name (mkstemp: O_EXCL, 0600), never one found there: a stale temp file keeps its mode and a
    link planted at a fixed temp name would be followed; the rename replaces whatever is at `file` (a link
    too), never writes through it. `owner`: a uid (and gid) the file is given, by its descriptor."""
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.", dir=file.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if owner is not None:
                os.fchown(f.fileno(), owner, owner)
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, file)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save(data_dir: Path, m: Membership) -> None:
    write_private(path(data_dir), json.dumps(asdict(m), indent=2))


def load(data_dir: Path) -> Membership | None:
    p = path(data_dir)
    if not p.exists():
        return None
    return Membership(**json.loads(p.read_text()))


def alive(pid: int | None, started: float | None) -> bool:
    """Is this process still the one that was recorded (not a PID reused after a reboot or a container
    restart, where the new agent may well get the old one's PID)?"""
    if not pid or pid == os.getpid():
        return False
    try:
        p = psutil.Process(pid)
        return started is None or abs(p.create_time() - started) < 1.0
    except psutil.Error:
        return False


def clear(data_dir: Path) -> None:
    for name in ("membership.json", "cluster_token"):
        try:
            (data_dir / name).unlink()
        except FileNotFoundError:
            pass
