"""Vision settings (`RMA_VISION_*`): which backend answers POST /api/inference/vision, where it may be placed, and the
request limits.

- `ollama` (default): a small Serve deployment that calls the Ollama server running beside its node (the official
  `ollama` client; the node's `OLLAMA_HOST`, else http://127.0.0.1:11434). It is placed only on nodes labelled
  `rma.io/ollama=true` (a donor whose probe found a local Ollama with a vision model) of the tiers in `tiers`.
- `vllm`: a multimodal catalog model (`deployments.llm.catalog`, `vision=True`) served by ray.serve.llm's
  `LLMServer` on a gpu-tier node, chosen by `model` or by `gpu_memory_mb`.

On an edge cluster (`edge`, the edge profile: DESIGN.md, "Trust domains") the same two apps run on the edge's
untrusted donors: the front checks the edge credential instead of client keys and runs on the edge's donors
(never its head); the backend is placed as on the core, by the same labels, among the edge's donors.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from deployments.vision.request import Limits
from rma_ray.tiers import LABEL_OLLAMA, LABEL_TIER, TRUSTED_NODES

VISION_APP = "rma-vision"
BACKEND_APP = "rma-vision-backend"
VISION_ROUTE_PREFIX = (
    "/api/inference/vision"  # longer than rma-inference's /api/inference: Serve routes it here
)
FRONT_DEPLOYMENT = "VisionGateway"
OLLAMA_DEPLOYMENT = "OllamaVision"


class VisionSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RMA_VISION_", extra="ignore")

    backend: Literal["ollama", "vllm"] = "ollama"
    model: str | None = Field(
        default=None,
        description="ollama: a model name (default: the node's first vision "
        "model); vllm: a vision catalog model_id",
    )
    ollama_host: str | None = Field(
        default=None, description="default: each node's OLLAMA_HOST or 127.0.0.1:11434"
    )
    tiers: str = Field(default="gpu", description="node tiers that may host the backend (comma-separated)")
    num_replicas: int = Field(default=1, ge=1)
    max_ongoing_requests: int = Field(
        default=4, ge=1, description="per backend replica (Ollama runs a few at once)"
    )
    timeout_s: float = Field(default=180, gt=0, description="one model call")
    keep_alive: str | None = Field(
        default=None, description="Ollama keep_alive, e.g. '30m' (default: Ollama's)"
    )
    gpu_memory_mb: int = Field(
        default=0, ge=0, description="vllm: the smallest gpu-tier GPU (picks the model)"
    )
    accelerator_type: str | None = None
    gpu_memory_utilization: float = Field(default=0.85, gt=0.1, le=0.98)
    max_image_bytes: int = Field(default=10 * 2**20, ge=1024)
    max_pixels: int = Field(default=7680 * 4320, ge=64)
    max_prompt_chars: int = Field(default=8000, ge=1)
    max_tokens: int = Field(default=2048, ge=1)
    edge: str | None = Field(
        default=None,
        description="serve it on this edge cluster (the edge profile): the front checks the edge credential "
        "instead of client keys; both apps run on the edge's donors, never its head",
    )
    edge_coordinator_url: str | None = Field(
        default=None, description="with `edge`: the coordinator whose edge keys (JWKS) the front reads"
    )

    def front_selector(self) -> dict[str, str]:
        """Where the front runs: it sees every client's key on the core (trusted nodes only, the head is one);
        on an edge (no client key reaches it) the edge's donors."""
        if self.edge:
            return {LABEL_TIER: "in(service,gpu)"}
        return dict(TRUSTED_NODES)

    def edge_env(self) -> dict[str, str]:
        """The front's env vars that put it in edge mode (none on the core)."""
        from deployments.gateway.edge_gate import edge_env

        return edge_env(self.edge, self.edge_coordinator_url, "edge vision")

    def limits(self) -> Limits:
        return Limits(
            max_image_bytes=self.max_image_bytes,
            max_pixels=self.max_pixels,
            max_prompt_chars=self.max_prompt_chars,
            max_tokens=self.max_tokens,
        )

    def tier_list(self) -> list[str]:
        tiers = [t.strip() for t in self.tiers.split(",") if t.strip()]
        if not tiers:
            raise ValueError("RMA_VISION_TIERS names no tier")
        return tiers

    def ollama_selector(self) -> dict[str, str]:
        """Ray label selector of the Ollama backend's replicas."""
        tiers = self.tier_list()
        return {LABEL_OLLAMA: "true", LABEL_TIER: tiers[0] if len(tiers) == 1 else f"in({','.join(tiers)})"}

    def vllm_entry(self) -> Any:
        from deployments.llm.catalog import NoModelFits, by_id, choose_vision

        if self.model:
            entry = by_id(self.model)
            if not entry.vision:
                raise NoModelFits(
                    f"model {self.model!r} does not take images; pick a catalog entry with vision"
                )
            return entry
        return choose_vision(self.gpu_memory_mb)

    def vllm_config(self) -> Any:
        """ray.serve.llm's LLMConfig of the multimodal model (the LLM's own builder, gpu tier)."""
        from deployments.llm.config import LLMSettings, build_llm_config

        entry = self.vllm_entry()
        # the vision model's own values: RMA_LLM_MODEL_SOURCE / RMA_LLM_CATALOG are the chat model's, not this one's
        llm = LLMSettings(
            tier="gpu",
            model=entry.model_id,
            model_source=None,
            catalog=None,
            gpu_memory_mb=self.gpu_memory_mb,
            accelerator_type=self.accelerator_type,
            gpu_memory_utilization=self.gpu_memory_utilization,
            num_replicas=self.num_replicas,
        )
        return build_llm_config(llm)

    def vllm_deployment_name(self) -> str:
        """ray.serve.llm's deployment name for the model id (its builder's rule, as in deployments.llm.app)."""
        return "LLMServer:" + self.vllm_entry().model_id.replace("/", "--").replace(".", "_")

    def backend_deployment(self) -> str:
        return OLLAMA_DEPLOYMENT if self.backend == "ollama" else self.vllm_deployment_name()
