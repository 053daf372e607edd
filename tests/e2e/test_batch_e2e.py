"""The OpenAI Batch API in the real pool (network-namespace hosts, `rma up` + `rma join`) losing the donor that
runs its items: Postgres (the batch queue's store) on a trusted data donor, the rma-batches store and runner,
rma-files and the embeddings on two trusted service donors, an `/v1/embeddings` batch under way, and a power cut
of the donor hosting the runner replica (every process of its host SIGKILLed at once, as test_stores_e2e cuts
its data donor). Ray sees the node dead, Serve starts the runner on the other donor, the sweep puts the dead
runner's jobs back after `batch_stalled_s`, and the batch completes with every `custom_id` once
(deployments/services/batches.py: the item rows are the truth). The runner's replica alone killed on one
machine: tests/integration/test_services.py; the whole pool restarted: tests/integration/test_batch_restart.py."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil
import pytest

from tests.e2e.conftest import Donor, PoolUnderTest
from tests.support import batch_jsonl, wait_for

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.ray,
    pytest.mark.postgres,  # the batch queue's Postgres, run by its supervisor from Debian's binaries
    pytest.mark.timeout(1200),
]
N = 200
RUNNER = "ServeReplica:rma-batches:batch_store"  # the replicas' actor class: Serve's app and deployment names
EMBEDDER = "ServeReplica:rma-embeddings:Embedder"


def app_args(service_donors: list[str]) -> dict[str, dict[str, Any]]:
    """The apps' args: the batch apps only (not the whole services app: its gateway, OCR, NER and RAG replicas are
    no part of a batch), everything a client reaches on this module's two service donors (by name: another
    module's donors stay out of it); one item at a time, so that the batch is still under way when the runner's
    donor goes, and a dead runner's jobs put back 5 s after its last heartbeat instead of 30 s."""
    where = {
        "rma.io/tier": "service",
        "rma.io/trusted": "true",
        "rma.io/node": f"in({','.join(service_donors)})",
    }
    services = {
        "service_selector": where,
        "data_selector": where,
        "client_data_selector": where,
        "batch_concurrency": 1,
        "batch_stalled_s": 5,
    }
    return {
        # a model replica on each donor (Serve spreads them): items keep an embedder when one donor goes
        "embeddings_app": {"model_selector": where, "ingress_selector": where, "num_replicas": 2},
        "batches_app": services,
        "files_app": services,
    }


POSTGRES = """
import json, ray
from ray.experimental import internal_kv
from deployments.stores import supervisor
ray.init(logging_level="ERROR", log_to_driver=False)
# another module's Postgres (test_stores_e2e's) left its pin on its own donor: this one is placed anew
internal_kv._internal_kv_del(supervisor.pin_key("postgres"), namespace=supervisor.NAMESPACE)
supervisor.ensure("postgres", selector={**supervisor.TRUSTED_DATA, "rma.io/node": %r})
print(json.dumps(supervisor.endpoint("postgres", 240).__dict__))
"""
# applied as `python -m deployments up` applies apps (a PUT of serve_config's config on the dashboard), with this
# module's args and the cluster token the driver is given (never on a command line); no Ray client in this process
APPLY = """
import json, os
from pathlib import Path
from deployments import serve_config
from deployments.__main__ import Dashboard, app_states, http_options
from rma_ray.waiting import wait_until
dashboard, host, port, args = %r
token = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
specs = [serve_config.AppSpec(a.name, a.route_prefix, a.builder, args[a.builder])
         for a in serve_config.apps() if a.builder in args]
dash = Dashboard(dashboard, token)
dash.apply(serve_config.apply_config(specs, http_options(host, port)))
names = [a.name for a in specs]
states = wait_until(lambda: app_states(dash.applications(), names), timeout=480, interval=2, what="the apps")
print(json.dumps({n: s["status"] for n, s in states.items()}))
"""
# the apps deleted at once and waited for together: each app's ingress replica stays reachable for 30 s once
# deleted (Ray's HAProxy mode, RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S), so one after the other took 93 s
TEARDOWN = """
import ray
from ray.experimental import internal_kv
from deployments.gateway.deploy import delete_apps
from deployments.stores import supervisor
ray.init(logging_level="ERROR", log_to_driver=False)
try:
    delete_apps(("rma-files", "rma-batches", "rma-embeddings"), timeout_s=120)
except Exception:
    pass
try:
    a = ray.get_actor(supervisor.actor_name("postgres"), namespace=supervisor.NAMESPACE)
    ray.get(a.stop.remote(), timeout=60)
    ray.kill(a, no_restart=True)
except Exception:
    pass
# the next module that places Postgres places it where it says, not on this module's donor
internal_kv._internal_kv_del(supervisor.pin_key("postgres"), namespace=supervisor.NAMESPACE)
"""


@dataclass
class BatchPool:
    pool: PoolUnderTest
    data: Donor
    services: list[Donor]
    key: str

    def openai(self) -> Any:
        from openai import OpenAI

        return OpenAI(base_url=self.pool.info["serve_url"] + "/v1", api_key=self.key, timeout=60)

    def replica_nodes(self, actor_class: str) -> list[str]:
        """The Ray node ids of the live replicas of one deployment (Ray's state API on the dashboard)."""
        token = (self.pool.root / "head" / "cluster_token").read_text().strip()
        r = httpx.get(
            self.pool.info["ray_dashboard_url"] + "/api/v0/actors",
            params={
                "detail": "true",
                "limit": "10000",
                "filter_keys": "state",
                "filter_predicates": "=",
                "filter_values": "ALIVE",
            },
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        r.raise_for_status()
        actors = r.json()["data"]["result"]["result"]
        return [a["node_id"] for a in actors if a["class_name"] == actor_class]


@pytest.fixture(scope="module")
def batch_pool(pool: PoolUnderTest) -> Iterator[BatchPool]:
    """A trusted data donor with Postgres, two trusted service donors with the batch apps and the embeddings, and
    a client key (~2-4 min on a busy 2-core box); module-scoped. Torn down: the apps deleted, Postgres stopped,
    its pin removed, the donors left (so that the next module finds the pool as it was)."""
    dirs = [Path(tempfile.mkdtemp(prefix="rma-e2e-batch-")) for _ in range(3)]
    for volume in dirs:  # the postgres user must traverse the data donor's; the others hold the uploads
        volume.chmod(0o755)
    donors: list[Donor] = []
    try:
        data = pool.join(pool.invite(tier="data", trusted=True), env={"RMA_STORES_DIR": str(dirs[0])})
        donors.append(data)
        for volume in dirs[1:]:
            donors.append(
                pool.join(pool.invite(tier="service", trusted=True), env={"RMA_STORES_DIR": str(volume)})
            )
        r = pool.driver(POSTGRES % data.worker_id, timeout=400)
        assert r.returncode == 0, r.stderr[-3000:]
        assert json.loads(r.stdout.strip().splitlines()[-1])["host"] == data.host.ip
        serve = urlsplit(pool.info["serve_url"])
        apply = (
            pool.info["ray_dashboard_url"],
            serve.hostname,
            serve.port,
            app_args([d.worker_id for d in donors[1:]]),
        )
        r = pool.driver(APPLY % (apply,), timeout=540)
        assert r.returncode == 0, r.stderr[-3000:]
        assert set(json.loads(r.stdout.strip().splitlines()[-1]).values()) == {"RUNNING"}, r.stdout
        c = pool.admin("POST", "/api/admin/clients", json={"name": "batch-e2e"})
        assert c.status_code == 201, c.text
        yield BatchPool(pool, data, donors[1:], str(c.json()["key"]))
    finally:
        pool.driver(TEARDOWN, timeout=240)
        live = [d for d in donors if d.proc.poll() is None]
        for d in live:
            d.proc.send_signal(signal.SIGINT)  # a leave
        for d in live:
            try:
                d.proc.wait(60)
            except subprocess.TimeoutExpired:
                d.proc.kill()
        for pidfile in dirs[0].glob("*/.rma-pid.json"):  # a Postgres its supervisor did not stop
            try:
                psutil.Process(json.loads(pidfile.read_text())["pid"]).kill()
            except (psutil.Error, OSError, ValueError):
                pass
        for volume in dirs:
            shutil.rmtree(volume, ignore_errors=True)


def test_a_batch_completes_when_the_donor_running_it_loses_power(batch_pool: BatchPool) -> None:
    from deployments.embeddings.config import EmbeddingSettings

    pool = batch_pool.pool
    client = batch_pool.openai()
    model = EmbeddingSettings().entry().model_id
    lines = batch_jsonl("/v1/embeddings", N, lambda i: {"model": model, "input": f"text number {i}"}, "e")
    # the ingress answers client keys once the coordinator's keyring has reached its donor
    f = wait_for(
        lambda: client.files.create(file=("power-cut.jsonl", lines), purpose="batch"),
        timeout=120,
        interval=1,
        what="rma-files to take a client key's upload",
    )
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
    wait_for(
        lambda: client.batches.retrieve(b.id).request_counts.completed >= 5,
        timeout=300,
        interval=0.5,
        what="a few items answered",
    )
    nodes = {pool.worker(d.worker_id)["ray_node_id"]: d for d in batch_pool.services}
    (runner_node,) = batch_pool.replica_nodes(RUNNER)
    assert runner_node in nodes, (runner_node, nodes)  # on a service donor, as its selector says
    victim = nodes.pop(runner_node)
    (survivor_node,) = nodes
    before = client.batches.retrieve(b.id).request_counts
    assert before.completed < N, f"the batch finished before the power cut: {before}"

    victims = victim.pids()
    assert victim.proc.pid in victims, victims
    victim.power_cut(victims)
    wait_for(
        lambda: any(n["node_id"] == runner_node and n["state"] == "DEAD" for n in pool.ray_nodes()),
        timeout=120,
        interval=1,
        what="Ray to see the killed donor's node dead",
    )
    # the ingress may have been on the killed donor too: a failed poll is tried again until Serve replaces it
    done: Any = wait_for(
        lambda: (
            (x := client.batches.retrieve(b.id)).status in ("completed", "failed", "cancelled", "expired")
            and x
        ),
        timeout=600,
        interval=1,
        what=f"batch {b.id} to finish after the power cut",
    )
    assert done.status == "completed", done
    assert done.request_counts.total == done.request_counts.completed == N, done.request_counts
    assert done.error_file_id is None, done
    out = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    assert sorted(x["custom_id"] for x in out) == sorted(f"e-{i}" for i in range(N))  # each exactly once
    assert all(
        x["response"]["status_code"] == 200 and len(x["response"]["body"]["data"][0]["embedding"]) > 0
        for x in out
    )
    # the runner moved to the other donor, and the embeddings run there alone
    assert batch_pool.replica_nodes(RUNNER) == [survivor_node]
    assert set(batch_pool.replica_nodes(EMBEDDER)) == {survivor_node}
