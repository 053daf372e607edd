"""The LLMConfig per tier and the OpenAI route table (building them starts no Ray and loads no model)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="the LLM stack is not installed: run scripts/install-llm.sh")

from deployments.llm.config import LLMSettings, build_llm_config, label_selector  # noqa: E402


def test_cpu_tier_serves_the_embedded_model_from_the_data_dir(tmp_path: Path) -> None:
    s = LLMSettings(data_dir=tmp_path, kv_cache_gib=2)
    c = build_llm_config(s)
    assert c.model_id == "smollm2-135m-instruct"
    assert c.model_loading_config.model_source == str(tmp_path / "models" / "smollm2-135m-instruct")
    assert c.accelerator_config.kind == "cpu" and c.accelerator_type is None
    assert c.engine_kwargs["enforce_eager"] is True and c.engine_kwargs["max_model_len"] == 2048
    env = c.runtime_env["env_vars"]
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and env["HF_HUB_OFFLINE"] == "1"
    # not Ray's default of the replica's one CPU: the engine computes on what the placement group reserves
    assert env["OMP_NUM_THREADS"] == "2"
    assert (
        build_llm_config(LLMSettings(data_dir=tmp_path, cpu_threads=6)).runtime_env["env_vars"][
            "OMP_NUM_THREADS"
        ]
        == "6"
    )
    # threads float over the node (vLLM's 'auto' pins ONE thread on a 2-core node and every core on a big one)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    # one worker inside vLLM's engine core, as vLLM's own server runs it (deployments.llm.server.CPUEngine)
    assert env["RMA_LLM_CPU_EXECUTOR"] == "uni"
    # as its app's ingress, the replica's key gate writes a stream at most every 20 ms
    assert build_llm_config(s, ingress=True).runtime_env["env_vars"]["RMA_LLM_STREAM_COALESCE_MS"] == "20"
    # the CPU LLM runs on trusted nodes only (the head, trusted service donors): it is its app's ingress and sees keys
    assert c.deployment_config["placement_group_bundle_label_selector"] == [
        {"rma.io/tier": "in(service,head)", "rma.io/trusted": "true"}
    ]
    assert s.direct_ingress()
    # the replica converts the GGUF on its own node before vLLM starts
    assert c.callback_config.callback_class == "deployments.llm.prepare:PrepareEmbeddedModel"
    assert c.callback_config.callback_kwargs == {"target": c.model_loading_config.model_source}


def test_gpu_tier_picks_by_memory_and_selects_gpu_nodes_of_the_accelerator_type(tmp_path: Path) -> None:
    s = LLMSettings(data_dir=tmp_path, gpu_memory_mb=24_576, accelerator_type="A10G")
    c = build_llm_config(s)
    assert s.resolved_tier() == "gpu"
    assert c.model_id == "qwen2.5-14b-instruct-awq"
    assert c.model_loading_config.model_source == "Qwen/Qwen2.5-14B-Instruct-AWQ"
    assert c.accelerator_type == "A10G" and c.accelerator_config.kind == "gpu"
    assert (
        c.engine_kwargs["quantization"] == "awq_marlin" and c.engine_kwargs["gpu_memory_utilization"] == 0.9
    )
    assert "enforce_eager" not in c.engine_kwargs
    # any admitted GPU donor may serve: so its replica is not an ingress (client keys stay on trusted nodes)
    assert c.deployment_config["placement_group_bundle_label_selector"] == [{"rma.io/tier": "gpu"}]
    assert not s.direct_ingress()
    assert c.runtime_env is None  # a GPU donor may reach the hub; nothing forces offline mode


def test_model_source_override_points_at_a_volume(tmp_path: Path) -> None:
    s = LLMSettings(data_dir=tmp_path, gpu_memory_mb=16_000, model_source="/mnt/rma-data/models/qwen7b-awq")
    c = build_llm_config(s)
    assert c.model_loading_config.model_source == "/mnt/rma-data/models/qwen7b-awq"
    assert c.callback_config.callback_class != "deployments.llm.prepare:PrepareEmbeddedModel"


def test_settings_come_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RMA_LLM_TIER", "cpu")
    monkeypatch.setenv("RMA_LLM_MAX_MODEL_LEN", "1024")
    monkeypatch.setenv("RMA_LLM_CPU_TIERS", "service")
    monkeypatch.setenv("RMA_DATA_DIR", str(tmp_path))
    s = LLMSettings()
    c = build_llm_config(s)
    assert s.data_dir == tmp_path and c.engine_kwargs["max_model_len"] == 1024
    assert c.deployment_config["placement_group_bundle_label_selector"] == [
        {"rma.io/tier": "service", "rma.io/trusted": "true"}
    ]


def test_a_model_for_the_wrong_tier_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="gpu tier, not cpu"):
        build_llm_config(LLMSettings(data_dir=tmp_path, tier="cpu", model="qwen2.5-7b-instruct-awq"))
    with pytest.raises(ValueError, match="names no tier"):
        label_selector("cpu", " , ")


def test_the_ingress_shape_follows_where_the_llm_may_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The LLM replica answers HTTP itself (and so sees client keys) only where it runs on trusted nodes only."""
    import ray.serve.llm
    from ray.llm._internal.serve.core.server.llm_server import LLMServer

    from deployments.llm.app import build_llm_app
    from deployments.llm.config import PROXIED_INGRESS_DEPLOYMENT

    built: list[tuple[object, dict]] = []

    def fake_build(
        llm_config: object, **kwargs: object
    ) -> object:  # the real one asks a running Ray for its env
        built.append((llm_config, kwargs))
        return ray.serve.deployment(lambda: None, name="LLMServer:stand-in").bind()

    monkeypatch.setattr(ray.serve.llm, "build_llm_deployment", fake_build)
    build_llm_app(LLMSettings(data_dir=tmp_path))
    config, kwargs = built[-1]
    assert kwargs["name_prefix"] == "LLMServer:" and issubclass(kwargs["deployment_cls"], LLMServer)
    assert kwargs["deployment_cls"].__mro__[1].__name__ == "KeyedLLMServer"  # serve.ingress() wraps it
    assert (
        config.runtime_env["env_vars"]["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    )  # its own HTTP server for HAProxy

    proxied = build_llm_app(LLMSettings(data_dir=tmp_path, trusted_only=False))
    from deployments.llm.server import KeyedLLMServer, PoolLLMServer

    assert built[-1][1]["deployment_cls"] is PoolLLMServer and not issubclass(PoolLLMServer, KeyedLLMServer)
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in built[-1][0].runtime_env["env_vars"]
    assert proxied._bound_deployment.name == PROXIED_INGRESS_DEPLOYMENT
    assert proxied._bound_deployment.ray_actor_options["label_selector"] == {"rma.io/trusted": "true"}
    assert not LLMSettings(data_dir=tmp_path, ingress="proxied").direct_ingress()
    with pytest.raises(ValueError, match="RMA_LLM_TRUSTED_ONLY=true"):
        LLMSettings(data_dir=tmp_path, trusted_only=False, ingress="direct").direct_ingress()
    gpu = LLMSettings(data_dir=tmp_path, gpu_memory_mb=24_576, trusted_only=True)
    assert gpu.direct_ingress()
    assert build_llm_config(gpu).deployment_config["placement_group_bundle_label_selector"] == [
        {"rma.io/tier": "gpu", "rma.io/trusted": "true"}
    ]


def test_the_key_gate_serves_only_the_openai_routes_and_only_with_a_key() -> None:
    """ClientKeyGate in front of an app shaped like vLLM's (routes carry /v1; Serve mounts it at root_path /v1)."""
    import asyncio

    import httpx
    from fastapi import FastAPI

    from deployments.gateway import auth
    from deployments.gateway.keys import ClientKeyVerifier
    from deployments.llm.gate import key_gate
    from rma_ray.credentials import Kind, mint

    inner = FastAPI()
    seen: list[str] = []

    @inner.get("/v1/models")
    async def models() -> dict[str, str]:
        return {"object": "list"}

    @inner.post("/v1/chat/completions")
    async def chat() -> dict[str, str]:
        return {"object": "chat.completion"}

    @inner.get("/v1/tokenize")
    async def tokenize() -> dict[str, str]:
        seen.append("tokenize")
        return {}

    good = mint(Kind.CLIENT)
    v = ClientKeyVerifier(
        lambda: {"keys": [{"id": good.id, "hash": good.hash, "name": "alice"}]},
        refresh_s=3600,
        max_stale_s=3600,
    )
    v.refresh()
    auth.set_verifier(v)

    async def run() -> None:
        gate = key_gate(inner)

        async def mounted(scope: dict, receive: object, send: object) -> None:  # what Serve's replica does
            await gate({**scope, "root_path": "/v1"} if scope["type"] == "http" else scope, receive, send)

        key = {"Authorization": f"Bearer {good.token}"}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=mounted), base_url="http://pool") as c:
            assert (await c.get("/v1/models", headers=key)).json() == {"object": "list"}
            assert (await c.post("/v1/chat/completions", headers=key)).json() == {"object": "chat.completion"}
            for headers in (
                {},
                {"Authorization": "Bearer rma_client_nope_nope"},
                {"Authorization": f"Bearer {mint(Kind.CLIENT).token}"},
            ):
                r = await c.post("/v1/chat/completions", headers=headers)
                assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
                assert r.headers["www-authenticate"] == "Bearer"
            for path in ("/v1/tokenize", "/v1/docs", "/v1/openapi.json", "/v1/metrics", "/v1/embeddings"):
                r = await c.get(path, headers=key)
                assert r.status_code == 404 and "/chat/completions" in r.json()["error"]["message"], path
            r = await c.delete("/v1/chat/completions", headers=key)
            assert r.status_code == 405 and r.headers["allow"] == "POST"
        assert seen == []  # vLLM's other routes were never reached

    try:
        asyncio.run(run())
    finally:
        auth.set_verifier(None)


def test_every_openai_route_needs_a_client_key() -> None:
    """Drift guard (proxied shape): the ingress mounts only these routes, each with the one client-key check,
    and no docs."""
    from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress, make_fastapi_ingress

    from deployments.gateway.auth import AUTH, current_client
    from deployments.llm.openai import openai_fastapi_app, openai_routes

    app = openai_fastapi_app()
    make_fastapi_ingress(OpenAiIngress, endpoint_map=openai_routes(), app=app)
    routes = {(next(iter(r.methods)), r.path): r for r in app.routes if hasattr(r, "methods")}
    assert set(routes) == {
        ("GET", "/models"),
        ("GET", "/models/{model:path}"),
        ("POST", "/completions"),
        ("POST", "/chat/completions"),
    }
    for route in routes.values():
        assert any(d.call is current_client for d in route.dependant.dependencies), route.path
    assert AUTH[0].dependency is current_client
    assert app.docs_url is None and app.openapi_url is None


def test_inference_routes_need_a_client_key() -> None:
    from deployments.gateway.auth import current_client
    from deployments.llm.inference import _inference_app

    routes = [r for r in _inference_app.routes if hasattr(r, "methods")]
    assert [(r.path, sorted(r.methods)) for r in routes] == [("/llm", ["POST"])]
    assert any(d.call is current_client for d in routes[0].dependant.dependencies)
    assert _inference_app.docs_url is None and _inference_app.openapi_url is None


def test_the_one_key_check_accepts_a_live_key_and_refuses_the_others() -> None:
    """current_client, on the event loop: the client a live key acts for; 401 with WWW-Authenticate for a
    missing, malformed or unknown key, and 503 with Retry-After when the replica has no keyring."""
    import asyncio

    from starlette.requests import Request

    from deployments.gateway import auth
    from deployments.gateway.keys import ClientKeyVerifier
    from deployments.gateway.refusal import Refusal
    from rma_ray.credentials import Kind, mint

    good = mint(Kind.CLIENT)
    v = ClientKeyVerifier(
        lambda: {"keys": [{"id": good.id, "hash": good.hash, "name": "alice"}]},
        refresh_s=3600,
        max_stale_s=3600,
    )
    v.refresh()

    def req(header: str | None) -> Request:
        headers = [(b"authorization", header.encode())] if header else []
        return Request({"type": "http", "method": "POST", "path": "/", "headers": headers})

    auth.set_verifier(v)
    try:
        assert asyncio.run(auth.current_client(req(f"Bearer {good.token}"))).client == "alice"
        for header in (None, "Bearer rma_client_nope_nope", f"Bearer {mint(Kind.CLIENT).token}"):
            with pytest.raises(Refusal) as exc:
                asyncio.run(auth.current_client(req(header)))
            assert exc.value.status == 401 and exc.value.headers() == {"WWW-Authenticate": "Bearer"}
        auth.set_verifier(None)
        with pytest.MonkeyPatch.context() as mp:
            mp.delenv("RMA_COORDINATOR_URL", raising=False)
            no_identity = RuntimeError("no identity on this node")
            mp.setattr(auth, "_build", lambda: (_ for _ in ()).throw(no_identity))
            with pytest.raises(Refusal) as exc:
                asyncio.run(auth.current_client(req(f"Bearer {good.token}")))
        assert (exc.value.status, exc.value.code) == (503, "keyring_unavailable")
        assert "no identity" in exc.value.message and exc.value.headers() == {"Retry-After": "5"}
    finally:
        auth.set_verifier(None)


def test_the_stream_coalescer_writes_the_first_chunk_at_once_and_loses_nothing() -> None:
    """On an event loop whose clock only moves when every task waits (looptime): the gaps between chunks and the
    times of the writes are exact, whatever the machine's load."""
    import asyncio

    import looptime

    from deployments.gateway.asgi import StreamCoalescer

    async def run(content_type: bytes, gaps: list[float]) -> list[tuple[float, bytes, bool]]:
        loop = asyncio.get_running_loop()
        sent: list[tuple[float, bytes, bool]] = []

        async def send(message: dict) -> None:
            if message["type"] == "http.response.body":
                sent.append((round(loop.time(), 6), message["body"], bool(message.get("more_body"))))

        c = StreamCoalescer(send, 0.05)
        await c({"type": "http.response.start", "status": 200, "headers": [(b"content-type", content_type)]})
        for i, gap in enumerate(gaps):
            await asyncio.sleep(gap)
            await c({"type": "http.response.body", "body": b"data: %d\n\n" % i, "more_body": True})
        await c({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        return sent

    def on_fake_time(content_type: bytes, gaps: list[float]) -> list[tuple[float, bytes, bool]]:
        loop = looptime.new_event_loop(start=100.0)  # fake time from the start (no pytest-asyncio here)
        try:
            return loop.run_until_complete(run(content_type, gaps))
        finally:
            loop.close()

    # chunks at t=100, 100.001, .002, .003, then .123 and .124; the stream ends at .124
    events = on_fake_time(b"text/event-stream", [0, 0.001, 0.001, 0.001, 0.12, 0.001])
    assert events == [
        (100.0, b"data: 0\n\n", True),  # the first token is not held back
        (100.05, b"data: 1\n\ndata: 2\n\ndata: 3\n\n", True),  # gathered for one window after the first write
        (100.123, b"data: 4\n\n", True),  # a window has passed since the last write: at once
        (100.124, b"data: 5\n\ndata: [DONE]\n\n", False),  # the end flushes what is held, at once
    ]
    # a response that is not an event stream passes through untouched, at the times it was written
    plain = on_fake_time(b"application/json", [0, 0.001])
    assert plain == [
        (100.0, b"data: 0\n\n", True),
        (100.001, b"data: 1\n\n", True),
        (100.001, b"data: [DONE]\n\n", False),
    ]


@pytest.mark.parametrize("usage_stats", ["0", "1"])
def test_the_engine_starts_without_the_telemetry_report_when_usage_stats_are_off(
    usage_stats: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pool runs Ray with usage stats off: the replica then does not wait for ray.serve.llm's TelemetryAgent
    (a detached actor, a fresh worker process on the head); with them on, ray.serve.llm's start is kept."""
    import asyncio

    from ray.llm._internal.serve.core.server import llm_server

    from deployments.llm.server import KeyedLLMServer

    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", usage_stats)
    reports: list[object] = []
    monkeypatch.setattr(
        llm_server, "push_telemetry_report_for_all_models", lambda all_models: reports.append(all_models)
    )
    monkeypatch.setattr(llm_server, "record_extra_usage_tag", lambda *a: None)
    started: list[bool] = []

    class Engine:
        async def start(self) -> None:
            started.append(True)

    server = KeyedLLMServer.__new__(KeyedLLMServer)
    server.engine, server._llm_config = Engine(), "the config"
    asyncio.run(server._start_engine())
    assert started == [True]
    assert reports == ([] if usage_stats == "0" else [["the config"]])
