"""Upload sink: an HTTP/1.1 origin that reads each request body to the end, then answers.

Why not nginx: nginx's ``return 204`` *discards* a body, but it answers first and drains the
rest afterwards, so a proxy sees the response before its upload has finished (the gateway
then, rightly, stops sending and drops the connection) and the measured time is meaningless.
Making nginx read a body fully before answering means buffering it (memory or a 1 GiB temp
file on disk). This asyncio protocol costs one ``data_received`` call per socket read and no
copies of body bytes, so it keeps up with any of the proxies on loopback.

Answers ``200`` with the number of body bytes received, so the client can check that all of
them arrived. Keep-alive, ``Content-Length`` and ``chunked`` bodies are supported.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from typing import cast

_HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILER = range(6)
_MAX_HEAD = 64 * 1024


class SinkProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.state = _HEAD
        self.buf = bytearray()
        self.remaining = 0
        self.received = 0
        self.close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; cast, don't check
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.buf:
            # only ever small: a partial request head or chunk-size line
            data = bytes(self.buf) + data
            self.buf.clear()
        pos, end = 0, len(data)
        while pos < end:
            state = self.state
            if state in (_BODY, _CHUNK_DATA):
                take = min(self.remaining, end - pos)
                self.remaining -= take
                self.received += take
                pos += take
                if self.remaining == 0:
                    if state == _BODY:
                        self._respond()
                    else:
                        self.state = _CHUNK_END
                continue
            if state == _HEAD:
                stop = data.find(b"\r\n\r\n", pos)
                if stop < 0:
                    self._keep(data[pos:])
                    return
                if not self._head(data[pos:stop]):
                    return
                pos = stop + 4
                continue
            stop = data.find(b"\r\n", pos)
            if stop < 0:
                self._keep(data[pos:])
                return
            line = data[pos:stop]
            pos = stop + 2
            if state == _CHUNK_SIZE:
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    self._bad()
                    return
                if size == 0:
                    self.state = _TRAILER
                else:
                    self.remaining = size
                    self.state = _CHUNK_DATA
            elif state == _CHUNK_END:
                self.state = _CHUNK_SIZE
            elif state == _TRAILER and not line:
                self._respond()

    def _keep(self, rest: bytes) -> None:
        self.buf += rest
        if len(self.buf) > _MAX_HEAD:
            self._bad()

    def _head(self, head: bytes) -> bool:
        lines = head.split(b"\r\n")
        if not lines[0].endswith((b"HTTP/1.1", b"HTTP/1.0")):
            self._bad()
            return False
        length = 0
        chunked = False
        self.close_after = lines[0].endswith(b"HTTP/1.0")
        expect = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            value = value.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = value.endswith(b"chunked")
            elif name == b"connection":
                self.close_after = value == b"close"
            elif name == b"expect":
                expect = value == b"100-continue"
        if expect and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.received = 0
        if chunked:
            self.state = _CHUNK_SIZE
        elif length:
            self.remaining = length
            self.state = _BODY
        else:
            self._respond()
        return True

    def _respond(self) -> None:
        self.state = _HEAD
        body = b"%d\n" % self.received
        if self.transport is not None:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                                 b"Content-Length: %d\r\n%s\r\n%s"
                                 % (len(body), b"Connection: close\r\n" if self.close_after
                                    else b"", body))
            if self.close_after:
                self.transport.close()

    def _bad(self) -> None:
        if self.transport is not None:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n"
                                 b"Connection: close\r\n\r\n")
            self.transport.close()


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(SinkProtocol, host, port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
