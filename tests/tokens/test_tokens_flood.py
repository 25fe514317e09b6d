"""Flood limits on the callback: global rate, concurrency, locked-out floods stay cheap."""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp
from aiohttp.test_utils import RawTestServer

from tests.support.process import wait_for
from tests.tokens.conftest import GatewayFactory, issue_token, post_validate, validate_body


async def test_rate_of_wrong_tokens(make_gateway: GatewayFactory, http: aiohttp.ClientSession
                                    ) -> None:
    gw = await make_gateway(rate_limit="5/second", guard={"max_failures": 1000})
    token = (await issue_token(http, gw))["token"]
    results = await asyncio.gather(
        *(post_validate(http, gw, validate_body(f"{n:043d}", f"u{n}")) for n in range(20))
    )
    statuses = Counter(status for status, _, _ in results)
    assert statuses == {200: 5, 503: 15}
    for status, body, headers in results:
        assert body["retCode"] != 0
        if status == 503:
            assert int(headers["Retry-After"]) >= 1
    assert gw.metrics.count(("validate", "rate_limited")) == 15
    # Right tokens are not counted against the rate: all validate, even now.
    results = await asyncio.gather(*(post_validate(http, gw, validate_body(token))
                                     for _ in range(20)))
    assert all(body["retCode"] == 0 for _, body, _ in results)


async def test_concurrency_limit(make_gateway: GatewayFactory, http: aiohttp.ClientSession) -> None:
    gw = await make_gateway(max_concurrency=1, body_timeout=1.0)
    token = (await issue_token(http, gw))["token"]
    # A slow caller holds the only slot while its body trickles in.
    reader, writer = await asyncio.open_connection(gw.server.host, gw.server.port)
    writer.write(
        f"POST {gw.cfg.validate_path} HTTP/1.1\r\nHost: x\r\n"
        "Content-Type: application/json\r\nContent-Length: 50\r\n\r\n{".encode()
    )
    await writer.drain()
    try:
        await wait_for(lambda: gw.guard.active > 0, what="the validation in flight")
        assert gw.guard.active == 1
        status, body, headers = await post_validate(http, gw, validate_body(token))
        assert status == 503 and body["retCode"] != 0 and headers["Retry-After"] == "1"
        assert ("validate", "busy") in gw.metrics
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
        assert head.startswith(b"HTTP/1.1 408")
    finally:
        writer.close()
    assert gw.guard.active == 0
    assert (await post_validate(http, gw, validate_body(token)))[1]["retCode"] == 0


async def test_guessing_flood_is_bounded_and_leaves_the_user_their_token(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(guard={"max_failures": 3, "window": 10, "lockout": 30},
                            max_concurrency=100)
    token = (await issue_token(http, gw))["token"]
    loop = asyncio.get_running_loop()
    started = loop.time()
    statuses: Counter[int] = Counter()
    valid: Counter[int] = Counter()
    for batch in range(5):
        results = await asyncio.gather(
            post_validate(http, gw, validate_body(token)),
            *(post_validate(http, gw, validate_body(f"{batch}{n:042d}")) for n in range(40))
        )
        valid[results[0][1]["retCode"]] += 1
        statuses.update(status for status, _, _ in results[1:])
    assert loop.time() - started < 10
    # Each wrong guess takes an attempt atomically: however many arrive at once, exactly
    # max_failures are answered "validate failed", the rest 429. The user's own token went
    # through every time.
    assert statuses == {200: 3, 429: 197}
    assert valid == {0: 5}


async def test_without_client_ip_key_fails_closed(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway()
    token = (await issue_token(http, gw))["token"]
    # Served without the core: nothing sets request["gateway.client_ip"].
    bare = RawTestServer(gw.endpoints.validate, host="127.0.0.1", port=0)
    await bare.start_server()
    try:
        async with http.post(bare.make_url(gw.cfg.validate_path), json=validate_body(token)) as r:
            assert r.status == 403
    finally:
        await bare.close()
