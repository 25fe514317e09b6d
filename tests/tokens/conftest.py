"""Fixtures for the token tests: a real redis-server, configs, and endpoints on real sockets."""

from __future__ import annotations

import ipaddress
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import RawTestServer
from pydantic import SecretStr

from gateway.config import TokenConfig, TokenGuard
from gateway.keys import CLIENT_IP
from gateway.redisconn import RedisAuth
from gateway.tokens import Guard, TokenEndpoints, TokenStore, guard_from_config, open_store
from tests.redis_server import RedisServer, redis_or_fail

SIGNING_KEY = "s" * 32
API_KEY = "api-key-0123456789abcdef"
TENANT = "202007159031"
# Test-only: lets one test client pose as several addresses. The real core computes
# gateway.client_ip from the socket and trusted_proxies; the endpoints never read headers.
TEST_IP_HEADER = "X-Test-Client-IP"


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server on a free loopback port, stopped after the test."""
    with redis_or_fail() as server:
        yield server


@pytest.fixture(params=["memory", "redis"])
def backend_url(request: pytest.FixtureRequest) -> str:
    """Each test once on the memory store and once on a fresh redis-server: its URL."""
    if request.param == "memory":
        return "memory"
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url


def make_cfg(**overrides: Any) -> TokenConfig:
    """A TokenConfig with test-sized limits; keyword arguments override fields."""
    values: dict[str, Any] = {
        "signing_key": SecretStr(SIGNING_KEY),
        "api_key": SecretStr(API_KEY),
        "ttl": 60.0,
        "store": "memory",
        "validate_allow_from": [ipaddress.ip_network("127.0.0.1/32")],
        "guard": TokenGuard(max_failures=3, window=10.0, lockout=1.0),
        "rate_limit": "1000/second",
        "max_concurrency": 16,
        "max_body": 4096,
        "body_timeout": 2.0,
    }
    values.update(overrides)
    return TokenConfig(**values)


class Gateway:
    """One TokenEndpoints behind a real HTTP server, like one gateway process."""

    def __init__(self, cfg: TokenConfig, store: TokenStore, guard: Guard) -> None:
        self.cfg = cfg
        self.store = store
        self.guard = guard
        self.metrics: list[tuple[str, str]] = []
        self.endpoints = TokenEndpoints(
            cfg, TENANT, store, guard, lambda e, o: self.metrics.append((e, o))
        )
        self.server = RawTestServer(self._dispatch, host="127.0.0.1", port=0)

    async def _dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        # Stands in for the core: sets the client address, then calls the gateway handler.
        with warnings.catch_warnings():
            # The core's contract is a plain string key (aiohttp recommends RequestKey).
            warnings.simplefilter("ignore")
            request[CLIENT_IP] = request.headers.get(TEST_IP_HEADER, request.remote or "")
        if request.path == self.cfg.validate_path:
            return await self.endpoints.validate(request)
        if request.path == self.cfg.issue_path:
            return await self.endpoints.issue(request)
        return web.Response(status=404)

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    @property
    def validate_url(self) -> str:
        return self.url(self.cfg.validate_path)

    @property
    def issue_url(self) -> str:
        return self.url(self.cfg.issue_path)


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def make_gateway() -> AsyncIterator[GatewayFactory]:
    """``await make_gateway(**cfg_overrides)`` → a running Gateway; all closed at teardown."""
    made: list[Gateway] = []

    async def factory(**overrides: Any) -> Gateway:
        cfg = make_cfg(**overrides)
        gw = Gateway(
            cfg,
            open_store(cfg.store, SIGNING_KEY.encode(), cfg.ttl,
                       auth=RedisAuth.from_config(cfg.redis), max_tokens=cfg.max_tokens),
            guard_from_config(cfg),
        )
        await gw.server.start_server()
        made.append(gw)
        return gw

    yield factory
    for gw in made:
        await gw.server.close()
        await gw.store.close()
        await gw.guard.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def validate_body(token: str, user_id: str = "u1", user_name: str = "Tom") -> dict[str, str]:
    return {"Token": token, "userId": user_id, "userName": user_name, "tenantSpaceId": TENANT}


async def post_validate(
    http: aiohttp.ClientSession, gw: Gateway, body: Any, *, ip: str | None = None
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """POST the callback; returns (status, JSON body, headers)."""
    headers = {TEST_IP_HEADER: ip} if ip else {}
    async with http.post(gw.validate_url, json=body, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None), dict(resp.headers)


async def issue_token(
    http: aiohttp.ClientSession, gw: Gateway, user_id: str = "u1", user_name: str = "Tom"
) -> dict[str, Any]:
    async with http.post(
        gw.issue_url,
        json={"userId": user_id, "userName": user_name},
        headers={"Authorization": f"Bearer {API_KEY}"},
    ) as resp:
        assert resp.status == 200, await resp.text()
        data: dict[str, Any] = await resp.json()
        return data
