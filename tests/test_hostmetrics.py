"""How the supervisor adds up its workers' expositions (the pure part of hostmetrics), and
the bounds of its admin listener (a real listener on 127.0.0.1)."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from gateway import hostmetrics
from gateway.hostmetrics import HostAdmin, _Families, aggregate
from tests.support.admin import metric

WORKER = """\
# HELP gateway_requests_total Requests answered
# TYPE gateway_requests_total counter
gateway_requests_total{{route="/app/",method="GET",status="200"}} {n}
# HELP gateway_reloads_total Config reloads
# TYPE gateway_reloads_total counter
gateway_reloads_total{{result="ok"}} 1
gateway_reloads_created{{result="ok"}} {created}
# HELP gateway_request_duration_seconds Time
# TYPE gateway_request_duration_seconds histogram
gateway_request_duration_seconds_bucket{{route="/app/",le="0.1"}} {n}
gateway_request_duration_seconds_bucket{{route="/app/",le="+Inf"}} {n}
gateway_request_duration_seconds_count{{route="/app/"}} {n}
gateway_request_duration_seconds_sum{{route="/app/"}} 0.5
# HELP gateway_requests_in_flight In flight
# TYPE gateway_requests_in_flight gauge
gateway_requests_in_flight {n}
# HELP gateway_build_info Build
# TYPE gateway_build_info gauge
gateway_build_info{{version="0.1.0"}} 1
# HELP process_resident_memory_bytes RSS
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes {rss}
"""


def test_counters_histograms_gauges_add_up_process_series_stay_per_worker() -> None:
    texts = {"0": WORKER.format(n=3, created=200.0, rss=1000),
             "1": WORKER.format(n=4, created=100.0, rss=2000)}
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(aggregate(texts)))
    out = generate_latest(registry).decode()
    assert metric(out, "gateway_requests_total", route="/app/", status="200") == 7
    assert metric(out, "gateway_request_duration_seconds_bucket", le="0.1") == 7
    assert metric(out, "gateway_request_duration_seconds_count") == 7
    assert metric(out, "gateway_request_duration_seconds_sum") == 1.0
    assert metric(out, "gateway_requests_in_flight") == 7
    assert metric(out, "gateway_reloads_total") == 2
    assert metric(out, "gateway_reloads_created") == 100.0  # the earliest, not a sum
    assert metric(out, "gateway_build_info", version="0.1.0") == 1  # once, not per worker
    assert metric(out, "process_resident_memory_bytes", worker="0") == 1000
    assert metric(out, "process_resident_memory_bytes", worker="1") == 2000
    assert "process_resident_memory_bytes 3000" not in out


# ------------------------------------------------------------------ the listener's bounds


@contextlib.contextmanager
def _admin(monkeypatch: pytest.MonkeyPatch, *, cap: int = 64, idle: float = 10.0
           ) -> Iterator[HostAdmin]:
    """A supervisor's admin listener on 127.0.0.1 (with no workers) under these bounds."""
    monkeypatch.setattr(hostmetrics, "MAX_ADMIN_CONNECTIONS", cap)
    monkeypatch.setattr(hostmetrics, "ADMIN_IDLE_TIMEOUT", idle)
    admin = HostAdmin("127.0.0.1", 0)
    admin.start()
    try:
        yield admin
    finally:
        admin.stop()


def _port(admin: HostAdmin) -> int:
    return int(admin.url.rsplit(":", 1)[1])


def _ask(port: int, target: str = "/healthz") -> bytes:
    """One request; the whole answer (the listener closes each connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5.0) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: admin\r\n\r\n".encode())
        return _read_all(sock)


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@pytest.fixture
def small_admin(monkeypatch: pytest.MonkeyPatch) -> Iterator[HostAdmin]:
    with _admin(monkeypatch, cap=4) as admin:
        yield admin


def test_connections_past_the_cap_get_a_503_and_the_others_go_on(
        small_admin: HostAdmin) -> None:
    """Silent connections hold at most the cap of the listener's threads: the next one is
    answered 503 at once and closed; once one of them goes, requests are served again."""
    port = _port(small_admin)
    held = [socket.create_connection(("127.0.0.1", port), timeout=5.0) for _ in range(4)]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5.0) as extra:
            busy = _read_all(extra)
        head, _, body = busy.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 "), busy
        assert body == b"503 admin listener busy\n"
        assert b"Content-Length: %d" % len(body) in head
        held.pop().close()
        deadline = time.monotonic() + 5.0
        while (answer := _ask(port)).startswith(b"HTTP/1.1 503 ") and b"busy" in answer:
            assert time.monotonic() < deadline, "a closed connection's slot never came back"
            time.sleep(0.02)
        # Served (no worker here, so /healthz itself says 503, over HTTP/1.0).
        assert answer.startswith(b"HTTP/1.0 503 ") and answer.endswith(b"no worker answers\n")
    finally:
        for sock in held:
            sock.close()


def test_served_connections_give_their_slot_back(small_admin: HostAdmin) -> None:
    port = _port(small_admin)
    for _ in range(12):  # three times the cap, one after the other
        answer = _ask(port, "/nowhere")
        assert answer.startswith(b"HTTP/1.0 404 "), answer


def test_a_silent_connection_is_closed_after_the_idle_timeout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with _admin(monkeypatch, idle=0.3) as admin:
        with socket.create_connection(("127.0.0.1", _port(admin)), timeout=5.0) as sock:
            began = time.monotonic()
            assert sock.recv(1024) == b""  # closed by the listener, unanswered
            assert 0.2 < time.monotonic() - began < 5.0
