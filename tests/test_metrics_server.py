"""The /metrics server of a host-network agent: bound where it is told, bounded threads,
timeouts, scrapes served from a cache."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request

import pytest

from cn2mirror.agent.metrics import Family, MetricsServer, Registry, parse_address


class CountingCollector:
    def __init__(self):
        self.calls = 0

    def collect(self):
        self.calls += 1
        yield Family("cn2mirror_test_calls", "counter", "collections").add(self.calls)


def serve(**kwargs) -> tuple[MetricsServer, CountingCollector]:
    registry = Registry()
    c = registry.register(CountingCollector())
    return MetricsServer(registry, "127.0.0.1:0", **kwargs).start(), c


def get(server: MetricsServer, path: str = "/metrics", timeout: float = 5) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}",
                                timeout=timeout) as r:
        return r.read().decode()


def test_without_a_host_it_listens_on_localhost_only():
    assert parse_address(":9464") == ("127.0.0.1", 9464)
    assert parse_address("198.18.0.5:9464") == ("198.18.0.5", 9464)
    assert parse_address("[::1]:0") == ("::1", 0)
    registry = Registry()
    server = MetricsServer(registry, ":0").start()
    try:
        assert server._server.server_address[0] == "127.0.0.1"
    finally:
        server.stop()


def test_idle_connections_do_not_grow_threads_beyond_the_cap():
    server, _ = serve(max_connections=8, request_timeout=30)
    socks = []
    try:
        before = threading.active_count()
        for _ in range(200):
            s = socket.create_connection(("127.0.0.1", server.port))
            socks.append(s)
        deadline = time.monotonic() + 5
        while server.refused < 200 - 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.refused >= 200 - 8
        assert threading.active_count() - before <= 8
        # The refused ones were closed: reading gives EOF at once.
        socks[-1].settimeout(2)
        assert socks[-1].recv(1) == b""
        for s in socks[:8]:
            s.close()
        del socks[:8]
        # Slots come back once the idle clients go: a scrape is served again.
        deadline = time.monotonic() + 5
        while True:
            try:
                assert "cn2mirror_test_calls" in get(server, timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        for s in socks:
            s.close()
        server.stop()


def test_a_slow_client_times_out_and_frees_its_slot():
    server, _ = serve(max_connections=1, request_timeout=0.5)
    try:
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(b"GET /metr")  # and then nothing more
        t0 = time.monotonic()
        s.settimeout(5)
        assert s.recv(1024) == b""  # the server hung up on it
        assert time.monotonic() - t0 < 3
        s.close()
        # The one slot is free again (the handler releases it just after hanging up: on
        # a busy machine a moment later, so a scrape is tried for up to 2 s).
        deadline = time.monotonic() + 2
        while True:
            try:
                assert "cn2mirror_test_calls" in get(server)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    finally:
        server.stop()


def test_two_scrapes_within_the_refresh_window_compute_once():
    server, c = serve(cache_seconds=2.0)
    try:
        first = get(server)
        second = get(server)
        assert first == second and c.calls == 1 and server.renders == 1
        # Concurrent scrapes: still one computation.
        out = []
        threads = [threading.Thread(target=lambda: out.append(get(server))) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert out == [first] * 5 and c.calls == 1
        time.sleep(2.1)
        assert "cn2mirror_test_calls 2" in get(server) and c.calls == 2
    finally:
        server.stop()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        MetricsServer(Registry(), ":0", max_connections=0)
