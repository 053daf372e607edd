"""A pool with an edge cluster, for tests/e2e/test_edge.py and bench/edge.py: `rma up` (edge on, the CLI's
default) on the root namespace of a bed of its own, the LLM app on both clusters, and `rma join`
of untrusted donors from the bed's hosts (they land in the edge)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from rma_ray.edges import DEFAULT_EDGE, SERVED_BY_HEADER
from tests.e2e.conftest import PY, Donor, PoolUnderTest
from tests.e2e.netns import TestBed
from tests.support import GiveUp, wait_for
from tests.support.llm import MODEL_CACHE

__all__ = ["SERVED_BY_HEADER", "EdgePool", "start_edge_pool"]


class EdgePool(PoolUnderTest):
    """The package pool's helpers plus the edge: its head, its token, its Serve apps."""

    env: dict[str, str]

    @property
    def edge(self) -> dict[str, Any]:
        return self.info["edges"][DEFAULT_EDGE]  # type: ignore[no-any-return]

    def refresh_info(self) -> dict[str, Any]:
        self.info = json.loads((self.root / "head" / "pool.json").read_text())
        return self.info

    @property
    def edge_token_file(self) -> Path:
        return Path(self.edge["data_dir"]) / "cluster_token"

    def core_token(self) -> str:
        return (self.root / "head" / "cluster_token").read_text().strip()

    def _get(self, url: str, token: str, **params: Any) -> Any:
        r = httpx.get(url, params=params, headers={"Authorization": f"Bearer {token}"}, timeout=10)
        r.raise_for_status()
        return r.json()

    def edge_nodes(self) -> list[dict[str, Any]]:
        token = self.edge_token_file.read_text().strip()
        out = self._get(self.edge["dashboard_url"] + "/api/v0/nodes", token, detail="true")
        return out["data"]["result"]["result"]  # type: ignore[no-any-return]

    def serve_apps(self, cluster: str = "core") -> dict[str, Any]:
        if cluster == "core":
            url, token = self.info["ray_dashboard_url"], self.core_token()
        else:
            url, token = self.edge["dashboard_url"], self.edge_token_file.read_text().strip()
        return self._get(url + "/api/serve/applications/", token).get("applications", {})  # type: ignore[no-any-return]

    def replica_ids(self, cluster: str = "core") -> dict[str, list[str]]:
        """deployment -> sorted replica ids of every app of a cluster (a redeploy changes them)."""
        out: dict[str, list[str]] = {}
        for app, a in self.serve_apps(cluster).items():
            for dep, d in a.get("deployments", {}).items():
                out[f"{app}/{dep}"] = sorted(r["replica_id"] for r in d.get("replicas", []))
        return out

    def running_replicas(self, app: str, cluster: str) -> int:
        a = self.serve_apps(cluster).get(app) or {}
        return sum(
            sum(1 for r in d.get("replicas", []) if r.get("state") == "RUNNING")
            for d in a.get("deployments", {}).values()
        )

    def client_key(self, name: str, sensitive: bool = False) -> str:
        r = self.admin("POST", "/api/admin/clients", json={"name": name, "sensitive": sensitive})
        assert r.status_code == 201, r.text
        return r.json()["key"]  # type: ignore[no-any-return]

    def rma(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PY, "-m", "rma_ray.cli", *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )


@contextlib.contextmanager
def start_edge_pool(
    root: Path, n_hosts: int = 2, apps: str = "llm", settings: dict[str, str] | None = None
) -> Iterator[EdgePool]:
    """A bed of `n_hosts` donor hosts and `rma up` (edge on) on its root side; torn down by PID. `settings`:
    `RMA_*` variables for `rma up` (its coordinator reads them). The core's LLM reads the tests' shared converted
    model (tests.support.llm; the core's replicas run as root on this machine); the edge's does not get that
    path (rma_ray.head.edge_app_env), so the edge donor's replica converts on its own node, every run."""
    with TestBed(n_hosts, prefix="rma-edge") as bed:
        env = {
            **os.environ,
            "HOME": str(root / "hhome"),
            "RMA_DATA_DIR": str(root / "head"),
            "RMA_LLM_MODEL_DIR": str(MODEL_CACHE),
            "COLUMNS": "200",
            **(settings or {}),
        }
        log = root / "up.log"
        proc = subprocess.Popen(
            [
                PY,
                "-m",
                "rma_ray.cli",
                "up",
                "--node-ip-address",
                bed.head_ip,
                "--heartbeat-interval",
                "2",
                "--stores",
                "none",
                "--apps",
                apps,
                "--edge",
            ],
            env=env,
            stdout=open(log, "wb"),
            stderr=subprocess.STDOUT,
        )
        pool: EdgePool | None = None
        try:

            def ready() -> dict[str, Any] | None:
                if proc.poll() is not None:
                    raise GiveUp(f"rma up exited: {log.read_text()}")
                p = root / "head" / "pool.json"
                if not p.exists():
                    return None
                info = json.loads(p.read_text())
                # the edge head starts after the core's apps run (Pool.up): its head pid is set once it runs
                edge = (info.get("edges") or {}).get(DEFAULT_EDGE) or {}
                if edge.get("error"):
                    raise GiveUp(f"the edge did not start: {edge['error']}")
                return info if info.get("apps") is not None and edge.get("head_pid") else None

            info = wait_for(ready, timeout=1500, interval=1, what="rma up to deploy the core and edge apps")
            pool = EdgePool(bed, info, root, proc, free_hosts=list(bed.hosts))
            pool.env = env
            yield pool
        finally:
            donors: list[Donor] = pool.donors if pool else []
            for d in donors:
                if d.proc.poll() is None:
                    d.proc.send_signal(signal.SIGINT)
            for d in donors:
                try:
                    d.proc.wait(30)
                except subprocess.TimeoutExpired:
                    d.proc.kill()
            down = subprocess.run(
                [PY, "-m", "rma_ray.cli", "down"], env=env, capture_output=True, text=True, timeout=200
            )
            if down.returncode != 0:
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(150)
            except subprocess.TimeoutExpired:
                proc.kill()
            # `rma down` keeps the edge's data dir (its token across restarts, EdgeSpec.data_dir) and with it the
            # model the edge donor converted under the edge's home (~260 MB in /tmp a run); this bed's data dir
            # is never started again
            if pool is not None and pool.edge.get("data_dir"):
                shutil.rmtree(pool.edge["data_dir"], ignore_errors=True)
