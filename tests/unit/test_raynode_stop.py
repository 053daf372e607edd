"""`RayNode.stop_all` (a pool's `rma down`): every process of the node gets SIGTERM at once but the GCS, which
gets it once the raylet has gone (a real raylet whose GCS went first waits ~10 s for it). Stand-in processes
named `raylet` and `gcs_server` (no Ray here) that log what they saw: this raylet, like Ray's, does not exit
while its GCS is stopping."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import psutil

from rma_ray.raynode import NodeSpec, RayNode
from tests.support import wait_for

RAYLET = """\
#!{py}
import signal, sys, time
from pathlib import Path
log = Path({log!r})
def term(*_):
    time.sleep(0.3)  # as Ray's raylet, it talks to its GCS on the way out
    if "gcs-term" in log.read_text():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # stuck waiting for its GCS: only SIGKILL ends it
        return
    with log.open("a") as f:
        f.write("raylet-exit\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
with log.open("a") as f:
    f.write("raylet-up\\n")
while True:
    time.sleep(0.05)
"""

GCS = """\
#!{py}
import signal, sys, time
from pathlib import Path
log = Path({log!r})
def term(*_):
    with log.open("a") as f:
        f.write("gcs-term\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
with log.open("a") as f:
    f.write("gcs-up\\n")
while True:
    time.sleep(0.05)
"""


def test_the_gcs_is_stopped_after_the_raylet_and_nothing_is_left(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.write_text("")
    for name, body in (("raylet", RAYLET), ("gcs_server", GCS)):
        path = tmp_path / name  # the process's name is its file's: what stop_all tells them by
        path.write_text(body.format(py=sys.executable, log=str(log)))
        path.chmod(0o755)
    parent = textwrap.dedent(
        f"""
        import subprocess, time
        kids = [subprocess.Popen([{str(tmp_path / "gcs_server")!r}]), subprocess.Popen([{str(tmp_path / "raylet")!r}])]
        while True:
            time.sleep(0.05)
        """
    )
    node = RayNode(NodeSpec("127.0.0.1", tmp_path / "token", tmp_path / "ray", {}), tmp_path / "node.log")
    node.proc = subprocess.Popen([sys.executable, "-c", parent])
    try:
        wait_for(lambda: {"raylet-up", "gcs-up"} <= set(log.read_text().split()), timeout=30, what="both up")
        node.track()
        tree = [psutil.Process(pid) for pid in node._seen]
        assert len(tree) == 3
        node.stop_all(grace=10)
        events = log.read_text().split()
        assert events.index("raylet-exit") < events.index("gcs-term"), events  # the raylet exited by itself
        assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        node.kill()
