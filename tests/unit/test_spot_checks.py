"""Spot-checks of edge answers, the core's side (`deployments.gateway.spotcheck`): the comparators, and the
sampler over real HTTP: a tiny core app behind `EdgeForward` (the real key check and meter in memory), an edge
behind the real edge gate that answers honestly or not, a stand-in coordinator that serves the routes (with
their spot-check rate) and takes the verdicts. Module-scoped: three uvicorn servers (under a second)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from deployments.gateway import auth, edge, quota, spotcheck
from deployments.gateway.edge import EdgeForward, EdgeRouter, coordinator_fetch
from deployments.gateway.edge_gate import EdgeCredentialVerifier, EdgeGate
from deployments.gateway.keys import ClientKeyVerifier
from deployments.gateway.spotcheck import SpotChecker
from rma_ray import credentials
from rma_ray.client import AdmissionClient
from rma_ray.credentials import Kind
from rma_ray.edges import SERVED_BY_HEADER, jwks_path
from rma_ray.upstream import UPSTREAM_HEADER
from rma_ray.wire import SpotCheckReport
from tests.support import ServerThread, wait_for
from tests.support.edge import EDGE, SERVICE_CREDENTIAL, Coordinator, jwk

APP = "rma-test"
PLAIN = credentials.mint(Kind.CLIENT)
KEYRING = {"keys": [{"id": PLAIN.id, "hash": PLAIN.hash, "name": "alice"}]}
ROUTES = (
    ("POST", re.compile(r"/v1/embeddings")),
    ("POST", re.compile(r"/v1/chat/completions")),
    ("POST", re.compile(r"/v1/completions")),
    ("POST", re.compile(r"/api/ocr")),
)
OCR_TEXT = "INVOICE 2026-12-05\nTotal due: 41.20 EUR"
HONEST_REPLY = (
    "The capital of France is Paris, a city on the Seine in the north of the country, home to about two"
    " million people."
)  # over MIN_COMPLETION_TOKENS words: one scored token each here
GARBAGE_REPLY = " ".join(["zq", "xv", "wk", "pl", "mm"] * 4)


def vector(text: str, seed: int = 0) -> list[float]:
    """The 'model': a deterministic vector per text (another seed: another model)."""
    digest = hashlib.sha256(f"{seed}:{text}".encode()).digest()
    return [b / 255 - 0.5 for b in digest[:16]]


def embeddings_answer(inputs: list[str], seed: int = 0) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": vector(t, seed)} for i, t in enumerate(inputs)
        ],
        "usage": {"prompt_tokens": 3, "total_tokens": 3},
    }


def chat_answer(text: str) -> dict[str, Any]:
    return {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
    }


def completion_answer(text: str) -> dict[str, Any]:
    return {
        "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
    }


def words(text: str) -> list[str]:
    """The 'tokens' of `text`: its words, each with the spaces after it (they spell `text` again)."""
    return re.findall(r"\S+\s*", text)


def events(text: str, chat: bool) -> list[bytes]:
    """`text` streamed as vLLM streams it: one chunk per word (chat: a first chunk with the role), the
    finish_reason in its own chunk, a usage chunk with no choices (`stream_options.include_usage`), `[DONE]`;
    a keep-alive comment in between."""

    def chunk(choice: dict[str, Any] | None, **extra: Any) -> bytes:
        obj = "chat.completion.chunk" if chat else "text_completion"
        data = {"id": "cmpl-1", "object": obj, "choices": [] if choice is None else [choice], **extra}
        return b"data: " + json.dumps(data).encode() + b"\n\n"

    def piece(word: str | None, finish: str | None = None) -> dict[str, Any]:
        if chat:
            delta = {} if word is None else {"content": word}
            return {"index": 0, "delta": delta, "finish_reason": finish}
        return {"index": 0, "text": word or "", "finish_reason": finish}

    out = [chunk({"index": 0, "delta": {"role": "assistant", "content": ""}})] if chat else []
    out += [chunk(piece(w)) for w in words(text)]
    out.insert(2, b": keep-alive\n\n")
    out += [chunk(piece(None, "stop")), chunk(None, usage={"prompt_tokens": 5, "completion_tokens": 7})]
    return [*out, b"data: [DONE]\n\n"]


def logprobs(prompt: str) -> list[Any]:
    """vLLM's `prompt_logprobs` for `prompt` (null first, then one {token id: {logprob, rank, decoded_token}}
    per token): words of the honest reply are likely."""
    likely = set(HONEST_REPLY.split())
    entries: list[Any] = [None]
    for i, w in enumerate(words(prompt)[1:]):
        lp = -0.4 if w.strip() in likely else -9.0
        entries.append({str(100 + i): {"logprob": lp, "rank": 1, "decoded_token": w}})
    return entries


def scored(request: dict[str, Any]) -> dict[str, Any]:
    """The core's answer to a scoring request, shaped as vLLM's: chat's logprobs at the top, completions' in
    the choice."""
    if "messages" in request:
        return {
            **chat_answer("x"),
            "prompt_logprobs": logprobs(" ".join(m["content"] for m in request["messages"])),
        }
    answer = completion_answer("x")
    return {**answer, "choices": [{**answer["choices"][0], "prompt_logprobs": logprobs(request["prompt"])}]}


@dataclass
class Core:
    """The core's replica: its own answers, the client check as the real apps run it, and a gate a test may
    close to hold the re-runs."""

    calls: list[dict[str, Any]] = field(default_factory=list)
    gate: threading.Event = field(default_factory=threading.Event)

    def app(self) -> Any:
        async def answer(request: Request) -> Response:
            client = await auth.current_client(request)  # charged here, were the re-run a new request
            await asyncio.to_thread(self.gate.wait, 30)
            body = await request.body()
            self.calls.append(
                {
                    "path": request.url.path,
                    "client": client.key_id,
                    "scope": dict(request.scope),
                    "body": body,
                }
            )
            if request.url.path == "/api/ocr":
                return JSONResponse({"content_type": "image/png", "text": OCR_TEXT})
            req = json.loads(body)
            if request.url.path == "/v1/embeddings":
                return JSONResponse(embeddings_answer(req["input"]))
            if req.get("prompt_logprobs") is not None:
                return JSONResponse(scored(req))
            return JSONResponse(chat_answer(HONEST_REPLY))

        # the answers' tokens as the LLM replica counts them (a re-run must pass uncounted)
        return quota.CountTokens(Starlette(routes=[Route(p.pattern, answer, methods=[m]) for m, p in ROUTES]))


@dataclass
class Edge:
    """An edge behind the real edge gate: `honest`, or not (other vectors, other text, garbage); an LLM
    answer streamed when asked."""

    honest: bool = True
    answer: tuple[int, bytes] | None = None  # the LLM answer (status, body, streamed when asked), when set
    upstream: str | None = None  # the x-rma-upstream the edge head's HAProxy adds (rma_ray.upstream)

    def app(self, verifier: EdgeCredentialVerifier) -> Any:
        async def answer(request: Request) -> Response:
            body = await request.body()
            if request.url.path == "/api/ocr":
                return JSONResponse(
                    {"content_type": "image/png", "text": OCR_TEXT if self.honest else "lorem"}
                )
            try:
                req = json.loads(body)
            except (ValueError, RecursionError):
                return JSONResponse({"error": {"message": "the body is not JSON"}}, status_code=400)
            if request.url.path == "/v1/embeddings":
                return JSONResponse(embeddings_answer(req["input"], seed=0 if self.honest else 1))
            streamed = req.get("stream") in (True, 1, "true")  # vLLM's pydantic reads these as true
            if self.answer is not None:
                media = "text/event-stream" if streamed else "application/json"
                return Response(self.answer[1], status_code=self.answer[0], media_type=media)
            text = HONEST_REPLY if self.honest else GARBAGE_REPLY
            chat = request.url.path.endswith("/chat/completions")
            if streamed:
                return StreamingResponse(iter(events(text, chat)), media_type="text/event-stream")
            return JSONResponse(chat_answer(text) if chat else completion_answer(text))

        gated = EdgeGate(
            Starlette(routes=[Route(p.pattern, answer, methods=[m]) for m, p in ROUTES]), verifier
        )

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] == "lifespan" or scope.get("path") == "/healthz":
                await Starlette(routes=[Route("/healthz", lambda r: PlainTextResponse("ok"))])(
                    scope, receive, send
                )
            else:
                await gated(scope, receive, with_upstream(send))

        def with_upstream(send: Any) -> Any:
            async def sending(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start" and self.upstream is not None:
                    headers = [*message.get("headers", []), (b"x-rma-upstream", self.upstream.encode())]
                    message = {**message, "headers": headers}
                await send(message)

            return sending

        return app


@dataclass
class Reports:
    """The coordinator's side: the edge keys and routes (with the spot-check rate), the verdicts received."""

    coordinator: Coordinator = field(default_factory=Coordinator)
    rate: float = 1.0
    received: list[dict[str, Any]] = field(default_factory=list)

    def app(self) -> Starlette:
        def service(request: Request) -> bool:
            return request.headers.get("authorization") == f"Bearer {SERVICE_CREDENTIAL}"

        async def routes(request: Request) -> Response:
            if not service(request):
                return JSONResponse({"error": {"message": "no"}}, status_code=403)
            return JSONResponse({"edges": self.coordinator.routes, "spot_check_rate": self.rate})

        async def spot_checks(request: Request) -> Response:
            if not service(request):
                return JSONResponse({"error": {"message": "no"}}, status_code=403)
            self.received.append(SpotCheckReport.model_validate(await request.json()).model_dump())
            return Response(status_code=204)

        return Starlette(
            routes=[
                Route("/healthz", lambda r: PlainTextResponse("ok")),
                Route(jwks_path(EDGE), lambda r: JSONResponse({"keys": [jwk(self.coordinator.key)]})),
                Route("/api/service/edge-routes", routes, methods=["POST"]),
                Route("/api/service/spot-checks", spot_checks, methods=["POST"]),
            ]
        )


@dataclass
class Bed:
    reports: Reports
    edge: Edge
    core: Core
    url: str
    router: EdgeRouter
    meter: quota.Meter
    report: Any

    def usage(self) -> dict[str, int]:
        return self.meter._count(PLAIN.id, {})  # this replica's counts (no shared store here)


@pytest.fixture(scope="module")
def bed() -> Iterator[Bed]:
    reports, edge_app, core = Reports(), Edge(), Core()
    core.gate.set()
    verifier = ClientKeyVerifier(lambda: KEYRING)
    verifier.refresh()
    auth.set_verifier(verifier)
    meter = quota.Meter(None)
    quota.set_meter(meter)
    forward = EdgeForward(core.app(), app_name=APP, routes=ROUTES)

    async def core_server(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan" or scope.get("path") == "/healthz":
            await Starlette(routes=[Route("/healthz", lambda r: PlainTextResponse("ok"))])(
                scope, receive, send
            )
        else:
            await forward(scope, receive, send)

    try:
        with (
            ServerThread(reports.app()) as coord,
            ServerThread(edge_app.app(EdgeCredentialVerifier(EDGE, coord.url))) as edge_server,
            ServerThread(core_server) as core_url,
        ):
            reports.coordinator.route(edge_server.url, {APP: 1})
            router = EdgeRouter(coordinator_fetch(coord.url, SERVICE_CREDENTIAL))
            assert router.refresh()
            edge.set_router(router)

            def report(r: SpotCheckReport) -> None:
                with AdmissionClient(coord.url, SERVICE_CREDENTIAL, timeout=2.0) as client:
                    client.report_spot_check(r)

            yield Bed(reports, edge_app, core, core_url.url, router, meter, report)
    finally:
        edge.set_router(None, disabled=True)
        spotcheck.set_checker(None)
        auth.set_verifier(None)
        quota.set_meter(None)


@pytest.fixture
def fresh(bed: Bed) -> Iterator[Bed]:
    """The bed with no verdicts yet, a new checker reporting to the coordinator, an honest edge, rate 1."""
    spotcheck.set_checker(SpotChecker(bed.report))
    bed.reports.received.clear()
    bed.reports.rate = 1.0
    assert bed.router.refresh()
    bed.core.calls.clear()
    bed.core.gate.set()
    bed.edge.honest, bed.edge.answer, bed.edge.upstream = True, None, None
    yield bed
    bed.core.gate.set()


def post(bed: Bed, path: str, status: int = 200, **kw: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {PLAIN.token}", **kw.pop("headers", {})}
    r = httpx.post(bed.url + path, headers=headers, timeout=20, **kw)
    assert r.status_code == status, r.text
    assert r.headers[SERVED_BY_HEADER] == f"edge:{EDGE}"
    return r


def verdicts(bed: Bed, n: int) -> list[dict[str, Any]]:
    return wait_for(
        lambda: bed.reports.received if len(bed.reports.received) >= n else None,
        timeout=20,
        what=f"{n} spot-check verdict(s) at the coordinator",
    )


# -- comparators ----------------------------------------------------------------------------------------------


def test_embeddings_score_is_the_lowest_cosine_of_the_batch() -> None:
    a = embeddings_answer(["one", "two"])
    assert spotcheck.embeddings_score(a, a) == pytest.approx(1.0)
    scaled = {"data": [{**d, "embedding": [2 * x for x in d["embedding"]]} for d in a["data"]]}
    assert spotcheck.embeddings_score(scaled, a) == pytest.approx(1.0)  # cosine: the length does not matter
    one_wrong = {"data": [a["data"][0], {**a["data"][1], "embedding": vector("two", seed=1)}]}
    assert spotcheck.embeddings_score(one_wrong, a) < 0.9
    b64 = {
        "data": [
            {
                "index": d["index"],
                "embedding": base64.b64encode(np.asarray(d["embedding"], "<f4").tobytes()).decode(),
            }
            for d in a["data"]
        ]
    }
    assert spotcheck.embeddings_score(b64, a) == pytest.approx(1.0, abs=1e-6)
    assert spotcheck.embeddings_score(embeddings_answer(["one"]), a) == 0.0  # one vector short
    assert spotcheck.embeddings_score({"data": "nonsense"}, a) == 0.0
    assert spotcheck.embeddings_score({"data": [{"embedding": [float("nan")] * 16}]}, a) == 0.0


def test_text_score_and_llm_parts() -> None:
    assert spotcheck.text_score({"text": OCR_TEXT}, {"text": OCR_TEXT}) == 1.0
    assert spotcheck.text_score({"text": "lorem"}, {"text": OCR_TEXT}) < 0.5
    assert spotcheck.text_score({}, {"text": OCR_TEXT}) == 0.0
    chat = {"model": "m", "messages": [{"role": "user", "content": "Capital of France?"}], "temperature": 1.3}
    req = spotcheck.scoring_request(chat, "Paris.", chat=True)
    assert req["messages"][-1] == {"role": "assistant", "content": "Paris."}
    assert req["continue_final_message"] and not req["add_generation_prompt"]
    assert (req["max_tokens"], req["prompt_logprobs"], req["model"]) == (1, 1, "m")
    assert spotcheck.scoring_request({"model": "m", "prompt": "Q: "}, "A", chat=False)["prompt"] == "Q: A"
    with pytest.raises(spotcheck.Unjudgeable):
        spotcheck.scoring_request({"model": "m", "prompt": [1, 2, 3]}, "A", chat=False)
    with pytest.raises(spotcheck.Unjudgeable):  # a chat request (by its path) without messages
        spotcheck.scoring_request({"model": "m", "prompt": "Q: "}, "A", chat=True)
    with pytest.raises(spotcheck.Unjudgeable):  # a tool call: no text to judge
        spotcheck.completion_text(
            {"choices": [{"message": {"content": None, "tool_calls": [{}]}}]}, chat=True
        )
    for malformed in (
        {"choices": []},
        {"choices": ["x"]},
        {"choices": [{"message": "x"}]},
        {"choices": [{"message": {"content": "", "tool_calls": []}}]},
        {"error": "busy"},
    ):
        with pytest.raises(spotcheck.Malformed):
            spotcheck.completion_text(malformed, chat=True)
    spotcheck.calibrated({**chat, "temperature": 1.0, "top_p": 0.95, "presence_penalty": 0, "seed": 3})
    spotcheck.calibrated(
        {**chat, "temperature": None, "response_format": {"type": "text"}, "tool_choice": "none"}
    )
    for out_of_range in (
        {"temperature": 2.0},
        {"temperature": "hot"},
        {"top_p": 0.5},
        {"logit_bias": {"50256": -100}},
        {"response_format": {"type": "json_object"}},
        {"guided_regex": "a+"},
        {"structured_outputs": {"choice": ["a"]}},
        {"frequency_penalty": 1.5},
        {"repetition_penalty": 1.3},
        {"min_tokens": 40},
        {"ignore_eos": True},
        {"tools": [{"type": "function", "function": {"name": "f"}}]},
        {"tool_choice": "required"},
        # what changes the prompt the edge's model saw, or how it chose: a client could fail an honest edge
        {"truncate_prompt_tokens": 4},
        {"use_beam_search": True},
        {"documents": [{"title": "t", "text": "x"}]},
        {"vllm_xargs": {"k": 1}},
        {"reasoning_effort": "high"},
    ):
        with pytest.raises(spotcheck.Unjudgeable):
            spotcheck.calibrated({**chat, **out_of_range})
    # the completion's tokens are the last ones of the prompt: only those count
    answer = {
        "prompt_logprobs": [
            None,
            {"7": {"logprob": -20.0, "rank": 1, "decoded_token": "Capital"}},
            {"8": {"logprob": -3.0, "rank": 1, "decoded_token": " Par"}},
            {"9": {"logprob": -1.0, "rank": 1, "decoded_token": "is."}},
        ]
    }
    assert spotcheck.completion_logprobs(answer, " Paris.") == [-1.0, -3.0]
    assert spotcheck.llm_score(answer, " Paris.") == pytest.approx(-2.0)
    with pytest.raises(spotcheck.CoreFailed):
        spotcheck.completion_logprobs({"choices": [{}]}, "x")


def test_a_greedy_answer_is_judged_by_its_share_of_the_models_top_tokens() -> None:
    """temperature 0: an honest edge's text is the core model's most likely token at every step (a near-tie
    within GREEDY_TIE_NATS counts as the top); another model's fluent text, whose mean logprob passes the
    sampled requests' threshold, is not, and fails. The core here answers the scoring request with
    vLLM's prompt_logprobs at k = 1: the prompt's own token first, the top one beside it when it differs."""
    words = HONEST_REPLY.split(" ")
    completion = " ".join(words)

    def entries(top: list[bool], gap: float = 1.5) -> list[Any]:
        out: list[Any] = [None, {"1": {"logprob": -7.0, "rank": 3, "decoded_token": "Capital?"}}]
        for i, (w, is_top) in enumerate(zip(words, top, strict=True)):
            tok = w if i == 0 else " " + w
            own = {"logprob": -1.0, "rank": 1 if is_top else 2, "decoded_token": tok}
            out.append(
                {str(10 + i): own}
                if is_top
                else {str(10 + i): own, "9": {"logprob": -1.0 + gap, "rank": 1, "decoded_token": " zq"}}
            )
        return out

    def core_app(prompt_logprobs: list[Any]) -> Any:
        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            body = json.loads((await receive())["body"])
            assert body["prompt_logprobs"] == 1 and body["messages"][-1]["content"] == completion
            answer = {**chat_answer("x"), "prompt_logprobs": prompt_logprobs}
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": json.dumps(answer).encode()})

        return app

    def check(request: dict[str, Any], prompt_logprobs: list[Any]) -> SpotCheckReport:
        scope = {
            "type": "http",
            "method": "POST",
            "path": "/v1/chat/completions",
            "headers": [],
            "query_string": b"",
        }
        sample = spotcheck.Sample(
            EDGE,
            APP,
            "llm",
            scope,
            json.dumps(request).encode(),
            json.dumps(chat_answer(completion)).encode(),
            core=core_app(prompt_logprobs),
        )
        return asyncio.run(SpotChecker(None).check(sample))

    chat = {"model": "m", "messages": [{"role": "user", "content": "Capital?"}], "temperature": 0}
    n = len(words)
    honest = check(chat, entries([True] * n))
    assert honest.passed and honest.score == 1.0 and honest.threshold == spotcheck.GREEDY_THRESHOLD
    flips = [i % 4 != 1 for i in range(n)]  # one token in four another than the top, each by 1.5 nats
    other = check(chat, entries(flips))
    assert not other.passed and other.score == pytest.approx(sum(flips) / n)
    assert other.sample and json.loads(other.sample["core_answer"])["not_top"] == [
        i for i, top in enumerate(flips) if not top
    ]
    # the same text, sampled (temperature absent or 0.7): its mean logprob (-1.0) passes
    for sampled in ({k: v for k, v in chat.items() if k != "temperature"}, {**chat, "temperature": 0.7}):
        report = check(sampled, entries(flips))
        assert report.passed and report.score == -1.0 and report.threshold == spotcheck.LLM_THRESHOLD
    # a near-tie broken the other way (float noise between builds) counts as the top token
    assert check(chat, entries(flips, gap=spotcheck.GREEDY_TIE_NATS / 2)).score == 1.0
    assert spotcheck.greedy({"temperature": 0.0}) and spotcheck.greedy({"temperature": 0})
    assert spotcheck.greedy({"temperature": 1e-6}) and spotcheck.greedy({"temperature": 0.7, "top_k": 1})
    assert not any(spotcheck.greedy({"temperature": t}) for t in (None, False, 0.2, "0"))
    assert spotcheck.greedy_share([]) == 0.0


def test_the_greedy_share_reads_tokens_by_rank_and_counts_the_same_text_split_otherwise() -> None:
    """The prompt's own token is told from the top one by rank, never by position (an answer reordered on
    its way would otherwise pass every check); a token the model would not write first still counts when its
    top token spells the start of the same remaining text (the scoring tokenizes the completion again)."""
    completion = " Paris is"
    own_first = {
        "1": {"logprob": -3.0, "rank": 2, "decoded_token": " Par"},
        "2": {"logprob": -0.5, "rank": 1, "decoded_token": " Paris"},
    }
    top_first = dict(reversed(list(own_first.items())))
    tail = [{"3": {"logprob": -0.1, "rank": 1, "decoded_token": "is"}}]
    for order in (own_first, top_first):
        got = spotcheck.completion_tokens({"prompt_logprobs": [None, order, *tail]}, " Paris")
        assert got == [(-0.1, True), (-3.0, True)]  # " Par" + "is": " Paris" is the model's, split otherwise
    other = {
        "1": {"logprob": -3.0, "rank": 2, "decoded_token": " Lyon"},
        "2": {"logprob": -0.5, "rank": 1, "decoded_token": " Paris"},
    }
    got = spotcheck.completion_tokens({"prompt_logprobs": [None, other, *tail]}, " Lyonis")
    assert got == [(-0.1, True), (-3.0, False)]
    for bad in (
        {"1": {"logprob": -3.0, "decoded_token": " Par"}},  # one token, not ranked first: no top beside it
        {"1": {"logprob": -3.0, "rank": 1}, "2": {"logprob": -0.5, "rank": 1}},  # two ranked first
        {"1": {"logprob": -3.0, "rank": 2}, "2": {"logprob": -0.5, "rank": 3}},  # none ranked first
        {
            "1": {"logprob": -3.0, "rank": 2},
            "2": {"logprob": -0.5, "rank": 1},
            "3": {"logprob": -1, "rank": 2},
        },
        {"1": ["not", "a", "dict"]},
    ):
        with pytest.raises(spotcheck.CoreFailed):
            spotcheck.completion_tokens({"prompt_logprobs": [None, bad]}, completion)


def test_kinds_by_path() -> None:
    assert spotcheck.is_chat("/v1/chat/completions") and spotcheck.is_chat("/v1/chat/completions/")
    assert not spotcheck.is_chat("/v1/completions")
    assert spotcheck.kind_of("/v1/chat/completions") == "llm"
    assert spotcheck.kind_of("/v1/completions") == "llm"
    assert spotcheck.kind_of("/v1/embeddings") == "embeddings"
    assert spotcheck.kind_of("/api/ocr") == "ocr"
    assert spotcheck.kind_of("/api/documents/parse") == "parse"
    assert spotcheck.kind_of("/v1/models") is None


def test_the_meter_counts_nothing_while_spot_checking() -> None:
    m = quota.Meter(None)
    client = ClientKeyVerifier(lambda: KEYRING)
    client.refresh()
    identity = client.verify(f"Bearer {PLAIN.token}")

    async def run() -> dict[str, int]:
        token = quota.spot_checking.set(True)
        try:
            await m.admit(identity.key_id, identity.quota)
            await m.add_tokens(identity.key_id, 10, 20)
            await m.charge_upload(identity.key_id, identity.quota, 1000)
        finally:
            quota.spot_checking.reset(token)
        await m.add_tokens(identity.key_id, 1, 2)
        return await m.usage(identity.key_id)

    assert asyncio.run(run()) == {"requests": 0, "tokens_in": 1, "tokens_out": 2, "upload_bytes": 0}


# -- the sampler over HTTP ------------------------------------------------------------------------------------


def test_a_hostile_edge_fails_its_checks_and_the_client_gets_its_answer_unchanged(fresh: Bed) -> None:
    fresh.edge.honest = False
    r = post(fresh, "/v1/embeddings", json={"model": "e", "input": ["alpha", "beta"]})
    assert r.json() == embeddings_answer(["alpha", "beta"], seed=1)  # the edge's answer, as it sent it
    r = post(fresh, "/api/ocr", files={"file": ("scan.png", b"\x89PNG fake image", "image/png")})
    assert r.json()["text"] == "lorem"
    chat = {"model": "m", "messages": [{"role": "user", "content": "Capital of France?"}]}
    assert post(fresh, "/v1/chat/completions", json=chat).json() == chat_answer(GARBAGE_REPLY)
    got = {v["kind"]: v for v in verdicts(fresh, 3)}
    assert set(got) == {"embeddings", "ocr", "llm"}
    for v in got.values():
        assert v["edge"] == EDGE and v["app"] == APP and not v["passed"], v
        assert v["score"] < v["threshold"]
        assert set(v["sample"]) == {"request", "edge_answer", "core_answer"}
    assert json.loads(got["embeddings"]["sample"]["edge_answer"]) == embeddings_answer(["alpha", "beta"], 1)
    assert re.fullmatch(r"[0-9a-f]{64}", got["embeddings"]["request_sha256"])
    assert got["ocr"]["sample"]["edge_answer"].endswith('"lorem"}')
    assert got["llm"]["score"] == pytest.approx(-9.0)
    checker = spotcheck.checker()
    assert checker.counts[(EDGE, "embeddings", "failed")] >= 1


def test_an_honest_edge_passes_and_the_re_run_is_not_charged(fresh: Bed) -> None:
    before = fresh.usage()
    post(fresh, "/v1/embeddings", json={"model": "e", "input": ["alpha"]})
    chat = {"model": "m", "messages": [{"role": "user", "content": "Capital of France?"}]}
    post(fresh, "/v1/chat/completions", json=chat)
    got = verdicts(fresh, 2)
    assert all(v["passed"] and v["sample"] is None for v in got), got
    assert {v["kind"] for v in got} == {"embeddings", "llm"}
    # the core re-ran both, for the same client, flagged, through the replica's token counting
    assert [c["client"] for c in fresh.core.calls] == [PLAIN.id, PLAIN.id]
    assert all(c["scope"][quota.SPOT_CHECK] for c in fresh.core.calls)
    after = fresh.usage()
    assert after["requests"] - before["requests"] == 2  # the client's two requests, not the re-runs
    assert after["tokens_in"] == before["tokens_in"]  # the core's answers carry usage: never counted


def test_rate_zero_samples_nothing(fresh: Bed) -> None:
    fresh.reports.rate = 0.0
    assert fresh.router.refresh() and fresh.router.spot_check_rate == 0.0
    post(fresh, "/v1/embeddings", json={"model": "e", "input": ["alpha"]})
    fresh.reports.rate = 1.0
    assert fresh.router.refresh() and fresh.router.spot_check_rate == 1.0
    body = json.dumps({"model": "e", "input": ["beta"]}).encode()
    post(fresh, "/v1/embeddings", content=body, headers={"Content-Type": "application/json"})
    (verdict,) = verdicts(fresh, 1)  # one worker, in order: the rate-0 answer would have been checked first
    assert verdict["request_sha256"] == hashlib.sha256(body).hexdigest()
    assert len(fresh.core.calls) == 1 and spotcheck.checker().counts.total() == 1


def test_wants_draws_at_the_rate() -> None:
    draws = iter([0.05, 0.5, 0.09999, 0.1, 0.99])
    checker = SpotChecker(None, rng=lambda: next(draws))
    assert [checker.wants(0.1) for _ in range(5)] == [True, False, True, False, False]
    assert not SpotChecker(None, rng=lambda: 0.0).wants(0.0)  # rate 0: never, whatever the draw


@pytest.mark.parametrize("limit", ["answer", "request"])
def test_a_long_answer_or_request_is_not_sampled(fresh: Bed, limit: str) -> None:
    checker = SpotChecker(fresh.report)
    if limit == "answer":
        checker.max_answer_bytes = 64  # an embeddings answer here is ~600 bytes
    else:
        checker.max_request_bytes = 200
    spotcheck.set_checker(checker)
    post(fresh, "/v1/embeddings", json={"model": "e", "input": ["x" * 300]})
    checker.max_answer_bytes = checker.max_request_bytes = 2**20
    body = json.dumps({"model": "e", "input": ["beta"]}).encode()
    post(fresh, "/v1/embeddings", content=body, headers={"Content-Type": "application/json"})
    (verdict,) = verdicts(fresh, 1)  # one worker, in order: an earlier sample would have been checked first
    assert verdict["passed"] and verdict["request_sha256"] == hashlib.sha256(body).hexdigest()
    assert len(fresh.core.calls) == 1
    assert checker.counts == {(EDGE, "embeddings", "oversize"): 1, (EDGE, "embeddings", "passed"): 1}


def test_a_full_queue_drops_samples_and_never_delays_the_client(fresh: Bed) -> None:
    """One check at a time, one sample queued: with the core holding the first re-run, the second waits in
    the queue and the third is dropped; every client got its answer meanwhile."""
    checker = SpotChecker(fresh.report, queue_size=1)
    spotcheck.set_checker(checker)
    fresh.core.gate.clear()
    try:
        for word in ("one", "two", "three"):
            r = post(fresh, "/v1/embeddings", json={"model": "e", "input": [word]})
            assert r.json() == embeddings_answer([word])
        wait_for(
            lambda: checker.counts[(EDGE, "embeddings", "dropped")] == 1, timeout=10, what="a dropped sample"
        )
        assert fresh.reports.received == []  # the first check still waits on the core
    finally:
        fresh.core.gate.set()
    got = verdicts(fresh, 2)
    assert [v["passed"] for v in got] == [True, True]
    assert checker.counts[(EDGE, "embeddings", "passed")] == 2


def test_a_report_the_coordinator_refuses_is_a_log_line(fresh: Bed, caplog: pytest.LogCaptureFixture) -> None:
    def refused(r: SpotCheckReport) -> None:
        raise httpx.ConnectError("coordinator down")

    checker = SpotChecker(refused)
    spotcheck.set_checker(checker)
    post(fresh, "/v1/embeddings", json={"model": "e", "input": ["alpha"]})
    wait_for(lambda: checker.counts[(EDGE, "embeddings", "passed")] == 1, timeout=20, what="the check")
    wait_for(lambda: "verdict not reported" in caplog.text, timeout=5, what="the log line")


def test_count_tokens_passes_a_flagged_re_run_uncounted() -> None:
    m, previous = quota.Meter(None), quota._meter  # the bed's meter, when it runs: put back after
    quota.set_meter(m)
    client = ClientKeyVerifier(lambda: KEYRING)
    client.refresh()
    identity = client.verify(f"Bearer {PLAIN.token}")
    app = quota.CountTokens(JSONResponse(chat_answer("hi")))

    async def call(flagged: bool) -> None:
        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
        scope["state"] = {"client": identity}
        if flagged:
            scope[quota.SPOT_CHECK] = True
        await spotcheck.call_app(app, scope, b"{}")

    try:
        asyncio.run(call(flagged=True))
        assert m._count(PLAIN.id, {})["tokens_out"] == 0
        asyncio.run(call(flagged=False))
        assert m._count(PLAIN.id, {})["tokens_out"] == 7
    finally:
        quota.set_meter(previous)


CHAT = {"model": "m", "messages": [{"role": "user", "content": "Capital of France?"}]}
COMPLETION = {"model": "m", "prompt": "Capital of France?\n"}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("honest", [True, False])
def test_a_streamed_answer_is_judged_as_the_same_answer_not_streamed(
    fresh: Bed, path: str, honest: bool
) -> None:
    fresh.edge.honest = honest
    request = CHAT if path == "/v1/chat/completions" else COMPLETION
    text = HONEST_REPLY if honest else GARBAGE_REPLY
    post(fresh, path, json=request)
    streamed = json.dumps({**request, "stream": True, "stream_options": {"include_usage": True}}).encode()
    r = post(fresh, path, content=streamed, headers={"Content-Type": "application/json"})
    assert r.content == b"".join(events(text, chat=request is CHAT))  # the edge's bytes, as it sent them
    plain, stream = verdicts(fresh, 2)  # one worker, in order
    assert (stream["passed"], stream["score"]) == (plain["passed"], plain["score"])
    assert stream["passed"] is honest
    assert stream["score"] == pytest.approx(-0.4 if honest else -9.0)
    assert stream["request_sha256"] == hashlib.sha256(streamed).hexdigest()
    if not honest:  # the failed sample shows the answer put back together, not its events
        (choice,) = json.loads(stream["sample"]["edge_answer"])["choices"]
        assert (choice["message"]["content"] if request is CHAT else choice["text"]) == text
        assert choice["finish_reason"] == "stop"
    # the core scored one whole answer: nothing of the client's stream asked of it
    for call in fresh.core.calls:
        scoring = json.loads(call["body"])
        assert scoring["stream"] is False and "stream_options" not in scoring, scoring
    assert fresh.core.calls[0]["body"] == fresh.core.calls[1]["body"]


def test_a_streamed_answer_the_api_could_not_send_fails(fresh: Bed) -> None:
    whole = b"".join(events(HONEST_REPLY, chat=True))
    streamed = {**CHAT, "stream": True}
    for answer in (
        whole.removesuffix(b"data: [DONE]\n\n"),  # ended cleanly without [DONE]: the API always sends it
        b'data: {"choices": [{"index": 0, "delta": {"content": "Paris"}}]}\n\ndata: Paris\n\ndata: [DONE]\n\n',
        b'data: {"id": "x"}\n\ndata: [DONE]\n\n',
        b'{"choices": [{"message": {"content": "Paris"}}]}\ndata: [DONE]\n',  # no chunk at all
        # a second choice: clients read the first by position, the one judged must be it
        whole.replace(
            b'"choices": [{"index": 0, "delta": {"content": "The',
            b'"choices": [{"index": 1, "delta": {"content": "The',
        ),
        b'data: {"choices": [{"index": 0, "delta": {"content": "Paris", "tool_calls": 1}}]}\n\ndata: [DONE]\n\n',
    ):
        fresh.edge.answer = (200, answer)
        assert post(fresh, "/v1/chat/completions", json=streamed).content == answer  # as the edge sent it
    got = verdicts(fresh, 6)
    assert [(v["passed"], v["score"]) for v in got] == [(False, spotcheck.LOGPROB_FLOOR)] * 6
    assert got[0]["sample"]["edge_answer"].startswith(
        'data: {"id": "cmpl-1"'
    )  # as sent: it could not be read
    assert got[2]["sample"]["edge_answer"].startswith('data: {"id": "x"}')
    checker = spotcheck.checker()
    assert checker.counts == {(EDGE, "llm", "failed"): 6}  # failed, not a traceback in the worker
    assert fresh.core.calls == []  # nothing of these was worth a re-run


def test_a_stream_the_assembler_cannot_read_fails_not_a_traceback(
    fresh: Bed, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreadable(self: spotcheck.StreamAssembler, data: bytes) -> None:
        raise KeyError("index")  # a shape the assembler does not foresee: read on the relay path

    monkeypatch.setattr(spotcheck.StreamAssembler, "_event", unreadable)
    r = post(fresh, "/v1/chat/completions", json={**CHAT, "stream": True})
    assert r.content == b"".join(events(HONEST_REPLY, chat=True))  # the client's relay never saw it
    (verdict,) = verdicts(fresh, 1)
    assert (verdict["passed"], verdict["score"]) == (False, spotcheck.LOGPROB_FLOOR)
    assert "KeyError" in verdict["sample"]["core_answer"]


def test_a_stream_is_told_by_its_content_type_and_chat_by_the_path(fresh: Bed) -> None:
    """vLLM streams for `"stream": 1` too; a completions request carrying a `messages` key is still one."""
    post(fresh, "/v1/completions", json=COMPLETION)
    request = {**COMPLETION, "messages": CHAT["messages"], "stream": 1}
    r = post(fresh, "/v1/completions", json=request)
    assert r.headers["content-type"].startswith("text/event-stream")
    plain, stream = verdicts(fresh, 2)
    assert stream["passed"] and (stream["score"], plain["score"]) == (
        pytest.approx(-0.4),
        pytest.approx(-0.4),
    )
    assert fresh.core.calls[0]["body"] == fresh.core.calls[1]["body"]  # scored as the completion it is


def test_a_batch_of_prompts_streamed_is_skipped_before_the_stream_is_read(fresh: Bed) -> None:
    """A list prompt: vLLM streams one choice per prompt (honest indexes 0 and 1): skipped, not failed."""
    fresh.edge.answer = (
        200,
        sse(
            {"choices": [{"index": 0, "text": "Paris", "finish_reason": None}]},
            {"choices": [{"index": 1, "text": "Rome", "finish_reason": None}]},
        ),
    )
    post(fresh, "/v1/completions", json={**COMPLETION, "prompt": ["France?", "Italy?"], "stream": True})
    checker = spotcheck.checker()
    wait_for(lambda: checker.counts.total() == 1, timeout=20, what="the stream's outcome")
    assert checker.counts == {(EDGE, "llm", "skipped"): 1}


def padded(stream: list[bytes], padding: bytes, total: int) -> bytes:
    """`stream`'s events with `padding` between them, repeated to over `total` bytes in all."""
    per_gap = total // (len(padding) * (len(stream) - 1)) + 1
    return (padding * per_gap).join(stream)


PADDING = b": " + b"x" * 1000 + b"\n\n" + b"\n\n" + b"event: ping\nid: 7\nretry: 10\n\n"  # cost nothing


@pytest.mark.parametrize("honest", [True, False])
def test_a_stream_padded_with_comments_and_keep_alives_is_judged_not_oversize(
    fresh: Bed, honest: bool
) -> None:
    """The copy is bounded by the answer the client got, not by the stream's bytes: 2 MiB of comments,
    keep-alives and other fields (8x the answer's cap) between the events change nothing."""
    text = HONEST_REPLY if honest else GARBAGE_REPLY
    answer = padded(events(text, chat=True), PADDING, 2 * 2**20)
    assert len(answer) > 2 * 2**20
    fresh.edge.answer = (200, answer)
    assert post(fresh, "/v1/chat/completions", json={**CHAT, "stream": True}).content == answer
    (verdict,) = verdicts(fresh, 1)
    assert verdict["passed"] is honest
    assert verdict["score"] == pytest.approx(-0.4 if honest else -9.0)
    if not honest:  # the failed sample shows the answer put back together, not the padding
        (choice,) = json.loads(verdict["sample"]["edge_answer"])["choices"]
        assert choice["message"]["content"] == text
    assert spotcheck.checker().counts == {(EDGE, "llm", "passed" if honest else "failed"): 1}


EMPTY_CHUNK = b'data: {"choices": [{"index": 0, "delta": {}}]}\n\n'


def test_a_stream_padded_with_empty_chunks_fails_as_malformed(fresh: Bed) -> None:
    """Chunks that carry nothing, past what honest vLLM sends (EMPTY_CHUNKS and EMPTY_PER_CHUNK per chunk
    carrying something), fail the check and are reported; up to the bound the stream is judged."""
    stream = events(HONEST_REPLY, chat=True)
    carrying = len(words(HONEST_REPLY)) + 2  # the words, the finish chunk, the usage chunk
    bound = spotcheck.EMPTY_CHUNKS + spotcheck.EMPTY_PER_CHUNK * carrying - 1  # the role chunk is one
    at_bound = b"".join(stream[:-1]) + EMPTY_CHUNK * bound + stream[-1]
    for answer in (at_bound, padded(stream, EMPTY_CHUNK, 2**20)):
        fresh.edge.answer = (200, answer)
        assert post(fresh, "/v1/chat/completions", json={**CHAT, "stream": True}).content == answer
    at, over = verdicts(fresh, 2)
    assert at["passed"]
    assert (over["passed"], over["score"]) == (False, spotcheck.LOGPROB_FLOOR)
    assert "carry nothing" in over["sample"]["core_answer"]
    assert over["sample"]["edge_answer"].startswith('data: {"id": "cmpl-1"')  # as sent: not put together
    one_more = b"".join(stream[:-1]) + EMPTY_CHUNK * (bound + 1) + stream[-1]
    with pytest.raises(spotcheck.Malformed, match="carry nothing"):
        spotcheck.reassemble(CHAT, one_more, chat=True)
    assert len(fresh.core.calls) == 1  # the padded stream was never worth a re-run


def test_a_stream_whose_answer_is_over_the_cap_is_oversize(fresh: Bed) -> None:
    """The cap is the answer's (as a non-streamed one's), whatever the stream's bytes: the text's bytes."""
    size = len(HONEST_REPLY.encode())
    checker = SpotChecker(fresh.report, max_answer_bytes=size)  # the stream's events: several times that
    spotcheck.set_checker(checker)
    post(fresh, "/v1/chat/completions", json={**CHAT, "stream": True})
    (verdict,) = verdicts(fresh, 1)
    assert verdict["passed"]
    checker.max_answer_bytes = size - 1
    r = post(fresh, "/v1/chat/completions", json={**CHAT, "stream": True})
    assert r.content == b"".join(events(HONEST_REPLY, chat=True))  # the client got it all the same
    wait_for(lambda: checker.counts.total() == 2, timeout=20, what="the second stream's outcome")
    assert checker.counts == {(EDGE, "llm", "passed"): 1, (EDGE, "llm", "oversize"): 1}
    assert len(fresh.reports.received) == 1


def test_the_assembler_counts_tool_calls_and_bounds_a_line() -> None:
    call = {"index": 0, "id": "c", "function": {"name": "f", "arguments": "x" * 100}}
    tools = sse(*[delta(tool_calls=[{**call, "index": i}]) for i in range(10)])
    assembler = spotcheck.StreamAssembler(chat=True, max_answer_bytes=1000)
    assembler.feed(tools)
    assert assembler.oversize and assembler.tool_calls == {}  # 10 calls of 100 bytes of arguments and more
    # many tool calls with no arguments cost their own shape: not a way around the cap either
    many = sse(*[delta(tool_calls=[{"index": i}]) for i in range(100)])
    assembler = spotcheck.StreamAssembler(chat=True, max_answer_bytes=1000)
    assembler.feed(many)
    assert assembler.oversize
    line = sse(delta("Paris" * 100))
    assembler = spotcheck.StreamAssembler(chat=True, max_line_bytes=100)
    for i in range(0, len(line), 30):  # one data line over the line buffer's bound, in pieces
        assembler.feed(line[i : i + 30])
    assert assembler.oversize and len(assembler._line) == 0


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_a_stream_split_at_every_byte_reassembles_to_the_same_answer(eol: bytes) -> None:
    whole = b"".join(events(HONEST_REPLY, chat=True)).replace(b"\n", eol)
    expected = spotcheck.reassemble(CHAT, whole, chat=True)
    assert expected["choices"][0]["message"]["content"] == HONEST_REPLY
    for cut in range(len(whole) + 1):
        assembler = spotcheck.StreamAssembler(chat=True)
        assembler.feed(whole[:cut])
        assembler.feed(whole[cut:])
        assembler.close()
        assert assembler.answer(CHAT) == expected, cut
    assembler = spotcheck.StreamAssembler(chat=True)
    for i in range(len(whole)):
        assembler.feed(whole[i : i + 1])
    assert assembler.answer(CHAT) == expected
    # the last line without its line end: read at the end of the stream
    assert spotcheck.reassemble(CHAT, whole.removesuffix(eol * 2), chat=True) == expected


def test_the_tee_keeps_no_raw_copy_of_a_stream() -> None:
    """5 MiB of padding (comments, keep-alives, other fields, one comment line spanning many messages) goes
    through the Tee: the client gets every byte, the held state stays a few KiB, the answer is put together."""
    checker = SpotChecker(None)
    stream = spotcheck.StreamAssembler(chat=True, max_answer_bytes=1024, max_line_bytes=4096)
    sample = spotcheck.Sample(
        edge=EDGE, app=APP, kind="llm", scope={"path": "/v1/chat/completions"}, body=b"{}", stream=stream
    )
    received: list[bytes] = []

    async def client(message: dict[str, Any]) -> None:
        received.append(message.get("body", b""))

    tee = spotcheck.Tee(checker, sample, client)
    long_comment = [b": " + b"y" * 2**20, b"y" * 2**20, b"\n\n"]  # 2 MiB in one line, 3 messages
    padding = [PADDING * 64] * 48 + long_comment  # ~3 MiB + 2 MiB
    messages = [*padding[:20], *events(HONEST_REPLY, chat=True)[:4], *padding[20:]]
    messages += events(HONEST_REPLY, chat=True)[4:]
    assert sum(map(len, messages)) > 5 * 2**20

    def held() -> int:
        return len(tee._parts) + len(stream._line) + sum(len(t) for t in stream.text)

    async def relay() -> None:
        await tee.send({"type": "http.response.start", "status": 200, "headers": []})
        for i, body in enumerate(messages):
            await tee.send({"type": "http.response.body", "body": body, "more_body": i < len(messages) - 1})
            assert held() <= spotcheck.PART_BYTES + 1024, i

    asyncio.run(relay())
    assert b"".join(received) == b"".join(messages)
    assert not sample.too_big and len(tee._parts) == spotcheck.PART_BYTES
    assert stream.answer(CHAT)["choices"][0]["message"]["content"] == HONEST_REPLY


def test_streamed_embeddings_are_unaffected(fresh: Bed) -> None:
    post(fresh, "/v1/embeddings", json={"model": "e", "input": ["alpha"], "stream": True})
    (verdict,) = verdicts(fresh, 1)
    assert verdict["kind"] == "embeddings" and verdict["passed"]


def sse(*chunks: Any, done: bytes = b"data: [DONE]\n\n") -> bytes:
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + done


def delta(content: Any = None, index: int = 0, **extra: Any) -> dict[str, Any]:
    return {"choices": [{"index": index, "delta": {"content": content, **extra}, "finish_reason": None}]}


def test_reassemble_reads_a_stream_tolerantly() -> None:
    stream = (
        b": ping\r\n\r\nevent: message\r\nid: 1\r\n"  # comments and other fields: skipped; CRLF lines
        + b'data:{"choices": [{"index": 0, "delta": {"role": "assistant"}}]}\r\n\r\n'  # no space after data:
        + sse(
            delta("Par"),
            delta("is"),
            {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]},
            {"choices": [], "usage": {"completion_tokens": 2}},
            done=b"data:[DONE]\n\n"
            + b'data: {"choices": [{"index": 0, "delta": {"content": " after"}}]}\n\n',
        )
    )
    assert spotcheck.reassemble(CHAT, stream, chat=True) == {
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Paris"}, "finish_reason": "length"}
        ]
    }
    completions = sse(
        {"choices": [{"index": 0, "text": "Par", "finish_reason": None}]},
        {"choices": [{"index": 0, "text": "is.", "finish_reason": "stop"}]},
    )
    assert spotcheck.reassemble(COMPLETION, completions, chat=False) == {
        "choices": [{"index": 0, "text": "Paris.", "finish_reason": "stop"}]
    }
    reassembled = spotcheck.reassemble(COMPLETION, completions, chat=False)
    assert spotcheck.completion_text(reassembled, chat=False) == "Paris."
    # an error event after some text ends the stream: the text before it is judged (the client got it)
    errored = sse(delta("Par"), delta("is"), {"error": {"message": "the engine died"}}, delta(" Rome"))
    (choice,) = spotcheck.reassemble(CHAT, errored, chat=True)["choices"]
    assert choice["message"]["content"] == "Paris"
    # tool calls, merged by index: with no text, nothing to judge (as a non-streamed answer)
    call = {"index": 0, "id": "call-1", "type": "function", "function": {"name": "f", "arguments": '{"a"'}}
    tools = sse(delta(tool_calls=[call]), delta(tool_calls=[{"index": 0, "function": {"arguments": ": 1}"}}]))
    (choice,) = spotcheck.reassemble(CHAT, tools, chat=True)["choices"]
    assert choice["message"]["tool_calls"] == [
        {"id": "call-1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    ]
    with pytest.raises(spotcheck.Unjudgeable):
        spotcheck.completion_text({"choices": [choice]}, chat=True)


@pytest.mark.parametrize(
    ("stream", "request_", "why"),
    [
        (b"data: not json\n\ndata: [DONE]\n\n", CHAT, spotcheck.Malformed),
        (b"data: [1, 2]\n\ndata: [DONE]\n\n", CHAT, spotcheck.Malformed),
        (sse({"id": "x"}), CHAT, spotcheck.Malformed),  # no choices
        (sse({"choices": []}), CHAT, spotcheck.Malformed),  # never a first choice
        (sse({"choices": ["Paris"]}), CHAT, spotcheck.Malformed),
        (sse({"choices": [{"index": "0", "text": "Paris"}]}), COMPLETION, spotcheck.Malformed),
        (sse({"choices": [{"index": 0, "text": "Paris"}]}), CHAT, spotcheck.Malformed),  # no delta
        (sse({"choices": [{"index": 0, "text": 3}]}), COMPLETION, spotcheck.Malformed),
        (sse({"choices": [{"index": 0, "delta": {"tool_calls": ["f"]}}]}), CHAT, spotcheck.Malformed),
        (sse(delta("Paris", tool_calls=1)), CHAT, spotcheck.Malformed),  # not a list
        (sse(delta("Paris", tool_calls=True)), CHAT, spotcheck.Malformed),
        (sse(delta("Paris", tool_calls={"index": 0})), CHAT, spotcheck.Malformed),
        # n is 1: a choice other than the first, or a chunk of several, is not the API's
        (sse(delta("Paris"), delta("ignored", index=1)), CHAT, spotcheck.Malformed),
        (sse({"choices": [delta("a")["choices"][0], delta("b")["choices"][0]]}), CHAT, spotcheck.Malformed),
        (b"", CHAT, spotcheck.Malformed),  # no [DONE]: the API always sends it
        (sse({"choices": [{"index": 0, "text": "Paris"}]}, done=b""), COMPLETION, spotcheck.Malformed),
        (sse({"choices": [{"index": 0, "text": "Paris"}]}), {**COMPLETION, "n": 2}, spotcheck.Unjudgeable),
        (sse({"error": {"message": "the engine died"}}), CHAT, spotcheck.Unjudgeable),
        (sse({"object": "error", "message": "the engine died"}), CHAT, spotcheck.Unjudgeable),
        (sse(delta(""), {"error": {"message": "died"}}, done=b""), CHAT, spotcheck.Unjudgeable),  # no text
    ],
)
def test_reassemble_refuses_what_the_api_could_not_send(
    stream: bytes, request_: dict[str, Any], why: type
) -> None:
    with pytest.raises(why):
        spotcheck.reassemble(request_, stream, chat="messages" in request_)


def test_the_scoring_request_of_a_streamed_request_is_not_streamed() -> None:
    for request in (CHAT, COMPLETION):
        scoring = spotcheck.scoring_request(
            {**request, "stream": True, "stream_options": {"include_usage": True}},
            "Paris.",
            chat=request is CHAT,
        )
        assert scoring["stream"] is False and "stream_options" not in scoring
    spotcheck.calibrated({**CHAT, "stream": True, "stream_options": {"include_usage": True}})


def test_an_llm_answer_out_of_range_or_short_is_skipped_and_a_malformed_one_fails(fresh: Bed) -> None:
    chat = {"model": "m", "messages": [{"role": "user", "content": "Capital of France?"}]}
    fresh.edge.honest = False  # garbage, but asked at temperature 2: what an honest edge sends too
    post(fresh, "/v1/chat/completions", json={**chat, "temperature": 2.0})
    fresh.edge.answer = (200, json.dumps(chat_answer("Paris.")).encode())  # 2 tokens: too few to judge
    post(fresh, "/v1/chat/completions", json=chat)
    for status, answer in ((200, b"not json"), (200, b'{"choices": []}'), (203, b'{"choices": ["x"]}')):
        fresh.edge.answer = (status, answer)
        post(fresh, "/v1/chat/completions", status=status, json=chat)
    got = verdicts(fresh, 3)
    assert [(v["passed"], v["score"], v["sample"]["edge_answer"]) for v in got] == [
        (False, spotcheck.LOGPROB_FLOOR, "not json"),
        (False, spotcheck.LOGPROB_FLOOR, '{"choices": []}'),
        (False, spotcheck.LOGPROB_FLOOR, '{"choices": ["x"]}'),
    ]
    checker = spotcheck.checker()
    assert checker.counts == {(EDGE, "llm", "skipped"): 2, (EDGE, "llm", "failed"): 3}
    assert len(fresh.core.calls) == 1  # the short answer's scoring only: the rest never reached the core


def test_a_deeply_nested_body_gets_an_answer_not_a_500(fresh: Bed) -> None:
    r = post(fresh, "/v1/chat/completions", status=400, content=b"[" * 100_000)  # the edge's own refusal
    assert "not JSON" in r.text
    assert spotcheck.checker().counts.total() == 0


def test_text_no_encoder_takes_fails_the_check_and_never_reaches_the_relay() -> None:
    """A lone surrogate (`\\ud800`: JSON allows it, UTF-8 does not; vLLM never sends one) in the text or a tool
    call's id: the stream is malformed; feeding it raises nothing (the client's relay calls feed)."""
    for chunk in (delta("\ud800"), delta(tool_calls=[{"index": 0, "id": "\ud800", "function": {}}])):
        assembler = spotcheck.StreamAssembler(chat=True, max_answer_bytes=1000)
        assembler.feed(sse(delta("Paris"), chunk))
        assembler.close()
        with pytest.raises(spotcheck.Malformed, match="UnicodeEncodeError"):
            assembler.answer(CHAT)


def test_a_long_stop_string_allows_as_many_empty_chunks_first() -> None:
    """vLLM holds back text that may begin a stop string: an honest stream asked to stop at a 70-character
    string may open with that many empty chunks. Without the allowance they would read as padding."""
    stop = "x" * 70
    stream = sse(*[delta("") for _ in range(60)], delta("Paris is the capital."), done=b"data: [DONE]\n\n")
    body = json.dumps({**CHAT, "stop": ["end", stop]}).encode()
    assert spotcheck.longest_stop(body) == 70
    assert spotcheck.longest_stop(b"not json") == 0 and spotcheck.longest_stop(b'{"stop": "ab"}') == 2
    honest = spotcheck.StreamAssembler(chat=True, held_back=spotcheck.longest_stop(body))
    honest.feed(stream)
    assert honest.answer(CHAT)["choices"][0]["message"]["content"] == "Paris is the capital."
    padded = spotcheck.StreamAssembler(chat=True)
    padded.feed(stream)
    with pytest.raises(spotcheck.Malformed, match="carry nothing"):
        padded.answer(CHAT)


def test_chunks_that_carry_only_other_fields_end_the_reading_as_oversize() -> None:
    """Chunks with a field that is not empty but no answer (`{"x": 1}`) are not padding the empty-chunk bound
    sees, yet each costs a json.loads on the relay: past one per byte of the answer cap (+ slack), the stream
    is oversize and read no further."""
    junk = {"choices": [{"index": 0, "delta": {"x": 1}}]}
    assembler = spotcheck.StreamAssembler(chat=True, max_answer_bytes=100)
    assembler.feed(sse(delta("Paris"), *[junk] * (100 + spotcheck.EVENTS_SLACK)))
    assert assembler.oversize and not assembler.reading


def test_the_edge_heads_upstream_reaches_the_verdict_and_never_the_client(fresh: Bed) -> None:
    """The edge head's HAProxy names the replica's address (rma_ray.upstream): the verdict carries it for the
    coordinator to name the donor; the client never sees it; a value not of that shape is dropped."""
    fresh.edge.upstream = "10.77.0.2:30001"
    r = post(fresh, "/v1/chat/completions", json=CHAT)
    assert UPSTREAM_HEADER not in r.headers
    (v,) = verdicts(fresh, 1)
    assert v["upstream"] == "10.77.0.2:30001" and v["passed"]
    fresh.reports.received.clear()
    fresh.edge.upstream = "10.77.0.2:30001; x"
    post(fresh, "/v1/chat/completions", json=CHAT)
    (v,) = verdicts(fresh, 1)
    assert v["upstream"] is None
