"""Calling the pool's LLM from another Serve deployment (RAG answers, note summaries), through a Serve handle.

    from deployments.llm.client import chat, Refusal

    reply = await chat([{"role": "system", "content": "Answer from the context."},
                        {"role": "user", "content": question}], max_tokens=256, temperature=0.2)
    reply.text, reply.finish_reason, reply.usage["completion_tokens"]

Signature:
    async def chat(messages: list[dict[str, str]], max_tokens: int = 256, *, temperature: float = 0.2,
                   top_p: float = 1.0, stop: list[str] | None = None, model: str | None = None,
                   timeout_s: float = 120.0) -> ChatReply

- `messages`: OpenAI chat messages, each {"role": "system"|"user"|"assistant", "content": str}.
- `model`: a served model id (GET /v1/models); None = the pool's model.
- Returns `ChatReply(text, model, finish_reason, usage)`; `finish_reason == "length"` means max_tokens cut it.
- Raises the kit's `Refusal(status, code, message)`: 400 bad request (too many tokens for the context,
  malformed messages), 404 unknown model, 5xx when the LLM is down; `TimeoutError` after `timeout_s`.

It goes through the `LLMGateway` deployment of the `rma-inference` app with plain dicts, so the caller needs no
vLLM import and no client key (code inside the Ray cluster is already trusted). Call it from inside a replica (or
any driver connected to the pool's Ray cluster); the handle is created once per process.

Streaming (the answer as the model makes it):

    async for text in chat_stream(messages, max_tokens=256):
        ...  # pieces of the answer, in order; raises Refusal / TimeoutError like chat()

It goes straight to ray.serve.llm's `LLMServer` deployment through a streaming handle (`.options(stream=True)`),
with an OpenAI chat request that the LLM replica rebuilds as its own `ChatCompletionRequest` when it unpickles the
call (`_StreamRequest.__reduce__`): the caller still imports no vLLM. The replica answers with OpenAI SSE chunks
(`data: {...}`), parsed here.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from deployments.gateway.refusal import Refusal, refusal_from
from deployments.llm.config import GATEWAY_DEPLOYMENT, INFERENCE_APP, LLM_APP

__all__ = ["ChatReply", "Refusal", "chat", "chat_stream"]

_handle: Any = None
_servers: dict[str, Any] = {}


@dataclass(frozen=True)
class ChatReply:
    text: str
    model: str
    finish_reason: str | None
    usage: dict[str, int] | None


def _gateway() -> Any:
    global _handle
    if _handle is None:
        from ray import serve

        _handle = serve.get_deployment_handle(GATEWAY_DEPLOYMENT, app_name=INFERENCE_APP)
    return _handle


async def chat(
    messages: list[dict[str, str]],
    max_tokens: int = 256,
    *,
    temperature: float = 0.2,
    top_p: float = 1.0,
    stop: list[str] | None = None,
    model: str | None = None,
    timeout_s: float = 120.0,
) -> ChatReply:
    """One chat completion from the pool's LLM (see the module docstring for the contract)."""
    payload: dict[str, Any] = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
    }
    if stop:
        payload["stop"] = stop
    if model:
        payload["model"] = model
    try:
        out = await asyncio.wait_for(_gateway().chat.remote(payload), timeout=timeout_s)
    except Refusal as exc:  # Ray re-raises the replica's exception as a subclass of it: a plain one
        raise refusal_from(exc) or exc from None
    except TimeoutError:
        raise TimeoutError(f"the LLM did not answer within {timeout_s:.0f} s") from None
    return ChatReply(
        text=out["text"], model=out["model"], finish_reason=out["finish_reason"], usage=out["usage"]
    )


def _chat_completion_request(payload: dict[str, Any]) -> Any:
    """Runs in the LLM replica, as it unpickles a `_StreamRequest` (it has vLLM imported already)."""
    from ray.llm._internal.serve.core.configs.openai_api_models import ChatCompletionRequest

    return ChatCompletionRequest(**payload)


class _StreamRequest:
    """An OpenAI chat request that crosses Ray as a call of `_chat_completion_request`: the caller never imports
    vLLM's request class, the LLM replica receives one."""

    def __init__(self, payload: dict[str, Any]) -> None:
        self.payload = payload

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        return _chat_completion_request, (self.payload,)


def _server(model: str | None) -> Any:
    """A streaming handle to ray.serve.llm's `LLMServer` deployment of `model` (None: the one the pool serves)."""
    from ray import serve

    key = model or ""
    if key not in _servers:
        if model:  # ray.serve.llm's deployment name for a model id (its builder's rule)
            name = "LLMServer:" + model.replace("/", "--").replace(".", "_")
        else:
            app = serve.status().applications.get(LLM_APP)
            names = sorted(d for d in (app.deployments if app else {}) if d.startswith("LLMServer:"))
            if not names:
                raise Refusal(503, "llm_unavailable", "the LLM is not running (no LLMServer deployment)")
            name = names[0]
        _servers[key] = serve.get_deployment_handle(name, app_name=LLM_APP).options(stream=True)
    return _servers[key]


def _error(obj: Any) -> Refusal:
    """An OpenAI error (a dict from an SSE chunk, or ray.serve.llm's ErrorResponse) as Refusal."""
    err = obj.get("error") if isinstance(obj, dict) else getattr(obj, "error", None)
    get = err.get if isinstance(err, dict) else (lambda k, d=None: getattr(err, k, d))
    try:
        status = int(get("code", 500))
    except (TypeError, ValueError):
        status = 500
    status = status if 400 <= status < 600 else 500
    code = {400: "invalid_request", 404: "model_not_found"}.get(status, "llm_error")
    return Refusal(status, code, str(get("message", "the LLM failed"))[:500])


def parse_stream_batch(batch: Any) -> tuple[list[str], bool]:
    """The text pieces in one step of ray.serve.llm's chat stream (a list of OpenAI SSE strings, `data: {...}`),
    and whether `data: [DONE]` ended it; an error chunk (or ray.serve.llm's ErrorResponse) raises Refusal."""
    texts: list[str] = []
    for item in batch if isinstance(batch, list) else [batch]:
        if not isinstance(item, str):
            raise _error(item)
        for line in item.splitlines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return texts, True
            chunk = json.loads(data)
            if "error" in chunk:
                raise _error(chunk)
            for choice in chunk.get("choices") or []:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    texts.append(text)
    return texts, False


async def chat_stream(
    messages: list[dict[str, str]],
    max_tokens: int = 256,
    *,
    temperature: float = 0.2,
    top_p: float = 1.0,
    stop: list[str] | None = None,
    model: str | None = None,
    timeout_s: float = 120.0,
) -> AsyncIterator[str]:
    """The reply's text in pieces, as the LLM makes them (see the module docstring)."""
    payload: dict[str, Any] = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "stream": True,
        "model": model,
    }
    if stop:
        payload["stop"] = stop
    gen = _server(model).chat.remote(_StreamRequest(payload), None)
    try:
        async with asyncio.timeout(timeout_s):
            async for batch in gen:  # ray.serve.llm batches stream chunks: a list of SSE strings per step
                texts, done = parse_stream_batch(batch)
                for text in texts:
                    yield text
                if done:
                    return
    except TimeoutError:
        raise TimeoutError(f"the LLM did not finish within {timeout_s:.0f} s") from None
    finally:
        gen.cancel()
