"""The edge head's HAProxy wrapper (rma_ray.upstream): one response rule per backend, the real HAProxy run on a
rewritten copy, and the address read back on the core's side. The real HAProxy in front of a replica that
forges the header: tests/integration/test_upstream.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rma_ray import upstream

CONFIG = """global
    maxconn 10
defaults
    mode http
frontend f
    bind 127.0.0.1:8000
    use_backend b1 if { path_beg /a }
    default_backend b2
backend b1
    server s1 10.0.0.7:30001 check
backend b2
    server s2 10.0.0.8:30002 check
"""


def test_every_backend_gets_the_rule_first_and_nothing_else_changes() -> None:
    out = upstream.rewrite(CONFIG).splitlines()
    for name in ("b1", "b2"):
        i = out.index(f"backend {name}")
        assert out[i + 1] == upstream.RULE
    assert out.count(upstream.RULE) == 2
    assert [line for line in out if line != upstream.RULE] == CONFIG.splitlines()
    assert 'set-header x-rma-upstream "%si:%sp"' in upstream.RULE


def test_the_config_argument_points_at_a_rewritten_copy(tmp_path: Path) -> None:
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(CONFIG)
    argv = upstream.patched_argv(["-db", "-f", str(cfg), "-sf", "123", "-x", "/s.sock"])
    copy = Path(argv[2])
    assert argv[:2] == ["-db", "-f"] and argv[3:] == ["-sf", "123", "-x", "/s.sock"]
    assert copy.parent == tmp_path and copy != cfg and copy.read_text() == upstream.rewrite(CONFIG)
    assert cfg.read_text() == CONFIG  # Ray's own file is left as Ray wrote it
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "haproxy.cfg",
        "haproxy.cfg" + upstream.PATCHED_SUFFIX,
    ]
    # no config (haproxy -v), or one that is not a file: passed on for HAProxy to judge
    assert upstream.patched_argv(["-v"]) == ["-v"]
    assert upstream.patched_argv(["-f", str(tmp_path / "none")]) == ["-f", str(tmp_path / "none")]


def test_the_wrapper_runs_this_python_on_the_real_binary(tmp_path: Path) -> None:
    path = upstream.wrapper(tmp_path / "dir", "/opt/haproxy bin/haproxy")
    text = path.read_text()
    assert os.access(path, os.X_OK) and text.startswith("#!/bin/sh\nexec ")
    assert "-m rma_ray.upstream '/opt/haproxy bin/haproxy' \"$@\"" in text


@pytest.mark.parametrize(
    ("value", "host"),
    [
        ("10.77.0.2:30001", "10.77.0.2"),
        ("[fd00::7]:30001", "fd00::7"),
        (" 10.0.0.1:8 ", "10.0.0.1"),
        ("10.77.0.2", None),
        ("10.77.0.2:x", None),
        (":30001", None),
        ("", None),
        (None, None),
    ],
)
def test_the_address_is_read_back(value: str | None, host: str | None) -> None:
    assert upstream.upstream_host(value) == host
