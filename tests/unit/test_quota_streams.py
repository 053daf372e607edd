"""Streamed answers' tokens (`deployments.gateway.quota.CountTokens`): the gateway asks the model for the usage
chunk, counts the prompt and completion tokens from it, and gives the client the stream it would have got
without it. In process: a fake vLLM-like ASGI app behind the real middleware, no Ray."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from deployments.gateway.keys import ClientIdentity
from deployments.gateway.quota import CountTokens, DropUsage, Meter, Tally, set_meter
from rma_ray.wire import Quota

PROMPT_TOKENS = 5000


def events(body: dict[str, Any]) -> list[bytes]:
    """What vLLM streams for `body` (compact JSON): one chunk per token (max_tokens of them, content, a tool call's
    arguments, reasoning), then, with `stream_options.include_usage`, the usage chunk; then [DONE]."""
    n = int(body.get("max_tokens", 3))
    kind = body.get("kind", "content")
    out = []
    for i in range(n):
        if kind == "tool":
            delta: dict[str, Any] = {"tool_calls": [{"index": 0, "function": {"arguments": f"a{i}"}}]}
        else:
            delta = {kind: f"t{i}"}
        chunk = {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}]}
        out.append(b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n")
    if (body.get("stream_options") or {}).get("include_usage"):
        usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": n, "total_tokens": PROMPT_TOKENS + n}
        chunk = {"id": "c", "object": "chat.completion.chunk", "choices": [], "usage": usage}
        out.append(b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n")
    return [*out, b"data: [DONE]\n\n"]


class FakeModel:
    """An ASGI app that streams `events(body)`, or answers JSON when the body does not ask for a stream; it
    keeps the body and headers it was sent. Each event in messages of `split` bytes (an event split across
    messages, as a proxy may send it)."""

    def __init__(self, split: int = 0) -> None:
        self.split = split
        self.seen: dict[str, Any] = {}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        raw, more = b"", True
        while more:
            m = await receive()
            raw, more = raw + m.get("body", b""), m.get("more_body", False)
        self.seen = {"raw": raw, "headers": dict(scope["headers"])}
        body = json.loads(raw)
        if not body.get("stream"):
            reply = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}}
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": json.dumps(reply).encode()})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        data = b"".join(events(body))
        step = self.split or len(data)
        for i in range(0, len(data), step):
            await send({"type": "http.response.body", "body": data[i : i + step], "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def post(app: Any, body: dict[str, Any], path: str = "/v1/chat/completions") -> bytes:
    """One request through the app, in 3 body messages; the response body's bytes."""
    raw = json.dumps(body).encode()
    parts = [raw[:10], raw[10:20], raw[20:]]
    incoming = [
        {"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)
    ]
    got: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        got.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
        "state": {"client": ClientIdentity("k1", "app", quota=Quota(tokens_per_day=10**6))},
    }
    asyncio.run(app(scope, receive, send))
    assert got[0]["status"] == 200
    return b"".join(m.get("body", b"") for m in got[1:])


@pytest.fixture
def meter() -> Any:
    m = Meter(None)
    set_meter(m)
    yield m
    set_meter(None)


def tokens(m: Meter) -> tuple[int, int]:
    used = asyncio.run(m.usage("k1"))
    return used["tokens_in"], used["tokens_out"]


@pytest.mark.parametrize("split", [0, 7])
def test_a_stream_without_include_usage_counts_its_prompt_and_the_client_sees_no_usage_chunk(
    meter: Meter, split: int
) -> None:
    """A large prompt with max_tokens=1, streamed: its prompt tokens count (they counted nothing before)."""
    model = FakeModel(split)
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True, "max_tokens": 1}
    got = post(CountTokens(model), body)
    asked = json.loads(model.seen["raw"])
    assert asked["stream_options"] == {"include_usage": True}
    assert {k: v for k, v in asked.items() if k != "stream_options"} == body
    assert model.seen["headers"][b"content-length"] == str(len(model.seen["raw"])).encode()
    assert got == b"".join(events(body))  # byte for byte what the client would have got
    assert tokens(meter) == (PROMPT_TOKENS, 1)


def test_a_client_that_asked_for_usage_gets_its_chunk_and_its_body_is_sent_as_it_came(meter: Meter) -> None:
    model = FakeModel()
    body = {"messages": [], "stream": True, "max_tokens": 2, "stream_options": {"include_usage": True}}
    got = post(CountTokens(model), body)
    assert model.seen["raw"] == json.dumps(body).encode()
    assert got == b"".join(events(body)) and b'"usage"' in got
    assert tokens(meter) == (PROMPT_TOKENS, 2)


def test_other_stream_options_are_kept_and_completions_streams_count_too(meter: Meter) -> None:
    model = FakeModel()
    body = {
        "prompt": "x",
        "stream": True,
        "max_tokens": 1,
        "stream_options": {"include_usage": False, "x": 1},
    }
    got = post(CountTokens(model), body, "/v1/completions")
    assert json.loads(model.seen["raw"])["stream_options"] == {"include_usage": True, "x": 1}
    assert got == b"".join(events(body))
    assert tokens(meter) == (PROMPT_TOKENS, 1)


def test_a_json_answer_s_body_is_passed_as_it_came(meter: Meter) -> None:
    model = FakeModel()
    body = {"messages": [], "max_tokens": 2}
    post(CountTokens(model), body)
    assert model.seen["raw"] == json.dumps(body).encode()
    assert tokens(meter) == (7, 2)


@pytest.mark.parametrize("kind", ["content", "tool", "reasoning_content", "reasoning"])
def test_with_no_usage_chunk_every_generated_delta_counts(kind: str) -> None:
    """The fallback (an upstream that sends no usage chunk): tool-call arguments and reasoning count as
    content does, one token per chunk (they counted 0 before)."""
    tally = Tally()
    tally.see(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
    )
    for e in events({"max_tokens": 50, "kind": kind}):
        tally.see({"type": "http.response.body", "body": e, "more_body": True})
    tally.see({"type": "http.response.body", "body": b"", "more_body": False})
    assert tally.tokens() == (0, 50)


async def through_drop_usage(data: bytes, step: int) -> bytes:
    """`data` streamed through DropUsage in messages of `step` bytes; the bytes it sent on."""
    sent: list[dict[str, Any]] = []

    async def send(m: dict[str, Any]) -> None:
        sent.append(m)

    drop = DropUsage(send)
    start = {
        "type": "http.response.start",
        "status": 200,
        "headers": [(b"content-type", b"text/event-stream")],
    }
    await drop(start)
    for i in range(0, len(data), step):
        await drop({"type": "http.response.body", "body": data[i : i + step], "more_body": True})
    await drop({"type": "http.response.body", "body": b"", "more_body": False})
    return b"".join(m.get("body", b"") for m in sent[1:])


def test_drop_usage_keeps_every_other_byte_however_the_events_are_split() -> None:
    body = {"max_tokens": 3, "stream_options": {"include_usage": True}}
    data = b": keep-alive\n\n" + b"".join(events(body))
    want = b": keep-alive\n\n" + b"".join(events({"max_tokens": 3}))
    for step in (1, 5, 64, len(data)):
        assert asyncio.run(through_drop_usage(data, step)) == want, step
