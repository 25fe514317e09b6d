"""What the upstream answers, byte for byte, and what each visitor gets (issue 17).

Every case runs twice on both request paths (see ``harness.run_case``): a clean answer
leaves one pooled connection that serves the second visitor, who sees nothing of the first;
an answer that breaks framing is still answered when it was correct, and its connection is
closed. Sources: RFC 9112 §2.2 (bare CR/LF), §4 (status line), §5 (field syntax,
obs-fold), §6 (framing: Content-Length vs Transfer-Encoding, chunked, trailers), §9.3
(persistence); RFC 9110 §6.6.1 (Date), §8.6 (Content-Length lists), §15.2 (1xx); and the
response-splitting / desync catalogues (CRLF injection in header values, smuggled second
responses behind body-less ones, duplicate or conflicting lengths).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.runtime import Running, serving
from gateway.upstream import MAX_INTERIM
from tests.conformance.conftest import conformance_config
from tests.conformance.harness import (
    Case,
    PathSwitch,
    ScriptedUpstream,
    fetch,
    request,
    run_case,
)

BODY = b"hello RUN?"


def ok(*lines: bytes, body: bytes = BODY, status: bytes = b"200 OK") -> bytes:
    head = b"HTTP/1.1 " + status + b"\r\n" + b"".join(line + b"\r\n" for line in lines)
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
TRAILER_CHECKSUM = (CHUNKED + b"Trailer: X-Checksum\r\n\r\n"
                    b"5\r\nhello\r\n5\r\n RUN?\r\n0\r\nX-Checksum: RUN?abc123\r\n\r\n")
TRAILER_COOKIE = (CHUNKED + b"Trailer: Set-Cookie\r\n\r\n"
                  b"a\r\nhello RUN?\r\n0\r\nSet-Cookie: sid=attackerRUN?; Path=/\r\n\r\n")
INTERIM = (b"HTTP/1.1 100 Continue\r\n\r\n"
           b"HTTP/1.1 103 Early Hints\r\nLink: </RUN?.css>; rel=preload\r\n\r\n"
           + ok(b"Server: up"))
HEAD_REQUEST = request("HEAD")
DATE = b"Date: Tue, 01 Dec 2026 10:00:00 GMT"

CASES = [
    # ---- trailers: dropped, never headers of this response or the next (issue item 1)
    Case("trailer-x-checksum", [TRAILER_CHECKSUM], 200, b"hello RUN?",
         absent=("X-Checksum", "Trailer"), nginx=True),
    Case("trailer-set-cookie", [TRAILER_COOKIE], 200, BODY, absent=("Set-Cookie", "Trailer"),
         nginx=True),
    Case("trailer-split", [TRAILER_COOKIE[:60], TRAILER_COOKIE[60:79], TRAILER_COOKIE[79:-9],
                           TRAILER_COOKIE[-9:-1], TRAILER_COOKIE[-1:]], 200, BODY,
         absent=("Set-Cookie",), nginx=True),
    Case("trailers-many", [CHUNKED + b"\r\na\r\nhello RUN?\r\n0\r\nX-A: RUN?\r\n"
                           b"X-B: RUN?\r\nSet-Cookie: a=RUN?\r\n\r\n"], 200, BODY,
         absent=("X-A", "X-B", "Set-Cookie"), nginx=True),
    Case("trailers-client-te-trailers",
         [TRAILER_CHECKSUM], 200, b"hello RUN?", absent=("X-Checksum",),
         request=request("GET", "/c/RUN?", "TE: trailers"), nginx=True),
    Case("chunk-extensions", [CHUNKED + b"\r\n5;name=val\r\nhello\r\n5 ; x\r\n RUN?\r\n0\r\n\r\n"],
         200, b"hello RUN?", nginx=True),
    # ---- interim answers, in any read (issue item 2); dropped, as nginx does
    Case("100-coalesced", [b"HTTP/1.1 100 Continue\r\n\r\n" + ok()], 200, BODY),
    Case("103-coalesced-link-dropped", [INTERIM], 200, BODY, absent=("Link",),
         present={"Server": "up"}),
    Case("1xx-separate-writes", [b"HTTP/1.1 102 Processing\r\n\r\n",
                                 b"HTTP/1.1 103 Early Hints\r\nSet-Cookie: a=RUN?\r\n\r\n",
                                 ok()], 200, BODY, absent=("Set-Cookie",)),
    Case("1xx-twenty", [b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n" * 20 + ok()],
         200, BODY, absent=("Link",)),
    Case("post-upstream-100", [b"HTTP/1.1 100 Continue\r\n\r\n", ok()], 200, BODY,
         request=request("POST", "/c/RUN?", body=b"abc"), upstream_has=(b"Content-Length: 3",)),
    Case("post-expect-100-continue", [b"HTTP/1.1 100 Continue\r\n\r\n" + ok()], 200, BODY,
         request=request("POST", "/c/RUN?", "Expect: 100-continue", body=b"abc"),
         upstream_lacks=(b"Expect:",)),
    Case("101-unasked", [b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n"], 502),
    # ---- body-less answers followed by bytes (issue item 3)
    Case("204-junk-coalesced", [b"HTTP/1.1 204 No Content\r\n\r\nJUNK RUN?"], 204,
         reused=False, nginx=True),
    # (nginx 1.22 with upstream keep-alive pools this connection and the junk stalls the
    # next request on it: not a reference here.)
    Case("204-junk-later", [b"HTTP/1.1 204 No Content\r\n\r\n", b"JUNK RUN?"], 204,
         reused=False),
    Case("204-smuggled-response", [b"HTTP/1.1 204 No Content\r\n\r\n"
                                   + ok(b"Set-Cookie: sid=attackerRUN?")], 204,
         absent=("Set-Cookie",), reused=False),
    Case("204-with-content-length", [b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"],
         204, absent=("Content-Length",)),
    Case("304-clean", [b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\nContent-Length: 10\r\n\r\n"],
         304, request=request("GET", "/c/RUN?", 'If-None-Match: "x"'),
         present={"ETag": '"x"', "Content-Length": "10"}, nginx=True),
    Case("304-with-body", [b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\nContent-Length: 10"
                           b"\r\n\r\nhello RUN?"], 304, reused=False,
         request=request("GET", "/c/RUN?", 'If-None-Match: "x"'), nginx=True),
    Case("head-clean", [ok(body=BODY)[:-len(BODY)]], 200, request=HEAD_REQUEST, head=True,
         present={"Content-Length": "10"}, nginx=True),
    Case("head-with-body", [ok()], 200, request=HEAD_REQUEST, head=True, reused=False,
         present={"Content-Length": "10"}, nginx=True),
    Case("head-chunked-streaming-handler", [CHUNKED + b"\r\n"], 200, request=HEAD_REQUEST,
         head=True, reused=False, nginx=True),
    # ---- bytes after a framed body
    Case("bytes-after-content-length", [ok(body=b"hello") + b"EXTRA RUN?"], 200, b"hello",
         reused=False, nginx=True),
    Case("response-after-chunked", [CHUNKED + b"\r\n5\r\nhello\r\n0\r\n\r\n" + ok()], 200,
         b"hello", reused=False, nginx=True),
    Case("close-delimited", [b"HTTP/1.1 200 OK\r\nServer: up\r\n\r\nhello RUN?"], 200, BODY,
         close=True, nginx=True),
    Case("http10-upstream", [b"HTTP/1.0 200 OK\r\nContent-Length: 10\r\n\r\nhello RUN?"], 200,
         BODY, reused=False, nginx=True),
    Case("connection-close", [ok(b"Connection: close")], 200, BODY, reused=False,
         absent=("Connection",)),
    Case("connection-named-header", [ok(b"Connection: X-Secret", b"X-Secret: RUN?")], 200,
         BODY, absent=("X-Secret",)),
    # ---- response splitting: anything a lenient reader would frame differently -> 502
    Case("bare-lf-everywhere", [b"HTTP/1.1 200 OK\nContent-Length: 10\n\nhello RUN?"], 502),
    Case("bare-lf-in-field", [ok(b"X-A: 1\nSet-Cookie: sid=RUN?")], 502),
    Case("bare-cr-in-field", [ok(b"X-A: 1\rSet-Cookie: sid=RUN?")], 502, nginx=True),
    Case("nul-in-field", [ok(b"X-A: 1\x00RUN?")], 502, nginx=True),
    Case("obs-fold", [ok(b"X-A: 1", b" Set-Cookie: sid=RUN?")], 502, nginx=True),
    Case("space-before-colon", [b"HTTP/1.1 200 OK\r\nContent-Length : 10\r\n\r\nhello RUN?"],
         502, nginx=True),
    Case("no-colon", [ok(b"Set-Cookie sid=RUN?")], 502, nginx=True),
    Case("content-length-duplicate-same", [ok(b"Content-Length: 10")], 200, BODY,
         present={"Content-Length": "10"}, nginx=True),
    Case("content-length-list-same", [b"HTTP/1.1 200 OK\r\nContent-Length: 10, 10\r\n\r\n"
                                      b"hello RUN?"], 200, BODY,
         present={"Content-Length": "10"}),
    Case("content-length-conflicting", [ok(b"Content-Length: 4")], 502),
    Case("content-length-list-conflicting",
         [b"HTTP/1.1 200 OK\r\nContent-Length: 10, 4\r\n\r\nhello RUN?"], 502),
    Case("content-length-plus", [b"HTTP/1.1 200 OK\r\nContent-Length: +10\r\n\r\nhello RUN?"],
         502),
    Case("content-length-hex", [b"HTTP/1.1 200 OK\r\nContent-Length: 0xa\r\n\r\nhello RUN?"],
         502),
    Case("content-length-and-chunked", [b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n"
                                        b"Transfer-Encoding: chunked\r\n\r\n"
                                        b"a\r\nhello RUN?\r\n0\r\n\r\n"], 502),
    Case("te-not-chunked-last", [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"
                                 b"a\r\nhello RUN?\r\n0\r\n\r\n"], 502),
    Case("te-gzip-then-chunked", [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                                  b"a\r\nhello RUN?\r\n0\r\n\r\n"], 502),
    Case("te-chunked-twice", [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\na\r\nhello RUN?\r\n0\r\n\r\n"],
         502),
    Case("te-case-insensitive", [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n"
                                 b"a\r\nhello RUN?\r\n0\r\n\r\n"], 200, BODY, nginx=True),
    Case("chunk-size-0x", [CHUNKED + b"\r\n0xa\r\nhello RUN?\r\n0\r\n\r\n"], 502),
    Case("chunk-size-trailing-space", [CHUNKED + b"\r\na \r\nhello RUN?\r\n0\r\n\r\n"], 502),
    Case("chunk-size-overflow", [CHUNKED + b"\r\n10000000000000000a\r\nhello RUN?\r\n0\r\n\r\n"],
         502),
    Case("chunk-no-crlf-after-data", [CHUNKED + b"\r\n5\r\nhelloXX0\r\n\r\n"], 502),
    Case("chunk-bare-lf", [CHUNKED + b"\r\na\nhello RUN?\r\n0\r\n\r\n"], 502),
    Case("trailer-obs-fold", [CHUNKED + b"\r\n5\r\nhello\r\n0\r\nX-A: 1\r\n Set-Cookie: x\r\n"
                              b"\r\n"], 502),
    Case("status-four-digits", [b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n"], 502),
    Case("status-http2", [b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n"], 502),
    Case("status-no-space", [b"HTTP/1.1 200OK\r\nContent-Length: 0\r\n\r\n"], 502),
    Case("status-not-http", [b"ICY 200 OK\r\nContent-Length: 0\r\n\r\n"], 502),
    Case("status-no-reason", [b"HTTP/1.1 200\r\nContent-Length: 10\r\n\r\nhello RUN?"], 200,
         BODY, nginx=True),
    # ---- Date (RFC 9110 §6.6.1): added when missing, the upstream's kept otherwise
    Case("date-added", [ok()], 200, BODY, nginx=True),
    Case("date-kept", [ok(DATE)], 200, BODY,
         present={"Date": DATE.split(b": ", 1)[1].decode()}, nginx=True),
    # ---- the response header limit (16k by default)
    Case("header-under-limit", [ok(b"X-Big: " + b"a" * 15000)], 200, BODY),
    # (a count is no limit: 300 small fields are fine, aiohttp's fixed 128 is gone)
    Case("header-many-small", [ok(*(b"X-F%d: v" % i for i in range(300)))], 200, BODY,
         present={"X-F299": "v"}),
    Case("header-over-limit", [ok(b"X-Big: " + b"a" * 17000)], 502, nginx=True),
    # A hostile upstream's endless 1xx: a cap (gateway/upstream.py MAX_INTERIM), at once.
    Case("interim-at-the-cap", [b"HTTP/1.1 100 Continue\r\n\r\n" * MAX_INTERIM + ok()], 200,
         BODY),
    Case("interim-over-the-cap", [b"HTTP/1.1 102 Processing\r\n\r\n" * (MAX_INTERIM + 1)
                                  + ok()], 502),
    Case("interim-over-the-cap-one-per-read",
         [b"HTTP/1.1 103 Early Hints\r\n\r\n"] * (MAX_INTERIM + 1) + [ok()], 502, gap=0.002),
    Case("header-over-limit-in-1xx", [b"HTTP/1.1 103 Early Hints\r\nX-Big: " + b"a" * 17000
                                      + b"\r\n\r\n" + ok()], 502, nginx=True),
    Case("trailers-over-limit", [CHUNKED + b"\r\n5\r\nhello\r\n0\r\nX-Big: " + b"a" * 17000
                                 + b"\r\n\r\n"], 502),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
async def test_case(case: Case, gw: Running, up: ScriptedUpstream, path: PathSwitch) -> None:
    await run_case(case, gw.port, up, path)


async def test_interim_split_at_every_byte(gw: Running, up: ScriptedUpstream,
                                           path: PathSwitch) -> None:
    """100 and 103 then the final answer, cut into two reads at every byte boundary."""
    for k in range(1, len(INTERIM)):
        case = Case(f"interim-split-{k}", [INTERIM[:k], INTERIM[k:]], 200, BODY,
                    absent=("Link",), gap=0.002)
        await run_case(case, gw.port, up, path)


async def test_reuse_right_after_head_does_not_stall(gw: Running, up: ScriptedUpstream,
                                                     path: PathSwitch) -> None:
    """Issue item 4: a HEAD to a streaming handler (chunked, no body) that keeps running
    for 3 s; the next visitor must not wait for it on the same connection."""
    case = Case("head-then-get", [CHUNKED + b"\r\n"], 200, request=HEAD_REQUEST, head=True,
                reused=False, busy=3.0)
    start = time.monotonic()
    await run_case(case, gw.port, up, path)
    up.case = Case("get", [ok()], 200, busy=3.0)
    answer = await fetch(gw.port, request("GET", "/c/RUN1"), limit_s=1.0)
    assert answer.status == 200 and answer.body == b"hello RUN1"
    assert time.monotonic() - start < 2.0


async def test_header_limit_is_configurable(up: ScriptedUpstream, path: PathSwitch) -> None:
    async with serving(conformance_config(up.url, max_upstream_header_size="2k")) as gw:
        await run_case(Case("under-2k", [ok(b"X-Big: " + b"a" * 1900)], 200, BODY),
                       gw.port, up, path)
        await run_case(Case("over-2k", [ok(b"X-Big: " + b"a" * 2100)], 502), gw.port, up, path)


async def test_body_flow_control_pauses_the_upstream(gw: Running, up: ScriptedUpstream,
                                                     path: PathSwitch) -> None:
    """A client that reads nothing: the gateway stops reading the upstream (it buffers a
    bounded amount, not the body), then delivers every byte once the client reads."""
    size = 32 * 1024 * 1024
    block = b"x" * 65536
    up.case = Case("big", [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size]
                   + [block] * (size // len(block)), 200, gap=0)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(request("GET", "/c/RUN1"))
        # Wait until the upstream's writes stall (the gateway no longer reads them).
        async with asyncio.timeout(10):
            last = -1
            while up.written != last:
                last = up.written
                await asyncio.sleep(0.3)
        assert up.written < size // 2, up.written  # kernel buffers, not the whole body
        got = 0
        async with asyncio.timeout(20):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            while got < size:
                data = await reader.read(1 << 20)
                assert data
                got += len(data)
        assert got == size and up.written == size + len(up.case.writes[0])
    finally:
        writer.close()
