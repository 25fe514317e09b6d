"""The proxy end to end on real sockets: a real gateway in front of the real echo upstream.

Raw asyncio sockets are used wherever an HTTP client would normalise what is sent
(dot segments, percent escapes, hop-by-hop headers, slow or oversized requests).
"""

from __future__ import annotations

import asyncio
import gc
import gzip
import hashlib
import logging
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.support.gateway import ROUTES, GatewayFactory, body_json
from tests.support.ports import free_port
from tests.support.process import wait_for
from tests.support.rawhttp import get, raw_exchange, read_all, read_response
from tests.support.upstreams import GZIP_BODY, Echo, echo_barrier, pattern_sha256, raw_upstream

# Every test runs once on the fast path and once on the full path (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("path")

CORS = ROUTES + """
cors:
  allow_origins: [https://www.example.com]
  allow_credentials: true
  max_age: 600
"""


def assert_short_error(body: bytes, status: int) -> None:
    """Error bodies say what happened in a line and never leak internals."""
    text = body.decode("utf-8", "replace")
    assert text.startswith(str(status)), text
    assert len(body) < 200, text
    assert "Traceback" not in text and "File \"" not in text
    assert "127.0.0.1:" not in text  # no upstream address


# ------------------------------------------------------------------ path mapping


async def test_prefix_replaced_and_query_unchanged(gateway: GatewayFactory, echo: Echo) -> None:
    gw = await gateway()
    query = "x=1&y=%2F..%2F&&z=%E4%B8%AD&a+b=c d"
    resp = await raw_exchange(gw.host, gw.port, get(f"/app/a/b.js?{query}".replace(" ", "%20")))
    assert resp.status == 200
    seen = echo.seen[-1]
    assert seen.path == "/up/a/b.js"
    assert seen.query == query.replace(" ", "%20")
    resp = await raw_exchange(gw.host, gw.port, get("/index.html"))
    assert echo.seen[-1].target == "/root/index.html"


async def test_longest_prefix_wins(gateway: GatewayFactory, echo: Echo) -> None:
    gw = await gateway("""
routes:
  - {prefix: /, upstream: "${ECHO}/root/"}
  - {prefix: /app/deep/, upstream: "${ECHO}/deep/"}
  - {prefix: /app/, upstream: "${ECHO}/up/"}
""")
    for path, expected in [("/app/deep/x", "/deep/x"), ("/app/x", "/up/x"),
                           ("/app/deeper", "/up/deeper"), ("/other", "/root/other")]:
        resp = await raw_exchange(gw.host, gw.port, get(path))
        assert resp.status == 200
        assert echo.seen[-1].target == expected, path


async def test_prefix_without_slash_redirects(gateway: GatewayFactory, echo: Echo) -> None:
    gw = await gateway("routes:\n  - {prefix: /app/, upstream: '${ECHO}/up/'}\n")
    resp = await raw_exchange(gw.host, gw.port, get("/app?x=1"))
    assert resp.status == 301
    assert resp.header("Location") == "/app/?x=1"
    resp = await raw_exchange(gw.host, gw.port, get("/nothing"))
    assert resp.status == 404
    assert_short_error(resp.body, 404)
    assert echo.started == []


@pytest.mark.parametrize(("raw", "expected"), [
    ("/app/../secret", "/root/secret"),
    ("/app/%2e%2e/secret", "/root/secret"),
    ("/app/%2E%2E/secret?q=1", "/root/secret?q=1"),
    ("/app/x/.%2e/y", "/up/y"),
    ("/app/./y", "/up/y"),
])
async def test_dot_segments_resolved_before_routing(gateway: GatewayFactory, echo: Echo,
                                                    raw: str, expected: str) -> None:
    gw = await gateway()
    resp = await raw_exchange(gw.host, gw.port, get(raw))
    assert resp.status == 200
    assert echo.seen[-1].target == expected


@pytest.mark.parametrize("raw", [
    "/app/../../etc/passwd",
    "/app/%2e%2e/%2e%2e/etc/passwd",
    "/app/..%2f..%2fetc/passwd",
    "/app/a%2f..%2f..%2fetc",
    "/app/%2F..%2F..%2Fetc",
    "/app/a%5c..%5c..%5cetc",
    "/app/a%00",
])
async def test_encoded_traversal_never_escapes(gateway: GatewayFactory, echo: Echo,
                                               raw: str) -> None:
    gw = await gateway("routes:\n  - {prefix: /app/, upstream: '${ECHO}/up/'}\n")
    resp = await raw_exchange(gw.host, gw.port, get(raw))
    assert resp.status in (400, 404)
    assert_short_error(resp.body, resp.status)
    for seen in echo.seen:
        assert seen.path.startswith("/up/")
    assert echo.started == []


async def test_traversal_out_of_a_lone_route_is_not_forwarded(gateway: GatewayFactory,
                                                               echo: Echo) -> None:
    gw = await gateway("routes:\n  - {prefix: /app/, upstream: '${ECHO}/up/'}\n")
    for raw in ("/app/../up/x", "/app/%2e%2e/x", "/app/x/%2e%2e/%2e%2e/y"):
        resp = await raw_exchange(gw.host, gw.port, get(raw))
        assert resp.status in (400, 404), raw
    assert echo.started == []


async def test_absolute_form_target_routed_to_the_configured_upstream(
        gateway: GatewayFactory, echo: Echo) -> None:
    """RFC 9112 3.2.2: accepted; the path is routed as usual, never to the named host."""
    gw = await gateway()
    req = b"GET http://evil.example/x HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
    resp = await raw_exchange(gw.host, gw.port, req)
    assert resp.status == 200
    assert echo.started == ["/root/x"]


# ------------------------------------------------------------------ headers


async def test_hop_by_hop_request_headers_not_forwarded(gateway: GatewayFactory,
                                                        echo: Echo) -> None:
    gw = await gateway()
    req = get("/app/h", "Connection: close, X-Secret", "X-Secret: 1", "Keep-Alive: timeout=9",
              "TE: trailers", "Trailer: X-Checksum", "Proxy-Authorization: Basic eDp5",
              "Proxy-Connection: keep-alive", "X-End-To-End: yes", "Cookie: sid=1")
    resp = await raw_exchange(gw.host, gw.port, req)
    assert resp.status == 200
    names = {k.lower() for k, _ in echo.seen[-1].headers}
    for hop in ("x-secret", "keep-alive", "te", "trailer", "proxy-authorization",
                "proxy-connection", "upgrade"):
        assert hop not in names, hop
    # Connection itself is the gateway's own business with the upstream (keep-alive)
    assert (echo.seen[-1].header("Connection") or "").lower() in ("", "keep-alive")
    assert echo.seen[-1].header("X-End-To-End") == "yes"
    assert echo.seen[-1].header("Cookie") == "sid=1"


async def test_hop_by_hop_response_headers_not_forwarded(gateway: GatewayFactory,
                                                         http: aiohttp.ClientSession) -> None:
    gw = await gateway()
    async with http.get(gw.url + "/app/do/hop") as resp:
        assert resp.status == 200
        assert resp.headers["X-End-To-End"] == "kept"
        for hop in ("X-Hop-Secret", "Keep-Alive", "Proxy-Authenticate"):
            assert hop not in resp.headers, hop
        assert await resp.text() == "hop"


async def test_forwarded_headers_from_untrusted_client(gateway: GatewayFactory,
                                                       echo: Echo) -> None:
    gw = await gateway()
    req = get("/app/f", "X-Forwarded-For: 6.6.6.6", "X-Real-IP: 6.6.6.6",
              "X-Forwarded-Proto: https", "X-Forwarded-Host: evil.example",
              "Forwarded: for=6.6.6.6", host="www.example.com")
    await raw_exchange(gw.host, gw.port, req)
    seen = echo.seen[-1]
    assert seen.all("X-Real-IP") == ["127.0.0.1"]
    assert seen.all("X-Forwarded-For") == ["6.6.6.6, 127.0.0.1"]
    assert seen.all("X-Forwarded-Proto") == ["http"]
    assert seen.all("X-Forwarded-Host") == ["www.example.com"]
    assert seen.all("Forwarded") == []
    assert seen.all("Host") == [f"127.0.0.1:{echo.port}"]  # preserve_host: false


async def test_realip_recursive_with_trusted_proxies(gateway: GatewayFactory,
                                                     echo: Echo) -> None:
    gw = await gateway(ROUTES + "trusted_proxies: [127.0.0.0/8, 10.0.0.0/8]\n")
    req = get("/app/f", "X-Forwarded-For: 6.6.6.6, 198.51.100.7", "X-Forwarded-For: 10.1.1.1",
              "X-Forwarded-Proto: https", "X-Forwarded-Host: www.example.com",
              "X-Request-ID: trace-42")
    resp = await raw_exchange(gw.host, gw.port, req)
    seen = echo.seen[-1]
    assert seen.all("X-Real-IP") == ["198.51.100.7"]
    assert seen.all("X-Forwarded-For") == ["6.6.6.6, 198.51.100.7, 10.1.1.1, 127.0.0.1"]
    assert seen.all("X-Forwarded-Proto") == ["https"]
    assert seen.all("X-Forwarded-Host") == ["www.example.com"]
    assert seen.all("X-Request-ID") == ["trace-42"]  # a trusted proxy's request id is kept
    assert resp.header("X-Request-ID") == "trace-42"


async def test_untrusted_peer_request_id_replaced(gateway: GatewayFactory, echo: Echo) -> None:
    gw = await gateway(ROUTES + "trusted_proxies: [10.0.0.0/8]\n")
    resp = await raw_exchange(gw.host, gw.port, get("/app/f", "X-Request-ID: forged",
                                                    "X-Forwarded-For: 10.9.9.9"))
    seen = echo.seen[-1]
    assert seen.all("X-Real-IP") == ["127.0.0.1"]  # peer untrusted: header ignored
    rid = seen.header("X-Request-ID")
    assert rid and rid != "forged"
    assert resp.header("X-Request-ID") == rid


async def test_preserve_host(gateway: GatewayFactory, echo: Echo) -> None:
    gw = await gateway("""
routes:
  - {prefix: /, upstream: "${ECHO}/root/", preserve_host: true}
""")
    await raw_exchange(gw.host, gw.port, get("/x", host="www.example.com:8443"))
    assert echo.seen[-1].all("Host") == ["www.example.com:8443"]


async def test_set_cookie_domain_dropped_and_path_mapped(gateway: GatewayFactory,
                                                         http: aiohttp.ClientSession) -> None:
    gw = await gateway()
    async with http.get(gw.url + "/app/do/cookie") as resp:
        cookies = resp.headers.getall("Set-Cookie")
    token = next(c for c in cookies if c.startswith("ccmessaging-token="))
    assert "domain" not in token.lower()
    assert "Path=/app/" in token and "/up/" not in token
    assert "HttpOnly" in token
    other = next(c for c in cookies if c.startswith("other="))
    assert "Domain=elsewhere.example" in other and "Path=/app/x" in other
    assert "plain=2" in cookies


async def test_cookie_reaches_browser_on_gateway_origin(gateway: GatewayFactory,
                                                        echo: Echo) -> None:
    """With a real cookie jar, the token set by the upstream is sent back to the gateway."""
    gw = await gateway()
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
        async with browser.get(gw.url + "/app/do/cookie") as resp:
            assert resp.status == 200
        async with browser.get(gw.url + "/app/next") as resp:
            assert resp.status == 200
    assert "ccmessaging-token=abc123" in (echo.seen[-1].header("Cookie") or "")


async def test_no_cookie_jar_shared_between_clients(gateway: GatewayFactory, echo: Echo) -> None:
    gw = await gateway()
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as alice:
        async with alice.get(gw.url + "/app/do/cookie") as resp:
            assert "ccmessaging-token=abc123" in " ".join(resp.headers.getall("Set-Cookie"))
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as bob:
        async with bob.get(gw.url + "/app/bob") as resp:
            assert resp.status == 200
    assert echo.seen[-1].path == "/up/bob"
    assert echo.seen[-1].all("Cookie") == []


async def test_location_and_refresh_rewritten(gateway: GatewayFactory,
                                              http: aiohttp.ClientSession) -> None:
    gw = await gateway()
    async with http.get(gw.url + "/app/do/redirect?to=/up/next", allow_redirects=False) as r:
        assert r.status == 302
        assert r.headers["Location"] == "/app/next"
        assert r.headers["Refresh"] == "0; url=/app/next"
    async with http.get(gw.url + "/app/do/redirect?to=/up/rel&relative=1",
                        allow_redirects=False) as r:
        assert r.headers["Location"] == "/app/rel"
    # A redirect to somewhere the route does not cover stays as the upstream said.
    async with http.get(gw.url + "/app/do/redirect?to=/elsewhere", allow_redirects=False) as r:
        assert r.headers["Location"].endswith("/elsewhere")
        assert r.headers["Location"].startswith("http://127.0.0.1:")


# ------------------------------------------------------------------ connections and bodies


async def test_upstream_connections_kept_alive_and_pooled(gateway: GatewayFactory,
                                                          http: aiohttp.ClientSession,
                                                          echo: Echo) -> None:
    gw = await gateway()
    for i in range(5):
        async with http.get(f"{gw.url}/app/seq{i}") as resp:
            assert resp.status == 200
    ports = {s.peer_port for s in echo.seen}
    assert len(ports) == 1, ports  # five requests, one upstream connection
    # Separate client connections share the pool too.
    for i in range(3):
        await raw_exchange(gw.host, gw.port, get(f"/app/raw{i}"))
    assert {s.peer_port for s in echo.seen} == ports
    assert all(s.version == "1.1" for s in echo.seen)


async def test_concurrent_requests_use_several_connections(gateway: GatewayFactory,
                                                           http: aiohttp.ClientSession,
                                                           echo: Echo) -> None:
    gw = await gateway()

    async def one(i: int) -> int:
        async with http.get(f"{gw.url}/app/do/slow?delay=0.2&i={i}") as resp:
            return resp.status

    assert await asyncio.gather(*(one(i) for i in range(4))) == [200] * 4
    assert len({s.peer_port for s in echo.seen}) == 4
    # and afterwards they are reused rather than reopened
    before = {s.peer_port for s in echo.seen}
    await asyncio.gather(*(one(i) for i in range(4)))
    assert {s.peer_port for s in echo.seen[-4:]} <= before


async def test_gzip_response_not_decompressed(gateway: GatewayFactory,
                                              http: aiohttp.ClientSession) -> None:
    gw = await gateway()
    async with http.get(gw.url + "/app/do/gzip", headers={"Accept-Encoding": "gzip"}) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        body = await resp.read()
    assert body == GZIP_BODY
    assert gzip.decompress(body).startswith(b"hello gzip")


async def test_gzip_request_body_not_decompressed(gateway: GatewayFactory,
                                                  http: aiohttp.ClientSession,
                                                  echo: Echo) -> None:
    gw = await gateway()
    async with http.post(gw.url + "/app/upload", data=GZIP_BODY,
                         headers={"Content-Encoding": "gzip"}) as resp:
        assert resp.status == 200
    seen = echo.seen[-1]
    assert seen.sha256 == hashlib.sha256(GZIP_BODY).hexdigest()
    assert seen.header("Content-Encoding") == "gzip"
    assert seen.header("Content-Length") == str(len(GZIP_BODY))


async def test_content_length_upload(gateway: GatewayFactory, http: aiohttp.ClientSession,
                                     echo: Echo) -> None:
    gw = await gateway(ROUTES + "limits: {client_max_body_size: 10m}\n")
    data = bytes(range(256)) * 12_000  # ~3 MB
    async with http.put(gw.url + "/app/put", data=data) as resp:
        assert resp.status == 200
        reply = await resp.json()
    assert reply["body_len"] == len(data)
    assert reply["sha256"] == hashlib.sha256(data).hexdigest()
    assert echo.seen[-1].header("Content-Length") == str(len(data))
    assert echo.seen[-1].method == "PUT"


async def test_chunked_request_body(gateway: GatewayFactory, http: aiohttp.ClientSession,
                                    echo: Echo) -> None:
    gw = await gateway()
    parts = [b"alpha-", b"beta-" * 1000, b"", b"gamma"]

    async def gen() -> AsyncIterator[bytes]:
        for p in parts:
            yield p
            await asyncio.sleep(0.01)

    async with http.post(gw.url + "/app/chunked", data=gen()) as resp:
        assert resp.status == 200
    seen = echo.seen[-1]
    whole = b"".join(parts)
    assert seen.body_len == len(whole)
    assert seen.sha256 == hashlib.sha256(whole).hexdigest()
    assert seen.header("Transfer-Encoding") == "chunked"
    assert seen.header("Content-Length") is None


async def test_chunked_request_raw(gateway: GatewayFactory, echo: Echo) -> None:
    gw = await gateway()
    req = (b"POST /app/c HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n"
           b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n")
    resp = await raw_exchange(gw.host, gw.port, req)
    assert resp.status == 200
    assert echo.seen[-1].sha256 == hashlib.sha256(b"hello world").hexdigest()


async def test_chunked_response(gateway: GatewayFactory) -> None:
    gw = await gateway()
    resp = await raw_exchange(gw.host, gw.port, get("/app/do/chunked"))
    assert resp.status == 200
    assert (resp.header("Transfer-Encoding") or "").lower() == "chunked"
    assert resp.header("Content-Length") is None
    assert resp.body == b"part0;part1;part2;part3;part4;"


async def test_downloads_content_length_and_chunked(gateway: GatewayFactory,
                                                    http: aiohttp.ClientSession) -> None:
    gw = await gateway()
    n = 3 * 1024 * 1024 + 17
    for chunked in ("0", "1"):
        h = hashlib.sha256()
        async with http.get(f"{gw.url}/app/do/download?n={n}&chunked={chunked}") as resp:
            assert resp.status == 200
            if chunked == "0":
                assert resp.headers["Content-Length"] == str(n)
            async for block in resp.content.iter_any():
                h.update(block)
        assert h.hexdigest() == pattern_sha256(n)


async def test_expect_100_continue(gateway: GatewayFactory, echo: Echo) -> None:
    gw = await gateway()
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    try:
        writer.write(b"POST /app/e HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
                     b"Content-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        async with asyncio.timeout(3):
            interim = await reader.readuntil(b"\r\n\r\n")
        assert interim.startswith(b"HTTP/1.1 100")
        writer.write(b"hello")
        data = await read_all(reader)
    finally:
        writer.close()
    assert data.startswith(b"HTTP/1.1 200")
    assert echo.seen[-1].body_len == 5
    # The gateway answered the 100 itself and streams the body: like nginx, it does not
    # pass Expect on (the upstream would send a second 100 for nobody).
    assert echo.seen[-1].header("Expect") is None


async def test_head_request(gateway: GatewayFactory, http: aiohttp.ClientSession) -> None:
    gw = await gateway()
    async with http.head(gw.url + "/app/do/download?n=1000") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == "1000"
        assert await resp.read() == b""


async def test_upstream_status_and_body_pass_through(gateway: GatewayFactory,
                                                     http: aiohttp.ClientSession) -> None:
    gw = await gateway()
    async with http.get(gw.url + "/app/do/status?code=418") as resp:
        assert resp.status == 418
        assert await resp.text() == "status"


# ------------------------------------------------------------------ CORS


async def test_cors_preflight_allowed(gateway: GatewayFactory, http: aiohttp.ClientSession,
                                      echo: Echo) -> None:
    gw = await gateway(CORS)
    async with http.options(gw.url + "/app/rest", headers={
        "Origin": "https://www.example.com",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, x-token",
    }) as resp:
        assert resp.status in (200, 204)
        h = resp.headers
        assert h["Access-Control-Allow-Origin"] == "https://www.example.com"
        assert h["Access-Control-Allow-Credentials"] == "true"
        assert "POST" in h["Access-Control-Allow-Methods"]
        assert h["Access-Control-Allow-Headers"].lower() == "content-type, x-token"
        assert h["Access-Control-Max-Age"] == "600"
        assert "Origin" in h.getall("Vary")
    assert echo.started == []  # answered by the gateway


async def test_cors_preflight_denied(gateway: GatewayFactory, http: aiohttp.ClientSession,
                                     echo: Echo) -> None:
    gw = await gateway(CORS)
    async with http.options(gw.url + "/app/rest", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
    }) as resp:
        assert resp.status >= 400
        assert not any(k.lower().startswith("access-control-") for k in resp.headers)
        assert "Origin" in resp.headers.getall("Vary")
    assert echo.started == []


async def test_cors_actual_response_headers(gateway: GatewayFactory,
                                            http: aiohttp.ClientSession) -> None:
    gw = await gateway(CORS)
    async with http.get(gw.url + "/app/x", headers={"Origin": "https://www.example.com"}) as r:
        assert r.status == 200
        assert r.headers["Access-Control-Allow-Origin"] == "https://www.example.com"
        assert r.headers["Access-Control-Allow-Credentials"] == "true"
        assert "Origin" in ", ".join(r.headers.getall("Vary"))
    async with http.get(gw.url + "/app/x", headers={"Origin": "https://evil.example"}) as r:
        assert r.status == 200
        assert "Access-Control-Allow-Origin" not in r.headers
        assert "Access-Control-Allow-Credentials" not in r.headers
        assert "Origin" in ", ".join(r.headers.getall("Vary"))
    async with http.get(gw.url + "/app/x") as r:  # same-origin: nothing to add
        assert "Access-Control-Allow-Origin" not in r.headers


async def test_cors_vary_merges_with_upstream_vary(gateway: GatewayFactory,
                                                   http: aiohttp.ClientSession) -> None:
    gw = await gateway(CORS)
    async with http.get(gw.url + "/app/do/vary",
                        headers={"Origin": "https://www.example.com"}) as r:
        vary = ", ".join(r.headers.getall("Vary")).lower()
    assert "origin" in vary
    assert "accept-encoding" in vary  # the upstream's own Vary must survive


async def test_plain_options_is_forwarded(gateway: GatewayFactory, http: aiohttp.ClientSession,
                                          echo: Echo) -> None:
    gw = await gateway(CORS)
    async with http.options(gw.url + "/app/opt",
                            headers={"Origin": "https://www.example.com"}) as r:
        assert r.status == 200
    assert echo.seen[-1].method == "OPTIONS"


# ------------------------------------------------------------------ errors


async def test_refused_upstream_is_502(gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
                                       ) -> None:
    port = free_port()
    gw = await gateway(f"routes:\n  - {{prefix: /, upstream: 'http://127.0.0.1:{port}/'}}\n")
    with caplog.at_level(logging.WARNING, logger="gateway"):
        resp = await raw_exchange(gw.host, gw.port, get("/x"))
    assert resp.status == 502
    assert_short_error(resp.body, 502)
    assert any(str(port) in r.getMessage() for r in caplog.records)  # the log says where


async def test_upstream_reset_is_502(gateway: GatewayFactory) -> None:
    gw = await gateway()
    resp = await raw_exchange(gw.host, gw.port, get("/app/do/reset"))
    assert resp.status == 502
    assert_short_error(resp.body, 502)


async def test_silent_upstream_is_504(gateway: GatewayFactory) -> None:
    gw = await gateway(ROUTES + "timeouts: {read: 300ms}\n")
    loop = asyncio.get_running_loop()
    start = loop.time()
    resp = await raw_exchange(gw.host, gw.port, get("/app/do/slow?delay=3"))
    assert resp.status == 504
    assert loop.time() - start < 2.0
    assert_short_error(resp.body, 504)


async def test_upstream_stalling_mid_body_cuts_the_client(gateway: GatewayFactory) -> None:
    gw = await gateway(ROUTES + "timeouts: {read: 300ms}\n")
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    writer.write(get("/app/do/stall?delay=3"))
    data = await read_all(reader, 2.5)  # the gateway gives up long before the upstream
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"Content-Length: 10" in head
    assert body == b"12345"  # short: the client can tell the body broke off


async def test_slow_request_within_read_timeout_is_fine(gateway: GatewayFactory) -> None:
    gw = await gateway(ROUTES + "timeouts: {read: 2s}\n")
    resp = await raw_exchange(gw.host, gw.port, get("/app/do/slow?delay=0.3"))
    assert resp.status == 200


async def test_body_over_limit_by_content_length_is_413_before_forwarding(
        gateway: GatewayFactory, echo: Echo) -> None:
    gw = await gateway(ROUTES + "limits: {client_max_body_size: 1k}\n")
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    # Only the head is sent: the answer must come without waiting for the body.
    writer.write(b"POST /app/big HTTP/1.1\r\nHost: gw\r\nContent-Length: 5000\r\n\r\n")
    async with asyncio.timeout(1):
        resp = await read_response(reader)
    writer.close()
    assert resp is not None and resp.status == 413 and resp.complete
    assert_short_error(resp.body, 413)
    await echo_barrier(gw.host, gw.port, echo)
    assert echo.started == ["/up/after"]  # not even the refused request's head went upstream


async def test_chunked_body_over_limit_is_413(gateway: GatewayFactory, echo: Echo,
                                              caplog: pytest.LogCaptureFixture) -> None:
    gw = await gateway(ROUTES + "limits: {client_max_body_size: 1k}\n")
    chunk = b"x" * 600
    req = (b"POST /app/big HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
           + (b"258\r\n" + chunk + b"\r\n") * 4 + b"0\r\n\r\n")
    resp = await raw_exchange(gw.host, gw.port, req)
    assert resp.status == 413
    assert_short_error(resp.body, 413)
    await echo_barrier(gw.host, gw.port, echo)
    # A chunked body streams, so its head may have left already (as with nginx and
    # proxy_request_buffering off); the upstream must never get a complete request.
    assert [s.path for s in echo.seen] == ["/up/after"]
    # The abandoned upstream exchange leaves no stray error behind.
    gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


async def test_body_at_limit_passes(gateway: GatewayFactory, http: aiohttp.ClientSession,
                                    echo: Echo) -> None:
    gw = await gateway(ROUTES + "limits: {client_max_body_size: 1k}\n")
    async with http.post(gw.url + "/app/ok", data=b"y" * 1024) as resp:
        assert resp.status == 200
    assert echo.seen[-1].body_len == 1024


async def test_zero_limit_means_unlimited(gateway: GatewayFactory, http: aiohttp.ClientSession,
                                          echo: Echo) -> None:
    gw = await gateway(ROUTES + "limits: {client_max_body_size: 0}\n")
    async with http.post(gw.url + "/app/ok", data=b"z" * 2_000_000) as resp:
        assert resp.status == 200
    assert echo.seen[-1].body_len == 2_000_000


async def test_huge_header_is_431(gateway: GatewayFactory, echo: Echo) -> None:
    gw = await gateway(ROUTES + "limits: {max_header_size: 8k}\n")
    resp = await raw_exchange(gw.host, gw.port, get("/app/x", "X-Big: " + "a" * 10_000))
    assert resp.status == 431
    assert_short_error(resp.body, 431)
    ok = await raw_exchange(gw.host, gw.port, get("/app/x", "X-Big: " + "a" * 4_000))
    assert ok.status == 200
    assert [s.path for s in echo.seen] == ["/up/x"]


async def test_slow_headers_dropped(gateway: GatewayFactory, echo: Echo) -> None:
    gw = await gateway(ROUTES + "timeouts: {client_header: 400ms}\n")
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    start = loop.time()
    writer.write(b"GET /app/slowloris HTTP/1.1\r\nHost: gw\r\n")
    data = b""
    try:
        for _ in range(10):  # a header line every 200 ms never completes the request
            await asyncio.sleep(0.2)
            writer.write(b"X-Drip: 1\r\n")
            await writer.drain()
        data = await read_all(reader, 3)
    except ConnectionError:
        pass  # dropped while we were still dripping: what we want
    elapsed = loop.time() - start
    writer.close()
    assert not data.startswith(b"HTTP/1.1 200")
    assert elapsed < 2.5
    assert echo.started == []


async def test_idle_connection_without_bytes_is_dropped(gateway: GatewayFactory) -> None:
    gw = await gateway(ROUTES + "timeouts: {client_header: 300ms}\n")
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    assert await read_all(reader, 2) == b""
    writer.close()


async def test_keepalive_connection_survives_header_timer(gateway: GatewayFactory) -> None:
    """A request sent promptly on a kept-alive connection is not hit by the header deadline."""
    gw = await gateway(ROUTES + "timeouts: {client_header: 500ms, read: 5s}\n")
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    try:
        for i in range(3):
            writer.write(f"GET /app/do/slow?delay=0.3&i={i} HTTP/1.1\r\nHost: gw\r\n\r\n"
                         .encode())
            async with asyncio.timeout(3):
                resp = await read_response(reader)
            assert resp is not None and resp.status == 200 and resp.complete, resp
    finally:
        writer.close()


async def test_one_failure_does_not_disturb_others(gateway: GatewayFactory,
                                                   http: aiohttp.ClientSession) -> None:
    dead = free_port()
    gw = await gateway(ROUTES.replace("routes:", f"""routes:
  - {{prefix: /dead/, upstream: "http://127.0.0.1:{dead}/"}}""") + "timeouts: {read: 1s}\n")

    async def fetch(path: str) -> tuple[int, bytes]:
        async with http.get(gw.url + path) as resp:
            return resp.status, await resp.read()

    jobs = [fetch(f"/app/ok{i}") for i in range(8)]
    jobs += [fetch("/dead/x"), fetch("/app/do/reset"), fetch("/app/do/slow?delay=3"),
             fetch("/app/do/stall?delay=3")]
    jobs += [fetch(f"/app/do/download?n={100_000 + i}") for i in range(4)]
    results = await asyncio.gather(*jobs, return_exceptions=True)
    for i in range(8):
        status, body = results[i]  # type: ignore[misc]
        assert status == 200 and body_json(body)["path"] == f"/up/ok{i}"
    assert results[8][0] == 502  # type: ignore[index]
    assert results[9][0] == 502  # type: ignore[index]
    assert results[10][0] == 504  # type: ignore[index]
    assert isinstance(results[11], aiohttp.ClientPayloadError)  # cut mid-body
    for i in range(4):
        status, body = results[12 + i]  # type: ignore[misc]
        assert status == 200 and len(body) == 100_000 + i
    status, _ = await fetch("/app/after")
    assert status == 200


async def test_access_log_line(gateway: GatewayFactory, caplog: pytest.LogCaptureFixture) -> None:
    gw = await gateway()
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        await raw_exchange(gw.host, gw.port, get("/app/logged?token=SECRET"))
        await wait_for(lambda: any(r.name == "gateway.access" for r in caplog.records))
    lines = [r for r in caplog.records if r.name == "gateway.access"]
    assert len(lines) == 1
    msg = lines[0].getMessage()
    assert "127.0.0.1" in msg and "GET" in msg and "/app/logged" in msg and " 200 " in msg
    assert "SECRET" not in msg  # no query string in the log
    assert "route=/app/" in msg and "upstream=200" in msg


async def test_graceful_shutdown_lets_inflight_finish(echo: Echo) -> None:
    from gateway.runtime import serving
    from tests.support.gateway import build_config

    cfg = build_config(ROUTES + "timeouts: {shutdown_grace: 5s}\n", echo)
    async with aiohttp.ClientSession() as http:
        ctx = serving(cfg)
        gw = await ctx.__aenter__()
        url = gw.url
        slow = asyncio.ensure_future(http.get(url + "/app/do/slow?delay=0.6"))
        await asyncio.sleep(0.2)
        closing = asyncio.ensure_future(ctx.__aexit__(None, None, None))
        resp = await slow
        assert resp.status == 200
        assert (await resp.json())["path"] == "/up/do/slow"
        resp.release()
        await closing
    with pytest.raises(OSError):
        await asyncio.open_connection(gw.host, gw.port)


# ------------------------------------------------------------------ odd upstreams and clients


async def test_response_until_eof_is_streamed(gateway: GatewayFactory,
                                              http: aiohttp.ClientSession) -> None:
    """An HTTP/1.0-style answer without length ends at EOF; the connection is not reused."""
    async with raw_upstream(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n"
                            + b"until-eof " * 1000) as up:
        gw = await gateway(f"routes:\n  - {{prefix: /, upstream: '{up.url}/'}}\n")
        for _ in range(2):
            async with http.get(gw.url + "/eof") as resp:
                assert resp.status == 200
                assert await resp.read() == b"until-eof " * 1000
        assert len(up.requests) == 2


async def test_no_body_statuses(gateway: GatewayFactory, http: aiohttp.ClientSession) -> None:
    async with raw_upstream(b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n"
                            b"HTTP/1.1 204 No Content\r\n\r\n", close=False) as up:
        gw = await gateway(f"routes:\n  - {{prefix: /, upstream: '{up.url}/'}}\n")
        async with http.get(gw.url + "/a", headers={"If-None-Match": '"x"'}) as resp:
            assert resp.status == 304
            assert resp.headers["ETag"] == '"x"'
            assert await resp.read() == b""
        assert b"If-None-Match: \"x\"" in up.requests[0]


async def test_invalid_upstream_response_is_502(gateway: GatewayFactory) -> None:
    async with raw_upstream(b"SPDY/9 what\r\n\r\n") as up:
        gw = await gateway(f"routes:\n  - {{prefix: /, upstream: '{up.url}/'}}\n")
        resp = await raw_exchange(gw.host, gw.port, get("/x"))
    assert resp.status == 502
    assert_short_error(resp.body, 502)


async def test_upstream_answering_before_reading_the_body(gateway: GatewayFactory,
                                                          echo: Echo) -> None:
    # The upstream answers after the head and never reads the body (it keeps the socket open:
    # closing with unread data would reset the connection and lose the answer).
    async with raw_upstream(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 4\r\n\r\nnope",
                            hold=True) as up:
        gw = await gateway(f"""
routes:
  - {{prefix: /early/, upstream: '{up.url}/'}}
  - {{prefix: /, upstream: '${{ECHO}}/root/'}}
limits: {{client_max_body_size: 0}}
""")
        async with aiohttp.ClientSession() as http:
            async def body() -> AsyncIterator[bytes]:
                for _ in range(200):
                    yield b"x" * 65536
                    await asyncio.sleep(0)

            try:
                async with http.post(gw.url + "/early/upload", data=body()) as resp:
                    assert resp.status == 403
                    assert await resp.read() == b"nope"
            except aiohttp.ClientOSError:
                pass  # the gateway may also close while the client is still sending
            # the gateway is fine afterwards
            async with http.get(gw.url + "/after") as resp:
                assert resp.status == 200


async def test_client_body_timeout_is_408(gateway: GatewayFactory, echo: Echo) -> None:
    gw = await gateway(ROUTES + "timeouts: {client_body: 300ms}\n")
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    writer.write(b"POST /app/stalled HTTP/1.1\r\nHost: gw\r\nContent-Length: 100\r\n\r\nabc")
    async with asyncio.timeout(5):
        resp = await read_response(reader)
    writer.close()
    assert resp is not None and resp.status == 408
    assert_short_error(resp.body, 408)
    await echo_barrier(gw.host, gw.port, echo)
    assert [s.path for s in echo.seen] == ["/up/after"]  # never the stalled request


async def test_pipelined_requests_answered_in_order(gateway: GatewayFactory, echo: Echo) -> None:
    gw = await gateway()
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    writer.write(b"GET /app/one HTTP/1.1\r\nHost: gw\r\n\r\n"
                 b"GET /app/two HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
    data = await read_all(reader, 5)
    writer.close()
    assert data.count(b"HTTP/1.1 200") == 2
    assert data.index(b"/up/one") < data.index(b"/up/two")


@pytest.mark.parametrize("head", [
    b"POST /app/s HTTP/1.1\r\nHost: gw\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n",
    b"POST /app/s HTTP/1.1\r\nHost: gw\r\nContent-Length: 4\r\nContent-Length: 5\r\n",
    b"POST /app/s HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked, identity\r\n",
    b"GET /app/s HTTP/1.1\r\nHost: gw\r\nX-Bad\x01: 1\r\n",
])
async def test_ambiguous_framing_refused(gateway: GatewayFactory, echo: Echo,
                                         head: bytes) -> None:
    gw = await gateway()
    resp = await raw_exchange(gw.host, gw.port, head + b"Connection: close\r\n\r\n0\r\n\r\n")
    assert resp.status == 400
    assert_short_error(resp.body, 400)
    assert echo.started == []


async def test_long_request_line_refused(gateway: GatewayFactory, echo: Echo) -> None:
    gw = await gateway(ROUTES + "limits: {max_header_size: 8k}\n")
    resp = await raw_exchange(gw.host, gw.port, get("/app/" + "a" * 10_000))
    assert resp.status in (414, 431)
    assert echo.started == []


async def test_shutdown_with_open_websocket_respects_grace(echo: Echo) -> None:
    from gateway.runtime import serving
    from tests.support.gateway import build_config

    cfg = build_config(ROUTES + "timeouts: {shutdown_grace: 500ms}\n", echo)
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as http:
        async with serving(cfg) as gw:
            ws = await http.ws_connect(gw.url + "/app/do/ws")
            await ws.send_str("hi")
            assert await ws.receive_str(timeout=3) == "echo:hi"
            start = loop.time()
        assert loop.time() - start < 3
        msg = await ws.receive(timeout=3)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                            aiohttp.WSMsgType.ERROR)
        await ws.close()


async def test_slow_headers_on_a_kept_alive_connection_dropped(gateway: GatewayFactory,
                                                               echo: Echo) -> None:
    gw = await gateway(ROUTES + "timeouts: {client_header: 400ms}\n")
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    writer.write(b"GET /app/first HTTP/1.1\r\nHost: gw\r\n\r\n")
    async with asyncio.timeout(3):
        first = await read_response(reader)
    assert first is not None and first.status == 200 and first.complete
    loop = asyncio.get_running_loop()
    start = loop.time()
    data = b""
    try:
        writer.write(b"GET /app/second HTTP/1.1\r\n")
        for _ in range(10):
            await asyncio.sleep(0.2)
            writer.write(b"X-Drip: 1\r\n")
            await writer.drain()
        data = await read_all(reader, 3)
    except ConnectionError:
        pass
    writer.close()
    assert loop.time() - start < 2.5
    assert not data.startswith(b"HTTP/1.1 200")
    assert [s.path for s in echo.seen] == ["/up/first"]


async def test_fragment_in_target_is_not_forwarded(gateway: GatewayFactory, echo: Echo) -> None:
    """``GET /a#b``: the fragment is the client's business, never the upstream's."""
    running = await gateway(ROUTES_FOR_FRAGMENT)
    reader, writer = await asyncio.open_connection(running.host, running.port)
    writer.write(b"GET /app/frag?x=1#secret HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n")
    await writer.drain()
    data = await reader.read()
    writer.close()
    assert data.startswith(b"HTTP/1.1 200")
    assert echo.seen[-1].target == "/up/frag?x=1"


ROUTES_FOR_FRAGMENT = """
routes:
  - prefix: /app/
    upstream: ${ECHO}/up/
"""
