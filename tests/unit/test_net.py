"""rma_ray.net.free_port: ports for servers that start later, never ones the kernel hands out meanwhile."""

from __future__ import annotations

import socket

import pytest

from rma_ray import net


def test_free_ports_are_above_the_ephemeral_range_distinct_and_free_on_every_address() -> None:
    high = net._ephemeral_high()
    ports = [net.free_port("127.0.0.1") for _ in range(300)]
    assert len(set(ports)) == len(ports)  # never the same port twice in one process
    assert all(high < p <= 65535 for p in ports)
    for p in ports[:20]:
        with socket.socket() as s:
            s.bind(("", p))  # free on all addresses, not only on the one asked about


def test_a_taken_port_is_skipped_and_a_span_is_consecutive(monkeypatch: pytest.MonkeyPatch) -> None:
    first = net._ephemeral_high() + 1
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0 if first > 65000 else first + 5))
        taken = held.getsockname()[1]
        monkeypatch.setattr(net, "_next", taken - first)  # the cursor stands on the taken port
        port = net.free_port()
        assert port != taken
        monkeypatch.setattr(net, "_next", taken - first - 2)  # a span of 4 from there would cover it
        start = net.free_port(span=4)
        assert not start <= taken < start + 4
        for p in range(start, start + 4):
            with socket.socket() as s:
                s.bind(("", p))


def test_without_room_above_the_ephemeral_range_the_kernel_picks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(net, "_ephemeral_high", lambda: 65000)
    port = net.free_port("127.0.0.1")
    with socket.socket() as s:
        s.bind(("", port))
