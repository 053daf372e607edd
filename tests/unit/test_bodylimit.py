"""The one streamed body limit (rma_ray.bodylimit) in front of the services gateway, the coordinator and the
LLM's key gate, without Ray: a chunked body (no Content-Length) over the limit is refused with 413 after at
most the limit plus one chunk was pulled from the client, whatever the app does with the aborted read."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from deployments.gateway.auth import set_verifier
from deployments.gateway.keys import ClientKeyVerifier
from deployments.services.api import Backends, create_api
from deployments.services.settings import ServicesSettings
from rma_ray import credentials
from rma_ray.bodylimit import BodyLimit

CHUNK = 64 * 1024
KEY = credentials.mint(credentials.Kind.CLIENT)


class Body:
    """A chunked request body of `total` bytes that counts what the server pulled from it."""

    def __init__(self, total: int, head: bytes = b"") -> None:
        self.total, self.head, self.pulled = total, head, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.head:
            self.pulled += len(self.head)
            yield self.head
        while self.pulled < self.total:
            self.pulled += CHUNK
            yield b"x" * CHUNK


def post(app: Any, path: str, content: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://pool") as c:
            return await c.post(path, content=content, headers=headers or {})

    return asyncio.run(go())


def reading_app(catch_all: bool) -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> Any:
        try:
            return {"size": len(await request.body())}
        except Exception:
            if not catch_all:
                raise
            return JSONResponse({"error": "the app's own answer"}, status_code=400)

    return app


@pytest.mark.parametrize("catch_all", [False, True])
def test_a_chunked_body_over_the_limit_is_refused_as_it_streams(catch_all: bool) -> None:
    limit = 1 * 2**20
    body = Body(50 * 2**20)
    r = post(BodyLimit(reading_app(catch_all), limit), "/echo", body)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large", r.text
    assert "1,048,576" in r.json()["error"]["message"]
    assert body.pulled <= limit + 2 * CHUNK  # not the 50 MiB


def test_an_announced_body_over_the_limit_is_refused_before_a_byte_is_read() -> None:
    body = Body(2 * 2**20)
    r = post(BodyLimit(reading_app(False), 2**20), "/echo", body, {"Content-Length": str(2 * 2**20)})
    assert r.status_code == 413 and body.pulled == 0


def test_a_body_under_the_limit_passes_whole() -> None:
    r = post(BodyLimit(reading_app(False), 2**20), "/echo", Body(10 * CHUNK))
    assert r.status_code == 200 and r.json() == {"size": 10 * CHUNK}


@pytest.fixture
def services_app() -> Any:
    ring = {"keys": [{"id": KEY.id, "hash": KEY.hash, "name": "alice"}]}
    verifier = ClientKeyVerifier(lambda: ring, refresh_s=3600)
    verifier.refresh()
    set_verifier(verifier)
    try:
        none = Backends(None, None, None, None, None, None)
        yield create_api(none, ServicesSettings(upload_max_bytes=2**20))
    finally:
        set_verifier(None)


@pytest.mark.parametrize(
    "path,ctype",
    [
        ("/notes", "application/json"),
        ("/uploads", "multipart/form-data; boundary=b"),
        ("/documents/parse", "multipart/form-data; boundary=b"),
    ],
)
def test_the_services_gateway_refuses_a_chunked_body_over_the_limit(
    services_app: Any, path: str, ctype: str
) -> None:
    head = b'{"title": "t", "body": "'
    if ctype.startswith("multipart"):
        head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.txt"\r\n\r\n'
    body = Body(200 * 2**20, head)
    r = post(
        services_app,
        path,
        body,
        {"Authorization": f"Bearer {KEY.token}", "Content-Type": ctype, "X-Request-ID": "rid-1"},
    )
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "body_too_large" and r.json()["error"]["request_id"] == "rid-1"
    assert body.pulled <= 2**20 + 64 * 1024 + 2 * CHUNK


def test_the_coordinator_refuses_a_chunked_body_over_the_limit(tmp_path: Any) -> None:
    from admission.main import create_app
    from rma_ray.settings import Settings

    settings = Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path}/c.db", max_body_bytes=2**20)
    body = Body(200 * 2**20)
    r = post(create_app(settings), "/api/worker/register", body, {"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large", r.text
    assert body.pulled <= 2**20 + 2 * CHUNK


def test_the_llm_key_gate_refuses_a_chunked_body_over_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    from deployments.llm import gate as llm_gate

    ring = {"keys": [{"id": KEY.id, "hash": KEY.hash, "name": "alice"}]}
    verifier = ClientKeyVerifier(lambda: ring, refresh_s=3600)
    verifier.refresh()
    set_verifier(verifier)
    monkeypatch.setattr(llm_gate, "MAX_BODY_BYTES", 2**20)
    inner = FastAPI()

    @inner.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        return {"size": len(await request.body())}

    try:
        gate = llm_gate.key_gate(inner)

        async def mounted(scope: dict, receive: Any, send: Any) -> None:  # what Serve's replica does
            await gate({**scope, "root_path": "/v1"} if scope["type"] == "http" else scope, receive, send)

        body = Body(100 * 2**20)
        r = post(
            mounted,
            "/v1/chat/completions",
            body,
            {"Authorization": f"Bearer {KEY.token}", "Content-Type": "application/json"},
        )
    finally:
        set_verifier(None)
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error", r.text
    assert body.pulled <= 2**20 + 2 * CHUNK
