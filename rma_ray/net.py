"""Small network facts every side needs: which local address reaches a host, and whether a port is free."""

from __future__ import annotations

import socket
from urllib.parse import urlparse


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
