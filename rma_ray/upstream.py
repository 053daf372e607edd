"""An edge head's HAProxy names the replica it forwarded each answer to, so the core can tell which edge donor
answered (spot-check attribution, SECURITY.md "Spot-checks").

The core's gateway reaches an edge through the edge's Serve on the head: HAProxy there forwards each request to
an ingress replica at its node's address. HAProxy runs on the head (trusted, the edge's own system user), and
the address is the one it connected to, so a donor cannot forge it: a replica that sets the header itself is
overwritten (`set-header` replaces), and a donor whose node claims another donor's address gets no traffic for
it (that address answers: on the overlay, WireGuard routes it to its owner only). Any header of that name
from the client's side is irrelevant: it is a response header, set last.

Ray renders HAProxy's configuration itself and has no option for a response header, but it runs the binary
named by `RAY_SERVE_HAPROXY_BINARY_PATH` for every start and reload (`haproxy -db -f CONFIG [-sf PIDS] [-x
SOCKET]`). That binary is a small script (`wrapper`) that runs `python -m rma_ray.upstream REAL ARGS`: a copy
of the configuration with one rule added to every backend, then the real HAProxy in the same process (exec: the
PID Ray watches is HAProxy's). Servers Ray adds through HAProxy's runtime API need no rule of their own: the rule
is per backend.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

UPSTREAM_HEADER = "x-rma-upstream"
# %si / %sp: the address and port HAProxy connected to for this response (HAProxy's log-format variables)
RULE = f'    http-response set-header {UPSTREAM_HEADER} "%si:%sp"'
PATCHED_SUFFIX = ".rma-upstream"


def rewrite(config: str) -> str:
    """`config` with the upstream rule as the first line of every backend section."""
    out = []
    for line in config.splitlines():
        out.append(line)
        if line.startswith("backend "):
            out.append(RULE)
    return "\n".join(out) + "\n"


def patched_argv(argv: list[str]) -> list[str]:
    """HAProxy's arguments with each `-f FILE` pointed at a rewritten copy beside it (written atomically)."""
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg == "-f":
            source = Path(out[i + 1])
            if not source.is_file():
                continue  # a directory or nothing: HAProxy says what is wrong with it
            target = source.with_name(source.name + PATCHED_SUFFIX)
            tmp = target.with_name(target.name + f".{os.getpid()}")
            tmp.write_text(rewrite(source.read_text()))
            os.replace(tmp, target)
            out[i + 1] = str(target)
    return out


def upstream_host(value: str | None) -> str | None:
    """The address of an `x-rma-upstream` value ("10.0.0.7:30001", "[fd00::7]:30001"); None when absent or
    not of that shape."""
    if not value:
        return None
    host, sep, port = value.strip().rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    return host.removeprefix("[").removesuffix("]")


def wrapper(directory: Path, real: str) -> Path:
    """Write the script Ray runs as HAProxy (`RAY_SERVE_HAPROXY_BINARY_PATH`) into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "haproxy-upstream"
    python = shlex.quote(sys.executable)
    path.write_text(f'#!/bin/sh\nexec {python} -m rma_ray.upstream {shlex.quote(real)} "$@"\n')
    path.chmod(0o755)
    return path


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit("usage: python -m rma_ray.upstream HAPROXY [ARGS...]")
    real, args = argv[0], patched_argv(argv[1:])
    os.execv(real, [real, *args])


if __name__ == "__main__":
    main(sys.argv[1:])
