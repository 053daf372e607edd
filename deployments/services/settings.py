"""Settings of the services app, from `RMA_SERVICES_*` environment variables or passed to `build_app()`.

They travel to every replica as a constructor argument, so a test can place deployments with its own label
selectors and limits without touching the environment of the nodes."""

from __future__ import annotations

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from rma_ray.serve_admin import INGRESS_REPLICA_ENV
from rma_ray.tiers import LABEL_TIER, LABEL_TRUSTED


class Limits(BaseModel):
    """Queueing and concurrency of one deployment (Serve: max_ongoing_requests, max_queued_requests)."""

    max_ongoing_requests: int = Field(ge=1)
    max_queued_requests: int = Field(ge=1)
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=4, ge=1)
    target_ongoing_requests: float = Field(default=2.0, gt=0)
    num_cpus: float = Field(default=0.0, ge=0)


def _limits(ongoing: int, queued: int, target: float, max_replicas: int = 4) -> Limits:
    return Limits(
        max_ongoing_requests=ongoing,
        max_queued_requests=queued,
        target_ongoing_requests=target,
        max_replicas=max_replicas,
    )


class ServicesSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RMA_SERVICES_", extra="ignore")

    # placement: service deployments on service-tier nodes; uploads (bytes on a volume) on trusted data nodes
    service_selector: dict[str, str] = Field(default_factory=lambda: {LABEL_TIER: "service"})
    data_selector: dict[str, str] = Field(default_factory=lambda: {LABEL_TIER: "data", LABEL_TRUSTED: "true"})
    # what holds a store password or clients' data (rag, client RAG, notes, graph, the gateway) stays on
    # trusted service nodes: store supervisors hand credentials to trusted nodes only
    client_data_selector: dict[str, str] = Field(
        default_factory=lambda: {LABEL_TIER: "service", LABEL_TRUSTED: "true"}
    )

    # the gateway is async and only waits on handles: it can hold many requests; the CPU-bound deployments
    # (parse, OCR, embeddings, NER) are kept near their core count so that a queue forms where it can be bounded
    # two gateway replicas from the start: on a 2-core box one replica's event loop is the ceiling of the whole
    # API (two beat one in `bench.services --part gateway`: bench/README.md), and a replica that dies leaves one
    gateway: Limits = Field(
        default_factory=lambda: Limits(
            max_ongoing_requests=256,
            max_queued_requests=512,
            target_ongoing_requests=64.0,
            min_replicas=2,
            max_replicas=4,
        )
    )
    documents: Limits = Field(default_factory=lambda: _limits(4, 64, 2.0))
    ocr: Limits = Field(default_factory=lambda: _limits(2, 32, 1.0))
    uploads: Limits = Field(default_factory=lambda: _limits(16, 128, 8.0, max_replicas=1))
    notes: Limits = Field(default_factory=lambda: _limits(32, 256, 16.0))
    rag: Limits = Field(default_factory=lambda: _limits(8, 128, 4.0))
    graph: Limits = Field(default_factory=lambda: _limits(8, 128, 4.0))
    # the Batch API's store and runner: next to the uploads volume (its files are blobs there), one replica
    batches: Limits = Field(default_factory=lambda: _limits(32, 256, 16.0, max_replicas=1))

    ingress_env: dict[str, str] = Field(
        default_factory=lambda: dict(INGRESS_REPLICA_ENV),
        description="Serve "
        "settings of the gateway replicas (rma_ray.serve_admin: an HTTP server for "
        "the head's HAProxy); {} when Serve runs its Python proxy only",
    )
    replica_env: dict[str, str] = Field(
        default_factory=dict,
        description="extra environment of every replica "
        "(e.g. RMA_COORDINATOR_URL and RMA_KEYRING_CREDENTIAL_FILE: a path, "
        "never a secret)",
    )
    client_rate: str | None = Field(
        default="1200/minute",
        description="requests per client key per gateway "
        "replica (the `limits` library's notation); None: no per-client limit",
    )
    access_log: bool = Field(default=True, description="Serve's per-request access log lines of the replicas")
    retry_after_s: float = Field(default=2.0, ge=0, description="Retry-After on a 503 for a full queue")
    request_timeout_s: float = Field(
        default=120.0, gt=0, description="the gateway's limit on one backend call"
    )
    upload_max_bytes: int = Field(default=25 * 1024 * 1024, ge=1024)
    uploads_dir: str | None = Field(
        default=None, description="content-addressed bytes; default <stores dir>/uploads"
    )
    database: str = Field(
        default="rma_services",
        pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        description="the Postgres database of uploads and notes (created if missing)",
    )
    rag_chunk_chars: int = Field(default=800, ge=100, le=8000)
    rag_chunk_overlap: int = Field(default=120, ge=0, le=2000)
    llm_timeout_s: float = Field(default=120.0, gt=0)

    # the OpenAI Batch API (deployments/services/batches.py)
    batch_file_max_bytes: int = Field(default=50 * 1024 * 1024, ge=1024, description="an input file's limit")
    batch_max_lines: int = Field(default=50_000, ge=1, description="requests in one input file")
    batch_concurrency: int = Field(
        default=4,
        ge=1,
        le=256,
        description="model calls in flight per runner: batches take what online leaves",
    )
    batch_max_attempts: int = Field(
        default=3, ge=1, le=20, description="tries of one item (its runner died, the model was away)"
    )
    batch_max_queued: int = Field(default=20, ge=1, description="unfinished batches per client key")
    batch_max_queued_items: int = Field(
        default=100_000, ge=1, description="requests not yet run, per client key, over all its batches"
    )
    batch_item_timeout_s: float = Field(default=600.0, gt=0, description="one item's model call")
    batch_stalled_s: float = Field(
        default=30.0, ge=2, description="a runner silent this long is dead: its items are run again"
    )
    batch_runner: bool = Field(default=True, description="run items in the batches replicas")

    # document-ingest jobs (deployments/services/ingest.py): in the batches' runner, a queue of their own
    ingest_concurrency: int = Field(
        default=1, ge=1, le=32, description="ingest jobs in flight per runner: online requests keep the rest"
    )
    ingest_max_attempts: int = Field(
        default=3, ge=1, le=20, description="starts of one job (its runner died, a service was away)"
    )
    ingest_max_unfinished: int = Field(default=10, ge=1, description="queued or running ingest jobs per key")
    ingest_max_ocr_pages: int = Field(default=500, ge=1, description="pages one job may send to OCR")
    ingest_keep_days: int = Field(
        default=30,
        ge=1,
        le=3650,
        description="a finished ingest job (its row, page texts, Idempotency-Key and queue entry) is deleted "
        "this many days after it ended; what it indexed and extracted stays",
    )
