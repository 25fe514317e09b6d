"""Raw HTTP/1.1 from the client's side: bytes out, responses framed exactly as they came.

``read_response`` frames one response from a stream by its Content-Length / chunked / close
and says whether the body arrived complete, so tests can tell a clean answer from a
truncation. ``exchange`` sends raw bytes and reads the answers (and fails on any extra
byte); ``raw_exchange`` sends one ``Connection: close`` request and parses all that came back;
``KeepAlive`` is one connection reused for several requests.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass


class Headers:
    """Header lookup over ``headers``, a list of (name, value) pairs, names any case."""

    headers: list[tuple[str, str]]

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        lname = name.lower()
        return [v for k, v in self.headers if k.lower() == lname]


@dataclass
class RawResponse(Headers):
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    reason: str = ""
    version: str = "HTTP/1.1"
    complete: bool = True  # the body arrived whole by its own framing
    raw: bytes = b""  # every byte of it as it came (read_response)


def parse_head(head: bytes) -> RawResponse:
    """The status line and header fields of a response head (with or without its CRLFCRLF)."""
    lines = head.removesuffix(b"\r\n\r\n").decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    status, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or not status.isdigit():
        raise AssertionError(f"not a status line (response stream out of step): {lines[0]!r}")
    headers = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.append((name, value.strip()))  # a stray space in a name shows
    return RawResponse(int(status), headers, b"", reason, version)


def parse_response(data: bytes) -> RawResponse:
    """A whole response already read to the connection's close (a chunked body is decoded)."""
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {data[:200]!r}"
    resp = parse_head(head)
    resp.body = body
    if (resp.header("Transfer-Encoding") or "").lower() == "chunked":
        resp.body = dechunk(body)
    return resp


def dechunk(data: bytes) -> bytes:
    out = bytearray()
    while True:
        size_line, sep, rest = data.partition(b"\r\n")
        assert sep, "truncated chunked body"
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += rest[:size]
        data = rest[size + 2:]


async def read_all(reader: asyncio.StreamReader, limit_s: float = 5.0) -> bytes:
    async with asyncio.timeout(limit_s):
        return await reader.read()


async def raw_exchange(host: str, port: int, data: bytes, *, limit_s: float = 5.0,
                       family: int = 0) -> RawResponse:
    """Send raw bytes (the request should say ``Connection: close``) and parse the answer."""
    reader, writer = await asyncio.open_connection(host, port, family=family)
    try:
        writer.write(data)
        await writer.drain()
        return parse_response(await read_all(reader, limit_s))
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def get(path: str, *headers: str, host: str = "gw.test") -> bytes:
    """A raw GET with Connection: close; extra header lines as ``Name: value``."""
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Connection: close", *headers, "", ""]
    return "\r\n".join(lines).encode("latin-1")


async def read_response(reader: asyncio.StreamReader, *, head_request: bool = False
                        ) -> RawResponse | None:
    """One response from ``reader``; None when the connection closed before any byte."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise AssertionError(f"connection closed inside a response head: {exc.partial!r}"
                             ) from None
    resp = parse_head(head)
    raw = bytearray(head)
    code = resp.status
    if head_request or code in (204, 304) or 100 <= code < 200:
        resp.raw = bytes(raw)
        return resp
    te = (resp.header("Transfer-Encoding") or "").lower()
    cl = resp.header("Content-Length")
    try:
        if te == "chunked":
            body = bytearray()
            while True:
                size_line = await reader.readuntil(b"\r\n")
                raw += size_line
                size = int(size_line[:-2].split(b";")[0], 16)
                if size == 0:
                    while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
                        raw += line
                    raw += line
                    break
                chunk = await reader.readexactly(size + 2)
                raw += chunk
                assert chunk.endswith(b"\r\n"), f"chunk data not followed by CRLF: {raw!r}"
                body += chunk[:-2]
            resp.body = bytes(body)
        elif cl is not None:
            resp.body = await reader.readexactly(int(cl))
        else:
            resp.body = await reader.read()
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        resp.complete = False
        resp.body = getattr(exc, "partial", b"")
    if te != "chunked":
        raw += resp.body
    resp.raw = bytes(raw)
    return resp


async def exchange(port: int, data: bytes, *, limit_s: float = 5.0, responses: int = 1,
                   head_at: tuple[int, ...] = ()) -> tuple[list[RawResponse], bool]:
    """Send raw bytes, read up to ``responses`` answers; (answers, closed by the gateway).

    ``head_at``: indexes of the answers that are to HEAD requests (no body follows).
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out: list[RawResponse] = []
    closed = False
    try:
        writer.write(data)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        async with asyncio.timeout(limit_s):
            while len(out) < responses:
                try:
                    resp = await read_response(reader, head_request=len(out) in head_at)
                except ConnectionResetError:
                    resp = None
                if resp is None:
                    closed = True
                    break
                if 100 <= resp.status < 200 and resp.status != 101:
                    continue  # interim (100 Continue): not an answer to count
                out.append(resp)
            if not closed:
                # Whatever follows the answers we expect: another response means the
                # gateway answered more requests than we sent.
                extra: bytes | None
                try:
                    extra = await asyncio.wait_for(reader.read(1), 0.3)
                except (TimeoutError, ConnectionError):
                    extra = None
                if extra == b"":
                    closed = True
                elif extra is not None:
                    raise AssertionError(f"unexpected bytes after the responses: {extra!r}")
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return out, closed


class KeepAlive:
    """One client connection reused for several requests (HTTP/1.1 keep-alive)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1") -> KeepAlive:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    @property
    def local_port(self) -> int:
        port: int = self.writer.get_extra_info("sockname")[1]
        return port

    async def request(self, method: str, path: str, *headers: str, body: bytes = b"",
                      within: float = 5.0) -> RawResponse:
        lines = [f"{method} {path} HTTP/1.1", "Host: gw.test", *headers]
        if body or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(body)}")
        data = ("\r\n".join([*lines, "", ""])).encode("latin-1") + body
        self.writer.write(data)
        await self.writer.drain()
        async with asyncio.timeout(within):
            resp = await read_response(self.reader, head_request=method == "HEAD")
        assert resp is not None, "the connection closed before an answer"
        return resp

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


async def read_response_head_and_body(reader: asyncio.StreamReader, limit_s: float = 5.0
                                      ) -> tuple[bytes, bytes]:
    """One response as raw bytes (head, body), without waiting for the connection to close;
    for tests that assert on the exact head bytes."""
    async with asyncio.timeout(limit_s):
        resp = await read_response(reader)
    assert resp is not None and resp.complete, resp
    return resp.raw[:resp.raw.index(b"\r\n\r\n") + 4], resp.body
