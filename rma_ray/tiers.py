"""Tiers from measured hardware, and the Ray node labels that carry them.

Filters -> candidates -> score, each a small pure function (DESIGN.md "Tiers and placement"):
1. a GPU with >= 16 GB           -> gpu     (llm, vision)
2. >= 8 GB RAM and >= 2 cores     -> service (gateway-side services)
3. >= 2 GB RAM and >= 20 GB disk  -> data    (data stores, trusted donors only)
A machine that qualifies for several tiers goes where the most replicas wait for a node; ties go to the
first rule that fits. An invite may pin a tier, which holds only if the hardware qualifies.

Thresholds are set a little under the marketed sizes: a "16 GB" card reports 15,360-16,384 MiB (a T4 shows
15,360), an "8 GB" machine 7.6-7.8 GiB after the kernel takes its share, "20 GB" of disk is 18.6 GiB.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from rma_ray.capabilities import Capabilities
from rma_ray.edges import LABEL_CLUSTER


class Tier(StrEnum):
    GPU = "gpu"
    SERVICE = "service"
    DATA = "data"

    @property
    def number(self) -> int:
        return TIER_ORDER.index(self) + 1


TIER_ORDER: tuple[Tier, ...] = (Tier.GPU, Tier.SERVICE, Tier.DATA)

MIN_GPU_MEMORY_MB = 15_000
MIN_SERVICE_RAM_MB = 7_500
MIN_SERVICE_CORES = 2
MIN_DATA_RAM_MB = 1_800
MIN_DATA_DISK_GB = 18.5

MINIMUMS: dict[Tier, str] = {
    Tier.GPU: "an NVIDIA GPU with at least 16 GB of memory",
    Tier.SERVICE: "at least 8 GB of RAM and 2 CPU cores",
    Tier.DATA: "at least 2 GB of RAM and 20 GB of free disk",
}

LABEL_TIER = "rma.io/tier"
LABEL_NODE = "rma.io/node"
LABEL_TRUSTED = "rma.io/trusted"
# label selector of the deployments that see clients' API keys in clear (HTTP ingresses): the head or trusted donors
TRUSTED_NODES = {LABEL_TRUSTED: "true"}
# A local Ollama server with at least one vision model (the probe's `ollama.vision_models`): the vision route's
# Ollama backend is placed only on such nodes. The model names stay in the capabilities (Ray label values
# cannot hold "llava:7b").
LABEL_OLLAMA = "rma.io/ollama"


@dataclass(frozen=True)
class Check:
    tier: Tier
    ok: bool
    reason: str  # why it fails (or what qualified it)


def check(tier: Tier, caps: Capabilities) -> Check:
    if tier is Tier.GPU:
        best = caps.gpu_memory_mb
        if not caps.gpus:
            return Check(tier, False, "no GPU found")
        if best < MIN_GPU_MEMORY_MB:
            return Check(tier, False, f"largest GPU has {best} MiB (needs {MIN_GPU_MEMORY_MB})")
        return Check(tier, True, f"GPU with {best} MiB")
    if tier is Tier.SERVICE:
        missing = []
        if caps.ram_mb < MIN_SERVICE_RAM_MB:
            missing.append(f"{caps.ram_mb} MiB RAM (needs {MIN_SERVICE_RAM_MB})")
        if caps.cpu_cores < MIN_SERVICE_CORES:
            missing.append(f"{caps.cpu_cores} CPU core(s) (needs {MIN_SERVICE_CORES})")
        return Check(
            tier, not missing, "; ".join(missing) or f"{caps.ram_mb} MiB RAM, {caps.cpu_cores} cores"
        )
    missing = []
    if caps.ram_mb < MIN_DATA_RAM_MB:
        missing.append(f"{caps.ram_mb} MiB RAM (needs {MIN_DATA_RAM_MB})")
    if caps.disk_free_gb < MIN_DATA_DISK_GB:
        missing.append(f"{caps.disk_free_gb:g} GiB free disk (needs {MIN_DATA_DISK_GB:g})")
    return Check(tier, not missing, "; ".join(missing) or f"{caps.disk_free_gb:g} GiB free disk")


def checks(caps: Capabilities) -> list[Check]:
    return [check(t, caps) for t in TIER_ORDER]


def eligible(caps: Capabilities) -> list[Tier]:
    return [c.tier for c in checks(caps) if c.ok]


def refusal(caps: Capabilities) -> str:
    """One line saying why no tier fits, with the minimums."""
    parts = [f"{c.tier}: {c.reason}; needs {MINIMUMS[c.tier]}" for c in checks(caps)]
    return "this machine is below every tier's minimum — " + " | ".join(parts)


def pin_refusal(tier: Tier, caps: Capabilities) -> str:
    return f"the invite pins the {tier} tier, but {check(tier, caps).reason}; the {tier} tier needs {MINIMUMS[tier]}"


def choose(
    candidates: list[Tier], demand: Mapping[str, int] | None = None, pinned: Tier | None = None
) -> Tier:
    """The tier to join: the pinned one, else the candidate with most unmet demand, ties by rule order."""
    if not candidates:
        raise ValueError("no candidate tier")
    if pinned is not None:
        if pinned not in candidates:
            raise ValueError(f"pinned tier {pinned} is not a candidate")
        return pinned
    demand = demand or {}
    return max(candidates, key=lambda t: (demand.get(str(t), 0), -TIER_ORDER.index(t)))


def node_labels(
    tier: Tier, node_id: str, trusted: bool, caps: Capabilities | None = None, cluster: str | None = None
) -> dict[str, str]:
    """A donor node's Ray labels. `cluster`: its cluster's name (`rma.io/cluster`), given where the pool has
    edge clusters (a pool without edges keeps the labels it always had)."""
    labels = {LABEL_TIER: str(tier), LABEL_NODE: node_id, LABEL_TRUSTED: "true" if trusted else "false"}
    if cluster is not None:
        labels[LABEL_CLUSTER] = cluster
    if caps is not None and caps.ollama is not None and caps.ollama.vision_models:
        labels[LABEL_OLLAMA] = "true"
    return labels
