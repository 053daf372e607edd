"""Table-driven: each row is a machine, what it qualifies for, and where it goes."""

from __future__ import annotations

import pytest

from rma_ray import tiers
from rma_ray.capabilities import Capabilities, GpuInfo, from_readings
from rma_ray.tiers import Tier


def machine(
    ram_mb: int = 16_000, cores: int = 4, disk: float = 100, gpu_mb: int | None = None
) -> Capabilities:
    gpus = [GpuInfo(name="GPU", memory_mb=gpu_mb)] if gpu_mb is not None else []
    return Capabilities(gpus=gpus, cpu_cores=cores, ram_mb=ram_mb, disk_free_gb=disk)


@pytest.mark.parametrize(
    ("caps", "eligible"),
    [
        (machine(gpu_mb=24_576), [Tier.GPU, Tier.SERVICE, Tier.DATA]),
        (machine(gpu_mb=15_360), [Tier.GPU, Tier.SERVICE, Tier.DATA]),  # a T4 ("16 GB") reports 15,360 MiB
        (machine(gpu_mb=8_192), [Tier.SERVICE, Tier.DATA]),  # 8 GB card: not enough for the gpu tier
        (machine(ram_mb=7_800, cores=2), [Tier.SERVICE, Tier.DATA]),  # an "8 GB" laptop
        (machine(ram_mb=16_000, cores=1), [Tier.DATA]),
        (machine(ram_mb=4_000, cores=4), [Tier.DATA]),
        (machine(ram_mb=4_000, cores=4, disk=10), []),
        (machine(ram_mb=1_000, cores=1, disk=500), []),
        (machine(ram_mb=16_000, cores=8, disk=5), [Tier.SERVICE]),
    ],
)
def test_eligible(caps: Capabilities, eligible: list[Tier]) -> None:
    assert tiers.eligible(caps) == eligible


@pytest.mark.parametrize(
    ("candidates", "demand", "pinned", "chosen"),
    [
        ([Tier.GPU, Tier.SERVICE, Tier.DATA], {}, None, Tier.GPU),  # no demand: first rule that fits
        ([Tier.GPU, Tier.SERVICE, Tier.DATA], {"service": 3}, None, Tier.SERVICE),
        ([Tier.GPU, Tier.SERVICE, Tier.DATA], {"service": 3, "data": 5}, None, Tier.DATA),
        ([Tier.GPU, Tier.SERVICE, Tier.DATA], {"gpu": 2, "data": 2}, None, Tier.GPU),  # tie -> rule order
        ([Tier.SERVICE, Tier.DATA], {"gpu": 9}, None, Tier.SERVICE),  # demand it cannot meet is ignored
        ([Tier.GPU, Tier.SERVICE, Tier.DATA], {"gpu": 9}, Tier.DATA, Tier.DATA),  # the admin's pin wins
    ],
)
def test_choose(candidates: list[Tier], demand: dict[str, int], pinned: Tier | None, chosen: Tier) -> None:
    assert tiers.choose(candidates, demand, pinned) == chosen


def test_choose_refuses_impossible_pin() -> None:
    with pytest.raises(ValueError):
        tiers.choose([Tier.DATA], {}, Tier.GPU)


def test_refusal_names_every_minimum() -> None:
    msg = tiers.refusal(machine(ram_mb=1_000, cores=1, disk=5))
    for minimum in tiers.MINIMUMS.values():
        assert minimum in msg
    assert "1000 MiB RAM" in msg


def test_pin_refusal_says_why() -> None:
    msg = tiers.pin_refusal(Tier.GPU, machine())
    assert "no GPU found" in msg and "16 GB" in msg


def test_real_readings(hardware_fixtures: dict) -> None:  # type: ignore[type-arg]
    h200 = from_readings(hardware_fixtures["h200-16cpu-128g"])
    cpu = from_readings(hardware_fixtures["cpu-2core-24g-nogpu"])
    assert tiers.choose(tiers.eligible(h200)) == Tier.GPU
    assert tiers.eligible(cpu) == [Tier.SERVICE, Tier.DATA]
    assert tiers.choose(tiers.eligible(cpu), {"data": 1}) == Tier.DATA


def test_labels() -> None:
    assert tiers.node_labels(Tier.DATA, "abc", True) == {
        "rma.io/tier": "data",
        "rma.io/node": "abc",
        "rma.io/trusted": "true",
    }
    assert Tier.GPU.number == 1 and Tier.SERVICE.number == 2 and Tier.DATA.number == 3
