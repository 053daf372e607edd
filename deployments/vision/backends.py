"""The two vision backends' request/response mapping, without Ray (the Serve deployments in `app` wrap them).

- `OllamaVision`: the official `ollama` client (`AsyncClient.chat` with the image in the user message's `images`)
  against the Ollama server beside this node. Picks the requested model if that server has it and it takes images,
  else the configured default, else the server's first vision model. Errors become `Refusal`s a client can act
  on: 404 unknown model, 503 when the server is unreachable or has no vision model, 504 on timeout, 502 otherwise.
- `openai_messages` / `from_chat_response`: the same request as OpenAI chat messages with an image part (a data:
  URL), for ray.serve.llm's `LLMServer` with a multimodal vLLM model, and its answer back.
"""

from __future__ import annotations

import base64
import time
from typing import Any

from deployments.gateway.refusal import Refusal
from deployments.vision.request import VisionInput
from rma_ray.capabilities import is_vision_model, ollama_url


def _finish(done_reason: str | None) -> str:
    return "length" if done_reason == "length" else "stop"


class OllamaVision:
    """One Ollama server's vision models. `host`: None = $OLLAMA_HOST or http://127.0.0.1:11434."""

    def __init__(
        self,
        host: str | None = None,
        default_model: str | None = None,
        timeout_s: float = 180,
        keep_alive: str | None = None,
    ) -> None:
        import ollama

        self.url = ollama_url(host)
        self.default_model = default_model
        self.keep_alive = keep_alive
        self.client = ollama.AsyncClient(host=self.url, timeout=timeout_s)
        self._vision: list[str] | None = None

    def _unreachable(self, exc: BaseException) -> Refusal:
        return Refusal(
            503,
            "ollama_unreachable",
            f"the Ollama server at {self.url} on the vision node does not "
            f"answer ({str(exc)[:200]}); is `ollama serve` running?",
        )

    async def vision_models(self, refresh: bool = False) -> list[str]:
        """The server's models that take images (cached; `refresh` asks again)."""
        import ollama

        if self._vision is None or refresh:
            try:
                found = []
                for m in (await self.client.list()).models:
                    if not m.model:
                        continue
                    show = await self.client.show(m.model)
                    families = list((show.details.families if show.details else None) or [])
                    if is_vision_model(show.capabilities, families):
                        found.append(m.model)
            except (ConnectionError, OSError) as exc:
                raise self._unreachable(exc) from None
            except ollama.ResponseError as exc:
                raise Refusal(
                    502,
                    "ollama_error",
                    f"Ollama at {self.url} refused to list its models: {str(exc.error)[:300]}",
                ) from None
            self._vision = found
        return self._vision

    @staticmethod
    def _match(name: str, models: list[str]) -> str | None:
        for m in models:  # "llava" means "llava:latest", as in the ollama CLI
            if m == name or m == f"{name}:latest":
                return m
        return None

    async def pick_model(self, requested: str | None) -> str:
        models = await self.vision_models()
        want = requested or self.default_model
        if want:
            found = self._match(want, models) or self._match(want, await self.vision_models(refresh=True))
            if found:
                return found
            models = self._vision or []
            if requested:
                raise Refusal(
                    404,
                    "model_not_found",
                    f"model {requested!r} is not a vision model of this node's "
                    f"Ollama; available: {', '.join(models) or 'none'}",
                )
        if not models:
            models = await self.vision_models(refresh=True)
        if not models:
            raise Refusal(
                503,
                "no_vision_model",
                f"the Ollama server at {self.url} has no vision model; the "
                f"donor must pull one (e.g. `ollama pull llava:7b`)",
            )
        return models[0]

    @staticmethod
    def messages(inp: VisionInput) -> list[dict[str, Any]]:
        msgs: list[dict[str, Any]] = []
        if inp.system:
            msgs.append({"role": "system", "content": inp.system})
        msgs.append({"role": "user", "content": inp.prompt, "images": [inp.image]})
        return msgs

    async def describe(self, inp: VisionInput) -> dict[str, Any]:
        """Image + prompt -> {"text", "model", "finish_reason", "usage", "backend"}; raises Refusal."""
        import httpx
        import ollama

        model = await self.pick_model(inp.model)
        started = time.perf_counter()
        try:
            resp = await self.client.chat(
                model=model,
                messages=self.messages(inp),
                stream=False,
                options={"num_predict": inp.max_tokens, "temperature": inp.temperature},
                keep_alive=self.keep_alive,
            )
        except (ConnectionError, OSError) as exc:
            raise self._unreachable(exc) from None
        except httpx.TimeoutException:
            raise Refusal(
                504, "vision_timeout", f"the Ollama server at {self.url} did not answer in time"
            ) from None
        except ollama.ResponseError as exc:
            message = str(exc.error)[:300]
            if exc.status_code == 404:
                self._vision = None
                raise Refusal(404, "model_not_found", f"Ollama: {message}") from None
            if 400 <= exc.status_code < 500:
                raise Refusal(400, "invalid_request", f"Ollama refused the request: {message}") from None
            raise Refusal(502, "ollama_error", f"Ollama failed: {message}") from None
        prompt_tokens, completion_tokens = resp.prompt_eval_count or 0, resp.eval_count or 0
        return {
            "text": resp.message.content or "",
            "model": resp.model or model,
            "finish_reason": _finish(resp.done_reason),
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            "backend": "ollama",
            "model_ms": round((time.perf_counter() - started) * 1000, 1),
        }


def openai_messages(inp: VisionInput) -> list[dict[str, Any]]:
    """OpenAI chat messages with one image part (a data: URL), as vLLM's multimodal chat takes them."""
    url = f"data:{inp.mime};base64,{base64.b64encode(inp.image).decode()}"
    msgs: list[dict[str, Any]] = []
    if inp.system:
        msgs.append({"role": "system", "content": inp.system})
    msgs.append(
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": inp.prompt},
            ],
        }
    )
    return msgs


def from_chat_response(resp: Any) -> dict[str, Any]:
    """ray.serve.llm's ChatCompletionResponse (or an object of that shape) -> the route's answer."""
    choice = resp.choices[0]
    usage = resp.usage.model_dump() if getattr(resp, "usage", None) else None
    return {
        "text": choice.message.content or "",
        "model": resp.model,
        "finish_reason": "length" if choice.finish_reason == "length" else "stop",
        "usage": usage,
        "backend": "vllm",
    }
