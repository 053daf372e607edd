"""A whole pool restarted in the middle of an OpenAI batch: `rma up` (the real CLI, the services and embeddings
apps, Postgres on the head), a `/v1/embeddings` batch under way, `rma down`, `rma up` again on the same data
dir, stores and ports; the batch resumes from the services' Postgres and finishes with every `custom_id` once
(deployments/services/batches.py: the item rows are the truth, the sweep puts back the jobs of dead runners).
The runner's replica alone being killed: tests/integration/test_services.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from rma_ray.net import local_ip_towards
from tests.support import GiveUp, batch_jsonl, free_port, kill_left_stores, pool_ports, wait_for

pytestmark = [
    pytest.mark.ray,
    pytest.mark.postgres,  # the services' Postgres, run by `rma up` from Debian's binaries
    pytest.mark.timeout(1500),
]
N = 300


@dataclass
class Pool:
    """One pool's data dir, stores dir, HOME and ports: `start` runs `rma up` on them, `stop` runs `rma down`."""

    root: Path
    env: dict[str, str]
    args: list[str]
    runs: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> dict[str, Any]:
        """`rma up` until it has applied the apps (~1-3 min: the head, the coordinator, Postgres, two apps)."""
        self.runs += 1
        log = self.root / f"up-{self.runs}.log"
        proc = self.proc = subprocess.Popen(
            [sys.executable, "-m", "rma_ray.cli", "up", *self.args],
            env=self.env,
            stdout=open(log, "wb"),
            stderr=subprocess.STDOUT,
        )

        def up() -> bool:
            if proc.poll() is not None:
                raise GiveUp(f"rma up exited: {log.read_text()[-3000:]}")
            return "RMA Pool is up" in log.read_text()  # printed once the stores and apps are done

        wait_for(up, timeout=600, interval=1, what="rma up to apply the apps")
        info: dict[str, Any] = json.loads((self.root / "data" / "pool.json").read_text())
        assert {a: s["status"] for a, s in info["apps"].items()} == {
            "embeddings": "running",
            "services": "running",
        }, log.read_text()[-3000:]
        return info

    def stop(self) -> subprocess.CompletedProcess[str]:
        """`rma down`, then the `rma up` it stopped reaped (killed if it outlives `rma down` by two minutes)."""
        down = subprocess.run(
            [sys.executable, "-m", "rma_ray.cli", "down"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if self.proc is not None:
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGKILL)
        return down


@pytest.fixture
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    """A `--no-edge` pool of one machine with only the services and embeddings apps and the one store the Batch
    API needs (Postgres), on free ports and dirs of its own; stopped by `rma down`, and whatever that left of
    the store killed by PID."""
    root = tmp_path_factory.mktemp("batch-restart")
    stores = Path(tempfile.mkdtemp(prefix="rma-it-batch-stores-"))
    stores.chmod(0o755)  # the postgres user must traverse it
    ip = local_ip_towards("192.0.2.1")
    env = {
        **os.environ,
        "HOME": str(root / "home"),
        "RMA_DATA_DIR": str(root / "data"),
        "RMA_STORES_DIR": str(stores),
        "COLUMNS": "200",
        # one item at a time: the batch is still running when `rma down` starts, on a busy 2-core box too
        "RMA_SERVICES_BATCH_CONCURRENCY": "1",
        # the previous runner's jobs are put back 5 s after its last heartbeat instead of 30 s
        "RMA_SERVICES_BATCH_STALLED_S": "5",
    }
    args = [
        "--node-ip-address",
        ip,
        *pool_ports(ip),
        "--apps",
        "services,embeddings",
        "--stores",
        "postgres",
        "--store-port",
        f"postgres={free_port(ip)}",
        "--no-edge",
    ]
    p = Pool(root, env, args)
    try:
        yield p
    finally:
        p.stop()
        kill_left_stores(stores)  # anything `rma down` failed to stop (the test fails)
        shutil.rmtree(stores, ignore_errors=True)


def _client_key(info: dict[str, Any], name: str) -> str:
    r = httpx.post(
        info["coordinator_url"] + "/api/admin/clients",
        json={"name": name},
        headers={"Authorization": f"Bearer {info['admin_key']}"},
        timeout=30,
    )
    assert r.status_code == 201, r.text
    return str(r.json()["key"])


def _openai(info: dict[str, Any], key: str) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=info["serve_url"] + "/v1", api_key=key, timeout=120)


def test_rma_down_and_up_mid_batch_resumes_it_with_each_custom_id_once(pool: Pool) -> None:
    import openai

    from deployments.embeddings.config import EmbeddingSettings

    info = pool.start()
    token = (pool.root / "data" / "cluster_token").read_text()
    alice_key, bob_key = _client_key(info, "alice"), _client_key(info, "bob")
    alice = _openai(info, alice_key)
    model = EmbeddingSettings().entry().model_id
    lines = batch_jsonl("/v1/embeddings", N, lambda i: {"model": model, "input": f"t {i}"}, "e")
    # the services app answers client keys once the coordinator's keyring has reached it
    f = wait_for(
        lambda: alice.files.create(file=("restart.jsonl", lines), purpose="batch"),
        timeout=120,
        interval=1,
        what="the services app to take a client key's upload",
    )
    b = alice.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
    counts = wait_for(
        lambda: (c := alice.batches.retrieve(b.id).request_counts).completed >= 5 and c,
        timeout=300,
        interval=0.5,
        what="a few items answered",
    )
    assert counts.completed < N, f"the batch finished before `rma down`: {counts}"

    down = pool.stop()
    assert down.returncode == 0, down.stdout + down.stderr
    info = pool.start()
    # SECURITY.md: the cluster token is generated once (the restarted head keeps it) and never printed
    assert (pool.root / "data" / "cluster_token").read_text() == token
    assert all(token.strip() not in (pool.root / f"up-{n}.log").read_text() for n in (1, 2))
    alice = _openai(info, alice_key)
    done: Any = wait_for(
        lambda: (
            (x := alice.batches.retrieve(b.id)).status in ("completed", "failed", "cancelled", "expired")
            and x
        ),
        timeout=600,
        interval=1,
        what=f"batch {b.id} to finish after the restart",
    )
    assert done.status == "completed", done
    assert done.request_counts.total == done.request_counts.completed == N, done.request_counts
    assert done.error_file_id is None, done
    out = [json.loads(x) for x in alice.files.content(done.output_file_id).text.splitlines()]
    ids = [x["custom_id"] for x in out]
    assert sorted(ids) == sorted(f"e-{i}" for i in range(N))  # every custom_id exactly once
    assert all(
        x["response"]["status_code"] == 200 and len(x["response"]["body"]["data"][0]["embedding"]) > 0
        for x in out
    )
    # the batch stays its client's: listed for her after the restart, as absent for another key as a missing one
    assert b.id in {x.id for x in alice.batches.list(limit=20).data}
    with pytest.raises(openai.NotFoundError):
        _openai(info, bob_key).batches.retrieve(b.id)
