"""POST /api/inference/vision: image + prompt -> text, behind the client key, on the pool's one Serve port.

Two Serve applications, so that the route answers even while no node can host a model:
- `rma-vision` at /api/inference/vision (longer than rma-inference's /api/inference, so Serve routes it here): the
  `VisionGateway` front (no CPU reserved, on trusted nodes: it sees client keys). It checks the key, parses and
  checks the request (`request`), and forwards plain values to the backend through a Serve handle. When the
  backend has no running replica it answers 503 `vision_not_available` at once, instead of queueing the
  request for a node that may never come.
- `rma-vision-backend` (no HTTP route): with `RMA_VISION_BACKEND=ollama`, `OllamaVision` replicas placed by the
  label selector `rma.io/ollama=true` + tier, each calling the Ollama server beside its own node; with `vllm`,
  ray.serve.llm's `LLMServer` with a multimodal catalog model on the gpu tier. Serve keeps its replicas pending
  until a matching node joins, then places them; the front notices within `STATUS_TTL_S`.

`rma up` applies both through the Serve config (`python -m deployments up --apps vision`,
`deployments/serve_config.py`); it waits for the front only.

With an edge cluster that runs vision (only when named: `rma up --edge-apps ...,vision`, DESIGN.md "Trust
domains"), the core's front checks the key and then hands the request to the edge's front (`EdgeForward`, with
the edge credential, no client key; not for `--sensitive` clients), which calls the edge's backend on an
untrusted donor (e.g. a GPU donor running Ollama); the core's own backend answers when no edge runs one. What
that costs (say it to clients): the image and prompt reach a stranger's machine; vision answers from an edge
are not spot-checked (deployments/gateway/spotcheck.py checks the LLM, embeddings, OCR and parsing); each donor's
Ollama serves the models that donor pulled (a request naming a model the edge donor lacks gets its 404); the
edge's 5xx (its Ollama down) count against that edge's breaker, shared with its other apps; EdgeForward reads
at most the default body limit (a larger image, after RMA_VISION_MAX_IMAGE_BYTES was raised, stays on the
core).
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

from fastapi import FastAPI, Request
from ray import serve

from deployments.gateway.asgi import PrefixIsRoot, body_limit
from deployments.gateway.auth import AUTH
from deployments.gateway.edge import EdgeForward
from deployments.gateway.refusal import Refusal, install_refusals, refusal_from
from deployments.vision import request as vreq
from deployments.vision.config import (
    BACKEND_APP,
    FRONT_DEPLOYMENT,
    OLLAMA_DEPLOYMENT,
    VISION_APP,
    VISION_ROUTE_PREFIX,
    VisionSettings,
)
from rma_ray.serve_admin import INGRESS_REPLICA_ENV
from rma_ray.tiers import TRUSTED_NODES

STATUS_TTL_S = 2.0
# an edge's front gives the model at most this long: the core's gateway gives up on an edge at 170 s
# (deployments.gateway.edge.EdgeRouter's total_timeout_s) and serves the request itself, so an edge still
# working on it past that only doubles the work
EDGE_CALL_LIMIT_S = 150.0
RETRY_S = 30.0  # Retry-After of a 503: the backend may need a node to join, or a model to load
BODY_LIMIT: dict[str, int] = {}
# what an edge cluster's vision may serve instead (full paths: deployments.gateway.edge.EdgeForward)
EDGE_ROUTES = (("POST", re.compile(re.escape(VISION_ROUTE_PREFIX) + "/?")),)


def refused(status: int, code: str, message: str) -> Refusal:
    """A refusal of the vision route; a 503 says when to try again."""
    return Refusal(status, code, message, RETRY_S if status == 503 else None)


def vision_fastapi_app(max_body_bytes: int | None = None) -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(PrefixIsRoot)
    # the largest body worth reading; by default from the replica's settings (VisionGateway sets it before any
    # request reaches the app, and the middleware reads it on the first one)
    app.add_middleware(
        body_limit,
        code="request_too_large",
        max_bytes=max_body_bytes or (lambda: BODY_LIMIT.get("max_bytes", vreq.Limits().max_body_bytes())),
    )
    # outermost: to an edge cluster's vision when one serves it (after the key check, which it runs itself); a
    # body over the default limit (an operator who raised RMA_VISION_MAX_IMAGE_BYTES) is served on the core
    app.add_middleware(
        EdgeForward,
        app_name=VISION_APP,
        routes=EDGE_ROUTES,
        max_body_bytes=max_body_bytes or vreq.Limits().max_body_bytes(),
    )
    install_refusals(app, "pool")
    return app


_app = vision_fastapi_app()


async def read_body(request: Request) -> bytes:
    """The body; the app's BodyLimit (rma_ray.bodylimit) refuses it with 413 once it passes the limit."""
    return await request.body()


async def parse_request(request: Request, limits: vreq.Limits) -> vreq.VisionInput:
    """multipart/form-data (an `image` file part) or JSON (`image` in base64) -> a checked VisionInput."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_body(request)
    if ctype == "application/json":
        return await asyncio.to_thread(
            vreq.from_json, body, limits
        )  # Pillow reads the whole image: off the loop
    if ctype != "multipart/form-data":
        raise Refusal(
            415,
            "unsupported_media_type",
            "send multipart/form-data (an `image` file and a `prompt` "
            'field) or application/json ({"image": base64, '
            '"prompt": ...})',
        )
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    from starlette.requests import Request as StarletteRequest

    try:
        form = await StarletteRequest(request.scope, replay).form(
            max_files=1, max_fields=len(vreq.FORM_FIELDS)
        )
    except Exception as exc:  # python-multipart's parse errors, too many parts
        raise Refusal(400, "invalid_form", f"the multipart body cannot be read: {str(exc)[:200]}") from None
    fields: dict[str, Any] = {}
    image: bytes | None = None
    try:
        for name, value in form.multi_items():
            if isinstance(value, str):
                fields[name] = value
            elif name == "image":
                image = await value.read()
            else:
                raise Refusal(422, "invalid_request", f"{name}: unexpected file; send the picture as `image`")
    finally:
        await form.close()
    return await asyncio.to_thread(vreq.from_form, fields, image, limits)


@serve.deployment(
    name=FRONT_DEPLOYMENT,
    max_ongoing_requests=64,
    ray_actor_options={
        "num_cpus": 0,
        "runtime_env": {"env_vars": dict(INGRESS_REPLICA_ENV)},
        # it sees every client's key: trusted nodes only (the head is one)
        "label_selector": dict(TRUSTED_NODES),
    },
)
@serve.ingress(_app)
class VisionGateway:
    """The route: key, request checks, backend availability, and the call through a Serve handle."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.s = VisionSettings(**settings)
        self.limits = self.s.limits()
        BODY_LIMIT["max_bytes"] = self.limits.max_body_bytes()
        self.deployment = self.s.backend_deployment()
        self._handle: Any = None  # looked up once the backend app is seen running (it may be deployed later)
        self._checked_at, self._available = 0.0, (False, "")
        self._status_lock = asyncio.Lock()
        self._model_id = self.s.vllm_entry().model_id if self.s.backend == "vllm" else None
        self.call_timeout_s = self.s.timeout_s + 10
        if self.s.edge:
            self.call_timeout_s = min(self.call_timeout_s, EDGE_CALL_LIMIT_S)

    @property
    def handle(self) -> Any:
        if self._handle is None:
            self._handle = serve.get_deployment_handle(self.deployment, app_name=BACKEND_APP)
        return self._handle

    def _backend_state(self) -> tuple[bool, str]:
        status = serve.status().applications.get(BACKEND_APP)
        if status is None:
            return False, "the vision backend is not deployed (`python -m deployments up --apps vision`)"
        dep = status.deployments.get(self.deployment)
        running = dep.replica_states.get("RUNNING", 0) if dep else 0
        if running:
            return True, ""
        if self.s.backend == "ollama":
            return False, (
                f"no node in the pool runs Ollama with a vision model (needed: a node labelled "
                f"rma.io/ollama=true of tier {self.s.tiers}); a GPU donor that runs `ollama serve` "
                f"with e.g. llava:7b pulled and joins will host it"
            )
        return False, (
            f"the vision model {self._model_id} is not running (it needs a gpu-tier donor; "
            f"{'starting' if dep and dep.replica_states else 'waiting for one'})"
        )

    async def _require_backend(self) -> None:
        async with self._status_lock:  # one status read per TTL, however many requests arrive at once
            if time.monotonic() - self._checked_at > STATUS_TTL_S:
                try:
                    self._available = await asyncio.to_thread(self._backend_state)
                except Exception as exc:  # the Serve controller did not answer: say so, do not guess
                    self._available = (
                        False,
                        f"the vision backend's state cannot be read right now ({exc})"[:300],
                    )
                self._checked_at = time.monotonic()
        ok, why = self._available
        if not ok:
            raise refused(503, "vision_not_available", why)

    async def _call_ollama(self, inp: vreq.VisionInput) -> dict[str, Any]:
        try:
            out: dict[str, Any] = await self.handle.describe.remote(inp.payload())
        except Refusal as exc:  # Ray re-raises the replica's exception as a subclass of it: a plain one
            inner = refusal_from(exc) or exc
            raise refused(inner.status, inner.code, inner.message) from None
        return out

    async def _call_vllm(self, inp: vreq.VisionInput) -> dict[str, Any]:
        from ray.llm._internal.serve.core.configs.openai_api_models import (
            ChatCompletionRequest,
            ErrorResponse,
        )

        from deployments.vision.backends import from_chat_response, openai_messages

        if inp.model and inp.model != self._model_id:
            raise Refusal(
                404, "model_not_found", f"unknown vision model {inp.model!r}; served: {self._model_id}"
            )
        request = ChatCompletionRequest(
            model=self._model_id,
            messages=openai_messages(inp),
            stream=False,
            max_tokens=inp.max_tokens,
            temperature=inp.temperature,
        )
        async for resp in self.handle.options(stream=True).chat.remote(request, None):
            if isinstance(resp, list):
                resp = resp[0]
            if isinstance(resp, ErrorResponse):
                status = int(resp.error.code) if 400 <= int(resp.error.code) < 600 else 502
                raise refused(
                    status,
                    "invalid_request" if status == 400 else "vision_error",
                    str(resp.error.message)[:500],
                )
            return from_chat_response(resp)
        raise Refusal(502, "vision_error", "the vision model returned nothing")

    @_app.post("/", dependencies=AUTH)
    async def vision(self, request: Request) -> dict[str, Any]:
        started = time.perf_counter()
        inp = await parse_request(request, self.limits)
        await self._require_backend()
        call = self._call_ollama if self.s.backend == "ollama" else self._call_vllm
        try:
            out = await asyncio.wait_for(call(inp), timeout=self.call_timeout_s)
        except TimeoutError:
            raise Refusal(504, "vision_timeout", f"no answer within {self.call_timeout_s:.0f} s") from None
        return {
            **out,
            "image": {"mime": inp.mime, "width": inp.width, "height": inp.height},
            "latency_ms": round((time.perf_counter() - started) * 1000, 1),
        }


@serve.deployment(name=OLLAMA_DEPLOYMENT, ray_actor_options={"num_cpus": 0})
class OllamaVisionBackend:
    """Calls the Ollama server beside its node. Placed only on nodes labelled rma.io/ollama=true."""

    def __init__(self, settings: dict[str, Any]) -> None:
        from deployments.vision.backends import OllamaVision

        s = VisionSettings(**settings)
        self.ollama = OllamaVision(s.ollama_host, s.model, timeout_s=s.timeout_s, keep_alive=s.keep_alive)

    async def describe(self, payload: dict[str, Any]) -> dict[str, Any]:
        return await self.ollama.describe(vreq.VisionInput.from_payload(payload))

    def where(self) -> dict[str, Any]:
        """Which node and which Ollama server answer (for operators and tests)."""
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "ollama": self.ollama.url}


def build_backend_app(settings: VisionSettings) -> Any:
    if settings.backend == "ollama":
        return OllamaVisionBackend.options(
            num_replicas=settings.num_replicas,
            max_ongoing_requests=settings.max_ongoing_requests,
            ray_actor_options={"num_cpus": 0, "label_selector": settings.ollama_selector()},
        ).bind(settings.model_dump(mode="json"))
    from ray.serve.llm import build_llm_deployment

    return build_llm_deployment(settings.vllm_config())


def build_front_app(settings: VisionSettings) -> Any:
    return VisionGateway.options(
        ray_actor_options={
            "num_cpus": 0,
            "runtime_env": {"env_vars": {**INGRESS_REPLICA_ENV, **settings.edge_env()}},
            "label_selector": settings.front_selector(),
        },
    ).bind(settings.model_dump(mode="json"))
