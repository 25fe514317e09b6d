"""The gateway in the test's event loop: ``start_gateway`` serves configs until the test ends;
``fast_path_spy`` and ``access_records`` watch what it did.

The one in-process starter. Suites that build their configs their own way (the hardening
and integration tests) override the fixture with a thin wrapper that calls this one.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import yaml

from gateway.config import Config, load_config_text
from gateway.fastpath import FastRequestHandler
from gateway.runtime import Running, serving
from tests.support.process import flat
from tests.support.upstreams import Echo

GatewayStarter = Callable[..., Awaitable[Running]]
GatewayFactory = GatewayStarter  # the root conftest's ``gateway``: in front of the echo


def build_config(yaml_text: str, echo: Echo, **env: str) -> Config:
    """Config from YAML with ``${ECHO}`` (the echo's base URL) and test-friendly defaults."""
    tree = yaml.safe_load(yaml_text) or {}
    listen = tree.setdefault("listen", {})
    listen.setdefault("host", "127.0.0.1")
    listen.setdefault("port", 0)
    tree.setdefault("timeouts", {}).setdefault("shutdown_grace", "2s")
    tree.setdefault("access_log", True)
    values = {"ECHO": echo.url, "ECHO_PORT": str(echo.port), **env}
    return load_config_text(yaml.safe_dump(tree), env=values)


# Two routes over the echo: /app/ -> /up/ and / -> /root/.
ROUTES = """
routes:
  - prefix: /app/
    upstream: ${ECHO}/up/
  - prefix: /
    upstream: ${ECHO}/root/
"""


def body_json(data: bytes) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(data)
    return result


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


@pytest.fixture
def fast_path_spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """Records (path, taken) for every request the fast path was offered."""
    calls: list[tuple[str, bool]] = []
    original = FastRequestHandler._try_inline

    def spy(self: FastRequestHandler, msg: Any, payload: Any) -> bool:
        taken = original(self, msg, payload)
        calls.append((getattr(msg, "path", "?"), taken))
        return taken

    monkeypatch.setattr(FastRequestHandler, "_try_inline", spy)
    return calls


@pytest.fixture
def access_records(caplog: pytest.LogCaptureFixture) -> Callable[[], list[dict[str, Any]]]:
    """The ``fields`` of every ``gateway.access`` record logged so far."""
    caplog.set_level(logging.INFO, logger="gateway.access")

    def get() -> list[dict[str, Any]]:
        return [flat(r.access) for r in caplog.records  # type: ignore[attr-defined]
                if r.name == "gateway.access"]

    return get
