"""WebSockets through the gateway: text, binary, ping/pong, close codes both ways, idle timeout."""

from __future__ import annotations

import asyncio
import os

import aiohttp
import pytest

from tests.support.gateway import ROUTES, GatewayFactory
from tests.support.ports import free_port
from tests.support.process import wait_for
from tests.support.upstreams import Echo


async def test_websocket_conversation(gateway: GatewayFactory, http: aiohttp.ClientSession,
                                      echo: Echo) -> None:
    gw = await gateway()
    async with http.ws_connect(gw.url + "/app/do/ws?room=1",
                               headers={"X-Forwarded-For": "6.6.6.6"}) as ws:
        await ws.send_str("hello")
        assert await ws.receive_str(timeout=3) == "echo:hello"
        await ws.send_bytes(b"\x00\x01\xff")
        assert await ws.receive_bytes(timeout=3) == b"echo:\x00\x01\xff"
        big = os.urandom(1 << 20)
        await ws.send_bytes(big)
        assert await ws.receive_bytes(timeout=5) == b"echo:" + big
        for i in range(20):
            await ws.send_str(f"m{i}")
        assert [await ws.receive_str(timeout=3) for _ in range(20)] == [f"echo:m{i}"
                                                                         for i in range(20)]
        await ws.send_str("中文 ✓")
        assert await ws.receive_str(timeout=3) == "echo:中文 ✓"
    seen = echo.seen[-1]
    assert seen.target == "/up/do/ws?room=1"
    assert seen.all("X-Real-IP") == ["127.0.0.1"]
    assert seen.all("X-Forwarded-For") == ["6.6.6.6, 127.0.0.1"]
    assert seen.header("Sec-WebSocket-Key")


async def test_upstream_close_code_reaches_client(gateway: GatewayFactory,
                                                  http: aiohttp.ClientSession) -> None:
    gw = await gateway()
    async with http.ws_connect(gw.url + "/app/do/ws") as ws:
        await ws.send_str("close:4001")
        msg = await ws.receive(timeout=3)
        assert msg.type == aiohttp.WSMsgType.CLOSE
        assert msg.data == 4001
        assert msg.extra == "bye"
    assert ws.close_code == 4001


async def test_client_close_code_reaches_upstream(gateway: GatewayFactory,
                                                  http: aiohttp.ClientSession,
                                                  echo: Echo) -> None:
    gw = await gateway()
    ws = await http.ws_connect(gw.url + "/app/do/ws")
    await ws.send_str("x")
    assert await ws.receive_str(timeout=3) == "echo:x"
    await ws.close(code=4002, message=b"leaving")
    await wait_for(lambda: bool(echo.ws_closed), what="the upstream's close")
    assert echo.ws_closed == [4002]


async def test_ping_pong_pass_through(gateway: GatewayFactory,
                                      http: aiohttp.ClientSession) -> None:
    gw = await gateway()
    async with http.ws_connect(gw.url + "/app/do/ws", autoping=False) as ws:
        await ws.ping(b"are-you-there")
        msg = await ws.receive(timeout=3)
        assert msg.type == aiohttp.WSMsgType.PONG
        assert msg.data == b"are-you-there"


async def test_idle_websocket_closed(gateway: GatewayFactory, http: aiohttp.ClientSession
                                     ) -> None:
    gw = await gateway(ROUTES + "timeouts: {websocket_idle: 400ms}\n")
    loop = asyncio.get_running_loop()
    async with http.ws_connect(gw.url + "/app/do/ws", autoping=False, heartbeat=None) as ws:
        await ws.send_str("still here")
        assert await ws.receive_str(timeout=3) == "echo:still here"
        start = loop.time()
        msg = await ws.receive(timeout=5)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                            aiohttp.WSMsgType.ERROR)
        assert 0.2 < loop.time() - start < 3


async def test_activity_keeps_websocket_open(gateway: GatewayFactory,
                                             http: aiohttp.ClientSession) -> None:
    gw = await gateway(ROUTES + "timeouts: {websocket_idle: 500ms}\n")
    async with http.ws_connect(gw.url + "/app/do/ws") as ws:
        for i in range(6):  # 6 x 200 ms > the idle timeout, but never idle for long
            await asyncio.sleep(0.2)
            await ws.send_str(str(i))
            assert await ws.receive_str(timeout=3) == f"echo:{i}"


async def test_websocket_disabled_on_route(gateway: GatewayFactory,
                                           http: aiohttp.ClientSession) -> None:
    gw = await gateway("routes:\n  - {prefix: /app/, upstream: '${ECHO}/up/', websocket: false}\n")
    with pytest.raises(aiohttp.WSServerHandshakeError):
        await http.ws_connect(gw.url + "/app/do/ws")


async def test_websocket_to_dead_upstream_is_502(gateway: GatewayFactory,
                                                 http: aiohttp.ClientSession) -> None:
    port = free_port()
    gw = await gateway(f"routes:\n  - {{prefix: /, upstream: 'http://127.0.0.1:{port}/'}}\n")
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await http.ws_connect(gw.url + "/ws")
    assert info.value.status == 502


async def test_websocket_and_http_side_by_side(gateway: GatewayFactory,
                                               http: aiohttp.ClientSession) -> None:
    gw = await gateway()
    async with http.ws_connect(gw.url + "/app/do/ws") as ws:
        async with http.get(gw.url + "/app/plain") as resp:
            assert resp.status == 200
        await ws.send_str("after")
        assert await ws.receive_str(timeout=3) == "echo:after"
