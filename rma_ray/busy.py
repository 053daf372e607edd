"""Owner first (`rma join --yield-when-busy`): the machine's own use, not the pool's, decides when the donor
steps aside, like BOINC's "use the GPU only when idle". `OwnerLoad` samples CPU (and GPU, through NVML where
there is one) minus the pool's own processes (Ray's workers run under the `ray start` process the agent
supervises); `BusyWatch` adds hysteresis: busy above `busy_percent` for `busy_for_s` → yield; idle below
`idle_percent` for `idle_for_s` → come back. The watch takes its clock and samples from outside, so it is
tested without waiting."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class BusyPolicy:
    busy_percent: float = 50.0
    busy_for_s: float = 30.0
    idle_percent: float = 20.0
    idle_for_s: float = 120.0

    def problem(self) -> str | None:
        """What is wrong with these thresholds, as one line; None when they make sense."""
        for name in ("busy_percent", "idle_percent"):
            if not 0 <= getattr(self, name) <= 100:
                return f"--{name.replace('_', '-')} must be between 0 and 100"
        if self.idle_percent > self.busy_percent:
            return "--idle-percent must not be above --busy-percent (the gap keeps the donor from flapping)"
        if self.busy_for_s < 0 or self.idle_for_s < 0:
            return "--busy-for and --idle-for must not be negative"
        return None


class BusyWatch:
    """Hysteresis over samples of the owner's use (percent of the machine, 0-100)."""

    def __init__(self, policy: BusyPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy, self.clock = policy, clock
        self.yielding = False
        self._since: float | None = None  # when the current run of samples past the threshold began

    def update(self, owner_percent: float) -> bool:
        """Feed one sample; True while the donor should step aside."""
        now, p = self.clock(), self.policy
        crossing = owner_percent < p.idle_percent if self.yielding else owner_percent > p.busy_percent
        if not crossing:
            self._since = None
            return self.yielding
        if self._since is None:
            self._since = now
        if now - self._since >= (p.idle_for_s if self.yielding else p.busy_for_s):
            self.yielding, self._since = not self.yielding, None
        return self.yielding


class OwnerLoad:
    """The machine's use by everything except the pool: the busier of CPU and GPU, in percent."""

    def __init__(self, pool_root: Callable[[], int | None]) -> None:
        self.pool_root = pool_root  # the `ray start` process of this donor (None while it is stopped)
        self._procs: dict[int, psutil.Process] = {}
        self._cpus = psutil.cpu_count() or 1
        psutil.cpu_percent(interval=None)  # the first reading only starts the count
        self._nvml = _nvml_handles()

    def _pool(self) -> list[psutil.Process]:
        root = self.pool_root()
        if not root:
            self._procs.clear()
            return []
        try:
            tree = psutil.Process(root)
            current = [tree, *tree.children(recursive=True)]
        except psutil.Error:
            return []
        keep = {}
        for p in current:
            keep[p.pid] = self._procs.get(p.pid, p)  # the same object, so cpu_percent counts since last time
        self._procs = keep
        return list(keep.values())

    def cpu(self) -> float:
        total = float(psutil.cpu_percent(interval=None))
        pool = 0.0
        for p in self._pool():
            try:
                pool += p.cpu_percent(interval=None)
            except psutil.Error:
                continue
        return max(0.0, total - pool / self._cpus)

    def gpu(self) -> float:
        if not self._nvml:
            return 0.0
        import pynvml

        pool = {p for p in self._procs}
        busiest = 0.0
        for h in self._nvml:
            try:
                users = pynvml.nvmlDeviceGetComputeRunningProcesses(h)
                if any(u.pid in pool for u in users):  # the pool's own use: count only other processes
                    samples = pynvml.nvmlDeviceGetProcessUtilization(h, 0)
                    use = sum(s.smUtil for s in samples if s.pid not in pool)
                else:
                    use = pynvml.nvmlDeviceGetUtilizationRates(h).gpu
            except pynvml.NVMLError:
                continue
            busiest = max(busiest, float(use))
        return min(100.0, busiest)

    def sample(self) -> float:
        return max(self.cpu(), self.gpu())


def _nvml_handles() -> list[object]:
    try:
        import pynvml

        pynvml.nvmlInit()
        return [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception:  # no NVIDIA driver or no nvidia-ml-py: CPU only
        return []
