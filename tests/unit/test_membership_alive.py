"""A kept membership names the agent and Ray processes by PID and start time: after a reboot or a container
restart the PID may belong to someone else (the new agent itself, often PID 1 in a container)."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil

from rma_ray import membership


def test_alive_only_for_the_very_process_recorded() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = psutil.Process(proc.pid).create_time()
        assert membership.alive(proc.pid, started)
        assert not membership.alive(proc.pid, started - 3600)  # a reused PID
        assert not membership.alive(os.getpid(), psutil.Process().create_time())  # the new agent itself
        assert not membership.alive(None, None)
    finally:
        proc.kill()
        proc.wait()
    assert not membership.alive(proc.pid, started)
