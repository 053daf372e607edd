"""The LLM's two Serve applications on the pool's one HTTP port (Serve routes by the longest route prefix),
and how a driver runs them:

- `rma-llm` at `/v1` (`deployments.llm.openai`: the OpenAI routes, direct or proxied shape; the model list of
  the whole pool in `deployments.llm.models`; the replica classes in `deployments.llm.server`);
- `rma-inference` at `/api/inference` (`deployments.llm.inference`: the seed's POST /api/inference/llm and the
  handle entry `LLMGateway.chat` that `deployments.llm.client` calls).

`rma up` applies both through the Serve config (`python -m deployments up --apps llm`, `deployments/serve_config.py`).
The builders are imported from here by `deployments/serve_config.py`.
"""

from __future__ import annotations

from deployments.gateway.deploy import wait_running
from deployments.llm.inference import build_inference_app
from deployments.llm.openai import build_llm_app, build_proxied_llm_app

__all__ = [
    "build_inference_app",
    "build_llm_app",
    "build_proxied_llm_app",
    "wait_running",
]
