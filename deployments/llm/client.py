"""Calling the pool's LLM from another Serve deployment (RAG answers, note summaries), through a Serve handle.

    from deployments.llm.client import chat, LLMCallError

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
- Raises `LLMCallError(status, code, message)`: 400 bad request (too many tokens for the context, malformed
  messages), 404 unknown model, 5xx when the LLM is down; `TimeoutError` after `timeout_s`.

It goes through the `LLMGateway` deployment of the `rma-inference` app with plain dicts, so the caller needs no
vLLM import and no client key (code inside the Ray cluster is already trusted). Call it from inside a replica (or
any driver connected to the pool's Ray cluster); the handle is created once per process.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from deployments.llm.app import GATEWAY_DEPLOYMENT, LLMCallError
from deployments.llm.config import INFERENCE_APP

__all__ = ["ChatReply", "LLMCallError", "chat"]

_handle: Any = None


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


async def chat(messages: list[dict[str, str]], max_tokens: int = 256, *, temperature: float = 0.2,
               top_p: float = 1.0, stop: list[str] | None = None, model: str | None = None,
               timeout_s: float = 120.0) -> ChatReply:
    """One chat completion from the pool's LLM (see the module docstring for the contract)."""
    payload: dict[str, Any] = {"messages": messages, "max_tokens": max_tokens, "temperature": temperature,
                               "top_p": top_p}
    if stop:
        payload["stop"] = stop
    if model:
        payload["model"] = model
    try:
        out = await asyncio.wait_for(_gateway().chat.remote(payload), timeout=timeout_s)
    except LLMCallError as exc:  # Ray re-raises the replica's exception as a subclass of it
        raise LLMCallError(exc.status, exc.code, exc.message) from None
    except asyncio.TimeoutError:
        raise TimeoutError(f"the LLM did not answer within {timeout_s:.0f} s") from None
    return ChatReply(text=out["text"], model=out["model"], finish_reason=out["finish_reason"], usage=out["usage"])
