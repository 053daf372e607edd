"""`rma probe` inside containers: cgroup v2 and v1 CPU quotas and memory limits, read from fake cgroup trees
(tmp dirs shaped like /sys/fs/cgroup and /proc/self/cgroup)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rma_ray import capabilities

GIB = 1 << 30
HOST = {"cpu_count_logical": 64, "ram_total_bytes": 256 * GIB, "disk_free_bytes": 100 * GIB}


def tree(root: Path, files: dict[str, str], proc: str) -> tuple[Path, Path]:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text + "\n")
    (root / "proc_cgroup").write_text(proc)
    return root / "sys", root / "proc_cgroup"


V2 = {"sys/cgroup.controllers": "cpu memory", "sys/cpu.max": "max 100000", "sys/memory.max": "max"}
V1 = {
    "sys/cpu,cpuacct/cpu.cfs_quota_us": "-1",
    "sys/cpu,cpuacct/cpu.cfs_period_us": "100000",
    "sys/memory/memory.limit_in_bytes": "9223372036854771712",
}
V1_PROC = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n0::/\n"


@pytest.mark.parametrize(
    ("files", "proc", "want"),
    [
        # v2, a container with its own cgroup namespace: limits at the mount's root (`docker run --cpus 2 -m 4g`)
        ({**V2, "sys/cpu.max": "200000 100000", "sys/memory.max": str(4 * GIB)}, "0::/\n", (2, 4 * GIB)),
        # v2, a systemd slice: the tightest limit on the way up wins; 1.5 cores are one whole core
        (
            {
                **V2,
                "sys/a.slice/cpu.max": "150000 100000",
                "sys/a.slice/memory.max": "max",
                "sys/a.slice/b.service/cpu.max": "max 100000",
                "sys/a.slice/b.service/memory.max": str(3 * GIB),
            },
            "0::/a.slice/b.service\n",
            (1, 3 * GIB),
        ),
        # v2 without limits: the host's figures
        (V2, "0::/\n", (64, 256 * GIB)),
        # v1 (Docker on an older host): the host's path in /proc, the container's cgroup mounted as the root
        (
            {
                **V1,
                "sys/cpu,cpuacct/cpu.cfs_quota_us": "300000",
                "sys/memory/memory.limit_in_bytes": str(8 * GIB),
            },
            V1_PROC,
            (3, 8 * GIB),
        ),
        # v1 without limits (quota -1, memory LONG_MAX rounded to a page)
        (V1, V1_PROC, (64, 256 * GIB)),
        # v1 with the host's hierarchy visible: the process's own directory
        (
            {
                **V1,
                "sys/cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000",
                "sys/cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000",
                "sys/memory/docker/abc/memory.limit_in_bytes": str(GIB),
            },
            V1_PROC,
            (1, GIB),
        ),
        # no cgroup filesystem at all
        ({}, "", (64, 256 * GIB)),
    ],
)
def test_cgroup_limits_cut_the_probe(
    tmp_path: Path, files: dict[str, str], proc: str, want: tuple[int, int]
) -> None:
    root, proc_file = tree(tmp_path, files, proc)
    cg = capabilities.read_cgroup(root, proc_file)
    caps = capabilities.from_readings({"psutil": HOST, "cgroup": cg})
    assert (caps.cpu_cores, caps.ram_mb) == (want[0], want[1] // 2**20)


def test_cpu_affinity_cuts_the_cores() -> None:
    caps = capabilities.from_readings({"psutil": {**HOST, "cpu_affinity": 4}})
    assert caps.cpu_cores == 4
