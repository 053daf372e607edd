"""A multi-host test bed made of Linux network namespaces, so e2e tests can run a head and several donors
on one machine with real IPs, real firewalls and real partitions.

Layout: the root namespace is the head. It owns a bridge ``rmab<hex>`` holding ``bed.head_ip`` on a private
/24 picked from 10.213.X.0/24 (X random, checked against existing addresses and routes). Each host is a
namespace ``<prefix>-<hex>-d<i>`` whose ``eth0`` is one end of a veth pair; the other end (``rmav<hex>d<i>``)
is a bridge port. Hosts default-route via the head, and the head does not route them anywhere else: when
``iptables`` is present we insert FORWARD rules that accept bridge-to-bridge traffic (needed when
bridge-nf-call-iptables sends bridged frames through a docker-style FORWARD DROP) and drop anything from the
bridge that would be routed off it. IPv6 is switched off on every bed interface so nothing chatters.
We change no sysctl of the root namespace: hosts share one L2 segment, so no forwarding is needed.

Teardown (``__exit__``, also run when setup fails halfway) is best effort and never raises: it kills every
process in the bed's namespaces (``ip netns pids``), deletes the namespaces, veths and bridge, and removes
the iptables rules it inserted. Problems are logged and kept in ``bed.teardown_errors``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

IP = shutil.which("ip") or "/usr/sbin/ip"
BLOCK_CHAIN = "RMA-BLOCK"  # iptables chain (and nft table name, lowercased) that block_inbound() installs
_NFT_BLOCK = """table inet rma_block {
  chain input { type filter hook input priority 0; policy accept;
    iif "lo" accept
    ct state established,related accept
    drop
  }
}
"""


def _sh(
    argv: Sequence[str], check: bool = True, timeout: float = 30, **kw: Any
) -> subprocess.CompletedProcess[str]:
    """Run a setup/teardown command, capturing output so failures carry the tool's own message."""
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, **kw)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def firewall_tool() -> str | None:
    """'iptables' or 'nft', whichever is installed (iptables first); None when neither is."""
    return next((t for t in ("iptables", "nft") if shutil.which(t)), None)


def available() -> str | None:
    """None when this process can build a bed (root, iproute2, may create a netns); else why not."""
    if os.geteuid() != 0:
        return "network-namespace test bed needs root"
    if not shutil.which("ip"):
        return "iproute2 'ip' not found"
    probe = f"rma-probe-{secrets.token_hex(3)}"
    res = subprocess.run([IP, "netns", "add", probe], capture_output=True, text=True)
    if res.returncode != 0:
        return f"cannot create a network namespace: {res.stderr.strip()}"
    subprocess.run([IP, "netns", "del", probe], capture_output=True)
    return None


@dataclass
class Host:
    """One namespace of the bed: a donor machine with its own IP, firewall and cable."""

    name: str  # netns name
    ip: str
    veth: str  # the root-side end, a bridge port: pulling it is pulling the cable
    head_ip: str
    _procs: list[subprocess.Popen[Any]] = field(default_factory=list, repr=False)

    def popen(
        self, argv: Sequence[str], env: dict[str, str] | None = None, **kw: Any
    ) -> subprocess.Popen[Any]:
        """Start argv inside the namespace. `ip netns exec` execs into argv, so .pid is the command's own.
        env replaces the environment, as with subprocess.Popen (pass {**os.environ, ...} to extend it)."""
        p: subprocess.Popen[Any] = subprocess.Popen([IP, "netns", "exec", self.name, *argv], env=env, **kw)
        self._procs.append(p)
        return p

    def run(
        self, argv: Sequence[str], check: bool = True, timeout: float = 60, **kw: Any
    ) -> subprocess.CompletedProcess[Any]:
        """Run argv inside the namespace to completion (output captured as text unless told otherwise)."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run([IP, "netns", "exec", self.name, *argv], check=check, timeout=timeout, **kw)

    def block_inbound(self) -> None:
        """Drop every new inbound connection, keep replies and loopback: a donor behind a home NAT."""
        self.unblock_inbound()  # idempotent: never stack two copies
        tool = firewall_tool()
        if tool == "iptables":
            for rule in (
                ["-N", BLOCK_CHAIN],
                ["-A", BLOCK_CHAIN, "-i", "lo", "-j", "RETURN"],
                ["-A", BLOCK_CHAIN, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "RETURN"],
                ["-A", BLOCK_CHAIN, "-j", "DROP"],
                ["-I", "INPUT", "1", "-j", BLOCK_CHAIN],
            ):
                self.run(["iptables", "-w", *rule])
        elif tool == "nft":
            self.run(["nft", "-f", "-"], input=_NFT_BLOCK)
        else:
            raise RuntimeError("block_inbound needs iptables or nft (apt-get install iptables)")

    def unblock_inbound(self) -> None:
        """Remove what block_inbound() installed; a no-op when nothing is blocked."""
        tool = firewall_tool()
        if tool == "iptables":
            while self.run(["iptables", "-w", "-D", "INPUT", "-j", BLOCK_CHAIN], check=False).returncode == 0:
                pass
            self.run(["iptables", "-w", "-F", BLOCK_CHAIN], check=False)
            self.run(["iptables", "-w", "-X", BLOCK_CHAIN], check=False)
        elif tool == "nft":
            self.run(["nft", "delete", "table", "inet", "rma_block"], check=False)

    def cut(self) -> None:
        """Partition the host: take its bridge port down (eth0 loses carrier; addresses and routes stay)."""
        _sh([IP, "link", "set", self.veth, "down"])

    def restore(self) -> None:
        """Heal the partition: port up again, default route re-asserted in case the kernel dropped it."""
        _sh([IP, "link", "set", self.veth, "up"])
        self.run([IP, "route", "replace", "default", "via", self.head_ip, "dev", "eth0"])


class TestBed:
    """`with TestBed(2) as bed:` gives bed.head_ip (the root namespace, on the bridge) and bed.hosts."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, n_hosts: int, prefix: str | None = None) -> None:
        if not 1 <= n_hosts <= 200:
            raise ValueError("n_hosts must be between 1 and 200")
        prefix = prefix or "rma"
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,15}", prefix):
            raise ValueError("prefix: up to 16 of [a-z0-9-]")
        self.n_hosts, self.prefix = n_hosts, prefix
        self.id = ""
        self.bridge = ""
        self.subnet: ipaddress.IPv4Network | None = None
        self.head_ip = ""
        self.hosts: list[Host] = []
        self.teardown_errors: list[str] = []
        self._namespaces: list[str] = []
        self._links: list[str] = []
        self._root_rules: list[list[str]] = []  # iptables args after -I/-D, for the root namespace

    # -- setup -------------------------------------------------------------------------------------------
    def __enter__(self) -> TestBed:
        try:
            self._setup()
        except BaseException:
            self._teardown()
            raise
        return self

    def _pick_names(self) -> None:
        existing = _sh([IP, "-o", "link"]).stdout
        namespaces = _sh([IP, "netns", "list"]).stdout
        for _ in range(100):
            self.id = secrets.token_hex(2)
            if f"rmab{self.id}" not in existing and f"-{self.id}-" not in namespaces:
                self.bridge = f"rmab{self.id}"
                return
        raise RuntimeError("no free bridge name")

    @staticmethod
    def _pick_subnet() -> ipaddress.IPv4Network:
        """A 10.213.X.0/24 overlapping no address or route of this machine (the default route excepted)."""
        text = _sh([IP, "-4", "-o", "addr"]).stdout + _sh([IP, "-4", "route"]).stdout
        found = re.findall(r"\b\d+\.\d+\.\d+\.\d+(?:/\d+)?", text)
        taken = [ipaddress.ip_network(m, strict=False) for m in found]
        taken = [n for n in taken if n.prefixlen > 0]
        for x in random.sample(range(1, 255), 254):
            net = ipaddress.ip_network(f"10.213.{x}.0/24")
            if not any(net.overlaps(t) for t in taken):
                return net
        raise RuntimeError("no free 10.213.X.0/24 subnet")

    def _setup(self) -> None:
        self._pick_names()
        self.subnet = self._pick_subnet()
        addrs = list(self.subnet.hosts())
        self.head_ip = str(addrs[0])
        plen = self.subnet.prefixlen
        self._links.append(self.bridge)
        _sh([IP, "link", "add", "name", self.bridge, "type", "bridge"])
        _no_ipv6(self.bridge)
        _sh([IP, "addr", "add", f"{self.head_ip}/{plen}", "dev", self.bridge])
        _sh([IP, "link", "set", self.bridge, "up"])
        self._open_root_firewall()
        for i in range(1, self.n_hosts + 1):
            ns, veth, ip = f"{self.prefix}-{self.id}-d{i}", f"rmav{self.id}d{i}", str(addrs[i])
            self._namespaces.append(ns)
            _sh([IP, "netns", "add", ns])
            self._links.append(veth)
            _sh([IP, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
            _no_ipv6(veth)
            _sh([IP, "link", "set", veth, "master", self.bridge, "up"])
            inns = [IP, "netns", "exec", ns]
            _sh([*inns, "sh", "-c", "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6"], check=False)
            _sh([*inns, IP, "link", "set", "lo", "up"])
            _sh([*inns, IP, "addr", "add", f"{ip}/{plen}", "dev", "eth0"])
            _sh([*inns, IP, "link", "set", "eth0", "up"])
            _sh([*inns, IP, "route", "add", "default", "via", self.head_ip, "dev", "eth0"])
            self.hosts.append(Host(name=ns, ip=ip, veth=veth, head_ip=self.head_ip))

    def _open_root_firewall(self) -> None:
        """Let bridge traffic through a DROP policy, and never let it be routed off the bridge."""
        if not shutil.which("iptables"):
            return
        tag = ["-m", "comment", "--comment", f"rma-testbed-{self.id}"]
        br = self.bridge
        for rule in (
            ["INPUT", "1", "-i", br, *tag, "-j", "ACCEPT"],
            ["OUTPUT", "1", "-o", br, *tag, "-j", "ACCEPT"],
            ["FORWARD", "1", "-i", br, "-o", br, *tag, "-j", "ACCEPT"],
            ["FORWARD", "2", "-i", br, *tag, "-j", "DROP"],  # nothing of the bed is routed off the bridge
            ["FORWARD", "3", "-o", br, *tag, "-j", "DROP"],
        ):
            _sh(["iptables", "-w", "-I", *rule])
            self._root_rules.append([rule[0], *rule[2:]])

    # -- teardown ----------------------------------------------------------------------------------------
    def __exit__(self, *exc: object) -> None:
        self._teardown()

    def _step(self, what: str, argv: Sequence[str]) -> None:
        try:
            res = _sh(argv, check=False)
            if res.returncode != 0 and "Cannot find" not in res.stderr and "No such" not in res.stderr:
                self.teardown_errors.append(f"{what}: {res.stderr.strip()}")
        except Exception as exc:  # teardown must go on whatever happens
            self.teardown_errors.append(f"{what}: {exc!r}")

    def _ns_pids(self, ns: str) -> list[int]:
        try:
            return [int(p) for p in _sh([IP, "netns", "pids", ns], check=False).stdout.split()]
        except Exception:
            return []

    def _kill_all(self) -> None:
        """SIGTERM everything in our namespaces, SIGKILL what is left after 3 s; reap what we started."""
        for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
            pids = [p for ns in self._namespaces for p in self._ns_pids(ns)]
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + grace
            while pids and time.monotonic() < deadline:
                for host in self.hosts:
                    for p in host._procs:
                        p.poll()  # reap our own children so they stop counting
                if not any(self._ns_pids(ns) for ns in self._namespaces):
                    break
                time.sleep(0.05)
        left = [p for ns in self._namespaces for p in self._ns_pids(ns)]
        if left:
            self.teardown_errors.append(f"processes survived SIGKILL: {left}")

    def _teardown(self) -> None:
        try:
            self._kill_all()
        except Exception as exc:
            self.teardown_errors.append(f"kill: {exc!r}")
        for ns in self._namespaces:
            self._step(f"netns del {ns}", [IP, "netns", "del", ns])
        for link in reversed(self._links):  # veths usually vanished with their namespace; bridge last
            if os.path.exists(f"/sys/class/net/{link}"):
                self._step(f"link del {link}", [IP, "link", "del", link])
        for rule in self._root_rules:
            self._step(f"iptables -D {rule}", ["iptables", "-w", "-D", *rule])
        self._namespaces, self._links, self._root_rules = [], [], []
        for err in self.teardown_errors:
            log.warning("netns test bed teardown: %s", err)


def _no_ipv6(ifname: str) -> None:
    """Keep the bed IPv4-only and quiet (no router solicitations); the setting dies with the interface."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6", "w") as f:
            f.write("1")
    except OSError:
        pass
