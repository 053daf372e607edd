"""The LLM, for RAG answers and note summaries, through the LLM helper's client (`deployments.llm.client`, a
Serve handle to the pool's LLM app). When no LLM is deployed the caller gets a 503 that says so: never an answer
made up here."""

from __future__ import annotations

import importlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from deployments.gateway.refusal import Refusal, unavailable

log = logging.getLogger("rma.services.llm")

NOT_RUNNING = (
    "the LLM is not running in this pool (no LLM Serve app is deployed): answers and summaries need "
    "it; retrieval without an answer still works (answer: false)"
)


def _client() -> Any:
    try:
        return importlib.import_module("deployments.llm.client")
    except ImportError:
        return None


_checked: tuple[float, bool] = (0.0, False)


def llm_running() -> bool:
    """Whether the pool's LLM Serve app exists (asked of the Serve controller, remembered for 10 s)."""
    global _checked
    import time

    if time.monotonic() - _checked[0] < 10:
        return _checked[1]
    running = False
    try:
        import ray

        if ray.is_initialized():
            from ray import serve

            from deployments.llm.config import INFERENCE_APP

            app = serve.status().applications.get(INFERENCE_APP)
            running = app is not None and str(app.status) in ("RUNNING", "ApplicationStatus.RUNNING")
    except Exception as exc:  # no Serve, no LLM package: not running
        log.info("LLM status unknown: %s", exc)
    _checked = (time.monotonic(), running)
    return running


async def complete(
    messages: list[dict[str, str]], max_tokens: int = 300, temperature: float = 0.2, timeout_s: float = 120.0
) -> str:
    client = _client()
    if client is None or not llm_running():
        raise unavailable("llm_not_running", NOT_RUNNING, retry_after_s=30)
    try:
        reply = await client.chat(
            messages, max_tokens=max_tokens, temperature=temperature, timeout_s=timeout_s
        )
    except TimeoutError:
        raise Refusal(504, "llm_timeout", f"the LLM did not answer within {timeout_s:.0f} s") from None
    except Exception as exc:
        status = getattr(exc, "status", None)
        if isinstance(status, int) and 400 <= status < 500:
            raise Refusal(
                422, "llm_refused", f"the LLM refused the request: {getattr(exc, 'message', exc)}"
            ) from None
        log.warning("LLM call failed: %s", exc)
        raise unavailable(
            "llm_failed", f"the LLM did not answer: {getattr(exc, 'message', type(exc).__name__)}"
        ) from None
    text = getattr(reply, "text", reply)
    if not isinstance(text, str) or not text.strip():
        raise unavailable("llm_failed", "the LLM returned an empty answer")
    return text.strip()


async def stream(
    messages: list[dict[str, str]], max_tokens: int = 300, temperature: float = 0.2, timeout_s: float = 120.0
) -> AsyncIterator[str]:
    """The answer in pieces as the LLM makes them (a Serve streaming handle to the LLM replica); the same
    refusals as `complete`."""
    client = _client()
    if client is None or not llm_running():
        raise unavailable("llm_not_running", NOT_RUNNING, retry_after_s=30)
    try:
        async for text in client.chat_stream(
            messages, max_tokens=max_tokens, temperature=temperature, timeout_s=timeout_s
        ):
            yield text
    except TimeoutError:
        raise Refusal(504, "llm_timeout", f"the LLM did not answer within {timeout_s:.0f} s") from None
    except Exception as exc:
        status = getattr(exc, "status", None)
        if isinstance(status, int) and 400 <= status < 500:
            raise Refusal(
                422, "llm_refused", f"the LLM refused the request: {getattr(exc, 'message', exc)}"
            ) from None
        log.warning("LLM stream failed: %s", exc)
        raise unavailable(
            "llm_failed", f"the LLM did not answer: {getattr(exc, 'message', type(exc).__name__)}"
        ) from None


def rag_messages(question: str, results: list[dict[str, Any]]) -> list[dict[str, str]]:
    """A prompt that numbers the retrieved chunks, so the answer can cite them as [1], [2]..."""
    context = "\n\n".join(f"[{i}] (source: {r.get('source')})\n{r['text']}" for i, r in enumerate(results, 1))
    return [
        {
            "role": "system",
            "content": "Answer the question using only the numbered context passages. Cite "
            "the passages you use as [1], [2]. If the context does not contain "
            "the answer, say you do not know.",
        },
        {"role": "user", "content": f"Context:\n{context}\n\nQuestion: {question}"},
    ]


def citations(answer: str, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The passages the answer cites by number; if it cites none, every passage it was given (its sources)."""
    import re

    cited = sorted({int(n) for n in re.findall(r"\[(\d{1,3})\]", answer) if 1 <= int(n) <= len(results)})
    picks = cited or list(range(1, len(results) + 1))
    return [
        {
            "ref": i,
            "source": results[i - 1].get("source"),
            "chunk": results[i - 1].get("chunk"),
            "explicit": bool(cited),
        }
        for i in picks
    ]
