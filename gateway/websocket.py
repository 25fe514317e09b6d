"""WebSockets: forward the upgrade, then splice the two sockets byte for byte.

The gateway does not parse frames; text, binary, ping/pong and close frames (with their
codes) pass unchanged, and an idle connection costs two transports and this small object.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gateway.aiohttp_adapter import splice_protocol
from gateway.upstream import UpstreamConnection

if TYPE_CHECKING:
    from gateway.proxy import Exchange

log = logging.getLogger("gateway.websocket")

_WRITE_HIGH = 1 << 20
_CLOSE_1001_PAYLOAD = (1001).to_bytes(2, "big")
# Server-to-client frames are unmasked; client-to-server frames must be masked.
_CLOSE_1001_TO_CLIENT = b"\x88\x02" + _CLOSE_1001_PAYLOAD


class Splice:
    """Moves bytes between the client and upstream transports until either side closes."""

    def __init__(self, request: web.BaseRequest, conn: UpstreamConnection, idle_timeout: float
                 ) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._client = request.transport
        self._protocol = request.protocol
        self._conn = conn
        self._idle = idle_timeout
        self._last = loop.time()
        self.done: asyncio.Future[None] = loop.create_future()
        self._timer = (loop.call_at(self._last + idle_timeout, self._check_idle)
                       if idle_timeout else None)
        self._tasks: set[asyncio.Task[None]] = set()
        self.bytes_in = 0
        self.bytes_out = 0
        conn.tunnel = self._from_upstream

    # aiohttp calls these as the "payload parser" of the upgraded client connection.
    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self._last = self._loop.time()
        self.bytes_in += len(data)
        transport = self._conn.transport
        if transport is None or transport.is_closing():
            self.close()
            return True, b""
        transport.write(data)
        if transport.get_write_buffer_size() > _WRITE_HIGH and self._client is not None:
            self._client.pause_reading()
            self._spawn(self._resume_client())
        return False, b""

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def feed_eof(self) -> None:
        self.close()

    async def _resume_client(self) -> None:
        try:
            await self._conn.drain()
        except Exception:  # the upstream went away; close() follows from connection_lost
            return
        if self._client is not None and not self._client.is_closing():
            self._client.resume_reading()

    def _from_upstream(self, data: bytes) -> None:
        if not data:  # upstream connection lost
            self.close()
            return
        self._last = self._loop.time()
        self.bytes_out += len(data)
        client = self._client
        if client is None or client.is_closing():
            self.close()
            return
        client.write(data)
        if client.get_write_buffer_size() > _WRITE_HIGH:
            transport = self._conn.transport
            if transport is not None:
                transport.pause_reading()
                self._spawn(self._resume_upstream())

    async def _resume_upstream(self) -> None:
        writer = self._protocol
        try:
            await writer._drain_helper()
        except Exception:
            return
        transport = self._conn.transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()

    def going_away(self) -> None:
        """Close both sides with 1001 (server going away), as a shutting-down server should.

        The frames are injected between whatever was relayed so far; chat traffic is small
        frames, so the chance of landing inside a partly relayed frame is negligible, and
        the connections are closed right after either way.
        """
        client = self._client
        if client is not None and not client.is_closing():
            client.write(_CLOSE_1001_TO_CLIENT)
        transport = self._conn.transport
        if transport is not None and not transport.is_closing():
            mask = os.urandom(4)
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(_CLOSE_1001_PAYLOAD))
            transport.write(b"\x88\x82" + mask + payload)
        self.close()

    def _check_idle(self) -> None:
        self._timer = None
        due = self._last + self._idle
        if self._loop.time() >= due:
            log.info("closing an idle WebSocket after %gs", self._idle)
            self.close()
            return
        self._timer = self._loop.call_at(due, self._check_idle)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._conn.tunnel = None
        self._conn.close()
        if self._client is not None and not self._client.is_closing():
            self._client.close()
        if not self.done.done():
            self.done.set_result(None)


async def splice(request: web.BaseRequest, conn: UpstreamConnection, head: bytes,
                 idle_timeout: float, registry: set[Splice] | None = None,
                 ex: Exchange | None = None) -> None:
    """Answer the client's upgrade with ``head`` (the upstream's 101) and splice until the
    end. The caller returns a response object that tells aiohttp to close afterwards."""
    transport = request.transport
    if transport is None or transport.is_closing():
        conn.abort()
        return
    transport.write(head)
    link = Splice(request, conn, idle_timeout)
    splice_protocol(request.protocol, link)
    tail = conn.tail
    conn.tail = b""
    if tail:
        link._from_upstream(tail)
    if conn.transport is None or conn.transport.is_closing():
        link.close()
    if registry is not None:
        registry.add(link)
    try:
        await link.done
    finally:
        link.close()
        if registry is not None:
            registry.discard(link)
        if ex is not None:
            ex.bytes_in, ex.bytes_out = link.bytes_in, link.bytes_out
