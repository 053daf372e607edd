"""GET /v1/models for the whole pool: the LLM's OpenAI app lists its own model (`kind: chat`) and the models
of the pool's other OpenAI routes (the `rma-embeddings` app's, `kind: embedding`), asked of that app's
ingress."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

from fastapi.responses import JSONResponse
from ray import serve

from deployments.gateway.asgi import path_under_root

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
        match = MODELS_PATH.fullmatch(path_under_root(scope))
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
