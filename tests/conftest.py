"""Shared fixtures: a real echo upstream on 127.0.0.1 port 0, a gateway factory, a client.

The helpers themselves live in ``tests/support/`` so test modules can import them.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

# Test modules import helpers as ``tests.<module>``; that needs the project root on the path
# whatever pytest's rootdir insertion did (tests/ has no __init__.py).
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
# The shared helpers assert too: their failures read like the tests' own.
pytest.register_assert_rewrite("tests.support")

from gateway.runtime import Running  # noqa: E402
from tests.conformance.harness import PathSwitch  # noqa: E402
from tests.support.gateway import ROUTES, GatewayFactory, GatewayStarter, build_config  # noqa: E402
from tests.support.upstreams import Echo, run_echo  # noqa: E402

pytest_plugins = ("tests.support.gateway",)


@pytest.fixture(params=["fast", "full"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> PathSwitch:
    """The request path that serves: ``fast`` (the lean path whenever it may) or ``full``
    (the fast path declines everything). A module using it (``pytestmark =
    pytest.mark.usefixtures("path")``) runs every test once on each path, as uvicorn runs
    its protocol tests over both of its protocol implementations."""
    switch = PathSwitch(request.param)
    switch.install(monkeypatch)
    return switch


@pytest.fixture
async def echo() -> AsyncIterator[Echo]:
    async with run_echo() as e:
        yield e


@pytest.fixture
def gateway(echo: Echo, start_gateway: GatewayStarter) -> GatewayFactory:
    """``running = await gateway(yaml_text)`` serves a gateway in front of the echo until the
    test ends."""
    async def start(yaml_text: str = ROUTES, **env: str) -> Running:
        return await start_gateway(build_config(yaml_text, echo, **env))

    return start


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client without a cookie jar and without decompression: it shows what arrived."""
    async with aiohttp.ClientSession(auto_decompress=False,
                                     cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: the big streaming tests (about 30 s)")
