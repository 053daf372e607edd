"""The `rma-inference` app at `/api/inference` (longer than the services' `/api`, so it wins there): the
seed's POST /api/inference/llm, and the handle entry (`LLMGateway.chat`) that other deployments use through
`deployments.llm.client` with plain dicts (so callers never import vLLM). Refusals are the kit's `Refusal`, in
the pool's shape."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray import serve

from deployments.gateway.auth import AUTH
from deployments.gateway.refusal import Refusal, install_refusals, short, validation_message
from deployments.llm.config import GATEWAY_DEPLOYMENT, LLM_APP
from rma_ray.serve_admin import INGRESS_REPLICA_ENV
from rma_ray.tiers import TRUSTED_NODES


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


def inference_fastapi_app() -> FastAPI:
    from deployments.gateway.quota import CountTokens

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    install_refusals(app, "pool")
    app.add_middleware(CountTokens)  # the reply's `usage`, to the client key's usage
    return app


_inference_app = inference_fastapi_app()


def _error_from(resp: Any) -> Refusal:
    err = resp.error
    status = int(err.code) if 400 <= int(err.code) < 600 else 500
    code = {400: "invalid_request", 404: "model_not_found"}.get(status, "llm_error")
    return Refusal(status, code, short(err.message))


@serve.deployment(
    name=GATEWAY_DEPLOYMENT,
    max_ongoing_requests=256,
    ray_actor_options={
        "num_cpus": 0,
        "runtime_env": {"env_vars": dict(INGRESS_REPLICA_ENV)},
        # it sees every client's key: trusted nodes only (the head is one)
        "label_selector": dict(TRUSTED_NODES),
    },
)
@serve.ingress(_inference_app)
class LLMGateway:
    """POST /api/inference/llm, and `chat(payload)` and `openai(endpoint, body)` for other deployments (plain
    dicts in and out)."""

    def __init__(self) -> None:
        self._models: list[str] = []
        self._servers: dict[str, Any] = {}

    async def _model_ids(self) -> list[str]:
        if not self._models:
            try:  # the rma-llm app's LLMServer (its ingress, or behind OpenAiIngress): one model per app
                apps = (await asyncio.to_thread(serve.status)).applications
                names = [
                    n
                    for n in (apps[LLM_APP].deployments if LLM_APP in apps else {})
                    if n.startswith("LLMServer:")
                ]
                if not names:
                    raise LookupError(f"no LLMServer deployment in the {LLM_APP} app")
                server = serve.get_deployment_handle(names[0], app_name=LLM_APP)
                config = await server.llm_config.remote()
            except Exception as exc:  # the rma-llm app is not deployed (yet), or is being replaced
                raise Refusal(503, "llm_unavailable", f"the LLM is not running: {exc}"[:300]) from None
            self._servers[config.model_id] = server.options(stream=True)
            self._models = [config.model_id]
        return self._models

    async def _server(self, model: str | None) -> tuple[str, Any]:
        ids = await self._model_ids()
        if not ids:
            raise Refusal(503, "llm_unavailable", "the LLM app serves no model")
        chosen = model or ids[0]
        if chosen not in ids:
            raise Refusal(404, "model_not_found", f"unknown model {chosen!r}; served: {', '.join(ids)}")
        return chosen, self._servers[chosen]

    async def chat(self, payload: dict[str, Any]) -> dict[str, Any]:
        """`payload`: OpenAI chat fields (messages, max_tokens, temperature, top_p, stop, model). Returns
        {"text", "model", "finish_reason", "usage"}; raises Refusal(status, code, message)."""
        from ray.llm._internal.serve.core.configs.openai_api_models import (
            ChatCompletionRequest,
            ErrorResponse,
        )

        model, server = await self._server(payload.get("model"))
        try:
            request = ChatCompletionRequest(**{**payload, "model": model, "stream": False})
        except ValidationError as exc:
            raise Refusal(400, "invalid_request", validation_message(exc.errors(), most=1)) from None
        async for resp in server.chat.remote(request, None):
            if isinstance(resp, list):  # batched stream chunks never come for stream=False; be safe
                resp = resp[0]
            if isinstance(resp, ErrorResponse):
                raise _error_from(resp)
            choice = resp.choices[0]
            return {
                "text": choice.message.content or "",
                "model": resp.model,
                "finish_reason": choice.finish_reason,
                "usage": resp.usage.model_dump() if resp.usage else None,
            }
        raise Refusal(502, "llm_error", "the LLM replica returned nothing")

    async def openai(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        """One OpenAI request (`endpoint` /v1/chat/completions or /v1/completions, `body` its JSON, never
        streamed) answered by the LLM replica; the whole OpenAI response as a dict. The Batch API's runner
        calls it (deployments/services/batches.py). Raises Refusal(status, code, message) as the online route would
        answer."""
        from ray.llm._internal.serve.core.configs.openai_api_models import (
            ChatCompletionRequest,
            CompletionRequest,
            ErrorResponse,
        )

        chat = endpoint.rstrip("/").endswith("/chat/completions")
        model, server = await self._server(body.get("model"))
        try:
            cls = ChatCompletionRequest if chat else CompletionRequest
            request = cls(**{**body, "model": model, "stream": False})
        except ValidationError as exc:
            raise Refusal(400, "invalid_request", validation_message(exc.errors(), most=1)) from None
        method = server.chat if chat else server.completions
        async for resp in method.remote(request, None):
            if isinstance(resp, list):
                resp = resp[0]
            if isinstance(resp, ErrorResponse):
                raise _error_from(resp)
            out: dict[str, Any] = resp.model_dump(mode="json")  # as the online route sends it
            return out
        raise Refusal(502, "llm_error", "the LLM replica returned nothing")

    @_inference_app.post("/llm", dependencies=AUTH)
    async def llm(self, body: InferenceRequest) -> dict[str, Any]:
        started = time.perf_counter()
        payload: dict[str, Any] = {
            "messages": body.chat_messages(),
            "max_tokens": body.max_tokens,
            "temperature": body.temperature,
            "top_p": body.top_p,
        }
        if body.stop:
            payload["stop"] = body.stop
        if body.model:
            payload["model"] = body.model
        out = await self.chat(payload)
        return {**out, "latency_ms": round((time.perf_counter() - started) * 1000, 1)}


def build_inference_app() -> Any:
    return LLMGateway.bind()
