"""Fixtures for the conformance suite: a scripted raw upstream, a gateway in front of it,
and the request path (fast or full, the ``path`` fixture of tests/conftest.py) every test
runs on.

The gateway runs in the test's event loop with a read timeout (5 s) longer than the client's
patience (3 s): an exchange that stalls fails the test instead of turning into a 504.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.config import Config
from gateway.runtime import Running
from tests.conformance.harness import PathSwitch, ScriptedUpstream, scripted_upstream
from tests.hardening.conftest import hardening_config
from tests.support.gateway import GatewayStarter


def conformance_config(upstream: str, **limits: Any) -> Config:
    timeouts = {"connect": "2s", "read": "5s", "client_header": "2s", "client_body": "2s",
                "send": "2s", "keepalive": "10s"}
    top: dict[str, Any] = {"limits": limits} if limits else {}
    return hardening_config(upstream, timeouts=timeouts, **top)


@pytest.fixture
async def up() -> AsyncIterator[ScriptedUpstream]:
    async with scripted_upstream() as upstream:
        yield upstream


@pytest.fixture
async def gw(up: ScriptedUpstream, path: PathSwitch, start_gateway: GatewayStarter) -> Running:
    return await start_gateway(conformance_config(up.url))
