"""Trust domains: the core cluster and the edge clusters (DESIGN.md, "Trust domains").

The **core** cluster is today's: the head, trusted donors, the data stores, every HTTP ingress that sees a client
key. An **edge** cluster is a Ray cluster of its own for untrusted donors (stateless compute only: the LLM,
vision, OCR, parsing, embeddings), with its own head (on the operator's machine by default, run as its own
unprivileged system user, with nothing of the core readable), its own cluster token and its own ports, so that
the head and an edge head share one machine.

What the three sides share, named once here:
- `EdgeSpec`: one edge's name, ports, overlay subnet and system user (what `rma up` starts; a config entry per
  edge);
- `EdgeEndpoint`: what the coordinator is told of a running edge (`RMA_EDGES`, a JSON list): where its GCS,
  dashboard and Serve proxy answer, which file holds its token and, with the overlay, its own hub
  (`EdgeOverlay`: the edge's donors get addresses and a peer there, never on the core's hub);
- the edge service credential: a short-lived EdDSA JWT the coordinator mints for the core's gateway (audience
  `edge_audience(name)`, issuer `EDGE_ISSUER`), checked by the edge's ingress against the coordinator's public
  keys (`jwks_path(name)`); it names no client and grants nothing beyond edge compute.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from rma_ray.overlay import RayPorts

CORE = "core"  # the core cluster's name (registry, labels, pool.json)
LABEL_CLUSTER = "rma.io/cluster"  # every node's cluster: "core" or the edge's name
EDGE_NAME = r"^[a-z][a-z0-9-]{0,15}$"
DEFAULT_EDGE = "edge"
EDGE_USER = "rma-edge"  # the unprivileged system user the default edge's head runs as (see edge_user)
EDGE_ISSUER = "rma-coordinator"
EDGE_TOKEN_TTL_S = 600  # an edge credential's lifetime; the gateway refreshes it well before
SERVED_BY_HEADER = "x-rma-served-by"  # on every forwarded answer: "edge:<name>" or "core"
# the apps an edge runs (`rma up --edge-apps`): stateless compute, no client data. Each takes over routes of a
# core app (rma_ray.poolinfo.APP_NAMES): the LLM's and the embeddings' of their own; `documents` (OCR and
# document parsing of bytes sent in the request, deployments/services/edge_app.py) those of `services`; `vision`
# its own (the front and a backend on an edge donor with Ollama or a GPU). Vision goes to an edge only when asked
# for (`--edge-apps`, not in EDGE_DEFAULT_APPS): its answers are not spot-checked (deployments/gateway/spotcheck.py)
# and an edge donor's Ollama serves the models that donor pulled
EDGE_APPS = ("llm", "embeddings", "documents", "vision")
EDGE_DEFAULT_APPS = ("llm", "embeddings", "documents")
EDGE_APP_CORE = {"llm": "llm", "embeddings": "embeddings", "documents": "services", "vision": "vision"}
# Serve apps an edge's app needs to answer (the front calls the other through a handle): the coordinator counts
# the front as running only while these run too, so the core forwards no request an edge would answer 503
# (deployments.vision.config's app names)
EDGE_APP_NEEDS: dict[str, tuple[str, ...]] = {"rma-vision": ("rma-vision-backend",)}


def default_edge_apps(core_apps: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The edge apps of a pool that deploys `core_apps`: each default edge app whose core app runs (an edge
    takes over routes of the core's apps, and a request the edge cannot take is served by the core's)."""
    return tuple(a for a in EDGE_DEFAULT_APPS if EDGE_APP_CORE[a] in core_apps)


def edge_audience(name: str) -> str:
    return f"rma-edge:{name}"


def jwks_path(name: str) -> str:
    """Where the coordinator publishes an edge's public keys (no credential needed: they are public)."""
    return f"/api/edges/{name}/jwks.json"


def edge_user(name: str) -> str:
    """An edge's own system user: `rma-edge` for the default edge, `rma-edge-<name>` for any other (at most 25
    characters: within useradd's 32). Each edge needs its own: stopping an edge kills every process of its
    user (rma_ray.raynode.kill_user_processes), which must never reach another edge's."""
    return EDGE_USER if name == DEFAULT_EDGE else f"{EDGE_USER}-{name}"


def valid_name(name: str) -> bool:
    return re.fullmatch(EDGE_NAME, name) is not None and name != CORE


@dataclass(frozen=True)
class EdgePorts:
    """Every port an edge head's Ray listens on, pinned and apart from the core head's (Ray's defaults and
    `rma_ray.overlay.RayPorts`), so that both heads run on one machine. `offset` moves them all, for a second
    edge on the same machine."""

    gcs: int = 6480
    dashboard: int = 8275
    serve: int = 8030  # not 8010: the chroma store's default (deployments/stores/kinds.py)
    node_manager: int = 6481
    object_manager: int = 6482
    metrics_export: int = 6483
    dashboard_agent_grpc: int = 6484
    runtime_env_agent: int = 6485
    dashboard_agent_listen: int = 52465
    ray_client: int = 25001
    min_worker: int = 20002
    max_worker: int = 24999

    def shifted(self, offset: int) -> EdgePorts:
        """The same layout `offset` ports up (worker range: offset * 5000 up)."""
        if offset == 0:
            return self
        return EdgePorts(
            gcs=self.gcs + 10 * offset,
            dashboard=self.dashboard + offset,
            serve=self.serve + offset,
            node_manager=self.node_manager + 10 * offset,
            object_manager=self.object_manager + 10 * offset,
            metrics_export=self.metrics_export + 10 * offset,
            dashboard_agent_grpc=self.dashboard_agent_grpc + 10 * offset,
            runtime_env_agent=self.runtime_env_agent + 10 * offset,
            dashboard_agent_listen=self.dashboard_agent_listen + offset,
            ray_client=self.ray_client + 5000 * offset,  # in the gap after this offset's worker ports
            min_worker=self.min_worker + 5000 * offset,
            max_worker=self.max_worker + 5000 * offset,
        )

    def argv(self) -> list[str]:
        """`ray start --head` arguments for these ports (GCS and dashboard ports go through NodeSpec): the same
        pinning as the core head's under the overlay (`rma_ray.overlay.RayPorts`), on the edge's numbers."""
        return self.ray_ports().argv(head=True)

    def head_tcp(self) -> list[int]:
        """The edge head's ports beyond RayPorts': GCS, dashboard, Serve (its edge hub firewalls them too)."""
        return [self.gcs, self.dashboard, self.serve]

    def ray_ports(self) -> RayPorts:
        from rma_ray.overlay import RayPorts

        return RayPorts(
            node_manager=self.node_manager,
            object_manager=self.object_manager,
            metrics_export=self.metrics_export,
            dashboard_agent_grpc=self.dashboard_agent_grpc,
            runtime_env_agent=self.runtime_env_agent,
            dashboard_agent_listen=self.dashboard_agent_listen,
            min_worker=self.min_worker,
            max_worker=self.max_worker,
            ray_client=self.ray_client,
        )


@dataclass(frozen=True)
class EdgeSpec:
    """One edge cluster `rma up` starts beside the core head."""

    name: str = DEFAULT_EDGE
    ports: EdgePorts = field(default_factory=EdgePorts)
    overlay_subnet: str = "10.89.0.0/16"  # its own, apart from the core's (rma_ray.overlay.DEFAULT_SUBNET)
    user: str = ""  # empty: edge_user(name)
    overlay_port: int = 51821  # its hub's UDP port, beside the core hub's (rma_ray.overlay.DEFAULT_PORT)

    def __post_init__(self) -> None:
        if not self.user:
            object.__setattr__(self, "user", edge_user(self.name))

    def data_dir(self, core_data_dir: Path) -> Path:
        """The edge's data dir: root's, 0755, holding the token (root:`user`, 0640, written by root only) and
        `home` (`user`'s, 0700: the edge head's HOME and cwd). Never writable by `user`: root reads and writes
        the token by path, so a link the edge's code put there must be impossible. Not under the core's data
        dir (0700, root's): a fixed place per core data dir, so the edge keeps its token across restarts."""
        digest = hashlib.sha256(str(core_data_dir.resolve()).encode()).hexdigest()[:8]
        return Path(tempfile.gettempdir()) / f"rma-edge-{self.name}-{digest}"


class EdgeOverlay(BaseModel):
    """An edge's own WireGuard hub on the head (`rma up --overlay`): its donors get an address from `subnet`
    and a peer on `interface`, never on the core's hub (rma_ray.overlay.edge_hub)."""

    interface: str = Field(description="the edge hub's WireGuard interface, on the coordinator's machine")
    public_key: str
    endpoint: str = Field(description="host:port (UDP) the edge's donors dial")
    subnet: str


class EdgeEndpoint(BaseModel):
    """A running edge as the coordinator knows it (`RMA_EDGES`, a JSON list of these, set by `rma up`)."""

    name: str = Field(pattern=EDGE_NAME)
    ray_address: str = Field(description="host:port of the edge's GCS, what its donors join")
    dashboard_url: str = Field(description="the edge's Ray dashboard (state API, Serve status)")
    serve_url: str = Field(description="the edge's Serve proxy, which the core's gateway calls")
    token_file: Path = Field(description="the edge's cluster token (root:edge user, 0640; root reads it)")
    overlay: EdgeOverlay | None = Field(default=None, description="the edge's hub; None: no overlay")

    def token(self) -> str | None:
        """The token, read only from a regular file, never through a link (defence in depth: the edge dir is
        root's, so its user cannot put a link to the core's secrets there)."""
        try:
            fd = os.open(self.token_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            with os.fdopen(fd, "r", closefd=False) as f:
                return f.read(4096).strip() or None
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)
