"""The upstream response reader as pure logic: every byte string fed in every split.

The socket-level cases are in tests/conformance/; these feed ``ResponseReader`` directly,
so every cut point (and every three-way cut of the short ones) is checked exactly,
independent of how the kernel happens to deliver reads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.upstream import (
    Body,
    InvalidResponse,
    Response,
    ResponseReader,
    UpstreamConnection,
    UpstreamPool,
    parse_head,
)


class _Conn:
    """Stands in for the connection a Body pauses and resumes (pure logic, no socket)."""

    def __init__(self) -> None:
        self.paused = 0
        self.resumed = 0
        self._loop: Any = None  # set by the one test that awaits

    def pause_reading(self) -> None:
        self.paused += 1

    def resume_reading(self) -> None:
        self.resumed += 1


def reader(*, head: bool = False, upgrade: bool = False, limit: int = 16384
           ) -> ResponseReader:
    conn: UpstreamConnection = _Conn()  # type: ignore[assignment]
    return ResponseReader(Body(conn), head_request=head, upgrade=upgrade, limit=limit)


def feed_all(r: ResponseReader, pieces: list[bytes]) -> None:
    for piece in pieces:
        if piece:
            r.feed(piece)


def splits(data: bytes) -> Iterator[list[bytes]]:
    yield [data]
    for i in range(1, len(data)):
        yield [data[:i], data[i:]]
    if len(data) <= 200:
        for i in range(1, len(data)):
            for j in range(i + 1, len(data), 7):
                yield [data[:i], data[i:j], data[j:]]
    yield [data[i:i + 1] for i in range(len(data))]


INTERIM_AND_CHUNKED = (
    b"HTTP/1.1 100 Continue\r\n\r\n"
    b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n"
    b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: abc\r\nSet-Cookie: sid=x\r\n\r\n")


@pytest.mark.parametrize("data,body,headers", [
    (INTERIM_AND_CHUNKED, b"hello world", [(b"X-A", b"1")]),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nServer: up\r\n\r\nhello", b"hello",
     [(b"Server", b"up")]),
    (b"HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 204 No Content\r\nX-B: 2\r\n\r\n", b"",
     [(b"X-B", b"2")]),
])
def test_every_split_gives_the_same_response(data: bytes, body: bytes,
                                             headers: list[tuple[bytes, bytes]]) -> None:
    for pieces in splits(data):
        r = reader()
        feed_all(r, pieces)
        assert r.complete and not r.stray, pieces
        assert r.response is not None and r.response.code in (200, 204)
        # 1xx fields and trailers are never fields of the response.
        assert r.response.raw_headers == headers, pieces
        assert r.body.take() == body, pieces


def test_bytes_after_the_response_are_stray_in_any_split() -> None:
    data = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n\r\n"
    for pieces in splits(data):
        r = reader()
        feed_all(r, pieces)
        assert r.complete and r.stray and r.body.take() == b"ok", pieces


def test_head_answer_ends_at_its_head() -> None:
    r = reader(head=True)
    r.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    assert r.complete and not r.stray and r.response is not None
    assert r.response.length == 10 and not r.response.should_close
    r = reader(head=True)
    r.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789")
    assert r.complete and r.stray
    r = reader(head=True)  # chunked: the upstream may still be streaming; do not reuse
    r.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert r.complete and r.response is not None and r.response.should_close


def test_switching_protocols_only_when_asked() -> None:
    data = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x02hi"
    r = reader(upgrade=True)
    r.feed(data)
    assert r.complete and r.response is not None and r.response.upgrade
    assert r.tail == b"\x81\x02hi"
    with pytest.raises(InvalidResponse):
        reader().feed(data)


def test_close_delimited_body_ends_at_close() -> None:
    r = reader()
    r.feed(b"HTTP/1.1 200 OK\r\n\r\nabc")
    r.feed(b"def")
    assert r.until_close and not r.complete
    r.close()
    assert r.complete and r.body.take() == b"abcdef"
    assert r.response is not None and r.response.should_close


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
    b"HTTP/1.1 200 OK\r\nX-A: 1\nX-B: 2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-A: 1\rX-B: 2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-A: 1\x00\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-A : 1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n: 1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX(A): 1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.0 2000 OK\r\n\r\n",
    b"HTTP/1.2 200 OK\r\n\r\n",
    b"HTTP/2 200\r\n\r\n",
    b"http/1.1 200 OK\r\n\r\n",
    b" HTTP/1.1 200 OK\r\n\r\n",
])
def test_invalid_heads_are_refused(head: bytes) -> None:
    for pieces in ([head], [head[:len(head) // 2], head[len(head) // 2:]]):
        r = reader()
        with pytest.raises(InvalidResponse):
            feed_all(r, pieces)


@pytest.mark.parametrize("body", [
    b"0x5\r\nhello\r\n0\r\n\r\n",
    b"5 \r\nhello\r\n0\r\n\r\n",
    b"5\r\nhelloXX0\r\n\r\n",
    b"5\nhello\r\n0\r\n\r\n",
    b"10000000000000000\r\n",
    b"5\r\nhello\r\n0\r\nX-A: 1\r\n folded\r\n\r\n",
    b"5\r\nhello\r\n0\r\nX-A 1\r\n\r\n",
    b"5\r\nhello\r\n0\r\nX-A: 1\rSet-Cookie: x\r\n\r\n",
    b"5\r\nhello\r\n0\r\nX-A: 1\nSet-Cookie: x\r\n\r\n",
    b"5\r\nhello\r\n0\r\nX-A: \x00\r\n\r\n",
    b"5\r\nhello\r\n0\r\nX-A : 1\r\n\r\n",
    b"-5\r\nhello\r\n0\r\n\r\n",
])
def test_invalid_chunked_framing_is_refused(body: bytes) -> None:
    data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    for pieces in splits(data):
        r = reader()
        with pytest.raises(InvalidResponse):
            feed_all(r, pieces)


def test_header_limit_counts_bytes_of_each_head() -> None:
    head = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 1000 + b"\r\nContent-Length: 0\r\n\r\n"
    r = reader(limit=len(head))
    r.feed(head)
    assert r.complete
    for pieces in ([head], [head[:500], head[500:]]):
        with pytest.raises(InvalidResponse):
            feed_all(reader(limit=len(head) - 1), pieces)
    # Trailers count against the same limit.
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: "
               + b"t" * 2000 + b"\r\n\r\n")
    with pytest.raises(InvalidResponse):
        reader(limit=1024).feed(chunked)


def test_parse_head_keeps_fields_but_not_framing() -> None:
    response = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\nConnection: close, "
                          b"X-Private\r\nDate: x\r\nX-Private: 1\r\n")
    assert isinstance(response, Response)
    assert response.length == 5 and response.should_close and response.has_date
    assert response.connection == ("close", "x-private")
    assert [k for k, _ in response.raw_headers] == [b"Connection", b"Date", b"X-Private"]
    assert response.headers.getall("x-private") == ["1"]
    http10 = parse_head(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n")
    assert http10.should_close and http10.minor == 0
    assert not parse_head(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\n"
                          b"Content-Length: 0\r\n").should_close


async def test_body_pauses_and_resumes_the_upstream() -> None:
    conn = _Conn()
    body = Body(conn)  # type: ignore[arg-type]
    conn._loop = asyncio.get_running_loop()
    body.feed(b"x" * 40000)
    assert conn.paused == 0
    body.feed(b"x" * 40000)
    assert conn.paused == 1  # over the high-water mark: stop reading the upstream
    assert len(await body.readany()) == 80000
    assert conn.resumed == 1
    body.finish()
    assert await body.readany() == b""


def test_pool_default_header_limit() -> None:
    pool = UpstreamPool(connect_timeout=1.0)
    assert pool.max_header_size == 16 * 1024
