"""The LLM's two Serve applications on the pool's one HTTP port (Serve routes by the longest route prefix),
and how a driver runs them:

- `rma-llm` at `/v1` (`deployments.llm.openai`: the OpenAI routes, direct or proxied shape; the model list of
  the whole pool in `deployments.llm.models`; the replica classes in `deployments.llm.server`);
- `rma-inference` at `/api/inference` (`deployments.llm.inference`: the seed's POST /api/inference/llm and the
  handle entry `LLMGateway.chat` that `deployments.llm.client` calls).

`deploy()` runs both with `serve.run` from a driver connected to the pool (`python -m deployments.llm deploy`).
The builders are imported from here by `deployments/serve_config.py`.
"""

from __future__ import annotations

import time
from typing import Any

from deployments.gateway.deploy import delete_apps, wait_running
from deployments.llm.config import (
    INFERENCE_APP,
    INFERENCE_ROUTE_PREFIX,
    LLM_APP,
    LLM_ROUTE_PREFIX,
    LLMSettings,
)
from deployments.llm.inference import build_inference_app
from deployments.llm.openai import build_llm_app, build_proxied_llm_app

__all__ = [
    "build_inference_app",
    "build_llm_app",
    "build_proxied_llm_app",
    "deploy",
    "undeploy",
    "wait_running",
]


def deploy(settings: LLMSettings | None = None, *, blocking_timeout_s: float = 600) -> dict[str, Any]:
    """Run both applications on the Serve instance of the Ray cluster this process is connected to
    (`ray.init(address=...)` first). Returns once they are RUNNING, with timings; raises on failure."""
    from ray import serve

    settings = settings or LLMSettings()
    if settings.resolved_tier() == "cpu" and (settings.model_source or settings.entry().source).startswith(
        "embedded:"
    ):
        from deployments.llm.prepare import prepare_embedded

        prepare_embedded(settings.embedded_dir(), progress=True)
    started = time.monotonic()
    serve.run(build_llm_app(settings), name=LLM_APP, route_prefix=LLM_ROUTE_PREFIX, blocking=False)
    serve.run(build_inference_app(), name=INFERENCE_APP, route_prefix=INFERENCE_ROUTE_PREFIX, blocking=False)
    wait_running([LLM_APP, INFERENCE_APP], timeout_s=blocking_timeout_s)
    return {
        "apps": [LLM_APP, INFERENCE_APP],
        "ready_s": round(time.monotonic() - started, 1),
        "model": settings.entry().model_id,
    }


def undeploy() -> None:
    """Delete both applications (Serve stops the replicas; vLLM's engine process goes with its replica)."""
    delete_apps((INFERENCE_APP, LLM_APP))
