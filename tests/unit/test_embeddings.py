"""/v1/embeddings without Ray: OpenAI's request checks, the model's batch of requests (the real MiniLM from
the wheel, ~3 s to load), base64 as OpenAI encodes it, and the LLM app's model list with the embedding
model."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import numpy as np
import pytest

from deployments.embeddings import config
from deployments.embeddings.config import EmbeddingSettings
from deployments.embeddings.model import EmbeddingModel, parse_request, reply
from deployments.gateway.refusal import Refusal

MODEL = config.DEFAULT_MODEL


@pytest.fixture(scope="module")
def settings() -> EmbeddingSettings:
    return EmbeddingSettings(max_items=4, token_ids="model")


@pytest.fixture(scope="module")
def model(settings: EmbeddingSettings) -> EmbeddingModel:
    return EmbeddingModel(settings)


@pytest.mark.parametrize(
    ("body", "status", "param", "words"),
    [
        ({"input": "hi", "model": "text-embedding-3-small"}, 404, "model", "GET /v1/models"),
        ({"input": [], "model": MODEL}, 400, "input", "at least one"),
        ({"input": ["a", "  "], "model": MODEL}, 400, "input", "input[1] is empty"),
        ({"input": ["a"] * 5, "model": MODEL}, 400, "input", "at most 4"),
        ({"input": [1.5], "model": MODEL}, 400, "input", "token ids"),
        ({"input": {"text": "hi"}, "model": MODEL}, 400, "input", "list of strings"),
        ({"input": "hi"}, 400, "model", "'model'"),
        ({"input": "hi", "model": MODEL, "dimensions": 128}, 400, "dimensions", "cannot shorten"),
        (
            {"input": "hi", "model": MODEL, "encoding_format": "int8"},
            400,
            "encoding_format",
            "'encoding_format'",
        ),
        ({"input": "hi", "model": MODEL, "temperature": 1}, 400, "temperature", "'temperature'"),
        ([1, 2], 400, None, "JSON object"),
    ],
)
def test_bad_requests_are_openai_errors_that_say_what_to_fix(
    settings: EmbeddingSettings, body: Any, status: int, param: str | None, words: str
) -> None:
    with pytest.raises(Refusal) as exc:
        parse_request(body, settings.entry(), settings)
    err = exc.value
    assert (err.status, err.param) == (status, param) and words in err.message, err.message
    assert err.openai_body()["error"]["type"] == "invalid_request_error"


def test_dimensions_equal_to_the_model_s_own_and_matryoshka_prefixes(settings: EmbeddingSettings) -> None:
    ok = parse_request({"input": "hi", "model": MODEL, "dimensions": 384}, settings.entry(), settings)
    assert ok.dimensions == 384
    gpu = EmbeddingSettings(model="mxbai-embed-large-v1")
    assert (
        parse_request(
            {"input": "hi", "model": "mxbai-embed-large-v1", "dimensions": 256}, gpu.entry(), gpu
        ).dimensions
        == 256
    )
    with pytest.raises(Refusal, match="at most 1024"):
        parse_request({"input": "hi", "model": "mxbai-embed-large-v1", "dimensions": 2048}, gpu.entry(), gpu)
    assert gpu.selector() == {"rma.io/tier": "gpu"}
    assert settings.selector() == {"rma.io/tier": "in(service,head)", "rma.io/trusted": "true"}


def test_a_batch_of_requests_answers_each_one_on_its_own(model: EmbeddingModel) -> None:
    ids = model.tokenizer("the cat sat", add_special_tokens=False)["input_ids"]
    long = "word " * 400
    out = model.embed_many(
        [
            {"input": ["the cat sat", "a dog"]},
            {"input": [ids]},  # token ids of the model's own tokenizer
            {"input": [long]},  # over the model's 256 tokens: refused, the others still answered
            {"input": [long], "truncate": True},  # RAG's chunks: cut as before
            {"input": [[10**9]]},
            {"input": ["x"], "dimensions": 384},
        ]
    )
    a, b = out[0]["vectors"]
    assert out[0]["vectors"].shape == (2, 384) and out[0]["vectors"].dtype == np.float32
    assert abs(float(np.linalg.norm(a)) - 1) < 1e-5 and float(a @ b) < 0.9
    assert float(out[1]["vectors"][0] @ a) > 0.999 and out[1]["tokens"] == out[0]["tokens"] - 4
    assert out[0]["tokens"] == 5 + 4  # [CLS] the cat sat [SEP] + [CLS] a dog [SEP]
    err = out[2]["error"]
    assert err.status == 400 and err.code == "context_length_exceeded" and "at most 256" in err.message
    assert out[3]["tokens"] == 256 and out[3]["vectors"].shape == (1, 384)
    assert out[4]["error"].status == 400 and "vocabulary" in out[4]["error"].message
    assert out[5]["vectors"].shape == (1, 384)


def test_token_ids_without_a_tokenizer_to_read_them_are_a_400_that_says_to_send_text(
    model: EmbeddingModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where tiktoken cannot load cl100k_base (no network, no cache), the ids LangChain's default sends are
    refused, not misread as this model's."""
    from deployments.embeddings import model as model_module

    monkeypatch.setattr(model_module, "_cl100k", lambda timeout_s: None)
    refusing = EmbeddingModel(EmbeddingSettings(token_ids="auto"), model=model.model)
    assert refusing.token_ids == "refuse"
    err = refusing.embed_many([{"input": [[101, 2000]]}, {"input": ["text is fine"]}])
    assert "check_embedding_ctx_length=False" in err[0]["error"].message and err[1]["vectors"].shape == (
        1,
        384,
    )


def test_the_reply_is_openai_s_in_float_and_base64(
    model: EmbeddingModel, settings: EmbeddingSettings
) -> None:
    vectors = model.embed_many([{"input": ["hello", "world"]}])[0]["vectors"]
    for fmt in ("float", "base64"):
        req = parse_request(
            {"input": ["hello", "world"], "model": MODEL, "encoding_format": fmt}, settings.entry(), settings
        )
        body = json.loads(json.dumps(reply(req, vectors, 6)))
        assert body["object"] == "list" and body["model"] == MODEL
        assert body["usage"] == {"prompt_tokens": 6, "total_tokens": 6}
        assert [d["index"] for d in body["data"]] == [0, 1]
        got = [
            np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
            if fmt == "base64"
            else np.asarray(d["embedding"], dtype=np.float32)
            for d in body["data"]
        ]
        assert np.allclose(np.stack(got), vectors)


def test_rag_s_own_embedder_and_the_model_agree(model: EmbeddingModel) -> None:
    """Outside Serve the RAG service falls back to its own copy of the model: the same vectors."""
    from deployments.embeddings.client import PoolEmbedder
    from deployments.services.rag import Embedder

    pool = PoolEmbedder(Embedder)
    assert not pool.shared
    text = "Refunds take five working days."
    mine = np.asarray(pool([text])[0])
    assert float(mine @ model.embed_many([{"input": [text]}])[0]["vectors"][0]) > 0.999


def _asgi_get(app: Any, path: str) -> tuple[int, Any]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    # as ClientKeyGate hands it to vLLM's app: the full path, the /v1 prefix taken off the root path
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/v1" + path,
        "root_path": "",
        "headers": [],
        "query_string": b"",
    }
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


def test_the_llm_s_model_list_adds_the_embedding_model_with_its_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi import FastAPI

    from deployments.embeddings.model import model_card
    from deployments.llm import models as llm_models

    vllm = FastAPI()

    @vllm.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "smollm2", "object": "model"}]}

    @vllm.get("/v1/models/{model}")
    async def one(model: str) -> Any:
        from fastapi.responses import JSONResponse

        if model == "smollm2":
            return {"id": "smollm2", "object": "model"}
        return JSONResponse({"error": {"message": "no"}}, status_code=404)

    card = model_card(config.by_id(MODEL))

    async def others() -> list[dict[str, Any]]:
        return [card]

    monkeypatch.setattr(llm_models, "other_models", others)
    app = llm_models.ModelCards(vllm)
    status, body = _asgi_get(app, "/models")
    assert status == 200
    assert [(m["id"], m["kind"]) for m in body["data"]] == [("smollm2", "chat"), (MODEL, "embedding")]
    assert body["data"][1]["dimensions"] == 384
    assert _asgi_get(app, f"/models/{MODEL}") == (200, card)
    assert _asgi_get(app, "/models/smollm2") == (200, {"id": "smollm2", "object": "model", "kind": "chat"})
    assert _asgi_get(app, "/models/gpt-17")[0] == 404
