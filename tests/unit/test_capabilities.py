from __future__ import annotations

import pytest
from pydantic import ValidationError

from rma_ray import capabilities
from rma_ray.capabilities import Capabilities


def test_h200_reading(hardware_fixtures: dict) -> None:  # type: ignore[type-arg]
    caps = capabilities.from_readings(hardware_fixtures["h200-16cpu-128g"])
    assert caps.cpu_cores == 16
    assert caps.ram_mb == 135148564480 // 2**20
    assert len(caps.gpus) == 1
    gpu = caps.gpus[0]
    assert gpu.name == "NVIDIA H200"
    assert gpu.memory_mb == 150754820096 // 2**20
    assert gpu.compute_capability == "9.0"
    assert gpu.uuid == "GPU-efa32f84-c264-afe8-c928-7ca77252248f"
    assert caps.disk_free_gb == pytest.approx(68702437376 / 2**30, abs=0.1)


def test_cpu_box_reading(hardware_fixtures: dict) -> None:  # type: ignore[type-arg]
    caps = capabilities.from_readings(hardware_fixtures["cpu-2core-24g-nogpu"])
    assert caps.gpus == []
    assert caps.cpu_cores == 2
    assert caps.ram_mb == 25276510208 // 2**20


def test_probe_on_this_machine_never_raises_without_gpu() -> None:
    caps = capabilities.probe()
    assert caps.cpu_cores >= 1 and caps.ram_mb > 0
    raw = capabilities.read_raw()
    if "error" in raw["nvml"]:  # no driver here: no GPUs, and the reason is kept
        assert caps.gpus == []


def test_seed_human_strings() -> None:
    caps = Capabilities.model_validate(
        {
            "gpu_memory": "24GB",
            "gpu_type": "NVIDIA RTX 4090",
            "cpu_cores": 16,
            "ram": "64GB",
            "storage": "1TB",
            "network_bandwidth": "1Gbps",
        }
    )
    assert caps.gpus[0].name == "NVIDIA RTX 4090"
    assert caps.gpus[0].memory_mb == 24_000_000_000 // 2**20
    assert caps.ram_mb == 64_000_000_000 // 2**20
    assert caps.disk_free_gb == pytest.approx(931.3, abs=0.1)


def test_seed_without_gpu() -> None:
    caps = Capabilities.model_validate({"gpu_memory": None, "cpu_cores": 4, "ram": "8GB"})
    assert caps.gpus == [] and caps.ram_mb == 7629


@pytest.mark.parametrize(
    "bad",
    [
        {"cpu_cores": 0, "ram_mb": 1000},
        {"cpu_cores": 2, "ram_mb": -1},
        {"cpu_cores": 2, "ram": "lots"},
        {"cpu_cores": 2, "ram_mb": 1000, "gpus": [{"name": "", "memory_mb": 1}]},
        {"ram_mb": 1000},
    ],
)
def test_invalid_capabilities_are_refused(bad: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValidationError):
        Capabilities.model_validate(bad)
