"""The services as one Serve application: the gateway (FastAPI ingress) and a deployment per service, each with
its own limits, autoscaling, health check and placement by node label. `build_app()` is what `rma up` deploys:

    serve.run(build_app(), name="services", route_prefix="/api")

Serve answers a full queue (`max_queued_requests`) with 503 and Retry-After (`BackpressureConfig`), and its proxy
puts X-Request-ID on every response. Metrics: Serve's own (`ray_serve_*` request counts, latencies, queue lengths
per deployment) and the gateway's `rma_api_*` per route, on each node's Ray metrics port for Prometheus."""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.config import AutoscalingConfig, BackpressureConfig

from deployments.services.settings import Limits, ServicesSettings

APP_NAME = "services"
ROUTE_PREFIX = "/api"
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
}


class ApiMetrics:
    """Per-route request counts and latencies (Ray's metrics API: exported with Serve's own, for Prometheus)."""

    def __init__(self) -> None:
        from ray.util import metrics

        self.requests = metrics.Counter(
            "rma_api_requests", "requests to the RMA services API", tag_keys=("route", "method", "status")
        )
        self.latency = metrics.Histogram(
            "rma_api_latency_ms",
            "RMA services API latency (ms)",
            boundaries=[5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000],
            tag_keys=("route", "method"),
        )
        self.retries = metrics.Counter(
            "rma_api_backend_retries",
            "idempotent backend calls sent again because the replica they reached died",
            tag_keys=("service",),
        )

    def retried(self, service: str) -> None:
        self.retries.inc(tags={"service": service})

    def observe(self, route: str, method: str, status: int, ms: float) -> None:
        self.requests.inc(tags={"route": route, "method": method, "status": str(status)})
        self.latency.observe(ms, tags={"route": route, "method": method})


@serve.ingress()
class Gateway:
    def __init__(
        self,
        settings: dict[str, Any],
        documents: Any,
        ocr: Any,
        uploads: Any,
        notes: Any,
        rag: Any,
        graph: Any,
        client_rag: Any = None,
    ) -> None:
        from deployments.services.api import Backends

        self.settings = ServicesSettings(**settings)
        self.backends = Backends(documents, ocr, uploads, notes, rag, graph, client_rag)

    def __serve_build_asgi_app__(self) -> Any:
        from deployments.services.api import create_api

        return create_api(self.backends, self.settings, set_request_id=False, metrics=ApiMetrics())

    def check_health(self) -> None:
        # fails (and Serve replaces the replica) if client keys cannot be checked at all on this node
        from deployments.gateway.auth import verifier

        verifier()


def _options(
    name: str,
    limits: Limits,
    selector: dict[str, str],
    settings: ServicesSettings,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    env_vars = {**OFFLINE_ENV, **settings.replica_env, **(env or {})}
    actor: dict[str, Any] = {"num_cpus": limits.num_cpus, "runtime_env": {"env_vars": env_vars}}
    if selector:
        actor["label_selector"] = dict(selector)
    return {
        "name": name,
        "ray_actor_options": actor,
        "max_ongoing_requests": limits.max_ongoing_requests,
        "max_queued_requests": limits.max_queued_requests,
        "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=settings.retry_after_s),
        "autoscaling_config": AutoscalingConfig(
            min_replicas=limits.min_replicas,
            max_replicas=max(limits.min_replicas, limits.max_replicas),
            target_ongoing_requests=limits.target_ongoing_requests,
        ),
        "health_check_period_s": 10,
        "health_check_timeout_s": 30,
        "graceful_shutdown_timeout_s": 20,
        "logging_config": {"enable_access_log": settings.access_log},
    }


def build_app(settings: ServicesSettings | dict[str, Any] | None = None) -> Any:
    """The services Serve application (bind graph), for `serve.run(app, name="services", route_prefix="/api")`."""
    from deployments.services.documents import Documents
    from deployments.services.graph import Graph
    from deployments.services.notes import Notes
    from deployments.services.ocr import Ocr
    from deployments.services.rag import Rag
    from deployments.services.uploads import Uploads

    if settings is None:
        settings = ServicesSettings()
    elif isinstance(settings, dict):
        settings = ServicesSettings(**settings)
    cfg = settings.model_dump(mode="json")
    svc, data, trusted = settings.service_selector, settings.data_selector, settings.client_data_selector

    # least exposure: what holds a store password or reads clients' data runs on trusted nodes only; untrusted
    # service donors get the stateless ones (OCR, parsing). The shared `rag` reads Chroma, which has no
    # authentication and holds every client's private collection; `graph` gets the graph store's password.
    ocr = serve.deployment(Ocr).options(**_options("ocr", settings.ocr, svc, settings)).bind()
    documents = (
        serve.deployment(Documents)
        .options(**_options("documents", settings.documents, svc, settings))
        .bind(ocr)
    )
    uploads = (
        serve.deployment(Uploads).options(**_options("uploads", settings.uploads, data, settings)).bind(cfg)
    )
    rag = serve.deployment(Rag).options(**_options("rag", settings.rag, trusted, settings)).bind(cfg)
    client_rag = (
        serve.deployment(Rag).options(**_options("client_rag", settings.rag, trusted, settings)).bind(cfg)
    )
    notes = (
        serve.deployment(Notes)
        .options(**_options("notes", settings.notes, trusted, settings))
        .bind(cfg, client_rag)
    )
    graph = serve.deployment(Graph).options(**_options("graph", settings.graph, trusted, settings)).bind()
    # the gateway sees every client's key and data in clear: trusted nodes only (the head, trusted service donors)
    return (
        serve.deployment(Gateway)
        .options(**_options("gateway", settings.gateway, trusted, settings, settings.ingress_env))
        .bind(cfg, documents, ocr, uploads, notes, rag, graph, client_rag)
    )
