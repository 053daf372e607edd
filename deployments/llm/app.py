"""The LLM's Serve applications, on the pool's one HTTP port (Serve routes by the longest route prefix):

- `rma-llm` at `/v1`: GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions (with `stream` SSE), POST
  /v1/completions, every one only with a client key (`deployments.gateway.auth`), refusals as OpenAI error bodies,
  no other route (vLLM's tokenize/metrics/docs routes and ray.serve.llm's embeddings/score are not reachable;
  POST /v1/embeddings is the `rma-embeddings` app's, deployments/embeddings, whose model GET /v1/models lists
  too).
  Two shapes, chosen by `LLMSettings.direct_ingress()`:
  * direct (the LLM replicas may run only on trusted nodes, as the embedded CPU default does): ray.serve.llm's
    `LLMServer` is the app's ingress and answers with vLLM's own OpenAI app behind `ClientKeyGate`; HAProxy sends
    each request straight into the replica (ray.serve.llm's "direct streaming" shape; replica classes in
    `deployments.llm.server`). bench.llm, 8 concurrent streams: 0.91-0.96x of vLLM's own server (proxied: 0.68-0.73x);
  * proxied (the LLM may land on untrusted donors, e.g. any GPU donor): ray.serve.llm's `OpenAiIngress` with our
    FastAPI app, pinned to trusted nodes, in front of the `LLMServer`: a client's key never reaches an untrusted
    donor; every streamed token takes one Ray hop more.
- `rma-inference` at `/api/inference` (longer than the services' `/api`, so it wins there): the seed's POST
  /api/inference/llm, and the handle entry (`LLMGateway.chat`) that other deployments use through
  `deployments.llm.client` with plain dicts (so callers never import vLLM).

`deploy()` runs both with `serve.run` from a driver connected to the pool (`python -m deployments.llm deploy`).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray import serve
from starlette.exceptions import HTTPException

from deployments.gateway.auth import (
    openai_error_handler,
    openai_refusal,
    require_client_on_loop,
    rma_error_handler,
)
from deployments.llm.config import (
    INFERENCE_APP,
    INFERENCE_ROUTE_PREFIX,
    LLM_APP,
    LLM_ROUTE_PREFIX,
    LLMSettings,
    build_llm_config,
)
from rma_ray.bodylimit import BodyLimit, json_refusal
from rma_ray.client_keys import KeyRejected
from rma_ray.serve_admin import INGRESS_REPLICA_ENV
from rma_ray.tiers import TRUSTED_NODES

GATEWAY_DEPLOYMENT = "LLMGateway"
PROXIED_INGRESS_DEPLOYMENT = "OpenAiIngress"
_keyring_ready = False


async def require_client_async(request: Request) -> Any:
    """`require_client` without FastAPI's thread hop for a sync dependency: the check is an in-memory hash lookup.
    The first call builds the replica's keyring (a coordinator fetch) in a thread, off the event loop."""
    global _keyring_ready
    if not _keyring_ready:
        from deployments.gateway.auth import verifier

        try:
            await asyncio.to_thread(verifier)
        except Exception as exc:  # no identity on this node: fail closed, say why (as require_client does)
            raise KeyRejected(503, "keyring_unavailable", f"API keys cannot be checked on this replica: {exc}") \
                from None
        _keyring_ready = True
    return await require_client_on_loop(request)


AUTH = [Depends(require_client_async)]
COALESCE_ENV = "RMA_LLM_STREAM_COALESCE_MS"
MAX_BODY_BYTES = 16 * 2**20  # a chat body: a long context is well under 1 MiB, base64 images a few MiB

# The OpenAI routes the pool serves (paths under the /v1 prefix): vLLM's app has many more (tokenize, metrics,
# docs, pooling, ...), and every one of them would be reachable with a key; only these are.
OPENAI_ROUTES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("GET", re.compile(r"/models")),
    ("GET", re.compile(r"/models/.+")),
    ("POST", re.compile(r"/chat/completions")),
    ("POST", re.compile(r"/completions")),
)


def openai_error(status: int, message: str, code: Any = None, headers: dict[str, str] | None = None) -> JSONResponse:
    kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
    if code is None and status == 404:
        code = "model_not_found" if "model" in message.lower() else "not_found"
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code or status}},
                        status_code=status, headers=headers)


MODELS_PATH = re.compile(r"(?:/v1)?/models(?:/(?P<model>.+))?")
_OTHER_TTL_S = 5.0
_other: tuple[float, list[dict[str, Any]]] = (-_OTHER_TTL_S, [])


async def other_models() -> list[dict[str, Any]]:
    """The model cards of the pool's other OpenAI routes (the `rma-embeddings` app's, with `kind: embedding`),
    for GET /v1/models; none while that app is not running. Cached for a few seconds per replica."""
    global _other
    now = time.monotonic()
    if now - _other[0] < _OTHER_TTL_S:
        return _other[1]
    cards: list[dict[str, Any]] = []
    try:
        from deployments.embeddings.config import EMBEDDINGS_APP, INGRESS_DEPLOYMENT

        apps = (await asyncio.to_thread(serve.status)).applications
        if EMBEDDINGS_APP in apps and str(apps[EMBEDDINGS_APP].status).rsplit(".", 1)[-1] == "RUNNING":
            handle = serve.get_deployment_handle(INGRESS_DEPLOYMENT, app_name=EMBEDDINGS_APP)
            cards = list(await asyncio.wait_for(handle.models.remote(), 10))
    except Exception:  # no Serve here, or the app is being replaced: list the LLM alone
        cards = []
    _other = (now, cards)
    return cards


class ModelCards:
    """ASGI middleware on the LLM's OpenAI app: GET /models lists the LLM (`kind: chat`) and the pool's
    embedding model; GET /models/{id} answers for the embedding model too."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        root = scope.get("root_path", "")
        path = scope["path"][len(root):] if scope["path"].startswith(root) else scope["path"]
        match = MODELS_PATH.fullmatch(path)
        if match is None:
            await self.app(scope, receive, send)
            return
        others = await other_models()
        wanted = match.group("model")
        card = next((c for c in others if c["id"] == wanted), None)
        if card is not None:
            await JSONResponse(card)(scope, receive, send)
            return
        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def capture(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, capture)
        body = b"".join(chunks)
        if start.get("status") == 200:
            try:
                data = json.loads(body)
                if wanted is None and isinstance(data.get("data"), list):
                    for c in data["data"]:
                        c.setdefault("kind", "chat")
                    data["data"] += others
                elif wanted is not None:
                    data.setdefault("kind", "chat")
                body = json.dumps(data).encode()
            except (ValueError, AttributeError):  # not the list we know: pass it on as it is
                pass
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class ClientKeyGate:
    """ASGI middleware in front of vLLM's own OpenAI app, inside the LLM replica: only OPENAI_ROUTES, each only with
    a valid client key (OpenAI error bodies otherwise, so the `openai` client raises AuthenticationError with the
    reason). It also mounts vLLM's app, whose routes carry their /v1, at the Serve app's /v1 route prefix."""

    def __init__(self, app: Any, prefix: str = LLM_ROUTE_PREFIX) -> None:
        self.app, self.prefix = ModelCards(app), prefix
        # vLLM's app reads the whole body: the pool's one streamed limit refuses a chunked one past it
        self.limited = BodyLimit(self.app, MAX_BODY_BYTES, json_refusal("body_too_large", shape="openai"))
        self.window = float(os.environ.get(COALESCE_ENV, "0") or 0) / 1000  # set in the replica's runtime env

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # no websocket routes are served
            await send({"type": "websocket.close", "code": 1008})
            return
        root = scope.get("root_path", "")
        path = scope["path"][len(root):] if scope["path"].startswith(root) else scope["path"]
        methods = [m for m, pattern in OPENAI_ROUTES if pattern.fullmatch(path)]
        if not methods:
            refusal = openai_error(404, f"no route {path!r} under {self.prefix}: the pool serves GET /models, "
                                        "GET /models/{model}, POST /chat/completions, POST /completions, "
                                        "POST /embeddings", code="not_found")
        elif scope["method"] not in methods:
            refusal = openai_error(405, f"{scope['method']} is not allowed on {path}; use {methods[0]}",
                                   code="method_not_allowed", headers={"Allow": ", ".join(methods)})
        else:
            try:
                await require_client_async(Request(scope))
                refusal = None
            except KeyRejected as exc:
                refusal = openai_refusal(exc)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.limited({**scope, "root_path": root.removesuffix(self.prefix)}, receive,
                       StreamCoalescer(send, self.window) if self.window > 0 else send)


class StreamCoalescer:
    """An ASGI `send` that writes a streamed (text/event-stream) body at most once per `window` seconds: the first
    chunk at once (time to first token unchanged), later ones gathered for up to `window`, the last one at once.
    Fewer, larger writes through the replica's HTTP server, HAProxy and the client's socket."""

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
                self.timer = asyncio.get_running_loop().create_task(self._later(self.last + self.window - now))
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


def openai_fastapi_app() -> FastAPI:
    """ray.serve.llm's ingress middlewares (request ids, OpenAI-shaped errors, HTTP metrics) on an app with no
    docs routes, plus our client-key refusals in OpenAI's shape."""
    # ray.serve.llm's modules import vLLM: imported here, so that `deployments.llm.client` stays light for callers.
    from ray.llm._internal.serve.core.configs.openai_api_models import OpenAIHTTPException
    from ray.llm._internal.serve.core.ingress.middleware import (
        SetRequestIdMiddleware,
        add_exception_handling_middleware,
    )
    from ray.llm._internal.serve.observability.metrics.fast_api_metrics import (
        add_http_metrics_middleware,
        metrics_lifespan,
    )

    app = FastAPI(lifespan=metrics_lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    add_exception_handling_middleware(app)
    add_http_metrics_middleware(app)
    app.add_middleware(SetRequestIdMiddleware)
    app.add_middleware(ModelCards)
    openai_error_handler(app)

    # FastAPI's own HTTPException handler would answer {"detail": ...} (OpenAiIngress raises HTTPException for an
    # unknown model), and ray.serve.llm wraps engine refusals in "Message: ..., Internal exception: ...": both
    # become OpenAI error bodies with a message a person can act on.
    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return openai_error(exc.status_code, str(exc.detail))

    @app.exception_handler(OpenAIHTTPException)
    async def _openai(request: Request, exc: OpenAIHTTPException) -> JSONResponse:
        return openai_error(exc.status_code, _short(exc.message))

    return app


def openai_routes() -> dict[str, Any]:
    """OpenAiIngress method -> route, each behind the client key (paths are relative to the /v1 prefix)."""
    from ray.llm._internal.serve.core.configs.openai_api_models import ModelCard, ModelList

    return {
        "models": lambda app: app.get("/models", response_model=ModelList, dependencies=AUTH),
        "model_data": lambda app: app.get("/models/{model:path}", response_model=ModelCard, dependencies=AUTH),
        "completions": lambda app: app.post("/completions", dependencies=AUTH),
        "chat": lambda app: app.post("/chat/completions", dependencies=AUTH),
    }


def build_proxied_llm_app(settings: LLMSettings) -> Any:
    """ray.serve.llm's OpenAiIngress (on trusted nodes: it sees client keys) in front of an LLMServer that may run on
    any node its selector allows: the key never reaches the LLM's node; every streamed token takes one hop more."""
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress, make_fastapi_ingress
    from ray.serve.llm import build_llm_deployment

    from deployments.llm.server import PoolLLMServer

    llm_config = build_llm_config(settings)
    ingress_cls = make_fastapi_ingress(OpenAiIngress, endpoint_map=openai_routes(), app=openai_fastapi_app())
    options = OpenAiIngress.get_deployment_options([llm_config])
    # The ingress only forwards: on a 2-core node the LLM's placement group takes every CPU, so it reserves none.
    # INGRESS_REPLICA_ENV: HAProxy's direct ingress into this replica, and the request path (every streamed chunk)
    # on the replica's own event loop instead of a hop to a user-code thread (OpenAiIngress is all async).
    options["ray_actor_options"] = {"num_cpus": 0, "runtime_env": {"env_vars": dict(INGRESS_REPLICA_ENV)},
                                    "label_selector": dict(settings.ingress_selector)}
    return serve.deployment(ingress_cls, name=PROXIED_INGRESS_DEPLOYMENT, **options).bind(
        llm_deployments={llm_config.model_id: build_llm_deployment(llm_config, name_prefix="LLMServer:",
                                                                   deployment_cls=PoolLLMServer)},
        model_cards={llm_config.model_id: to_model_metadata(llm_config.model_id, llm_config)},
        lora_paths={},
    )


def build_llm_app(settings: LLMSettings) -> Any:
    """The rma-llm app: the LLM replica as its own ingress when it runs only on trusted nodes (settings.direct_ingress
    says), else ray.serve.llm's OpenAiIngress on a trusted node in front of it."""
    if not settings.direct_ingress():
        return build_proxied_llm_app(settings)
    from ray.serve.llm import build_llm_deployment

    from deployments.llm.server import KeyedLLMServer

    llm_config = build_llm_config(settings, ingress=True)
    # the deployment keeps ray.serve.llm's usual name ("LLMServer:<model id>"): handles and tools look it up by it
    return build_llm_deployment(llm_config, name_prefix="LLMServer:", deployment_cls=serve.ingress()(KeyedLLMServer))


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=200_000)


class InferenceRequest(BaseModel):
    """The seed's /api/inference/llm body: a prompt or chat messages."""

    model_config = ConfigDict(extra="forbid")
    prompt: str | None = Field(default=None, min_length=1, max_length=200_000)
    system: str | None = Field(default=None, max_length=20_000)
    messages: list[Message] | None = Field(default=None, min_length=1, max_length=500)
    model: str | None = None
    max_tokens: int = Field(default=256, ge=1, le=32_768)
    temperature: float = Field(default=0.7, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: list[str] | None = Field(default=None, max_length=8)

    @model_validator(mode="after")
    def _one_input(self) -> InferenceRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of 'prompt' or 'messages'")
        return self

    def chat_messages(self) -> list[dict[str, str]]:
        if self.messages is not None:
            msgs = [m.model_dump() for m in self.messages]
        else:
            msgs = [{"role": "user", "content": self.prompt or ""}]
        if self.system:
            msgs.insert(0, {"role": "system", "content": self.system})
        return msgs


class LLMCallError(Exception):
    """A refusal or failure of the LLM, with the HTTP status it maps to."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(status, code, message)  # all three in args: Ray pickles it across the handle
        self.status, self.code, self.message = status, code, message

    def __str__(self) -> str:
        return self.message


def inference_fastapi_app() -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    rma_error_handler(app)

    @app.exception_handler(LLMCallError)
    async def _llm_error(request: Request, exc: LLMCallError) -> JSONResponse:
        return JSONResponse({"error": {"code": exc.code, "message": exc.message}}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first['msg']}" if where else str(first["msg"])
        return JSONResponse({"error": {"code": "invalid_request", "message": message}}, status_code=422)

    return app


_inference_app = inference_fastapi_app()


def _error_from(resp: Any) -> LLMCallError:
    err = resp.error
    status = int(err.code) if 400 <= int(err.code) < 600 else 500
    code = {400: "invalid_request", 404: "model_not_found"}.get(status, "llm_error")
    return LLMCallError(status, code, _short(err.message))


def _short(message: str) -> str:
    """vLLM's messages come wrapped ('Message: ..., Internal exception: ...'): keep the first part."""
    if message.startswith("Message: "):
        message = message[len("Message: "):].split(", Internal exception:")[0]
    return message[:500]


@serve.deployment(name=GATEWAY_DEPLOYMENT, max_ongoing_requests=256,
                  ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": dict(INGRESS_REPLICA_ENV)},
                                     # it sees every client's key: trusted nodes only (the head is one)
                                     "label_selector": dict(TRUSTED_NODES)})
@serve.ingress(_inference_app)
class LLMGateway:
    """POST /api/inference/llm, and `chat(payload)` for other deployments (plain dicts in and out)."""

    def __init__(self) -> None:
        self._models: list[str] = []
        self._servers: dict[str, Any] = {}

    async def _model_ids(self) -> list[str]:
        if not self._models:
            try:  # the rma-llm app's LLMServer (its ingress, or behind OpenAiIngress): one model per app
                apps = (await asyncio.to_thread(serve.status)).applications
                names = [n for n in (apps[LLM_APP].deployments if LLM_APP in apps else {})
                         if n.startswith("LLMServer:")]
                if not names:
                    raise LookupError(f"no LLMServer deployment in the {LLM_APP} app")
                server = serve.get_deployment_handle(names[0], app_name=LLM_APP)
                config = await server.llm_config.remote()
            except Exception as exc:  # the rma-llm app is not deployed (yet), or is being replaced
                raise LLMCallError(503, "llm_unavailable", f"the LLM is not running: {exc}"[:300]) from None
            self._servers[config.model_id] = server.options(stream=True)
            self._models = [config.model_id]
        return self._models

    async def _server(self, model: str | None) -> tuple[str, Any]:
        ids = await self._model_ids()
        if not ids:
            raise LLMCallError(503, "llm_unavailable", "the LLM app serves no model")
        chosen = model or ids[0]
        if chosen not in ids:
            raise LLMCallError(404, "model_not_found", f"unknown model {chosen!r}; served: {', '.join(ids)}")
        return chosen, self._servers[chosen]

    async def chat(self, payload: dict[str, Any]) -> dict[str, Any]:
        """`payload`: OpenAI chat fields (messages, max_tokens, temperature, top_p, stop, model). Returns
        {"text", "model", "finish_reason", "usage"}; raises LLMCallError(status, code, message)."""
        from ray.llm._internal.serve.core.configs.openai_api_models import (
            ChatCompletionRequest,
            ErrorResponse,
        )

        model, server = await self._server(payload.get("model"))
        try:
            request = ChatCompletionRequest(**{**payload, "model": model, "stream": False})
        except ValidationError as exc:
            first = exc.errors()[0]
            raise LLMCallError(400, "invalid_request", f"{'.'.join(map(str, first['loc']))}: {first['msg']}") \
                from None
        async for resp in server.chat.remote(request, None):
            if isinstance(resp, list):  # batched stream chunks never come for stream=False; be safe
                resp = resp[0]
            if isinstance(resp, ErrorResponse):
                raise _error_from(resp)
            choice = resp.choices[0]
            return {"text": choice.message.content or "", "model": resp.model,
                    "finish_reason": choice.finish_reason,
                    "usage": resp.usage.model_dump() if resp.usage else None}
        raise LLMCallError(502, "llm_error", "the LLM replica returned nothing")

    @_inference_app.post("/llm", dependencies=AUTH)
    async def llm(self, body: InferenceRequest) -> dict[str, Any]:
        started = time.perf_counter()
        payload: dict[str, Any] = {"messages": body.chat_messages(), "max_tokens": body.max_tokens,
                                   "temperature": body.temperature, "top_p": body.top_p}
        if body.stop:
            payload["stop"] = body.stop
        if body.model:
            payload["model"] = body.model
        out = await self.chat(payload)
        return {**out, "latency_ms": round((time.perf_counter() - started) * 1000, 1)}


def build_inference_app() -> Any:
    return LLMGateway.bind()


def deploy(settings: LLMSettings | None = None, *, blocking_timeout_s: float = 600) -> dict[str, Any]:
    """Run both applications on the Serve instance of the Ray cluster this process is connected to
    (`ray.init(address=...)` first). Returns once they are RUNNING, with timings; raises on failure."""
    settings = settings or LLMSettings()
    if settings.resolved_tier() == "cpu" and (settings.model_source or settings.entry().source).startswith("embedded:"):
        from deployments.llm.prepare import prepare_embedded

        prepare_embedded(settings.embedded_dir(), progress=True)
    started = time.monotonic()
    serve.run(build_llm_app(settings), name=LLM_APP, route_prefix=LLM_ROUTE_PREFIX, blocking=False)
    serve.run(build_inference_app(), name=INFERENCE_APP, route_prefix=INFERENCE_ROUTE_PREFIX, blocking=False)
    wait_running([LLM_APP, INFERENCE_APP], timeout_s=blocking_timeout_s)
    return {"apps": [LLM_APP, INFERENCE_APP], "ready_s": round(time.monotonic() - started, 1),
            "model": settings.entry().model_id}


def wait_running(apps: list[str], timeout_s: float) -> None:
    from ray.serve.schema import ApplicationStatus

    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications
        states = {a: status[a].status if a in status else "MISSING" for a in apps}
        failed = [a for a, s in states.items() if s in (ApplicationStatus.DEPLOY_FAILED, ApplicationStatus.UNHEALTHY)]
        if failed:
            raise RuntimeError(f"Serve app {failed[0]} failed: {status[failed[0]].message[-2000:]}")
        if all(s == ApplicationStatus.RUNNING for s in states.values()):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"Serve apps not running after {timeout_s:.0f} s: {json.dumps(states, default=str)}")
        time.sleep(1)


def undeploy() -> None:
    """Delete both applications (Serve stops the replicas; vLLM's engine process goes with its replica)."""
    for app in (INFERENCE_APP, LLM_APP):
        try:
            serve.delete(app, _blocking=True)
        except Exception:  # already gone
            pass
