"""Fixtures for the hardening tests: the raw recording upstream and a gateway in front of it.

The gateway runs in the test's event loop (``gateway.runtime.serving``) with short timeouts,
so every "cut off after the timeout" case finishes in about a second.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import yaml

from gateway.config import Config, load_config_text
from gateway.runtime import Running
from tests.support.gateway import GatewayStarter
from tests.support.upstreams import RawRecorder, run_recorder

# Timeouts short enough to watch them fire inside a test.
TIMEOUTS: dict[str, Any] = {
    "connect": "1s",
    "read": "1s",
    "client_header": "1s",
    "client_body": "1s",
    "send": "1s",
    "keepalive": "5s",
    "websocket_idle": "30s",
    "shutdown_grace": "1s",
}


def hardening_config(upstream: str, *, timeouts: dict[str, Any] | None = None,
                     routes: list[dict[str, Any]] | None = None, **top: Any) -> Config:
    """A gateway config: ``/`` to ``upstream`` (or ``routes``), loopback port 0, short timeouts."""
    tree: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "timeouts": {**TIMEOUTS, **(timeouts or {})},
        "access_log": False,
        "routes": routes or [{"prefix": "/", "upstream": upstream.rstrip("/") + "/"}],
        **top,
    }
    return load_config_text(yaml.safe_dump(tree), env={})




@pytest.fixture
async def recorder() -> AsyncIterator[RawRecorder]:
    async with run_recorder() as rec:
        yield rec


@pytest.fixture
def start_gateway(start_gateway: GatewayStarter) -> GatewayStarter:
    """``running = await start_gateway(upstream_url, timeouts={...})``: the shared starter
    (tests/support/gateway.py) with ``hardening_config``."""
    async def start(upstream: str, **kwargs: Any) -> Running:
        return await start_gateway(hardening_config(upstream, **kwargs))

    return start


@pytest.fixture
async def gw(recorder: RawRecorder, start_gateway: GatewayStarter) -> Running:
    """The default pair: a gateway with ``/`` routed to the recording upstream."""
    return await start_gateway(recorder.url)
