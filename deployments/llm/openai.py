"""The `rma-llm` app at `/v1`: GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions (with `stream`
SSE), POST /v1/completions, every one only with a client key (`deployments.gateway.auth`), refusals as OpenAI
error bodies, no other route (vLLM's tokenize/metrics/docs routes and ray.serve.llm's embeddings/score are not
reachable; POST /v1/embeddings is the `rma-embeddings` app's, deployments/embeddings, whose model GET
/v1/models lists too).

Two shapes, chosen by `LLMSettings.direct_ingress()`:
* direct (the LLM replicas may run only on trusted nodes, as the embedded CPU default does): ray.serve.llm's
  `LLMServer` is the app's ingress and answers with vLLM's own OpenAI app behind the kit's `ClientKeyGate`
  (`deployments.llm.gate`); HAProxy sends each request straight into the replica (ray.serve.llm's "direct
  streaming" shape; replica classes in `deployments.llm.server`). Figures: bench/README.md (bench.llm);
* proxied (the LLM may land on untrusted donors, e.g. any GPU donor): ray.serve.llm's `OpenAiIngress` with our
  FastAPI app, pinned to trusted nodes, in front of the `LLMServer`: a client's key never reaches an untrusted
  donor; every streamed token takes one Ray hop more.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from deployments.gateway.auth import AUTH
from deployments.gateway.refusal import Refusal, install_refusals, short
from deployments.llm.config import PROXIED_INGRESS_DEPLOYMENT, LLMSettings, build_llm_config
from deployments.llm.models import ModelCards
from rma_ray.serve_admin import INGRESS_REPLICA_ENV


def openai_fastapi_app() -> FastAPI:
    """ray.serve.llm's ingress middlewares (request ids, OpenAI-shaped errors, HTTP metrics) on an app with no
    docs routes, plus the kit's refusals in OpenAI's shape."""
    # ray.serve.llm's modules import vLLM: imported here, so that `deployments.llm.client` stays light for
    # callers.
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
    # FastAPI's own HTTPException handler would answer {"detail": ...} (OpenAiIngress raises HTTPException for
    # an unknown model): the installer answers it as an OpenAI error body. Installed before ray.serve.llm's
    # handlers, so that theirs (a body that fails validation: 400 `invalid_parameter`, as OpenAI answers) win.
    install_refusals(app, "openai")
    add_exception_handling_middleware(app)
    add_http_metrics_middleware(app)
    app.add_middleware(SetRequestIdMiddleware)
    app.add_middleware(ModelCards)
    # outermost: the completions go to an edge cluster's LLM when one serves it (after its own key check)
    from deployments.gateway.edge import EdgeForward
    from deployments.llm.config import LLM_APP
    from deployments.llm.gate import EDGE_ROUTES, MAX_BODY_BYTES

    app.add_middleware(EdgeForward, app_name=LLM_APP, routes=EDGE_ROUTES, max_body_bytes=MAX_BODY_BYTES)
    from deployments.gateway.quota import CountTokens

    app.add_middleware(CountTokens)  # the answers' tokens, to the client key's usage (edge answers too)

    # ray.serve.llm wraps engine refusals in "Message: ..., Internal exception: ...": keep the part a person
    # can act on
    @app.exception_handler(OpenAIHTTPException)
    async def _openai(request: Request, exc: OpenAIHTTPException) -> JSONResponse:
        code = "model_not_found" if exc.status_code == 404 and "model" in exc.message.lower() else None
        return Refusal(exc.status_code, code or _code(exc.status_code), short(exc.message)).response("openai")

    return app


def _code(status: int) -> str:
    return {400: "invalid_request", 404: "not_found"}.get(status, "llm_error")


def openai_routes() -> dict[str, Any]:
    """OpenAiIngress method -> route, each behind the client key (paths are relative to the /v1 prefix)."""
    from ray.llm._internal.serve.core.configs.openai_api_models import ModelCard, ModelList

    return {
        "models": lambda app: app.get("/models", response_model=ModelList, dependencies=AUTH),
        "model_data": lambda app: app.get(
            "/models/{model:path}", response_model=ModelCard, dependencies=AUTH
        ),
        "completions": lambda app: app.post("/completions", dependencies=AUTH),
        "chat": lambda app: app.post("/chat/completions", dependencies=AUTH),
    }


def build_proxied_llm_app(settings: LLMSettings) -> Any:
    """ray.serve.llm's OpenAiIngress (on trusted nodes: it sees client keys) in front of an LLMServer that may
    run on any node its selector allows: the key never reaches the LLM's node; every streamed token takes one
    hop more."""
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress, make_fastapi_ingress
    from ray.serve.llm import build_llm_deployment

    from deployments.llm.server import PoolLLMServer

    llm_config = build_llm_config(settings)
    ingress_cls = make_fastapi_ingress(OpenAiIngress, endpoint_map=openai_routes(), app=openai_fastapi_app())
    options = OpenAiIngress.get_deployment_options([llm_config])
    # The ingress only forwards: on a 2-core node the LLM's placement group takes every CPU, so it reserves
    # none. INGRESS_REPLICA_ENV: HAProxy's direct ingress into this replica, and the request path (every
    # streamed chunk) on the replica's own event loop instead of a hop to a user-code thread (OpenAiIngress is
    # all async).
    options["ray_actor_options"] = {
        "num_cpus": 0,
        "runtime_env": {"env_vars": dict(INGRESS_REPLICA_ENV)},
        "label_selector": dict(settings.ingress_selector),
    }
    return serve.deployment(ingress_cls, name=PROXIED_INGRESS_DEPLOYMENT, **options).bind(
        llm_deployments={
            llm_config.model_id: build_llm_deployment(
                llm_config, name_prefix="LLMServer:", deployment_cls=PoolLLMServer
            )
        },
        model_cards={llm_config.model_id: to_model_metadata(llm_config.model_id, llm_config)},
        lora_paths={},
    )


def build_llm_app(settings: LLMSettings) -> Any:
    """The rma-llm app: the LLM replica as its own ingress when it runs only on trusted nodes
    (settings.direct_ingress says), else ray.serve.llm's OpenAiIngress on a trusted node in front of it."""
    if not settings.direct_ingress():
        return build_proxied_llm_app(settings)
    from ray.serve.llm import build_llm_deployment

    from deployments.llm.server import KeyedLLMServer

    llm_config = build_llm_config(settings, ingress=True)
    # the deployment keeps ray.serve.llm's usual name ("LLMServer:<model id>"): handles and tools look it up
    # by it
    return build_llm_deployment(
        llm_config, name_prefix="LLMServer:", deployment_cls=serve.ingress()(KeyedLLMServer)
    )
