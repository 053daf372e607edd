"""Real parts for the edge tests (served by uvicorn on real ports, `tests.support.ServerThread`): a stand-in
coordinator that publishes an edge's public keys (a real Ed25519 key pair, a real JWKS) and answers the edge
routes, an edge app behind the real edge gate that records what reached it, and the credentials the coordinator
would mint."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import OKPAlgorithm
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from deployments.gateway.edge_gate import EdgeCredentialVerifier, EdgeGate
from rma_ray.edges import EDGE_ISSUER, EDGE_TOKEN_TTL_S, edge_audience, jwks_path

EDGE = "test-edge"
SERVICE_CREDENTIAL = "rma_service_testid_" + "s" * 40


def jwk(key: Ed25519PrivateKey) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(OKPAlgorithm.to_jwk(key.public_key()))
    out.update({"use": "sig", "alg": "EdDSA", "kid": out["x"][:16]})
    return out


def mint(key: Ed25519PrivateKey, edge: str = EDGE, **overrides: Any) -> str:
    """An edge credential as the coordinator mints it, its key id in the header (claims overridable to make
    bad ones)."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": EDGE_ISSUER,
        "aud": edge_audience(edge),
        "sub": "gateway",
        "iat": now,
        "exp": now + EDGE_TOKEN_TTL_S,
        "jti": uuid.uuid4().hex,
    }
    claims.update(overrides)
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": jwk(key)["kid"]})


@dataclass
class Coordinator:
    """What the edge gate and the router ask the coordinator: the JWKS and the edge routes."""

    keys: list[Ed25519PrivateKey] = field(default_factory=lambda: [Ed25519PrivateKey.generate()])
    routes: list[dict[str, Any]] = field(default_factory=list)
    route_calls: int = 0

    @property
    def key(self) -> Ed25519PrivateKey:
        return self.keys[0]

    def route(self, serve_url: str, apps: dict[str, int], token: str | None = None, **extra: Any) -> None:
        expires = datetime.now(UTC) + timedelta(seconds=EDGE_TOKEN_TTL_S)
        self.routes = [
            {
                "name": EDGE,
                "serve_url": serve_url,
                "token": token or mint(self.key),
                "expires_at": expires.isoformat(),
                "apps": apps,
                "healthy": True,
                **extra,
            }
        ]

    def app(self) -> Starlette:
        async def healthz(request: Request) -> Response:
            return PlainTextResponse("ok")

        async def jwks(request: Request) -> Response:
            return JSONResponse({"keys": [jwk(k) for k in self.keys]})

        async def edge_routes(request: Request) -> Response:
            if request.headers.get("authorization") != f"Bearer {SERVICE_CREDENTIAL}":
                return JSONResponse({"error": {"code": "forbidden", "message": "no"}}, status_code=403)
            self.route_calls += 1
            return JSONResponse({"edges": self.routes})

        return Starlette(
            routes=[
                Route("/healthz", healthz),
                Route(jwks_path(EDGE), jwks),
                Route("/api/service/edge-routes", edge_routes, methods=["POST"]),
            ]
        )


@dataclass
class EdgeApp:
    """An edge cluster's app behind the real edge gate. `mode`: ok | fail (503) | bad (400) | hang (waits for
    `release`) | cut (the stream breaks after its first chunk). Streams wait for `release` after their first
    chunk, so a test can see the first chunk arrive before the edge sends the rest."""

    mode: str = "ok"
    seen: list[dict[str, Any]] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)

    def app(self, verifier: EdgeCredentialVerifier) -> Any:
        async def answer(request: Request) -> Response:
            body = await request.body()
            self.seen.append({"path": request.url.path, "headers": dict(request.headers), "body": body})
            if self.mode == "fail":
                return JSONResponse({"error": {"message": "engine died"}}, status_code=503)
            if self.mode == "bad":
                return JSONResponse({"error": {"message": "bad model", "code": "model_not_found"}}, 400)
            if self.mode == "hang":
                await asyncio.to_thread(self.release.wait, 30)
            req = json.loads(body or b"{}")
            if req.get("stream"):
                return StreamingResponse(self._stream(), media_type="text/event-stream")
            return JSONResponse({"served": "edge", "echo": req})

        async def healthz(request: Request) -> Response:
            return PlainTextResponse("ok")

        gated = EdgeGate(
            Starlette(
                routes=[
                    Route("/v1/chat/completions", answer, methods=["POST"]),
                    Route("/v1/embeddings", answer, methods=["POST"]),
                ]
            ),
            verifier,
        )
        open_routes = Starlette(routes=[Route("/healthz", healthz)])

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            target = open_routes if scope.get("path") == "/healthz" or scope["type"] == "lifespan" else gated
            await target(scope, receive, send)

        return app

    async def _stream(self) -> Any:
        yield b'data: {"chunk": 1}\n\n'
        if self.mode == "cut":
            raise RuntimeError("the edge replica died mid-stream")
        await asyncio.to_thread(self.release.wait, 30)
        yield b'data: {"chunk": 2}\n\n'
        yield b"data: [DONE]\n\n"
