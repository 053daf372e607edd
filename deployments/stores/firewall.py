"""A store's port, open to trusted nodes only: an nftables table per store on the node its supervisor runs on.

Services reach a store over the network (Chroma has no authentication at all; Postgres, Redis and the graph
store have passwords, but no one else needs to try them), and only replicas on trusted nodes may use a store.
So the store's TCP port accepts loopback and the addresses of the cluster's trusted nodes (labelled
`rma.io/trusted=true`, and the head) as Ray lists them, and drops everything else; the supervisor refreshes
the list as nodes come and go.

When: `RMA_STORE_FIREWALL=on|off|auto` in the node's environment; `auto` (the default) means on where this
node runs the pool's WireGuard overlay (the overlay already needs root and nft, and installs Ray's own
firewall), off elsewhere. Where it is wanted but cannot be installed (no `nft`, not root), the supervisor says
so in its log and in `status()`; the store still runs."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger("rma.stores")
MODES = ("on", "off", "auto")


def table_name(store: str) -> str:
    return f"rma_store_{store}"


def render(store: str, port: int, allowed: Iterable[str]) -> str:
    """One nft transaction that replaces the store's table: loopback and `allowed` may reach `port`, no one
    else. (Declaring the table first makes the delete succeed when it does not exist yet.)"""
    addrs = sorted({ipaddress.ip_address(a) for a in allowed}, key=lambda a: (a.version, int(a)))
    v4 = ", ".join(str(a) for a in addrs if a.version == 4)
    v6 = ", ".join(str(a) for a in addrs if a.version == 6)
    t = table_name(store)
    lines = [
        f"table inet {t} {{}}",
        f"delete table inet {t}",
        f"table inet {t} {{",
        "  set trusted4 { type ipv4_addr;" + (f" elements = {{ {v4} }};" if v4 else "") + " }",
        "  set trusted6 { type ipv6_addr;" + (f" elements = {{ {v6} }};" if v6 else "") + " }",
        "  chain input {",
        "    type filter hook input priority filter - 4; policy accept;",
        '    iifname "lo" accept',
        f"    tcp dport {port} ip saddr @trusted4 accept",
        f"    tcp dport {port} ip6 saddr @trusted6 accept",
        f"    tcp dport {port} counter drop",
        "  }",
        "}",
        "",
    ]
    return "\n".join(lines)


def trusted_addresses(nodes: Iterable[dict[str, Any]], trusted: Any) -> list[str]:
    """The addresses of the alive trusted nodes in a `ray.nodes()` listing (`trusted`: the supervisor's
    test)."""
    out = set()
    for n in nodes:
        addr = n.get("NodeManagerAddress")
        if addr and trusted(n):
            try:
                out.add(str(ipaddress.ip_address(addr)))
            except ValueError:
                continue
    return sorted(out)


def wanted(data_dir: Path | None, env: dict[str, str] | None = None) -> bool:
    """Whether this node should firewall its stores (see the module's docstring)."""
    mode = (env if env is not None else os.environ).get("RMA_STORE_FIREWALL", "auto").strip().lower()
    if mode not in MODES:
        log.warning("RMA_STORE_FIREWALL=%r: use one of %s; treating it as auto", mode, ", ".join(MODES))
        mode = "auto"
    if mode != "auto":
        return mode == "on"
    if data_dir is None:
        return False
    for name, read in (
        ("membership.json", lambda d: (d.get("extra") or {}).get("overlay")),
        ("service.json", lambda d: d.get("overlay")),
    ):
        try:
            if read(json.loads((data_dir / name).read_text())):
                return True
        except (OSError, ValueError, AttributeError):
            continue
    return False


class StoreFirewall:
    """Installs and refreshes one store's table; `state` says what holds now ("on: N trusted addresses",
    "off: <why>")."""

    def __init__(self, store: str, port: int, enabled: bool) -> None:
        self.store, self.port, self.enabled = store, port, enabled
        self.allowed: list[str] | None = None
        self.state = (
            "off: not installed yet" if enabled else "off: not wanted on this node (RMA_STORE_FIREWALL)"
        )
        self._warned = False

    def apply(self, allowed: list[str]) -> None:
        if not self.enabled or allowed == self.allowed:
            return
        why = None
        if os.geteuid() != 0:
            why = "not root"
        else:
            try:
                rules = render(self.store, self.port, allowed)
                r = subprocess.run(
                    ["nft", "-f", "-"], input=rules, text=True, capture_output=True, timeout=20
                )
                if r.returncode != 0:
                    why = ((r.stderr or r.stdout).strip().splitlines() or ["nft failed"])[-1][:300]
            except FileNotFoundError:
                why = "`nft` is not installed (Debian: nftables)"
            except subprocess.TimeoutExpired:
                why = "`nft` did not finish in 20 s"
        if why is not None:
            self.state = f"off: {why}"
            if not self._warned:
                log.warning("%s's port %d is NOT firewalled to trusted nodes: %s", self.store, self.port, why)
                self._warned = True
            return
        self.allowed, self.state = list(allowed), f"on: {len(allowed)} trusted addresses"
        log.info("%s's port %d open to %d trusted node addresses only", self.store, self.port, len(allowed))

    def remove(self) -> None:
        if self.enabled and self.allowed is not None:
            subprocess.run(
                ["nft", "delete", "table", "inet", table_name(self.store)], capture_output=True, timeout=20
            )
            self.allowed = None
