"""gateway.health: upstream and store checks on real sockets (a listener, a closed port)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from gateway.health import HealthMonitor
from tests.gwhelpers import free_port


async def test_checks_report_up_down_and_changes(caplog: pytest.LogCaptureFixture) -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    closed = free_port()
    store_ok = True

    async def store_ping() -> None:
        if not store_ok:
            raise ConnectionError("refused")

    seen: list[tuple[str, bool]] = []
    store_seen: list[bool] = []
    monitor = HealthMonitor(
        lambda: [("/site/", "127.0.0.1", port), ("/cec/", "127.0.0.1", closed)],
        lambda: [store_ping],
        on_upstream=lambda route, up: seen.append((route, up)),
        on_store=store_seen.append, timeout=1.0)
    caplog.set_level(logging.INFO, logger="gateway.health")
    try:
        await monitor.check_now()
        assert monitor.upstreams["/site/"].up is True
        cec = monitor.upstreams["/cec/"]
        assert cec.up is False and cec.error and "ConnectionRefused" in cec.error
        assert monitor.store.up is True
        assert sorted(seen) == [("/cec/", False), ("/site/", True)] and store_seen == [True]
        # Logged: the first "down", not the first "up".
        assert "route /cec/" in caplog.text and "route /site/" not in caplog.text

        caplog.clear()
        store_ok = False
        server.close()
        await server.wait_closed()
        await monitor.check_now()
        assert monitor.upstreams["/site/"].up is False
        assert monitor.store.up is False and "ConnectionError: refused" in str(monitor.store.error)
        assert "route /site/" in caplog.text and "token store is down" in caplog.text
        assert "route /cec/" not in caplog.text  # no change, no line
        assert monitor.upstreams["/site/"].as_json()["since"] is not None
    finally:
        await monitor.stop()
        server.close()


async def test_concurrent_callers_share_one_round() -> None:
    calls = 0

    async def slow_ping() -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)

    monitor = HealthMonitor(list, lambda: [slow_ping])
    await asyncio.gather(*(monitor.check_now() for _ in range(10)))
    assert calls == 1
    await monitor.check_now()
    assert calls == 2


async def test_background_loop_runs_and_stops() -> None:
    calls = 0

    async def ping() -> None:
        nonlocal calls
        calls += 1

    monitor = HealthMonitor(list, lambda: [ping], interval=0.01)
    monitor.start()
    for _ in range(200):
        if calls >= 3:
            break
        await asyncio.sleep(0.01)
    await monitor.stop()
    assert calls >= 3
