"""`rma-documents`: OCR and document parsing as an edge cluster's app (DESIGN.md, "Trust domains").

The stateless part of the services app, for untrusted donors: POST /api/ocr and POST /api/documents/parse of a
file sent in the request (multipart `file`): bytes in, text out. No database, no store, no upload, no client
name: the caller is the core's gateway with the edge credential (its ingress runs in edge mode, so the one key
check, `deployments.gateway.auth.current_client`, takes that credential instead of a client key). The same
`Ocr` and `Documents` deployments as the core's, so an edge answers a file exactly as the core does.

On the core, the services gateway forwards those two routes here (`EdgeForward` in `deployments.services.api`)
when an edge reports running replicas of this app, only for a file in the body (`bytes_in_body`): a request
that names an upload's id reads bytes only the core holds, so it stays there.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qs

from pydantic import BaseModel, Field

from deployments.services.settings import Limits, ServicesSettings, _limits
from rma_ray.tiers import LABEL_TIER

EDGE_APP = "rma-documents"
EDGE_ROUTE_PREFIX = "/api"  # the core's services prefix: a forwarded request keeps its path
# full paths (Serve hands the app the path with its route prefix): what the core may forward here
EDGE_ROUTES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("POST", re.compile(r"/api/ocr/?")),
    ("POST", re.compile(r"/api/documents/parse/?")),
)


def bytes_in_body(scope: dict[str, Any]) -> bool:
    """Whether a request to an OCR or parse route carries its file in the body (multipart), not an upload's
    id (in the query, or a JSON body): only then may it leave the core."""
    headers = dict(scope.get("headers") or [])
    ctype = headers.get(b"content-type", b"").decode("latin-1").lower()
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    return ctype.startswith("multipart/form-data") and "upload_id" not in query


class EdgeDocumentsSettings(BaseModel):
    """The edge app's args (`deployments.serve_config.documents_app`): the edge it serves, where its keys are
    published, where its replicas run and their limits."""

    edge: str = Field(
        min_length=1, description="the edge cluster this app serves (its credential's audience)"
    )
    edge_coordinator_url: str = Field(description="the coordinator whose edge keys (JWKS) the ingress reads")
    # an edge has untrusted donors only; never its head (control plane, no CPUs)
    selector: dict[str, str] = Field(default_factory=lambda: {LABEL_TIER: "in(service,gpu)"})
    gateway: Limits = Field(
        default_factory=lambda: Limits(
            max_ongoing_requests=64, max_queued_requests=256, target_ongoing_requests=16.0, max_replicas=4
        )
    )
    documents: Limits = Field(default_factory=lambda: _limits(4, 64, 2.0))
    ocr: Limits = Field(default_factory=lambda: _limits(2, 32, 1.0))
    upload_max_bytes: int = Field(default=25 * 1024 * 1024, ge=1024)
    request_timeout_s: float = Field(default=120.0, gt=0)
    retry_after_s: float = Field(default=2.0, ge=0)
    access_log: bool = True

    def services(self) -> ServicesSettings:
        """The services' settings the shared plumbing reads (body limit, backend time limit, Retry-After); no
        per-client rate: the only caller is the core's gateway, which applied the client's."""
        return ServicesSettings(
            service_selector=self.selector,
            data_selector=self.selector,
            client_data_selector=self.selector,
            gateway=self.gateway,
            documents=self.documents,
            ocr=self.ocr,
            ingress_env={},
            replica_env={},
            client_rate=None,
            access_log=self.access_log,
            retry_after_s=self.retry_after_s,
            request_timeout_s=self.request_timeout_s,
            upload_max_bytes=self.upload_max_bytes,
        )


class EdgeDocumentsGateway:
    """The edge app's ingress: the OCR and parse routes only, behind the edge credential."""

    def __init__(self, settings: dict[str, Any], documents: Any, ocr: Any) -> None:
        from deployments.services.api import Backends

        self.settings = EdgeDocumentsSettings(**settings).services()
        self.backends = Backends(documents, ocr, None, None, None, None)

    def __serve_build_asgi_app__(self) -> Any:
        from deployments.services.api import create_edge_api

        return create_edge_api(self.backends, self.settings, set_request_id=False)

    def check_health(self) -> None:
        # fails (and Serve replaces the replica) if this replica cannot check edge credentials at all
        from deployments.gateway import edge_gate

        if edge_gate.verifier() is None:
            raise RuntimeError("this edge replica does not know its edge (RMA_EDGE_NAME) or its coordinator")


def build_edge_app(settings: EdgeDocumentsSettings | dict[str, Any]) -> Any:
    """The `rma-documents` Serve application (bind graph) of an edge cluster."""
    from ray import serve

    from deployments.gateway.edge_gate import edge_env
    from deployments.services.app import _options
    from deployments.services.documents import Documents
    from deployments.services.ocr import Ocr
    from rma_ray.serve_admin import INGRESS_REPLICA_ENV

    s = settings if isinstance(settings, EdgeDocumentsSettings) else EdgeDocumentsSettings(**settings)
    cfg = s.model_dump(mode="json")
    svc = s.services()
    ocr = serve.deployment(Ocr).options(**_options("ocr", s.ocr, s.selector, svc)).bind()
    documents = (
        serve.deployment(Documents).options(**_options("documents", s.documents, s.selector, svc)).bind(ocr)
    )
    ingress_env = {**INGRESS_REPLICA_ENV, **edge_env(s.edge, s.edge_coordinator_url, "the edge's documents")}
    gateway = serve.ingress()(EdgeDocumentsGateway)
    return (
        serve.deployment(gateway)
        .options(**_options("gateway", s.gateway, s.selector, svc, ingress_env))
        .bind(cfg, documents, ocr)
    )
