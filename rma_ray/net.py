"""Small network facts every side needs: which local address reaches a host, and whether a port is free."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Collection
from pathlib import Path
from urllib.parse import urlparse

# the kernel's ephemeral range (what bind(port 0) and every outgoing connection take) is 32768-60999 on Linux by
# default; below it lie Ray's worker ports (10002-19999, an edge head's 20002 up: rma_ray.edges.EdgePorts)


def local_ip_towards(url_or_host: str) -> str:
    """The address this machine uses to reach a host: what Ray should advertise (no packet is sent)."""
    host = urlparse(url_or_host).hostname or url_or_host
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, 9))
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def _ephemeral_high() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 60999


_next: int | None = None  # this process's cursor over the range above the ephemeral one
_lock = threading.Lock()


def free_port(host: str = "", span: int = 1, avoid: Collection[int] = ()) -> int:
    """A port free on every address of this machine (`host` too), to give to a server that starts later; with
    span > 1 the first of `span` consecutive free ones. Taken above the kernel's ephemeral range: a port that
    bind(0) handed out is free again at once, and the kernel may hand it to the next process that binds port 0
    or connects anywhere (Ray starts dozens) before our server binds it; below that range lie Ray's worker
    ports. Each process walks that range from its own starting point (from its pid), so it never hands out a
    port twice before the range wraps and two processes rarely meet. A machine whose ephemeral range leaves no
    room above it gets one from bind(0). `avoid`: ports already promised to a server that has not bound them yet
    (another process's cursor may land on them: HAProxy then fails to bind the Serve port a test picked)."""
    global _next
    first = _ephemeral_high() + 1
    size = 65536 - first - span
    for _ in range(2000):
        if size >= 1000:
            with _lock:
                start = (os.getpid() * 2654435761) if _next is None else _next
                port, _next = first + start % size, (start % size + span) % size
        else:
            with socket.socket() as s:
                s.bind((host, 0))
                port = int(s.getsockname()[1])
            if port + span > 65536:
                continue
        if all(p not in avoid and _bindable(h, p) for p in range(port, port + span) for h in {"", host}):
            return port
    raise RuntimeError(f"no {span} consecutive free port(s) on {host or 'this machine'}")


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False
