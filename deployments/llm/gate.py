"""What stands in front of vLLM's own OpenAI app inside the LLM replica (direct shape): the kit's
`ClientKeyGate` with the LLM's routes, body limit and stream coalescing, and the pool's model list
(`deployments.llm.models`)."""

from __future__ import annotations

import os
import re
from typing import Any

from deployments.gateway.asgi import ClientKeyGate
from deployments.llm.config import LLM_APP, LLM_ROUTE_PREFIX
from deployments.llm.models import ModelCards

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
# what an edge cluster's LLM may serve instead (full paths: deployments.gateway.edge.EdgeForward)
EDGE_ROUTES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("POST", re.compile(r"/v1/chat/completions/?")),
    ("POST", re.compile(r"/v1/completions/?")),
)
SERVED = "GET /models, GET /models/{model}, POST /chat/completions, POST /completions, POST /embeddings"


def key_gate(app: Any) -> ClientKeyGate:
    """vLLM's own OpenAI app (inside the LLM replica) behind the kit's key gate: OPENAI_ROUTES only, with the
    pool's model list, the chat body limit and the stream coalescing window of the replica's runtime env; the
    completions go to an edge cluster's LLM when one serves it (on an edge app the router is off)."""
    window = float(os.environ.get(COALESCE_ENV, "0") or 0) / 1000
    return ClientKeyGate(
        ModelCards(app),
        prefix=LLM_ROUTE_PREFIX,
        routes=OPENAI_ROUTES,
        max_body_bytes=MAX_BODY_BYTES,
        served=SERVED,
        coalesce_s=window,
        edge_app=LLM_APP,
        edge_routes=EDGE_ROUTES,
    )
