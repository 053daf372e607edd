"""`rma down` waits as long as the pool's stop makes progress, and gives up with one line only when a step
hangs. The supervisor is a stand-in Python process (no Ray): it writes its steps to `<data dir>/stopping`."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from rma_ray.head import UpError, signal_down

STEPPING = """
import signal, sys, time
from pathlib import Path
marker = Path(sys.argv[1])
def stop(*_):
    for i in range({steps}):  # each step shorter than the patience, all of them together longer
        marker.write_text(f"{{time.time()}} step {{i}}\\n")
        time.sleep({step_s})
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
while True:
    time.sleep(1)
"""


@pytest.fixture
def supervisor(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[subprocess.Popen[str]]:
    steps, step_s = request.param
    proc = subprocess.Popen(
        [sys.executable, "-c", STEPPING.format(steps=steps, step_s=step_s), str(tmp_path / "stopping")],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    (tmp_path / "pool.json").write_text(json.dumps({"supervisor_pid": proc.pid}))
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("supervisor", [(6, 0.3)], indirect=True)
def test_down_waits_while_the_stop_makes_progress(supervisor: subprocess.Popen[str], tmp_path: Path) -> None:
    assert "pool stopped" in signal_down(tmp_path, patience_s=1.0)
    assert supervisor.wait(5) == 0


@pytest.mark.parametrize("supervisor", [(1, 30)], indirect=True)
def test_down_gives_up_on_a_step_that_hangs(supervisor: subprocess.Popen[str], tmp_path: Path) -> None:
    with pytest.raises(UpError, match="made no progress for 1 s .last: step 0"):
        signal_down(tmp_path, patience_s=1.0)


def test_down_without_a_pool_says_so(tmp_path: Path) -> None:
    with pytest.raises(UpError, match="no pool is running"):
        signal_down(tmp_path)
