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
from starlette.responses import JSONResponse, PlainTextResponse, Response
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
from rma_ray.wire import SpotCheckReport
from tests.support import ServerThread, wait_for
from tests.support.edge import EDGE, SERVICE_CREDENTIAL, Coordinator, jwk

APP = "rma-test"
PLAIN = credentials.mint(Kind.CLIENT)
KEYRING = {"keys": [{"id": PLAIN.id, "hash": PLAIN.hash, "name": "alice"}]}
ROUTES = (
    ("POST", re.compile(r"/v1/embeddings")),
    ("POST", re.compile(r"/v1/chat/completions")),
    ("POST", re.compile(r"/api/ocr")),
)
OCR_TEXT = "INVOICE 2026-12-05\nTotal due: 41.20 EUR"
HONEST_REPLY = "The capital of France is Paris."


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


def scored(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The core's answer to a scoring request, shaped as vLLM's (`prompt_logprobs`: null first, then one
    {token id: {logprob, rank, decoded_token}} per prompt token): words of the honest reply are likely."""
    words = re.findall(r"\S+\s*", " ".join(str(m["content"]) for m in messages))
    likely = set(HONEST_REPLY.split())
    entries: list[Any] = [None]
    for i, w in enumerate(words[1:]):
        lp = -0.4 if w.strip() in likely else -9.0
        entries.append({str(100 + i): {"logprob": lp, "rank": 1, "decoded_token": w}})
    return {**chat_answer("x"), "prompt_logprobs": entries}


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
                {"path": request.url.path, "client": client.key_id, "scope": dict(request.scope)}
            )
            if request.url.path == "/api/ocr":
                return JSONResponse({"content_type": "image/png", "text": OCR_TEXT})
            req = json.loads(body)
            if request.url.path == "/v1/embeddings":
                return JSONResponse(embeddings_answer(req["input"]))
            if req.get("continue_final_message"):
                return JSONResponse(scored(req["messages"]))
            return JSONResponse(chat_answer(HONEST_REPLY))

        # the answers' tokens as the LLM replica counts them (a re-run must pass uncounted)
        return quota.CountTokens(Starlette(routes=[Route(p.pattern, answer, methods=[m]) for m, p in ROUTES]))


@dataclass
class Edge:
    """An edge behind the real edge gate: `honest`, or not (other vectors, other text, garbage)."""

    honest: bool = True

    def app(self, verifier: EdgeCredentialVerifier) -> Any:
        async def answer(request: Request) -> Response:
            body = await request.body()
            if request.url.path == "/api/ocr":
                return JSONResponse(
                    {"content_type": "image/png", "text": OCR_TEXT if self.honest else "lorem"}
                )
            req = json.loads(body)
            if request.url.path == "/v1/embeddings":
                return JSONResponse(embeddings_answer(req["input"], seed=0 if self.honest else 1))
            return JSONResponse(chat_answer(HONEST_REPLY if self.honest else "zq xv wk pl mm"))

        gated = EdgeGate(
            Starlette(routes=[Route(p.pattern, answer, methods=[m]) for m, p in ROUTES]), verifier
        )

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] == "lifespan" or scope.get("path") == "/healthz":
                await Starlette(routes=[Route("/healthz", lambda r: PlainTextResponse("ok"))])(
                    scope, receive, send
                )
            else:
                await gated(scope, receive, send)

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
    bed.edge.honest = True
    yield bed
    bed.core.gate.set()


def post(bed: Bed, path: str, **kw: Any) -> httpx.Response:
    r = httpx.post(bed.url + path, headers={"Authorization": f"Bearer {PLAIN.token}"}, timeout=20, **kw)
    assert r.status_code == 200, r.text
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
    req = spotcheck.scoring_request(chat, "Paris.")
    assert req["messages"][-1] == {"role": "assistant", "content": "Paris."}
    assert req["continue_final_message"] and not req["add_generation_prompt"]
    assert (req["max_tokens"], req["prompt_logprobs"], req["model"]) == (1, 0, "m")
    assert spotcheck.scoring_request({"model": "m", "prompt": "Q: "}, "A")["prompt"] == "Q: A"
    with pytest.raises(spotcheck.Unjudgeable):
        spotcheck.scoring_request({"model": "m", "prompt": [1, 2, 3]}, "A")
    with pytest.raises(spotcheck.Unjudgeable):
        spotcheck.completion_text(chat, {"choices": [{"message": {"content": None, "tool_calls": []}}]})
    # the completion's tokens are the last ones of the prompt: only those count
    answer = {
        "prompt_logprobs": [
            None,
            {"7": {"logprob": -20.0, "decoded_token": "Capital"}},
            {"8": {"logprob": -3.0, "decoded_token": " Par"}},
            {"9": {"logprob": -1.0, "decoded_token": "is."}},
        ]
    }
    assert spotcheck.completion_logprobs(answer, " Paris.") == [-1.0, -3.0]
    assert spotcheck.llm_score(answer, " Paris.") == pytest.approx(-2.0)
    with pytest.raises(spotcheck.CoreFailed):
        spotcheck.completion_logprobs({"choices": [{}]}, "x")


def test_kinds_by_path() -> None:
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
    assert post(fresh, "/v1/chat/completions", json=chat).json() == chat_answer("zq xv wk pl mm")
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
    assert fresh.core.calls == [] and spotcheck.checker().counts.total() == 0


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
    post(fresh, "/v1/embeddings", json={"model": "e", "input": ["beta"]})
    (verdict,) = verdicts(fresh, 1)  # one worker, in order: an earlier sample would have been checked first
    assert verdict["passed"] and len(fresh.core.calls) == 1
    assert checker.counts.total() == 1


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
    m = quota.Meter(None)
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
        quota.set_meter(None)


def test_a_streamed_answer_is_not_sampled(fresh: Bed) -> None:
    chat = {"model": "m", "messages": [{"role": "user", "content": "Capital of France?"}]}
    post(fresh, "/v1/chat/completions", json={**chat, "stream": True})
    post(fresh, "/v1/embeddings", json={"model": "e", "input": ["beta"]})
    (verdict,) = verdicts(fresh, 1)  # one worker, in order: the streamed answer would have been checked first
    assert verdict["kind"] == "embeddings" and len(fresh.core.calls) == 1
