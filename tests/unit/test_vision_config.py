"""Vision settings: placement of the Ollama backend, the vLLM multimodal backend's LLMConfig (built, not run: no GPU
and no weights here), catalog choice, and the reconciler's check of the Ollama label. No Ray is started."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from admission.models import Worker
from admission.services.reconcile import mismatch
from deployments.llm.catalog import NoModelFits, choose, choose_vision
from deployments.vision.config import OLLAMA_DEPLOYMENT, VisionSettings


def test_ollama_backend_is_placed_by_label_and_tier(monkeypatch: pytest.MonkeyPatch) -> None:
    s = VisionSettings()
    assert s.backend == "ollama" and s.backend_deployment() == OLLAMA_DEPLOYMENT
    assert s.ollama_selector() == {"rma.io/ollama": "true", "rma.io/tier": "gpu"}
    monkeypatch.setenv("RMA_VISION_TIERS", "gpu, service")
    monkeypatch.setenv("RMA_VISION_MAX_IMAGE_BYTES", "2048")
    s = VisionSettings()
    assert s.ollama_selector() == {"rma.io/ollama": "true", "rma.io/tier": "in(gpu,service)"}
    assert s.limits().max_image_bytes == 2048
    with pytest.raises(ValueError):
        VisionSettings(tiers=" , ").ollama_selector()


def test_vision_models_are_chosen_apart_from_chat_models() -> None:
    assert not choose(24_576).vision and not choose(143_771).vision
    assert choose_vision(15_360).model_id == "qwen2.5-vl-7b-instruct-awq"
    assert choose_vision(81_559).model_id == "qwen2.5-vl-32b-instruct-awq"
    with pytest.raises(NoModelFits, match="no vision model fits"):
        choose_vision(0)


needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="the LLM stack is not installed: run scripts/install-llm.sh",
)


@needs_vllm
def test_vllm_backend_config_for_a_gpu_donor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "RMA_LLM_MODEL_SOURCE", "/somewhere/the-chat-model"
    )  # the chat model's, never the vision's
    s = VisionSettings(backend="vllm", gpu_memory_mb=24_576, accelerator_type="A10G")
    c = s.vllm_config()
    assert c.model_id == "qwen2.5-vl-7b-instruct-awq"
    assert c.model_loading_config.model_source == "Qwen/Qwen2.5-VL-7B-Instruct-AWQ"
    assert c.engine_kwargs["limit_mm_per_prompt"] == {"image": 1}
    assert c.engine_kwargs["gpu_memory_utilization"] == 0.85 and c.accelerator_type == "A10G"
    assert c.deployment_config["placement_group_bundle_label_selector"] == [{"rma.io/tier": "gpu"}]
    assert s.backend_deployment() == "LLMServer:qwen2_5-vl-7b-instruct-awq"


def test_vllm_backend_refuses_a_text_model() -> None:
    with pytest.raises(NoModelFits, match="does not take images"):
        VisionSettings(backend="vllm", model="qwen2.5-7b-instruct-awq").vllm_entry()


def test_reconciler_quarantines_a_node_claiming_ollama_it_did_not_register() -> None:
    w = Worker(
        id="w1",
        tier="service",
        trusted=False,
        capabilities={"ram_mb": 24_000, "gpus": []},
        labels={"rma.io/tier": "service", "rma.io/node": "w1", "rma.io/trusted": "false"},
    )
    node = {"labels": {**w.labels}, "resources_total": {"CPU": 2}}
    assert mismatch(w, node) is None
    node["labels"]["rma.io/ollama"] = "true"
    assert "rma.io/ollama" in (mismatch(w, node) or "")
