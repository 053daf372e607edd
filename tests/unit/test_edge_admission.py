"""Edge clusters on the coordinator's side, without a server: which cluster an invite admits into, the labels,
the settings' edge list, the wire's defaults (an older peer's replies still parse), and how an edge's Serve
status becomes the gateway's replica counts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from admission.errors import ApiError
from admission.models import Invite
from admission.services.edges import parse_serve_status
from admission.services.reconcile import mismatch
from admission.services.workers import cluster_for
from rma_ray import wire
from rma_ray.edges import LABEL_CLUSTER, EdgeEndpoint
from rma_ray.settings import Settings
from rma_ray.tiers import Tier, node_labels


def edge(name: str) -> EdgeEndpoint:
    return EdgeEndpoint(
        name=name,
        ray_address="127.0.0.1:6480",
        dashboard_url="http://127.0.0.1:8275",
        serve_url="http://127.0.0.1:8010",
        token_file=Path(f"/nonexistent/{name}"),
    )


TWO_EDGES = Settings(edges=[edge("edge"), edge("west")])
NO_EDGES = Settings()


@pytest.mark.parametrize(
    ("settings", "trusted", "invite_edge", "want"),
    [
        (TWO_EDGES, False, None, "edge"),  # the first edge by default
        (TWO_EDGES, False, "west", "west"),
        (TWO_EDGES, True, None, "core"),  # trusted donors join the core
        (NO_EDGES, False, None, "core"),  # --no-edge: as before
        (TWO_EDGES, False, "north", "edge_gone"),  # its edge is no longer configured
        (NO_EDGES, False, "edge", "edge_gone"),
    ],
)
def test_the_cluster_an_invite_admits_into(
    settings: Settings, trusted: bool, invite_edge: str | None, want: str
) -> None:
    got = cluster_for(settings, Invite(trusted=trusted, edge=invite_edge))
    if isinstance(got, ApiError):
        assert got.code == want and got.status == 409 and "join token was not used" in got.message
    else:
        assert got == want


def test_labels_name_the_cluster_only_where_given() -> None:
    assert LABEL_CLUSTER not in node_labels(Tier.SERVICE, "w1", False)
    assert node_labels(Tier.SERVICE, "w1", False, cluster="edge")[LABEL_CLUSTER] == "edge"


def test_a_node_in_the_wrong_cluster_is_a_mismatch() -> None:
    from admission.models import Worker

    w = Worker(labels=node_labels(Tier.SERVICE, "w1", False, cluster="edge"), capabilities={}, tier="service")
    assert mismatch(w, {"labels": dict(w.labels), "resources_total": {}}) is None
    why = mismatch(w, {"labels": {**w.labels, LABEL_CLUSTER: "core"}, "resources_total": {}})
    assert why is not None and LABEL_CLUSTER in why


def test_settings_edges_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RMA_EDGES", "[" + edge("edge").model_dump_json() + "]")
    s = Settings()
    assert s.clusters == ["core", "edge"] and s.cluster_address("edge") == "127.0.0.1:6480"
    assert s.cluster_token("edge") is None  # an unreadable token file is no token, not a crash
    assert s.cluster_address("north") is None and s.edge("north") is None
    for bad in ([edge("edge"), edge("edge")], [edge("core")]):
        with pytest.raises(ValidationError):
            Settings(edges=bad)
    with pytest.raises(ValidationError):
        Settings(edges=[{**edge("x").model_dump(), "name": "Bad Name"}])


def test_replies_without_the_new_fields_still_parse() -> None:
    """A coordinator from before edges: its replies parse, and mean the core."""
    info = wire.RayInfo.model_validate({"address": "h:6380", "auth_token": "t"})
    assert info.cluster == "core"
    entry = wire.KeyringEntry.model_validate({"id": "a", "hash": "b", "name": "c"})
    assert entry.sensitive is False


SERVE_STATUS: dict[str, Any] = {
    "applications": {
        "rma-llm": {
            "status": "RUNNING",
            "deployments": {
                "LLMServer": {
                    "replicas": [{"state": "RUNNING"}, {"state": "RUNNING"}, {"state": "STARTING"}]
                },
                "Ingress": {"replicas": [{"state": "RUNNING"}]},
            },
        },
        "rma-embeddings": {
            "status": "DEPLOYING",
            "deployments": {"Embed": {"replicas": [{"state": "STARTING"}]}},
        },
        "rma-ocr": {"status": "DEPLOY_FAILED", "deployments": {"Ocr": {"replicas": [{"state": "RUNNING"}]}}},
        "empty": {"status": "RUNNING", "deployments": {}},
    }
}


def test_serve_status_becomes_replicas_that_can_serve() -> None:
    assert parse_serve_status(SERVE_STATUS) == {"rma-llm": 1, "rma-embeddings": 0, "rma-ocr": 0, "empty": 0}
    assert parse_serve_status({}) == {} and parse_serve_status({"applications": None}) == {}


def test_an_edge_s_vision_front_serves_only_while_its_backend_runs() -> None:
    from deployments.vision.config import BACKEND_APP, VISION_APP
    from rma_ray.edges import EDGE_APP_NEEDS

    assert EDGE_APP_NEEDS == {
        VISION_APP: (BACKEND_APP,)
    }  # rma_ray names deployments' apps without importing it

    def status(backend_replicas: list[str] | None) -> dict[str, Any]:
        apps: dict[str, Any] = {
            VISION_APP: {
                "status": "RUNNING",
                "deployments": {"VisionGateway": {"replicas": [{"state": "RUNNING"}]}},
            }
        }
        if backend_replicas is not None:
            apps[BACKEND_APP] = {
                "status": "RUNNING" if "RUNNING" in backend_replicas else "DEPLOYING",
                "deployments": {"OllamaVision": {"replicas": [{"state": s} for s in backend_replicas]}},
            }
        return {"applications": apps}

    assert parse_serve_status(status(None))[VISION_APP] == 0  # no backend app at all
    assert parse_serve_status(status(["PENDING_ALLOCATION"])) == {VISION_APP: 0, BACKEND_APP: 0}
    assert parse_serve_status(status(["RUNNING", "RUNNING"])) == {VISION_APP: 1, BACKEND_APP: 2}


def test_the_status_cache_reads_an_edge_once_for_concurrent_callers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Single-flight per edge: callers that find the reading stale together share one dashboard call."""
    import threading
    import time

    from admission.services import edges as edges_mod

    calls: list[str] = []

    def slow_read(e: EdgeEndpoint) -> tuple[dict[str, int], bool]:
        calls.append(e.name)
        time.sleep(0.2)
        return {"llm": 1}, True

    monkeypatch.setattr(edges_mod, "read_serve_status", slow_read)
    cache = edges_mod.EdgeStatusCache(ttl_s=60)
    results: list[tuple[dict[str, int], bool]] = []
    threads = [threading.Thread(target=lambda: results.append(cache.get(edge("edge")))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [({"llm": 1}, True)] * 6
    assert calls == ["edge"]
    cache.get(edge("west"))  # another edge has its own reading
    assert calls == ["edge", "west"]


@pytest.mark.parametrize(
    ("settings", "trusted", "cluster", "refused"),
    [
        (TWO_EDGES, False, "core", True),  # registered before the pool had edges (migration 0007)
        (TWO_EDGES, False, "edge", False),
        (TWO_EDGES, True, "core", False),
        (NO_EDGES, False, "core", False),  # --no-edge: untrusted donors join the core as before
    ],
)
def test_an_untrusted_donor_left_in_the_core_is_refused_once_edges_exist(
    settings: Settings, trusted: bool, cluster: str, refused: bool
) -> None:
    from admission.models import Worker
    from admission.services.workers import untrusted_in_core

    refusal = untrusted_in_core(settings, Worker(trusted=trusted, cluster=cluster))
    if not refused:
        assert refusal is None
    else:
        assert refusal is not None and refusal.status == 409 and refusal.code == "untrusted_in_core"
        assert "ask the admin for a new invite" in refusal.message
