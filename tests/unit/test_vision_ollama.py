"""The Ollama side of vision, against FakeOllamaServer: a STAND-IN speaking Ollama's HTTP wire format, because a
real Ollama (binary + vision model) cannot run on this machine. What is real here: the official `ollama` client,
our request/response mapping (`deployments.vision.backends.OllamaVision`), the capabilities probe's Ollama detection
and the labels admission gives a donor from it. Real-model checks: tests/integration/test_vision.py with
RMA_TEST_OLLAMA_URL."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image

from deployments.gateway.refusal import Refusal
from deployments.vision.backends import OllamaVision, from_chat_response, openai_messages
from deployments.vision.request import VisionInput
from rma_ray import capabilities, tiers
from rma_ray.tiers import LABEL_OLLAMA, Tier
from tests.fake_ollama import FakeOllamaServer
from tests.support import free_port


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOllamaServer]:
    """Stand-in Ollama server on a free port in this process (~0.3 s)."""
    with FakeOllamaServer() as srv:
        yield srv


def vinput(model: str | None = None, max_tokens: int = 64, system: str | None = None) -> VisionInput:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (0, 90, 200)).save(buf, format="PNG")
    return VisionInput(
        image=buf.getvalue(),
        mime="image/png",
        width=64,
        height=48,
        prompt="What colour is it?",
        model=model,
        system=system,
        max_tokens=max_tokens,
        temperature=0.0,
    )


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_probe_reports_the_local_ollama_and_its_vision_models(fake: FakeOllamaServer) -> None:
    caps = capabilities.probe(ollama_host=fake.url)
    assert caps.ollama is not None and caps.ollama.url == fake.url
    assert caps.ollama.models == ["llava:7b", "llama3.2:1b", "bakllava:latest"]
    # llava by the server's `capabilities`, bakllava by its clip encoder family (an older server lists none)
    assert caps.ollama.vision_models == ["llava:7b", "bakllava:latest"]


def test_probe_without_a_server_reports_none_quickly() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    raw = capabilities.read_raw(ollama_host=url)
    assert "error" in raw["ollama"] and url in raw["ollama"]["error"]
    assert capabilities.from_readings(raw).ollama is None


def test_probe_uses_ollama_host_like_the_client(
    fake: FakeOllamaServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OLLAMA_HOST", fake.url)
    assert capabilities.ollama_url() == fake.url
    assert capabilities.probe().ollama is not None


def test_labels_carry_ollama_only_with_a_vision_model(
    fake: FakeOllamaServer, hardware_fixtures: dict[str, Any]
) -> None:
    raw = dict(hardware_fixtures["h200-16cpu-128g"])
    raw["ollama"] = capabilities.read_raw(ollama_host=fake.url)["ollama"]
    caps = capabilities.from_readings(raw)
    assert tiers.eligible(caps)[0] is Tier.GPU
    assert tiers.node_labels(Tier.GPU, "w1", False, caps)[LABEL_OLLAMA] == "true"
    text_only = caps.model_copy(update={"ollama": caps.ollama.model_copy(update={"vision_models": []})})
    assert LABEL_OLLAMA not in tiers.node_labels(Tier.GPU, "w1", False, text_only)
    assert LABEL_OLLAMA not in tiers.node_labels(
        Tier.GPU, "w1", False, caps.model_copy(update={"ollama": None})
    )
    # what a donor sends over the wire (model_dump -> JSON) keeps it
    again = capabilities.Capabilities.model_validate(caps.model_dump(mode="json"))
    assert again.ollama == caps.ollama


def test_describe_maps_request_and_response(fake: FakeOllamaServer) -> None:
    backend = OllamaVision(fake.url)
    out = run(backend.describe(vinput(system="Answer briefly.")))
    sent = fake.requests[-1]
    assert sent["model"] == "llava:7b" and sent["stream"] is False
    assert sent["options"] == {"num_predict": 64, "temperature": 0.0}
    assert [m["role"] for m in sent["messages"]] == ["system", "user"]
    assert base64.b64decode(sent["messages"][1]["images"][0]) == vinput().image
    assert out["text"].startswith("[stand-in] PNG 64x48 sha256:") and "What colour is it?" in out["text"]
    assert out["model"] == "llava:7b" and out["finish_reason"] == "stop" and out["backend"] == "ollama"
    assert out["usage"]["completion_tokens"] > 0
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]


def test_length_cutoff_is_finish_reason_length(fake: FakeOllamaServer) -> None:
    out = run(OllamaVision(fake.url).describe(vinput(max_tokens=2)))
    assert out["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 2


def test_model_choice(fake: FakeOllamaServer) -> None:
    assert run(OllamaVision(fake.url).describe(vinput(model="bakllava")))["model"] == "bakllava:latest"
    assert (
        run(OllamaVision(fake.url, default_model="bakllava:latest").describe(vinput()))["model"]
        == "bakllava:latest"
    )
    for name in ("llama3.2:1b", "gpt-4o"):  # a text-only model of that server, a model it does not have
        with pytest.raises(Refusal) as exc:
            run(OllamaVision(fake.url).describe(vinput(model=name)))
        assert exc.value.status == 404 and exc.value.code == "model_not_found"
        assert "llava:7b" in exc.value.message  # says what is available


def test_no_vision_model_and_no_server_are_503() -> None:
    with FakeOllamaServer(models={"llama3.2:1b": (["completion"], ["llama"])}) as only_text:
        with pytest.raises(Refusal) as exc:
            run(OllamaVision(only_text.url).describe(vinput()))
        assert (
            exc.value.status == 503
            and exc.value.code == "no_vision_model"
            and "ollama pull" in exc.value.message
        )
    with pytest.raises(Refusal) as exc:
        run(OllamaVision(f"http://127.0.0.1:{free_port()}").describe(vinput()))
    assert exc.value.status == 503 and exc.value.code == "ollama_unreachable"


def test_openai_messages_for_the_vllm_backend() -> None:
    inp = vinput(system="Be brief.")
    msgs = openai_messages(inp)
    assert msgs[0] == {"role": "system", "content": "Be brief."}
    image_part, text_part = msgs[1]["content"]
    assert image_part["type"] == "image_url"
    url = image_part["image_url"]["url"]
    assert url.startswith("data:image/png;base64,") and base64.b64decode(url.split(",", 1)[1]) == inp.image
    assert text_part == {"type": "text", "text": "What colour is it?"}

    class Usage:
        def model_dump(self) -> dict[str, int]:
            return {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}

    class Resp:
        model = "qwen2.5-vl-7b-instruct-awq"
        usage = Usage()
        choices = [
            type(
                "C",
                (),
                {"finish_reason": "length", "message": type("M", (), {"content": "A blue square."})()},
            )()
        ]

    assert from_chat_response(Resp()) == {
        "text": "A blue square.",
        "model": "qwen2.5-vl-7b-instruct-awq",
        "finish_reason": "length",
        "usage": Usage().model_dump(),
        "backend": "vllm",
    }
