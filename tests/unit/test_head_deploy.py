"""The typed pool.json (rma_ray/poolinfo.py), the config `rma up` applies (deployments/serve_config.py's
embedded profile) and the `python -m deployments` entry's refusals. No Ray: the entry refuses bad input before
it connects."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rma_ray import poolinfo

ROOT = Path(__file__).resolve().parents[2]


def test_pool_json_is_private_and_holds_only_what_is_set(tmp_path: Path) -> None:
    info = poolinfo.PoolInfo(
        coordinator_url="http://h:8470",
        admin_key="rma_admin_x",
        overlay=None,
        supervisor_pid=os.getpid(),
        head_pid=1,
    )
    poolinfo.write(tmp_path, info)
    path = poolinfo.pool_file(tmp_path)
    assert path.stat().st_mode & 0o777 == 0o600
    data = json.loads(path.read_text())
    assert data == {
        "coordinator_url": "http://h:8470",
        "admin_key": "rma_admin_x",
        "overlay": None,
        "supervisor_pid": os.getpid(),
        "head_pid": 1,
    }
    assert "stores" not in data  # scripts wait for this key to appear
    back = poolinfo.read(tmp_path)
    assert back.supervisor_running() and back.admin_key == "rma_admin_x"
    back.stores = {"redis": {"status": "ready"}}
    poolinfo.write(tmp_path, back.without_processes())
    again = json.loads(path.read_text())
    assert again["stores"] == {"redis": {"status": "ready"}}
    assert not {"supervisor_pid", "head_pid", "coordinator_pid"} & set(again)


def test_pool_json_keeps_keys_it_does_not_know(tmp_path: Path) -> None:
    poolinfo.pool_file(tmp_path).write_text(json.dumps({"admin_key": "k", "future_field": [1]}))
    assert poolinfo.read(tmp_path).as_dict() == {"admin_key": "k", "future_field": [1]}
    assert poolinfo.read(tmp_path / "nothing").as_dict() == {}
    poolinfo.pool_file(tmp_path).write_text('{"supervisor_pid": "not a pid"')
    assert poolinfo.try_read(tmp_path).as_dict() == {}


def test_rma_up_applies_the_apps_it_was_asked_for_with_the_environments_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from deployments import serve_config

    monkeypatch.setenv("RMA_LLM_INGRESS", "proxied")
    specs = serve_config.group_apps(["services", "llm"])
    # the services group: the services app and the Batch API's two apps
    assert [s.name for s in specs] == ["services", "rma-batches", "rma-files", "rma-llm", "rma-inference"]
    by_name = {s.name: s for s in specs}
    assert by_name["rma-llm"].args["ingress"] == "proxied"  # from the environment, carried as args
    assert by_name["services"].args["service_selector"] == {"rma.io/tier": "in(service,head)"}
    assert by_name["rma-batches"].args["data_selector"] == by_name["services"].args["data_selector"]
    config = serve_config.apply_config(specs, {"host": "0.0.0.0", "port": 8123, "request_timeout_s": 180.0})
    assert config["proxy_location"] == "HeadOnly" and config["http_options"]["port"] == 8123
    assert [a["import_path"] for a in config["applications"]] == [
        "deployments.serve_config:services_app",
        "deployments.serve_config:batches_app",
        "deployments.serve_config:files_app",
        "deployments.serve_config:llm_app",
        "deployments.serve_config:inference_app",
    ]
    assert all("deployments" not in a for a in config["applications"])  # the code's own options apply
    with pytest.raises(ValueError, match="unknown app nope"):
        serve_config.group_apps(["nope"])


def test_an_edge_gets_its_stateless_apps_behind_the_edge_gate_on_its_donors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from deployments import serve_config
    from deployments.embeddings.config import EmbeddingSettings
    from deployments.gateway.edge_gate import EDGE_COORDINATOR_ENV, EDGE_NAME_ENV
    from deployments.llm.config import LLMSettings, label_selector

    monkeypatch.setenv("RMA_LLM_MAX_NUM_SEQS", "4")
    specs = serve_config.group_apps(["embeddings", "llm"], "edge", "e1", "http://10.0.0.1:8080/")
    assert [s.name for s in specs] == ["rma-embeddings", "rma-llm"]  # no rma-inference: it sees client keys
    llm = LLMSettings(**specs[1].args)
    assert specs[1].args["max_num_seqs"] == 4  # the environment's settings, as for the core
    assert llm.edge == "e1" and llm.direct_ingress() and not llm.replicas_trusted_only()
    assert label_selector("cpu", llm.node_tiers(), llm.replicas_trusted_only()) == {"rma.io/tier": "service"}
    assert llm.edge_env() == {EDGE_NAME_ENV: "e1", EDGE_COORDINATOR_ENV: "http://10.0.0.1:8080"}
    emb = EmbeddingSettings(**specs[0].args)
    assert emb.selector() == {"rma.io/tier": "service"} and emb.ingress() == {
        "rma.io/tier": "in(service,gpu)"
    }
    with pytest.raises(ValueError, match="proxied"):
        LLMSettings(edge="e1", edge_coordinator_url="http://c", ingress="proxied").direct_ingress()
    with pytest.raises(ValueError, match="needs --edge"):
        serve_config.group_apps(["llm"], "edge")
    core = LLMSettings()  # the core's LLM is as it was
    assert core.edge_env() == {} and core.node_tiers() == "service,head"


def test_an_edges_vision_front_checks_the_edge_credential_on_its_donors_and_the_core_s_stays_trusted() -> (
    None
):
    from deployments import serve_config
    from deployments.gateway.edge_gate import EDGE_COORDINATOR_ENV, EDGE_NAME_ENV
    from deployments.vision.config import BACKEND_APP, VISION_APP, VisionSettings

    specs = serve_config.group_apps(["vision"], "edge", "e1", "http://10.0.0.1:8080/")
    assert [s.name for s in specs] == [BACKEND_APP, VISION_APP]  # the backend first, as on the core
    front, backend = VisionSettings(**specs[1].args), VisionSettings(**specs[0].args)
    assert front.edge == backend.edge == "e1"
    assert front.front_selector() == {"rma.io/tier": "in(service,gpu)"}  # the edge's donors, never its head
    assert front.edge_env() == {EDGE_NAME_ENV: "e1", EDGE_COORDINATOR_ENV: "http://10.0.0.1:8080"}
    assert backend.ollama_selector() == {"rma.io/ollama": "true", "rma.io/tier": "gpu"}  # as on the core
    core = VisionSettings()
    assert core.front_selector() == {"rma.io/trusted": "true"} and core.edge_env() == {}
    with pytest.raises(ValueError, match="edge_coordinator_url"):
        VisionSettings(edge="e1").edge_env()
    # the replica's actor options follow the settings (not only the checked-in file)
    from deployments.vision.app import build_front_app

    on_edge = build_front_app(front)._bound_deployment.ray_actor_options
    assert on_edge["label_selector"] == {"rma.io/tier": "in(service,gpu)"}
    assert on_edge["runtime_env"]["env_vars"][EDGE_NAME_ENV] == "e1"
    on_core = build_front_app(core)._bound_deployment.ray_actor_options
    assert on_core["label_selector"] == {"rma.io/trusted": "true"}
    assert EDGE_NAME_ENV not in on_core["runtime_env"]["env_vars"]


def test_the_environment_never_makes_a_core_app_an_edge_app(monkeypatch: pytest.MonkeyPatch) -> None:
    from deployments import serve_config

    monkeypatch.setenv("RMA_VISION_EDGE", "e1")
    monkeypatch.setenv("RMA_VISION_EDGE_COORDINATOR_URL", "http://c")
    monkeypatch.setenv("RMA_LLM_EDGE", "e1")
    for spec in serve_config.group_apps(["vision", "llm"], "embedded"):
        assert "edge" not in spec.args and "edge_coordinator_url" not in spec.args, spec
    (backend, front) = serve_config.group_apps(["vision"], "edge", "e2", "http://coord")
    assert front.args["edge"] == backend.args["edge"] == "e2"  # the edge profile's own, not the env's


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["up", "--apps", "llm,chat"], "unknown app chat"),
        (["down", "--stores", "redis,mysql"], "unknown store mysql"),
        (["up", "--store-port", "redis=99999"], "--store-port 'redis=99999'"),
        (["up", "--profile", "edge", "--coordinator-url", ""], "--profile edge needs --edge NAME"),
        (
            ["up", "--profile", "edge", "--edge", "Core!", "--coordinator-url", "http://c"],
            "invalid edge name",
        ),
        (
            [
                "up",
                "--profile",
                "edge",
                "--edge",
                "e1",
                "--coordinator-url",
                "http://c",
                "--apps",
                "services",
            ],
            "unknown app services; choose from llm, embeddings, documents, vision or 'none'",
        ),
        (
            ["up", "--profile", "edge", "--edge", "e1", "--coordinator-url", "http://c", "--stores", "redis"],
            "an edge cluster holds no data stores",
        ),
    ],
)
def test_the_entry_refuses_bad_input_in_one_json_line(args: list[str], says: str) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "deployments", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"},
    )
    assert r.returncode == 1
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(lines) == 1 and says in lines[0]["error"], r.stdout
