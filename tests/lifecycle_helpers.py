"""``KeepAlive``: one raw client connection reused for several requests."""

from __future__ import annotations

import asyncio
import contextlib

from tests.gwhelpers import RawResponse


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
            return await self._read_response(method == "HEAD")

    async def _read_response(self, head_only: bool) -> RawResponse:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        pairs = []
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                pairs.append((name.strip(), value.strip()))
        resp = RawResponse(status, pairs, b"")
        if head_only or status in (204, 304) or 100 <= status < 200:
            return resp
        if (resp.header("Transfer-Encoding") or "").lower() == "chunked":
            body = bytearray()
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    while await self.reader.readuntil(b"\r\n") != b"\r\n":
                        pass  # trailers
                    break
                body += (await self.reader.readexactly(size + 2))[:size]
            resp.body = bytes(body)
        elif resp.header("Content-Length") is not None:
            resp.body = await self.reader.readexactly(int(resp.header("Content-Length") or 0))
        else:
            resp.body = await self.reader.read()
        return resp

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()
