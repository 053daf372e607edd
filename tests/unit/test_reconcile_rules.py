"""The reconciler's judgement of a live Ray node against its registration (pure; no Ray)."""

from __future__ import annotations

import pytest

from admission.models import Worker
from admission.services.reconcile import mismatch

GIB = 1024**3


def worker(tier: str = "service", trusted: bool = False, gpus: list | None = None, ram_mb: int = 16000) -> Worker:  # type: ignore[type-arg]
    labels = {"rma.io/tier": tier, "rma.io/node": "w1", "rma.io/trusted": "true" if trusted else "false"}
    return Worker(id="w1", tier=tier, trusted=trusted, labels=labels,
                  capabilities={"cpu_cores": 4, "ram_mb": ram_mb, "gpus": gpus or []})


def node(labels: dict | None = None, **resources: float) -> dict:  # type: ignore[type-arg]
    base = {"rma.io/tier": "service", "rma.io/node": "w1", "rma.io/trusted": "false"}
    return {"labels": {**base, **(labels or {})}, "resources_total": {"CPU": 1, "memory": 8 * GIB,
                                                                      "object_store_memory": 2 * GIB, **resources}}


H200 = [{"name": "NVIDIA H200", "memory_mb": 143771}]


@pytest.mark.parametrize(("w", "n", "expect"), [
    (worker(), node(), None),
    (worker(), node({"rma.io/tier": "gpu"}), "label rma.io/tier"),
    (worker(), node({"rma.io/trusted": "true"}), "label rma.io/trusted"),
    (worker("gpu", gpus=H200), node({"rma.io/tier": "gpu"}), "0 GPUs"),
    (worker("gpu", gpus=H200), node({"rma.io/tier": "gpu"}, GPU=1, **{"accelerator_type:H200": 1}), None),
    (worker("gpu", gpus=H200), node({"rma.io/tier": "gpu"}, GPU=1, **{"accelerator_type:A100": 1}), "accelerator A100"),
    (worker(), node(GPU=2), "Ray reports 2 GPUs, registered 0"),
    (worker(ram_mb=4000), node(), "Ray sees 10240 MiB"),
    (worker(ram_mb=64000), node(), None),  # a donor capping Ray's memory is fine
])
def test_mismatch(w: Worker, n: dict, expect: str | None) -> None:  # type: ignore[type-arg]
    got = mismatch(w, n)
    if expect is None:
        assert got is None
    else:
        assert got is not None and expect in got
