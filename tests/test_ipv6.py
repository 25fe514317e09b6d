"""IPv6 loopback on both sides (skipped where the machine has no ::1)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest

from gateway.runtime import serving
from tests.support.gateway import build_config
from tests.support.rawhttp import get, raw_exchange
from tests.support.upstreams import Echo, run_echo


def _has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback here")

CONF = """
listen: {host: "::1", port: 0}
routes:
  - {prefix: /app/, upstream: "${ECHO}/up/"}
"""


@pytest.fixture
async def echo6() -> AsyncIterator[Echo]:
    async with run_echo("::1") as echo:
        yield echo


async def test_ipv6_both_sides(echo6: Echo) -> None:
    assert echo6.url.startswith("http://[::1]:")
    async with serving(build_config(CONF, echo6)) as gw:
        assert gw.url.startswith("http://[::1]:")
        resp = await raw_exchange("::1", gw.port, get("/app/v6?x=1", "X-Forwarded-For: 6.6.6.6"),
                                  family=socket.AF_INET6)
        assert resp.status == 200
        async with aiohttp.ClientSession() as http:
            async with http.get(gw.url + "/app/do/redirect?to=/up/next",
                                allow_redirects=False) as r:
                assert r.headers["Location"] == "/app/next"
            async with http.ws_connect(gw.url + "/app/do/ws") as ws:
                await ws.send_str("six")
                assert await ws.receive_str(timeout=3) == "echo:six"
    seen = echo6.seen[0]
    assert seen.target == "/up/v6?x=1"
    assert seen.all("X-Real-IP") == ["::1"]
    assert seen.all("X-Forwarded-For") == ["6.6.6.6, ::1"]
    assert seen.all("Host") == [f"[::1]:{echo6.port}"]


async def test_ipv6_trusted_proxy_walk(echo6: Echo) -> None:
    conf = CONF + 'trusted_proxies: ["::1/128", "2001:db8::/32"]\n'
    async with serving(build_config(conf, echo6)) as gw:
        await raw_exchange("::1", gw.port,
                           get("/app/t", "X-Forwarded-For: 2001:db9::7, 2001:db8::1"),
                           family=socket.AF_INET6)
    assert echo6.seen[-1].all("X-Real-IP") == ["2001:db9::7"]
    assert echo6.seen[-1].all("X-Forwarded-For") == ["2001:db9::7, 2001:db8::1, ::1"]


async def test_ipv4_client_through_ipv6_upstream(echo6: Echo) -> None:
    conf = CONF.replace('host: "::1"', "host: 127.0.0.1")
    async with serving(build_config(conf, echo6)) as gw:
        resp = await raw_exchange(gw.host, gw.port, get("/app/mixed"))
    assert resp.status == 200
    assert echo6.seen[-1].all("X-Real-IP") == ["127.0.0.1"]
