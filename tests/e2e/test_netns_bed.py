"""The network-namespace test bed itself: hosts reach each other and the head, a blocked host accepts nothing
new but still dials out, a cut host is gone until restored, and nothing of a bed outlives it."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from tests.e2e import netns
from tests.e2e.netns import Host, TestBed
from tests.support import wait_for

pytestmark = pytest.mark.e2e
_why = netns.available()
if _why:
    pytestmark = [pytest.mark.e2e, pytest.mark.skip(reason=_why)]

PY = sys.executable
PORT = 7000  # inside a fresh namespace nothing else listens
SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(16)
while True:
    c, _ = s.accept(); c.sendall(b"ok\\n"); c.close()
"""
CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
print(c.recv(16).decode().strip())
"""


def from_head(ip: str, port: int, timeout: float = 1.5) -> bool:
    """Connect from the root namespace (the head) and read the server's greeting."""
    try:
        with socket.create_connection((ip, port), timeout=timeout) as c:
            return c.recv(16).strip() == b"ok"
    except OSError:
        return False


def from_host(host: Host, ip: str, port: int, timeout: float = 1.5) -> bool:
    """Connect from inside a host's namespace."""
    res = host.run([PY, "-c", CLIENT, ip, str(port), str(timeout)], check=False, timeout=timeout + 10)
    return res.returncode == 0 and res.stdout.strip() == "ok"


@contextlib.contextmanager
def head_server(ip: str) -> Iterator[int]:
    """A TCP server in the root namespace bound to the head address only; yields its port."""
    srv = socket.socket()
    srv.bind((ip, 0))
    srv.listen(16)
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except OSError:
                continue
            with c:
                c.sendall(b"ok\n")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        t.join(5)
        srv.close()


def host_server(host: Host) -> subprocess.Popen[bytes]:
    """A TCP server inside the host on its bed address; returns once it answers locally."""
    proc = host.popen([PY, "-c", SERVER, host.ip, str(PORT)])
    wait_for(lambda: from_host(host, host.ip, PORT), timeout=15, what=f"server in {host.name}")
    return proc


@pytest.fixture
def bed() -> Iterator[TestBed]:
    with TestBed(2) as b:
        yield b
    assert b.teardown_errors == []


def test_names_addresses_and_pid(bed: TestBed) -> None:
    assert len(bed.bridge) <= 15 and all(len(h.veth) <= 15 for h in bed.hosts)
    assert bed.subnet is not None and bed.subnet.subnet_of(ipaddress.ip_network("10.213.0.0/16"))
    ips = {bed.head_ip, *(h.ip for h in bed.hosts)}
    assert len(ips) == 3 and all(ipaddress.ip_address(i) in bed.subnet for i in ips)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert all(h.name in listed for h in bed.hosts)
    # `ip netns exec` execs: the Popen pid is the command's own, and it lives in the host's namespace.
    p = bed.hosts[0].popen(["sh", "-c", "echo $$; exec sleep 30"], stdout=subprocess.PIPE)
    assert p.stdout is not None and int(p.stdout.readline()) == p.pid
    assert os.readlink(f"/proc/{p.pid}/ns/net") != os.readlink("/proc/self/ns/net")
    pids = subprocess.run(["ip", "netns", "pids", bed.hosts[0].name], capture_output=True, text=True).stdout
    assert str(p.pid) in pids.split()


def test_hosts_reach_head_and_each_other(bed: TestBed) -> None:
    h1, h2 = bed.hosts
    host_server(h1), host_server(h2)
    with head_server(bed.head_ip) as port:
        for src, dst in ((h1, h2), (h2, h1)):
            assert from_host(src, bed.head_ip, port), f"{src.name} -> head"
            assert from_host(src, dst.ip, PORT), f"{src.name} -> {dst.name}"
        assert from_head(h1.ip, PORT) and from_head(h2.ip, PORT)
    if shutil.which("ping"):
        for src, dst in ((h1, bed.head_ip), (h1, h2.ip), (h2, bed.head_ip), (h2, h1.ip)):
            res = src.run(["ping", "-c1", "-W2", dst], check=False)
            assert res.returncode == 0, f"ping {src.name} -> {dst}: {res.stdout}{res.stderr}"


def test_head_server_bound_to_head_ip_is_reachable(bed: TestBed) -> None:
    with head_server(bed.head_ip) as port:
        assert from_host(bed.hosts[0], bed.head_ip, port)
    assert not from_host(bed.hosts[0], bed.head_ip, port, timeout=1), "server is closed now"


@pytest.mark.skipif(netns.firewall_tool() is None, reason="needs iptables or nft (apt-get install iptables)")
def test_block_inbound_is_like_a_home_nat(bed: TestBed) -> None:
    h1, h2 = bed.hosts
    host_server(h1)
    assert from_head(h1.ip, PORT)
    h1.block_inbound()
    h1.block_inbound()  # idempotent
    assert not from_head(h1.ip, PORT), "head reached a blocked host"
    assert not from_host(h2, h1.ip, PORT), "another host reached a blocked host"
    assert from_host(h1, h1.ip, PORT), "loopback-side traffic of the host itself still works"
    with head_server(bed.head_ip) as port:
        assert from_host(h1, bed.head_ip, port), "a blocked host can still dial out"
    h1.unblock_inbound()
    wait_for(lambda: from_head(h1.ip, PORT), timeout=10, what="unblocked host reachable")


def test_cut_partitions_and_restore_heals(bed: TestBed) -> None:
    h1, h2 = bed.hosts
    host_server(h1)
    assert from_head(h1.ip, PORT)
    h1.cut()
    assert not from_head(h1.ip, PORT), "head reached a cut host"
    assert not from_host(h2, h1.ip, PORT), "another host reached a cut host"
    with head_server(bed.head_ip) as port:
        assert not from_host(h1, bed.head_ip, port), "a cut host reached the head"
        h1.restore()
        wait_for(lambda: from_head(h1.ip, PORT), timeout=15, what="restored host reachable from head")
        wait_for(lambda: from_host(h1, bed.head_ip, port), timeout=15, what="restored host reaches head")
        assert from_host(h2, h1.ip, PORT)


def _leftovers(bed_id: str) -> list[str]:
    """Lines of `ip netns list`, `ip link` and `iptables -S` that name anything of the bed `bed_id`."""
    tags = (f"rmab{bed_id}", f"rmav{bed_id}", f"-{bed_id}-d", f"rma-testbed-{bed_id}")
    out = []
    for argv in (["ip", "netns", "list"], ["ip", "-o", "link"]) + (
        (["iptables", "-w", "-S"],) if shutil.which("iptables") else ()
    ):
        lines = subprocess.run(argv, capture_output=True, text=True).stdout.splitlines()
        out += [line for line in lines if any(t in line for t in tags)]
    return out


def test_exit_kills_processes_and_removes_everything() -> None:
    import psutil

    with TestBed(2, prefix="rmat") as b:
        bridge, tag = b.bridge, b.id
        # ignores SIGTERM, and so do its two sleeps (an ignored signal stays ignored across fork and exec)
        stray = b.hosts[1].popen(["sh", "-c", "trap '' TERM; sleep 300 & sleep 300; wait"])
        sleeps = wait_for(
            lambda: (
                [c for c in psutil.Process(stray.pid).children() if c.name() == "sleep"][1:]
                and psutil.Process(stray.pid).children()
            ),
            timeout=10,
            what="the stray's two sleeps",
        )
        if netns.firewall_tool():
            b.hosts[0].block_inbound()
        assert _leftovers(tag)
    assert stray.wait(timeout=10) == -signal.SIGKILL  # SIGTERM was not enough: the bed went on to SIGKILL
    # every process in the namespace, not only the one the bed started
    gone, alive = psutil.wait_procs(sleeps, timeout=10)
    assert alive == [] and len(gone) == 2
    assert b.teardown_errors == []
    assert not os.path.exists(f"/sys/class/net/{bridge}")
    assert _leftovers(tag) == []


def test_failed_setup_is_torn_down(monkeypatch: pytest.MonkeyPatch) -> None:
    real, calls = netns._sh, []

    def flaky(argv, check=True, timeout=30, **kw):  # type: ignore[no-untyped-def]
        calls.append(list(argv))
        if list(argv[1:3]) == ["netns", "add"] and sum(c[1:3] == ["netns", "add"] for c in calls) == 2:
            raise RuntimeError("injected failure on the second host")
        return real(argv, check=check, timeout=timeout, **kw)

    monkeypatch.setattr(netns, "_sh", flaky)
    b = TestBed(2)
    with pytest.raises(RuntimeError, match="injected"):
        b.__enter__()
    monkeypatch.undo()
    assert b.id and _leftovers(b.id) == []
