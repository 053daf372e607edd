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
    """The machine's use by everything except the pool: the busier of CPU and GPU, in percent.

    CPU is measured as cumulative CPU time between samples, never as psutil's per-process cpu_percent (0.0
    on the first call for each new process, nothing for one that exited in between): the pool's share is
    each of its processes' own time plus that of its children that exited and were reaped (children_user,
    children_system), so a short-lived Ray worker still counts as the pool's, against the whole machine's
    busy time over the same interval."""

    def __init__(self, pool_root: Callable[[], int | None], wall: Callable[[], float] = time.time) -> None:
        self.pool_root = pool_root  # the `ray start` process of this donor (None while it is stopped)
        self.wall = wall
        self._procs: dict[int, psutil.Process] = {}
        self._used: dict[tuple[int, float], float] = {}  # (pid, started) -> its CPU seconds, reaped ones too
        self._root: tuple[int, float] | None = None
        self._last = wall()
        self._system = _system_times()
        self._pool_seconds()  # the first reading only starts the count
        self._nvml = _nvml_handles()

    def _pool_seconds(self) -> float:
        """CPU seconds (summed over cores) the pool's processes used since the last call."""
        since, self._last = self._last, self.wall()
        root = self.pool_root()
        current: list[psutil.Process] = []
        if root:
            try:
                tree = psutil.Process(root)
                current = [tree, *tree.children(recursive=True)]
            except psutil.Error:
                current = []
        used: dict[tuple[int, float], float] = {}
        procs: dict[int, psutil.Process] = {}
        seconds = 0.0
        same_tree = False
        for p in current:
            try:
                key = (p.pid, p.create_time())
                t = p.cpu_times()
            except psutil.Error:
                continue
            if p.pid == root:
                same_tree, self._root = key == self._root, key
            now = t.user + t.system + t.children_user + t.children_system
            before = self._used.get(key)
            if before is None:  # new in a known tree, or started since the last call: all of it is new
                before = 0.0 if same_tree or key[1] >= since - 1.0 else now  # (create_time is coarse)
            seconds += max(0.0, now - before)
            used[key], procs[p.pid] = now, p
        if not used:
            self._root = None
        self._used, self._procs = used, procs
        return seconds

    def cpu(self) -> float:
        (total0, busy0), self._system = self._system, _system_times()
        total, busy = self._system[0] - total0, self._system[1] - busy0
        pool = self._pool_seconds()
        if total <= 0:
            return 0.0
        return min(100.0, max(0.0, (busy - pool) / total * 100.0))

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


def _system_times() -> tuple[float, float]:
    """All CPU seconds so far, summed over cores, and the busy ones (as psutil's cpu_percent counts them)."""
    t = psutil.cpu_times()
    total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)  # in user/nice already
    return total, total - t.idle - getattr(t, "iowait", 0.0)


def _nvml_handles() -> list[object]:
    try:
        import pynvml

        pynvml.nvmlInit()
        return [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception:  # no NVIDIA driver or no nvidia-ml-py: CPU only
        return []
