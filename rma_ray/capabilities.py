"""The hardware probe: what a donor machine offers, measured with psutil and NVML, cut to what this process
may use (CPU affinity, cgroup v1/v2 CPU quota and memory limit: a container is probed honestly).

`read_raw()` takes the readings, `from_readings()` turns them into `Capabilities` (a pure function, tested
against real readings in shared/fixtures/hardware/). A machine without an NVIDIA GPU or driver reports no GPUs;
the probe never raises for that. It also asks a local Ollama server (the official `ollama` client; `OLLAMA_HOST` or
http://127.0.0.1:11434) which models it has and which of them take images: a donor that runs one beside its node
hosts the pool's vision route (label `rma.io/ollama=true`, see rma_ray.tiers). No server, no `ollama` package:
none. `Capabilities` also accepts the seed's human strings ("16GB", "1TB") so that an old-style agent can
register.
"""

from __future__ import annotations

import os
import platform
import socket
from pathlib import Path
from typing import Any

import psutil
from pydantic import BaseModel, ByteSize, ConfigDict, Field, TypeAdapter, field_validator, model_validator

MB = 1024 * 1024
GB = 1024 * MB
_BYTES = TypeAdapter(ByteSize)


def _to_mb(value: Any) -> Any:
    """'16GB', '64 GiB', 1.5e10 bytes-as-string -> MiB; ints pass through as MiB already."""
    if isinstance(value, str):
        return int(_BYTES.validate_python(value.strip()) // MB)
    return value


def _to_gb(value: Any) -> Any:
    if isinstance(value, str):
        return round(_BYTES.validate_python(value.strip()) / GB, 1)
    return value


class GpuInfo(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1, max_length=200)
    memory_mb: int = Field(ge=0, le=16 * 1024 * 1024)
    uuid: str | None = Field(default=None, max_length=100)
    compute_capability: str | None = Field(default=None, max_length=10, pattern=r"^\d+\.\d+$")

    @field_validator("memory_mb", mode="before")
    @classmethod
    def _human_memory(cls, v: Any) -> Any:
        return _to_mb(v)


class OllamaInfo(BaseModel):
    """A local Ollama server: where it answered, its models, and those that accept images."""

    model_config = ConfigDict(extra="ignore")

    url: str = Field(min_length=1, max_length=300)
    models: list[str] = Field(default_factory=list, max_length=1000)
    vision_models: list[str] = Field(default_factory=list, max_length=1000)


class Capabilities(BaseModel):
    model_config = ConfigDict(extra="ignore")

    gpus: list[GpuInfo] = Field(default_factory=list, max_length=64)
    cpu_cores: int = Field(ge=1, le=4096)
    ram_mb: int = Field(ge=0, le=64 * 1024 * 1024)
    disk_free_gb: float = Field(default=0.0, ge=0, le=10_000_000)
    os: str = Field(default="", max_length=200)
    hostname: str = Field(default="", max_length=255)
    ollama: OllamaInfo | None = None

    @model_validator(mode="before")
    @classmethod
    def _seed_shape(cls, data: Any) -> Any:
        """Accept the seed's registration spec: gpu_memory/gpu_type/ram/storage as human strings."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "gpus" not in data and data.get("gpu_memory"):
            data["gpus"] = [{"name": data.get("gpu_type") or "unknown GPU", "memory_mb": data["gpu_memory"]}]
        if "ram_mb" not in data and "ram" in data:
            data["ram_mb"] = data["ram"]
        if "disk_free_gb" not in data and "storage" in data:
            data["disk_free_gb"] = data["storage"]
        return data

    @field_validator("ram_mb", mode="before")
    @classmethod
    def _human_ram(cls, v: Any) -> Any:
        return _to_mb(v)

    @field_validator("disk_free_gb", mode="before")
    @classmethod
    def _human_disk(cls, v: Any) -> Any:
        return _to_gb(v)

    @property
    def gpu_memory_mb(self) -> int:
        return max((g.memory_mb for g in self.gpus), default=0)


def _read_nvml() -> dict[str, Any]:
    """NVML readings in the fixture's shape, or {'error': why} when there is no driver or no GPU."""
    try:
        import pynvml
    except ImportError as exc:  # nvidia-ml-py is a dependency, but a trimmed install may lack it
        return {"error": f"nvidia-ml-py not installed ({exc})"}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return {"error": f"no NVIDIA driver ({exc})"}
    try:
        devices = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            try:
                cc = list(pynvml.nvmlDeviceGetCudaComputeCapability(h))
            except pynvml.NVMLError:
                cc = None
            devices.append(
                {
                    "index": i,
                    "name": name.decode() if isinstance(name, bytes) else name,
                    "uuid": (lambda u: u.decode() if isinstance(u, bytes) else u)(
                        pynvml.nvmlDeviceGetUUID(h)
                    ),
                    "memory_total_bytes": int(mem.total),
                    "compute_capability": cc,
                }
            )
        return {"devices": devices}
    except pynvml.NVMLError as exc:
        return {"error": f"NVML query failed ({exc})"}
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


OLLAMA_DEFAULT_URL = "http://127.0.0.1:11434"
# Older Ollama servers list no `capabilities` in /api/show: their vision models carry a vision-encoder family
# (llava: "clip"; llama3.2-vision: "mllama").
_VISION_FAMILIES = {"clip", "mllama"}


def ollama_url(host: str | None = None) -> str:
    """The Ollama server this machine would use: `host`, else $OLLAMA_HOST (as the `ollama` client reads it)."""
    return host or os.environ.get("OLLAMA_HOST") or OLLAMA_DEFAULT_URL


def is_vision_model(capabilities: list[str] | None, families: list[str] | None) -> bool:
    if capabilities is not None:
        return "vision" in capabilities
    return bool(_VISION_FAMILIES & set(families or ()))


def _read_ollama(host: str | None, timeout_s: float = 3.0) -> dict[str, Any]:
    """The local Ollama server's models, or {'error': why} (no client package, no server, no answer)."""
    try:
        import ollama
    except ImportError as exc:
        return {"error": f"the ollama client is not installed ({exc})"}
    url = ollama_url(host)
    try:
        with ollama.Client(host=url, timeout=timeout_s) as client:
            models = []
            for m in client.list().models:
                if not m.model:
                    continue
                show = client.show(m.model)
                families = list((show.details.families if show.details else None) or [])
                models.append({"name": m.model, "capabilities": show.capabilities, "families": families})
    except (ConnectionError, ollama.ResponseError, ollama.RequestError, OSError, ValueError) as exc:
        return {"error": f"no Ollama server at {url} ({str(exc)[:200]})"}
    except Exception as exc:  # httpx timeouts and protocol errors: an answer we cannot use
        return {"error": f"Ollama at {url} did not answer usably ({type(exc).__name__}: {str(exc)[:200]})"}
    return {"url": url, "models": models}


_UNLIMITED_V1 = 1 << 60  # cgroup v1 writes "no limit" as a page-rounded LONG_MAX


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _ancestors(root: Path, rel: str) -> list[Path]:
    """The cgroup's directory and every parent up to the mount's root: a limit anywhere above applies too. A
    container sees its own cgroup as the mount's root while /proc names the host's path: keep those that
    exist."""
    parts = [p for p in rel.strip("/").split("/") if p]
    dirs = [root.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]
    return [d for d in dirs if d.is_dir()] or [root]


def read_cgroup(
    root: str | os.PathLike[str] = "/sys/fs/cgroup", proc_cgroup: str | os.PathLike[str] = "/proc/self/cgroup"
) -> dict[str, Any]:
    """The CPU quota (in cores) and memory limit (bytes) of this process's cgroup, v2 or v1; None where there
    is none. A container with `--cpus 2 --memory 4g` on a 64-core host offers 2 cores and 4 GiB, not the
    host's."""
    base = Path(root)
    out: dict[str, Any] = {"cpu_quota_cores": None, "memory_limit_bytes": None}
    lines = (_read(Path(proc_cgroup)) or "").splitlines()
    v1: dict[str, str] = {}
    for line in lines:
        _, controllers, rel = line.split(":", 2) if line.count(":") >= 2 else ("", "", "")
        for c in controllers.split(","):
            v1[c] = rel
    quotas: list[float] = []
    limits: list[int] = []
    if "" in v1 and (base / "cgroup.controllers").exists():  # v2 (unified)
        for d in _ancestors(base, v1[""]):
            quota, _, period = (_read(d / "cpu.max") or "max").partition(" ")
            if quota != "max" and period:
                quotas.append(int(quota) / int(period))
            mem = _read(d / "memory.max") or "max"
            if mem != "max":
                limits.append(int(mem))
    else:
        cpu_dir = next((base / n for n in ("cpu,cpuacct", "cpu", "cpuacct,cpu") if (base / n).is_dir()), None)
        if cpu_dir is not None:
            for d in _ancestors(cpu_dir, v1.get("cpu", "/")):
                q_us, p_us = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
                if q_us and p_us and int(q_us) > 0 and int(p_us) > 0:
                    quotas.append(int(q_us) / int(p_us))
        if (base / "memory").is_dir():
            for d in _ancestors(base / "memory", v1.get("memory", "/")):
                limit = _read(d / "memory.limit_in_bytes")
                if limit and int(limit) < _UNLIMITED_V1:
                    limits.append(int(limit))
    if quotas:
        out["cpu_quota_cores"] = min(quotas)
    if limits:
        out["memory_limit_bytes"] = min(limits)
    return out


def _affinity() -> int | None:
    try:
        return len(psutil.Process().cpu_affinity() or []) or None
    except (AttributeError, psutil.Error):  # not on every platform
        return None


def read_raw(disk_path: str | os.PathLike[str] = "/", ollama_host: str | None = None) -> dict[str, Any]:
    """Take the readings; never raises for a missing GPU, driver or Ollama server."""
    disk = psutil.disk_usage(os.fspath(disk_path))
    return {
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "psutil": {
            "cpu_count_logical": psutil.cpu_count(logical=True) or 1,
            "ram_total_bytes": psutil.virtual_memory().total,
            "disk_total_bytes": disk.total,
            "disk_free_bytes": disk.free,
            "cpu_affinity": _affinity(),
        },
        "cgroup": _safe_cgroup(),
        "nvml": _read_nvml(),
        "ollama": _read_ollama(ollama_host),
    }


def _safe_cgroup() -> dict[str, Any]:
    try:
        return read_cgroup()
    except (OSError, ValueError) as exc:  # an odd cgroup file: the host's figures, never a crash
        return {"error": str(exc)}


def effective_cpus_and_memory(ps: dict[str, Any], cgroup: dict[str, Any]) -> tuple[int, int]:
    """What this process may really use: the host's cores cut by the CPU affinity and the cgroup quota (whole
    cores, at least one), its memory cut by the cgroup limit."""
    cores = int(ps["cpu_count_logical"])
    if ps.get("cpu_affinity"):
        cores = min(cores, int(ps["cpu_affinity"]))
    if cgroup.get("cpu_quota_cores"):
        cores = min(cores, max(1, int(cgroup["cpu_quota_cores"])))
    memory = int(ps["ram_total_bytes"])
    if cgroup.get("memory_limit_bytes"):
        memory = min(memory, int(cgroup["memory_limit_bytes"]))
    return cores, memory


def from_readings(raw: dict[str, Any]) -> Capabilities:
    """Readings (from read_raw, or a fixture file) -> Capabilities."""
    ps = raw.get("psutil") or raw.get("psutil_equivalent") or {}
    cores, memory = effective_cpus_and_memory(ps, raw.get("cgroup") or {})
    nvml = raw.get("nvml") or {}
    gpus = []
    for d in nvml.get("devices", []):
        cc = d.get("compute_capability")
        gpus.append(
            GpuInfo(
                name=d["name"],
                memory_mb=int(d["memory_total_bytes"]) // MB,
                uuid=d.get("uuid"),
                compute_capability=f"{cc[0]}.{cc[1]}" if cc else None,
            )
        )
    ollama_raw = raw.get("ollama") or {}
    ollama_info = None
    if "url" in ollama_raw:
        models = ollama_raw.get("models") or []
        ollama_info = OllamaInfo(
            url=ollama_raw["url"],
            models=[m["name"] for m in models],
            vision_models=[
                m["name"] for m in models if is_vision_model(m.get("capabilities"), m.get("families"))
            ],
        )
    return Capabilities(
        gpus=gpus,
        cpu_cores=cores,
        ram_mb=memory // MB,
        disk_free_gb=round(int(ps["disk_free_bytes"]) / GB, 1),
        os=raw.get("platform", ""),
        hostname=raw.get("hostname", ""),
        ollama=ollama_info,
    )


def probe(disk_path: str | os.PathLike[str] = "/", ollama_host: str | None = None) -> Capabilities:
    return from_readings(read_raw(disk_path, ollama_host))
