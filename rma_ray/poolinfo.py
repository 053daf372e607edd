"""`<data dir>/pool.json`: what `rma up` tells scripts and the other `rma` commands about the running pool
(URLs, the admin key, a join token, the supervisor's PIDs, the stores' and apps' states), typed in one place.

Written 0600 (it holds the admin key). Only the fields set so far are written: a script that waits for the
stores waits for the `stores` key to appear. Keys this version does not know are kept as they are.

    info = poolinfo.read(data_dir)          # an empty PoolInfo when there is no file
    info.head_pid = 1234
    poolinfo.write(data_dir, info)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psutil
from pydantic import BaseModel, ConfigDict

from rma_ray.membership import write_private

# What `rma up --apps` and `--stores` may name, in the order they start (the keys of pool.json's `apps` and
# `stores`). The one list on this side of the rooms: `python -m deployments` keys its apps
# (deployments/serve_config.py APP_GROUPS) and stores (deployments/stores/kinds.py KINDS) by these names, and
# a unit test keeps them equal (rma_ray never imports deployments).
APP_NAMES = ("llm", "embeddings", "services", "vision")
STORE_NAMES = ("redis", "postgres", "chroma", "graph")

# the processes of a running pool: `rma down` removes them from the file once they are gone
PROCESS_FIELDS = ("supervisor_pid", "head_pid", "coordinator_pid")


class OverlayInfo(BaseModel):
    interface: str
    address: str
    subnet: str
    endpoint: str
    public_key: str


class EdgeInfo(BaseModel):
    """One edge cluster beside the core (rma_ray/edges.py): where its head answers and how it is."""

    model_config = ConfigDict(extra="allow")

    ray_address: str
    dashboard_url: str
    serve_url: str
    data_dir: str
    user: str
    head_pid: int | None = None
    token_rotated_at: float | None = None
    apps: dict[str, dict[str, Any]] | None = None  # app -> status, ready_s or error
    error: str | None = None  # why the edge head is not running (the core serves meanwhile)


class PoolInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    coordinator_url: str | None = None
    registry_url: str | None = None
    serve_url: str | None = None
    ray_dashboard_url: str | None = None
    overlay: OverlayInfo | None = None
    ray_address: str | None = None
    admin_key: str | None = None
    join_token: str | None = None
    join_token_expires_at: str | None = None
    data_dir: str | None = None
    supervisor_pid: int | None = None
    head_pid: int | None = None
    coordinator_pid: int | None = None
    first_start: bool | None = None
    cluster_token_rotated_at: float | None = None
    stores: dict[str, dict[str, Any]] | None = None  # store -> status, where, node_ip, port, error
    apps: dict[str, dict[str, Any]] | None = None  # app -> status, ready_s or error
    edges: dict[str, EdgeInfo] | None = None  # edge name -> its head (none: a `--no-edge` pool)

    def supervisor_running(self) -> bool:
        return bool(self.supervisor_pid) and psutil.pid_exists(self.supervisor_pid or 0)

    def without_processes(self) -> PoolInfo:
        """The same info with the running pool's PIDs removed (after `rma down`)."""
        data = self.as_dict()
        for key in PROCESS_FIELDS:
            data.pop(key, None)
        for edge in (data.get("edges") or {}).values():
            edge.pop("head_pid", None)
        return PoolInfo.model_validate(data)

    def as_dict(self) -> dict[str, Any]:
        """pool.json's content: the fields set so far (an unset `stores` is absent, not null)."""
        return self.model_dump(mode="json", exclude_unset=True)


def pool_file(data_dir: Path) -> Path:
    return data_dir / "pool.json"


def read(data_dir: Path) -> PoolInfo:
    """pool.json of `data_dir`, or an empty PoolInfo when there is none."""
    p = pool_file(data_dir)
    return PoolInfo.model_validate_json(p.read_text()) if p.exists() else PoolInfo()


def try_read(data_dir: Path) -> PoolInfo:
    """pool.json of `data_dir`, or an empty PoolInfo when it is missing, unreadable or not a pool's (the CLI's
    lookups of the coordinator URL and the admin key fall back to their other sources then)."""
    try:
        return read(data_dir)
    except (OSError, ValueError):  # pydantic's ValidationError is a ValueError
        return PoolInfo()


def write(data_dir: Path, info: PoolInfo) -> None:
    """Write pool.json (0600), or nothing when `info` holds nothing."""
    data = info.as_dict()
    if data:
        write_private(pool_file(data_dir), json.dumps(data, indent=2))
