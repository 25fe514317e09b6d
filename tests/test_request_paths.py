"""The fast path and the full path answer alike: regressions of the ways they once differed
(pipelining past aiohttp's queue limit is pinned in tests/test_aiohttp_contract.py).

Every test here runs on both paths (the ``path`` fixture); where the fast path is meant
to serve, the test also checks that it did, so a fast path that silently declines cannot
make a test pass.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway.policy import LEAN_BODY_MAX
from tests.chat.test_chat_endpoints import (
    CHANNEL,
    NEW_CLIENT,
    SECRET,
    TENANT,
    independent_verify,
)
from tests.conformance.harness import PathSwitch
from tests.support.gateway import ROUTES, GatewayFactory, GatewayStarter
from tests.support.rawhttp import (
    KeepAlive,
    get,
    parse_response,
    read_response,
    read_response_head_and_body,
)
from tests.support.upstreams import (
    RawRecorder,
    UpConn,
    UpRequest,
    fixed_response,
    recorder_barrier,
    run_recorder,
)

pytestmark = pytest.mark.usefixtures("path")

CORS = ROUTES + """
cors:
  allow_origins: [https://www.example.com]
"""


def served_as_expected(path: PathSwitch, marker: str) -> None:
    assert path.served_fast(marker) == (path.name == "fast"), path.taken[-5:]


async def test_vary_origin_on_every_response_of_a_kept_alive_connection(
        gateway: GatewayFactory, path: PathSwitch) -> None:
    """With CORS on, a proxied answer depends on Origin even when the request had none: a
    shared cache must not hand the CORS-less copy to a cross-origin page."""
    gw = await gateway(CORS)
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    try:
        for i in range(3):
            writer.write(b"GET /app/vary%d HTTP/1.1\r\nHost: gw.test\r\n\r\n" % i)
            head, _ = await read_response_head_and_body(reader)
            assert head.startswith(b"HTTP/1.1 200 "), head
            vary = [line for line in head.lower().split(b"\r\n") if line.startswith(b"vary:")]
            assert vary and b"origin" in b",".join(vary), (i, head)
    finally:
        writer.close()
    served_as_expected(path, "/app/vary2")


@pytest.mark.parametrize(("target", "status", "text"), [
    ("/app/do/reset", 502, b"502 Bad Gateway: the upstream could not be reached\n"),
    ("/app/do/slow?delay=3", 504, b"504 Gateway Timeout: the upstream did not answer in time\n"),
])
async def test_upstream_errors_are_one_answer(gateway: GatewayFactory, path: PathSwitch,
                                              target: str, status: int, text: bytes) -> None:
    """A 502/504 reads the same whichever path met the failure (here on a warm pool, which
    is where the fast path serves)."""
    gw = await gateway(ROUTES + "timeouts: {read: 300ms}\n")
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    try:
        writer.write(get("/app/warm").replace(b"Connection: close\r\n", b""))
        await read_response_head_and_body(reader)
        writer.write(b"GET %s HTTP/1.1\r\nHost: gw.test\r\n\r\n" % target.encode())
        head, body = await read_response_head_and_body(reader)
    finally:
        writer.close()
    resp = parse_response(head + body)
    assert resp.status == status
    assert head.startswith(b"HTTP/1.1 %d " % status)
    assert body == text
    names = sorted(name.lower() for name, _ in resp.headers)
    assert names == ["content-length", "content-type", "date", "server",
                     "x-content-type-options", "x-request-id"], names
    assert resp.header("Server") == "cec-gateway"
    assert resp.header("Content-Type") == "text/plain; charset=utf-8"
    assert resp.header("X-Content-Type-Options") == "nosniff"
    served_as_expected(path, "/app/do/")


# ------------------------------------------------------------------ request bodies

UPSTREAM = """
listen: {host: 127.0.0.1, port: 0}
access_log: false
timeouts: {shutdown_grace: 2s}
routes:
  - prefix: /
    upstream: ${UP}/
"""


async def through(start_gateway: GatewayStarter, rec: RawRecorder, extra: str = ""
                  ) -> KeepAlive:
    """A gateway in front of the recorder, and a client connection whose first GET left a
    pooled upstream connection behind (where the lean path serves)."""
    gw = await start_gateway(UPSTREAM + extra, env={"UP": rec.url})
    client = await KeepAlive.open(gw.port)
    warm = await client.request("GET", "/warm")
    assert warm.status == 200
    return client


def post(target: str, body: bytes, *headers: str) -> bytes:
    lines = [f"POST {target} HTTP/1.1", "Host: gw.test", f"Content-Length: {len(body)}",
             *headers]
    return "\r\n".join([*lines, "", ""]).encode("latin-1") + body


async def test_small_post_body_is_forwarded_byte_exact(start_gateway: GatewayStarter,
                                                       path: PathSwitch) -> None:
    body = bytes(range(256)) * 16  # 4 KiB, every byte value
    async with run_recorder() as rec:
        client = await through(start_gateway, rec)
        try:
            for method in ("POST", "PUT"):
                resp = await client.request(method, f"/small-{method}", body=body)
                assert resp.status == 200
                assert resp.body.endswith(f":{method} /small-{method}\n".encode()), resp.body
        finally:
            await client.close()
        reqs = rec.assert_clean(at_most=3)
    assert [(r.method, r.target, r.body) for r in reqs[1:]] == [
        ("POST", "/small-POST", body), ("PUT", "/small-PUT", body)]
    for r in reqs[1:]:
        assert r.header("Content-Length") == "4096"
    served_as_expected(path, "/small-")


async def test_body_split_across_writes_arrives_whole(start_gateway: GatewayStarter,
                                                      path: PathSwitch) -> None:
    """A body still arriving when the head is parsed: the lean path waits for it and sends
    it whole, the full path streams it; the upstream gets it whole either way."""
    body = b"0123456789abcdef" * 256
    async with run_recorder() as rec:
        client = await through(start_gateway, rec)
        try:
            data = post("/split", body)
            for cut in (len(data) - len(body) - 10, len(data) - 1000, len(data) - 1):
                client.writer.write(data[:cut])
                await client.writer.drain()
                await asyncio.sleep(0.02)
                data = data[cut:]
            client.writer.write(data)
            resp = await asyncio.wait_for(read_response(client.reader), 5)
        finally:
            await client.close()
        reqs = rec.assert_clean(at_most=2)
    assert resp is not None and resp.status == 200
    assert reqs[-1].target == "/split" and reqs[-1].body == body
    served_as_expected(path, "/split")


async def test_body_above_the_lean_threshold_streams(start_gateway: GatewayStarter,
                                                     path: PathSwitch) -> None:
    body = b"z" * (LEAN_BODY_MAX + 1)
    async with run_recorder() as rec:
        client = await through(start_gateway, rec)
        try:
            resp = await client.request("POST", "/big", body=body)
        finally:
            await client.close()
        reqs = rec.assert_clean(at_most=2)
    assert resp.status == 200
    assert reqs[-1].body == body
    assert not path.served_fast("/big")


async def test_client_closing_mid_body_never_reaches_upstream_as_complete(
        start_gateway: GatewayStarter, path: PathSwitch) -> None:
    async with run_recorder() as rec:
        client = await through(start_gateway, rec)
        client.writer.write(post("/cut", b"x" * 1000)[:-400])
        await client.writer.drain()
        await asyncio.sleep(0.05)
        client.writer.transport.abort()
        gw_port = client.writer.get_extra_info("peername")[1]
        await recorder_barrier(gw_port, rec)
        # Whatever reached the upstream of /cut was cut off, never framed as a request.
        assert [r.target for r in rec.requests if r.target == "/cut"] == []
    served_as_expected(path, "/cut")


async def test_body_over_client_max_body_size_is_413(start_gateway: GatewayStarter,
                                                     path: PathSwitch) -> None:
    async with run_recorder() as rec:
        client = await through(start_gateway, rec, "limits: {client_max_body_size: 1k}\n")
        try:
            ok = await client.request("POST", "/fits", body=b"a" * 1024)
            refused = await client.request("POST", "/over", body=b"a" * 1025)
        finally:
            await client.close()
        reqs = rec.assert_clean(at_most=2)
    assert ok.status == 200
    assert refused.status == 413 and refused.body == b"413 Content Too Large\n"
    assert refused.header("Connection") == "close"
    assert [r.target for r in reqs] == ["/warm", "/fits"]
    served_as_expected(path, "/fits")
    assert not path.served_fast("/over")


async def test_body_timeout_is_408(start_gateway: GatewayStarter, path: PathSwitch) -> None:
    async with run_recorder() as rec:
        client = await through(start_gateway, rec, "timeouts: {client_body: 200ms}\n")
        try:
            client.writer.write(post("/slow", b"s" * 100)[:-50])
            resp = await asyncio.wait_for(read_response(client.reader), 5)
        finally:
            await client.close()
    assert resp is not None and resp.status == 408
    assert resp.body == b"408 Request Timeout\n"
    assert resp.header("Connection") == "close" and resp.header("Server") == "cec-gateway"
    assert [r.target for r in rec.requests] == ["/warm"]  # nothing of it forwarded whole
    served_as_expected(path, "/slow")


async def test_pipelined_post_then_get_answer_in_order(start_gateway: GatewayStarter,
                                                       path: PathSwitch) -> None:
    async with run_recorder() as rec:
        client = await through(start_gateway, rec)
        try:
            client.writer.write(post("/first", b"one" * 100)
                                + b"GET /second HTTP/1.1\r\nHost: gw.test\r\n\r\n"
                                + post("/third", b"three"))
            answers = [await asyncio.wait_for(read_response(client.reader), 5)
                       for _ in range(3)]
        finally:
            await client.close()
        reqs = rec.assert_clean(at_most=4)
    assert [a.body[a.body.index(b":", 3) + 1:] if a else None for a in answers] == [
        b"POST /first\n", b"GET /second\n", b"POST /third\n"]
    assert [r.body for r in reqs[1:]] == [b"one" * 100, b"", b"three"]
    served_as_expected(path, "/first")
    served_as_expected(path, "/third")


async def test_body_completed_with_a_pipelined_get_behind_it(start_gateway: GatewayStarter,
                                                              path: PathSwitch) -> None:
    """The write that completes a body also carries the next request: both are answered,
    in order."""
    async with run_recorder() as rec:
        client = await through(start_gateway, rec)
        try:
            data = post("/late", b"L" * 3000)
            client.writer.write(data[:-1000])
            await client.writer.drain()
            await asyncio.sleep(0.05)
            client.writer.write(data[-1000:] + b"GET /next HTTP/1.1\r\nHost: gw.test\r\n\r\n")
            answers = [await asyncio.wait_for(read_response(client.reader), 5)
                       for _ in range(2)]
        finally:
            await client.close()
        reqs = rec.assert_clean(at_most=3)
    assert [a.body.split(b":", 2)[2] if a else None for a in answers] == [
        b"POST /late\n", b"GET /next\n"]
    assert reqs[1].body == b"L" * 3000
    served_as_expected(path, "/late")


async def test_post_is_not_retried_on_a_stale_pooled_connection(
        start_gateway: GatewayStarter, path: PathSwitch) -> None:
    """An upstream that drops a pooled connection as a request arrives: a GET is replayed on
    a fresh connection, a POST is not (the upstream may have acted on it)."""
    async def drop_reused(req: UpRequest, conn: UpConn, writer: asyncio.StreamWriter) -> bool:
        if len(conn.requests) > 1:
            return False  # closes without an answer
        writer.write(fixed_response(req, 1))
        await writer.drain()
        return True

    async with run_recorder(drop_reused) as rec:
        for method, status in (("GET", 200), ("POST", 502)):
            client = await through(start_gateway, rec)
            try:
                resp = await client.request(method, f"/stale-{method}", body=b"b" * 10)
            finally:
                await client.close()
            assert resp.status == status, (method, resp)
        seen = [r.target for r in rec.requests]
    assert seen.count("/stale-GET") == 2 and seen.count("/stale-POST") == 1, seen
    served_as_expected(path, "/stale-POST")


CHAT = f"""
cec:
  tenant_space_id: "{TENANT}"
  channel_config_id: "{CHANNEL}"
  auth: {{mode: authorization, secret_key: "{SECRET}"}}
  guest: {{cookie_key: "guest-cookie-key-0123456789abcdef"}}
"""


async def test_chat_post_is_rewritten_alike_on_both_paths(start_gateway: GatewayStarter,
                                                         path: PathSwitch) -> None:
    """A guest's chat-open POST (identity from the signed cookie, no I/O) is rewritten by the
    same function on either path: identity forced, signature valid, cookie issued once; a
    bad body is answered 400 by the one error writer."""
    page = json.dumps({"thirdUserName": "Ann", "thirdUserId": "admin", "locale": "en",
                       "tenantSpaceId": "999"}).encode()
    async with run_recorder() as rec:
        client = await through(start_gateway, rec, CHAT)
        try:
            first = await client.request("POST", NEW_CLIENT + "?t=1", body=page)
            cookie = (first.header("Set-Cookie") or "").split(";")[0]
            again = await client.request("POST", NEW_CLIENT + "?t=2", f"Cookie: {cookie}",
                                         body=page)
            bad = await client.request("POST", NEW_CLIENT + "?t=3", f"Cookie: {cookie}",
                                       body=b"{not json")
            big = await client.request("POST", NEW_CLIENT + "?t=4", f"Cookie: {cookie}",
                                       body=b"{" + b" " * 17000 + b"}")
            data = post(NEW_CLIENT + "?t=5", page, f"Cookie: {cookie}")
            client.writer.write(data[:-20])
            await client.writer.drain()
            await asyncio.sleep(0.05)
            client.writer.write(data[-20:])
            split = await asyncio.wait_for(read_response(client.reader), 5)
        finally:
            await client.close()
        reqs = rec.assert_clean(at_most=4)
    assert first.status == 200 and again.status == 200
    assert cookie and again.header("Set-Cookie") is None
    assert bad.status == 400 and bad.body.startswith(b"400 Bad Request: ")
    assert bad.header("Server") == "cec-gateway" and bad.header("X-Request-ID")
    assert big.status == 400 and big.body == b"400 Bad Request: JSON body is over 16384 bytes\n"
    assert split is not None and split.status == 200
    sent = [json.loads(r.body) for r in reqs[1:]]
    guest = sent[0]["thirdUserId"]
    assert guest.startswith("guest-") and sent[1]["thirdUserId"] == sent[2]["thirdUserId"] == guest
    for r, fields in zip(reqs[1:], sent, strict=True):
        assert r.header("Content-Length") == str(len(r.body))
        assert r.header("Content-Type") == "application/json;charset=UTF-8"
        assert fields["tenantSpaceId"] == TENANT and fields["channelConfigId"] == CHANNEL
        assert fields["thirdUserName"] == "Ann" and fields["locale"] == "en"
        assert independent_verify(fields["thirdPartAuthorization"], name="Ann", user_id=guest)
    served_as_expected(path, "?t=1")
    served_as_expected(path, "?t=3")
    served_as_expected(path, "?t=5")
    assert not path.served_fast("?t=4")  # over the rewriter's limit: the full path's 400


async def test_body_timeout_counts_silence_not_the_whole_upload(
        start_gateway: GatewayStarter, path: PathSwitch) -> None:
    """``timeouts.client_body`` is the longest silence between two reads of a body, as
    nginx's client_body_timeout: a body that keeps arriving is not cut off."""
    async with run_recorder() as rec:
        client = await through(start_gateway, rec, "timeouts: {client_body: 400ms}\n")
        try:
            data = post("/steady", b"s" * 400)
            client.writer.write(data[:-400])
            for i in range(4):
                await asyncio.sleep(0.15)
                client.writer.write(data[len(data) - 400 + 100 * i:][:100])
            resp = await asyncio.wait_for(read_response(client.reader), 5)
        finally:
            await client.close()
    assert resp is not None and resp.status == 200
    assert rec.requests[-1].body == b"s" * 400
    served_as_expected(path, "/steady")


@pytest.mark.parametrize(("origin", "allowed"), [
    ("https://www.example.com", True), ("https://evil.example", False)])
async def test_cross_origin_post_gets_the_same_cors_answer(
        start_gateway: GatewayStarter, path: PathSwitch, origin: str, allowed: bool) -> None:
    """A browser's POST always carries Origin: both paths add the policy's CORS headers (and
    ``Vary: Origin``) to the proxied answer."""
    async with run_recorder() as rec:
        client = await through(start_gateway, rec,
                               "cors: {allow_origins: [https://www.example.com]}\n")
        try:
            resp = await client.request("POST", "/cors", f"Origin: {origin}", body=b"{}")
        finally:
            await client.close()
    assert resp.status == 200
    assert resp.all("Access-Control-Allow-Origin") == ([origin] if allowed else [])
    assert "Origin" in ",".join(resp.all("Vary"))
    served_as_expected(path, "/cors")
