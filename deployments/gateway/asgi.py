"""The kit's plain ASGI pieces (no Starlette BaseHTTPMiddleware: it costs a task and a stream per request):

- `ClientKeyGate`: in front of an app we did not write (vLLM's own OpenAI app in the LLM replica): only the
  listed routes, each only with a valid client key (`deployments.gateway.auth.current_client`), refusals in
  OpenAI's shape, the body limit, and the app mounted at its Serve route prefix; with `edge_app`, the
  forwardable routes go to an edge cluster when one serves the app (`deployments.gateway.edge.EdgeForward`);
- `StreamCoalescer`: fewer, larger writes of a streamed (SSE) body;
- `PrefixIsRoot`: the route prefix itself served by the app's "/" route;
- `body_limit`: the pool's one streamed request-body limit (`rma_ray.bodylimit`, shared with the coordinator)
  in the refusal shape of a Serve app.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Sequence
from typing import Any

from starlette.requests import Request

from deployments.gateway.auth import current_client
from deployments.gateway.refusal import Refusal, Shape
from rma_ray.bodylimit import BodyLimit, json_refusal

Route = tuple[str, "re.Pattern[str]"]


def body_limit(
    app: Any, max_bytes: int | Callable[[], int], shape: Shape = "pool", code: str = "body_too_large"
) -> BodyLimit:
    """`app` behind the one streamed body limit: a 413 `code` in the app's refusal shape."""
    return BodyLimit(app, max_bytes, json_refusal(code, shape="openai" if shape == "openai" else "rma"))


def path_under_root(scope: dict[str, Any]) -> str:
    return str(scope["path"]).removeprefix(scope.get("root_path", ""))


class ClientKeyGate:
    """ASGI middleware: only `routes` (method, path pattern under the prefix), each only with a valid client
    key; OpenAI error bodies otherwise (so the `openai` client raises AuthenticationError with the reason).
    The app behind it, whose routes carry the prefix themselves (vLLM's carry their /v1), is mounted at the
    Serve app's route `prefix`, behind the body limit; `coalesce_s` > 0 coalesces its streamed bodies
    (`StreamCoalescer`)."""

    def __init__(
        self,
        app: Any,
        *,
        prefix: str,
        routes: Sequence[Route],
        max_body_bytes: int,
        served: str,
        coalesce_s: float = 0.0,
        edge_app: str | None = None,
        edge_routes: Sequence[Route] = (),
    ) -> None:
        self.app, self.prefix, self.routes, self.served = app, prefix, tuple(routes), served
        inner = app
        if edge_app is not None and edge_routes:  # after the key check: to an edge when one serves the app
            from deployments.gateway.edge import EdgeForward

            inner = EdgeForward(app, app_name=edge_app, routes=edge_routes, max_body_bytes=max_body_bytes)
        from deployments.gateway.quota import CountTokens

        # the answer's tokens, to the client key's usage (edge answers too: counted here, in the core)
        self.limited = body_limit(CountTokens(inner), max_body_bytes, "openai")
        self.window = coalesce_s

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # no websocket routes are served
            await send({"type": "websocket.close", "code": 1008})
            return
        path = path_under_root(scope)
        methods = [m for m, pattern in self.routes if pattern.fullmatch(path)]
        refusal: Refusal | None = None
        if not methods:
            refusal = Refusal(
                404, "not_found", f"no route {path!r} under {self.prefix}: the pool serves {self.served}"
            )
        elif scope["method"] not in methods:
            refusal = Refusal(
                405, "method_not_allowed", f"{scope['method']} is not allowed on {path}; use {methods[0]}"
            )
        else:
            try:
                await current_client(Request(scope))
            except Refusal as exc:
                refusal = exc
        if refusal is not None:
            response = refusal.response("openai")
            if refusal.status == 405:
                response.headers["Allow"] = ", ".join(methods)
            await response(scope, receive, send)
            return
        root = scope.get("root_path", "")
        await self.limited(
            {**scope, "root_path": root.removesuffix(self.prefix)},
            receive,
            StreamCoalescer(send, self.window) if self.window > 0 else send,
        )


class StreamCoalescer:
    """An ASGI `send` that writes a streamed (text/event-stream) body at most once per `window` seconds: the
    first chunk at once (time to first token unchanged), later ones gathered for up to `window`, the last one
    at once. Fewer, larger writes through the replica's HTTP server, HAProxy and the client's socket."""

    def __init__(self, send: Any, window: float) -> None:
        self.send, self.window = send, window
        self.streaming = False
        self.buf: list[bytes] = []
        self.last = 0.0
        self.timer: asyncio.Task[None] | None = None
        self.lock = asyncio.Lock()

    async def __call__(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            headers = dict(message.get("headers") or [])
            self.streaming = headers.get(b"content-type", b"").startswith(b"text/event-stream")
        elif self.streaming and message["type"] == "http.response.body" and message.get("more_body"):
            self.buf.append(message.get("body", b""))
            now = asyncio.get_running_loop().time()  # the clock its timer runs on (tests fast-forward it)
            if now - self.last >= self.window and self.timer is None:
                await self._flush()
            elif self.timer is None:
                self.timer = asyncio.get_running_loop().create_task(
                    self._later(self.last + self.window - now)
                )
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        async with self.lock:
            if self.buf and message["type"] == "http.response.body":
                message = {**message, "body": b"".join(self.buf) + message.get("body", b"")}
                self.buf.clear()
            await self.send(message)

    async def _later(self, delay: float) -> None:
        await asyncio.sleep(max(0.0, delay))
        self.timer = None
        await self._flush()

    async def _flush(self) -> None:
        async with self.lock:
            if not self.buf:
                return
            body = b"".join(self.buf)
            self.buf.clear()
            self.last = asyncio.get_running_loop().time()
            await self.send({"type": "http.response.body", "body": body, "more_body": True})


class PrefixIsRoot:
    """ASGI middleware: a request for the route prefix itself (e.g. /api/inference/vision, which Serve hands
    over as the empty path under root_path) is served by the "/" route, instead of a 307 to the trailing
    slash."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("root_path") and scope["path"] == scope["root_path"]:
            scope = {**scope, "path": scope["path"] + "/"}
        await self.app(scope, receive, send)
