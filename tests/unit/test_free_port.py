"""free_port picks ports a concurrent outgoing connection cannot take from under the child."""

from __future__ import annotations

import socket

import pytest

from tollgate import localstack
from tollgate.localstack import free_port


def test_ports_are_outside_the_ephemeral_range_and_never_repeated() -> None:
    low, high = localstack._ephemeral_range()
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert all(not low <= p <= high and p >= 10000 for p in ports)


def test_a_port_in_use_is_never_returned() -> None:
    held = []
    try:
        for _ in range(50):
            s = socket.socket()
            s.bind(("127.0.0.1", free_port()))
            s.listen()
            held.append(s)
        port = free_port()
        assert port not in {s.getsockname()[1] for s in held}
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))
    finally:
        for s in held:
            s.close()


def test_ipv6_host() -> None:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    port = free_port("::1")
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", port))


def test_falls_back_to_the_kernel_when_the_range_file_is_unreadable(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(localstack, "_EPHEMERAL_RANGE_FILE", tmp_path / "missing")
    assert localstack._ephemeral_range() == (32768, 60999)
    port = free_port()
    assert not 32768 <= port <= 60999
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
