"""The gateway in the test's event loop: ``start_gateway`` serves configs until the test ends.

The one in-process starter. Suites that build their configs their own way (the hardening
and integration tests) override the fixture with a thin wrapper that calls this one.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from gateway.config import Config, load_config_text
from gateway.runtime import Running, serving

GatewayStarter = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start_gateway() -> AsyncIterator[GatewayStarter]:
    """``running = await start_gateway(config)``: a ``Config``, or YAML text read with
    ``env``; every gateway started is stopped when the test ends."""
    async with contextlib.AsyncExitStack() as stack:
        async def start(config: Config | str, env: dict[str, str] | None = None) -> Running:
            if isinstance(config, str):
                config = load_config_text(config, env=env or {})
            return await stack.enter_async_context(serving(config))

        yield start
