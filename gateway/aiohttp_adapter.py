"""The gateway's contract with aiohttp: every use of its internals, in this module only.

aiohttp's low-level server (``web.Server`` and its per-connection ``RequestHandler``) parses
requests and runs a connection loop (``RequestHandler.start``). The gateway adds a
client-header deadline, refusals with the right status, a parser that stops between
requests, a fast path that serves plain GETs from ``data_received``, and WebSocket
splicing; for that it relies on the following, none of which is aiohttp's public API.
pyproject.toml pins aiohttp to the releases these were checked against (3.14.4 up to the
next minor), the import below refuses an aiohttp that lacks one of the names, and
tests/test_aiohttp_contract.py pins the behaviours, on both request paths.

``RequestHandler`` attributes and methods (aiohttp/web_protocol.py):

- ``_messages``: the deque of parsed ``(message, payload)`` pairs ``start()`` serves in
  order; ``_request_count``: how many were parsed. The gateway reads both, replaces a
  refused request by an error item (``_ErrInfo``), and takes requests the fast path serves.
- ``_waiter``: the future ``start()`` parks on while the queue is empty. The fast path
  hides it while parsing (so ``start()`` is not woken for a request the fast path takes)
  and wakes it for the requests the loop must serve.
- ``start()`` (the connection loop, a task) may not have run when the first request
  arrives (before Python 3.12 aiohttp starts it from the next loop iteration, and uvloop
  can deliver a new connection's bytes first): ``connection_made`` parks it in advance on
  a ``_waiter`` of its own, which the overridden ``start()`` awaits before aiohttp's loop
  (that loop checks the queue, then creates its own waiter).
- ``_current_request``: set while ``start()`` serves a request (the connection is busy).
- ``_parser`` (an ``HttpRequestParser``, replaced here with one created with
  ``max_msg_queue_size=1``, and its ``message_consumed()``), ``_payload_parser``,
  ``_upgraded``, ``_force_close``, ``_close``, ``_read_bufsize``, ``_loop``, ``_manager``.
- The pipelining back-pressure of aiohttp 3.14.4+: ``_max_msg_queue_size`` (32 queued
  requests pause reading), ``_msg_queue_resume_size``, ``_buffer_paused`` and
  ``_resume_reading_if_drained()``. ``start()`` resumes reading as it drains the queue;
  a request taken outside ``start()`` must do the same (``take``), or more than 32
  pipelined requests stall.
- Keep-alive: ``_keepalive_timeout``, ``_next_keepalive_close_time``,
  ``_keepalive_handle`` and ``_process_keepalive()`` (the idle timer, extended while the
  fast path serves since ``start()`` then looks idle).
- ``set_parser()`` and ``_parser = None`` for a spliced WebSocket; ``_drain_helper()`` of
  ``BaseProtocol`` (wait for a slow client's socket to drain).
- ``web.Server``: ``_kwargs``, ``_loop`` (to build the protocol), ``_make_request``
  (``ERROR``, the stand-in request of a parse failure) and ``web_protocol.ERROR``.
- A request body (the message's payload ``StreamReader``, public API: ``is_eof``,
  ``total_bytes``, ``exception``, ``read_nowait``) is fed while the request is parsed. Its
  buffer pauses reading only past twice ``_read_bufsize`` (64 KiB by default), above the
  largest body the fast path holds. ``read_nowait`` ends every read with
  ``resume_reading()``, which re-enters ``data_received(b"")`` to parse on; the fast path,
  which holds a body only once it is complete and has parsed what followed it already,
  takes it from the payload's ``_buffer`` instead (``complete_body``: with ``_size`` and
  ``_cursor`` kept as a read keeps them), so a POST costs one parse, not two.
- multidict (aiohttp's header dicts) keeps freed dicts and key tables in pools of its own;
  ``multidict._multidict._freelist_clear()`` empties them, which ``gateway/memory.py``
  calls after a crowd so that the pools do not hold the crowd's memory. It is looked up,
  not imported: a multidict without it (the pure-Python build, another release) makes
  ``multidict_freelist_clear()`` None and nothing is done. pyproject.toml bounds multidict
  to the major release it was checked against.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http import HttpVersion, HttpVersion11, RawRequestMessage
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidURLError,
    LineTooLong,
)
from aiohttp.http_parser import HttpRequestParser
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import ERROR, RequestHandler, RequestPayloadError, _ErrInfo

__all__ = [
    "EMPTY_PAYLOAD",
    "ERROR",
    "BadHttpMethod",
    "BadStatusLine",
    "HttpProcessingError",
    "HttpVersion",
    "HttpVersion11",
    "InvalidURLError",
    "LineTooLong",
    "Protocol",
    "RawRequestMessage",
    "RequestHandler",
    "Server",
    "StreamReader",
    "complete_body",
    "drain",
    "multidict_freelist_clear",
    "splice_protocol",
]

# What the list above names, checked once at import: an aiohttp without them fails here,
# by name, instead of answering nothing at the first pipelined request.
_RELIED_ON = (
    (RequestHandler, ("_messages", "_request_count", "_waiter", "_current_request", "_parser",
                      "_payload_parser", "_upgraded", "_force_close", "_close", "_read_bufsize",
                      "_loop", "_manager", "_max_msg_queue_size", "_msg_queue_resume_size",
                      "_buffer_paused", "_resume_reading_if_drained", "_keepalive_timeout",
                      "_next_keepalive_close_time", "_keepalive_handle", "_process_keepalive",
                      "set_parser")),
    (HttpRequestParser, ("message_consumed",)),
    (BaseProtocol, ("_drain_helper",)),
    (StreamReader, ("_buffer", "_buffer_offset", "_size", "_cursor")),
    (web.Server, ("_make_request",)),
)
_missing = [f"{cls.__name__}.{name}" for cls, names in _RELIED_ON for name in names
            if not hasattr(cls, name)]
if _missing:
    raise ImportError(
        f"aiohttp {aiohttp.__version__} lacks {', '.join(_missing)}, which the gateway relies "
        "on (gateway/aiohttp_adapter.py); install the aiohttp version pyproject.toml allows")

# The request aiohttp hands to the error handler when parsing failed: answered in HTTP/1.1
# (RFC 9112 2.5: the highest version we conform to, as nginx does), and never kept alive.
_ERROR_11 = ERROR._replace(version=HttpVersion11, should_close=True)


class Protocol(RequestHandler):
    """aiohttp's per-connection protocol, with the internals the gateway uses named."""

    def __init__(self, manager: Any, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        # aiohttp's parser drops every request it completed in a read when a later one in
        # the same read is malformed. Paused after each message (a queue of one), it hands
        # over each request before it meets the next (``parse_more`` resumes it).
        self._parser = HttpRequestParser(
            self, kwargs["loop"], self._read_bufsize, max_line_size=self.max_line_size,
            max_field_size=self.max_field_size, max_headers=self.max_headers,
            payload_exception=RequestPayloadError,
            auto_decompress=kwargs.get("auto_decompress", True), max_msg_queue_size=1)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._waiter is None:
            # start() has not run yet (before Python 3.12 aiohttp starts it from the next
            # loop iteration; uvloop may deliver the first request before that). Park it in
            # advance on a waiter of its own, so that the first request finds the loop
            # idle as every later one does: the fast path can take it, and start() wakes
            # only for what it must serve.
            self._waiter = self._loop.create_future()

    async def start(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            # The waiter parked in advance by connection_made: wait on it as start() waits
            # on its own (a cancelled one ends the loop, as it would have).
            try:
                await waiter
            finally:
                self._waiter = None
        await super().start()

    # ------------------------------------------------------------------ the request queue

    @property
    def queue(self) -> deque[tuple[Any, StreamReader]]:
        """The parsed requests ``start()`` serves in order."""
        return self._messages

    @property
    def parsed(self) -> int:
        return self._request_count

    def feed(self, data: bytes) -> None:
        """aiohttp's own parsing step (queues what completes, pauses reading when full)."""
        RequestHandler.data_received(self, data)

    def parse_more(self, taken: int) -> bool:
        """Let the parser go on after ``taken`` new requests; False when it must not
        (aiohttp's queue is full, or the stream is no longer HTTP requests)."""
        parser = self._parser
        if (parser is None or len(self._messages) >= self._max_msg_queue_size
                or self._upgraded or self._force_close or self._close):
            return False
        for _ in range(taken):
            parser.message_consumed()
        return True

    def queue_error(self, index: int | None, status: int, exc: BaseException) -> None:
        """Put a refusal in the queue (``start()`` answers it through ``handle_error``):
        at ``index`` in place of a parsed request, or appended."""
        item = (_ErrInfo(status=status, exc=exc, message=""), EMPTY_PAYLOAD)
        if index is None:
            self._messages.append(item)
            self._request_count += 1
        else:
            self._messages[index] = item

    @staticmethod
    def is_parse_error(msg: object) -> bool:
        return isinstance(msg, _ErrInfo)

    def take(self) -> None:
        """Take the first queued request outside ``start()``, as ``start()`` does: free a
        parser slot, and resume reading once the queue drained below half."""
        self._messages.popleft()
        if self._parser is not None:
            self._parser.message_consumed()
        if self._buffer_paused and len(self._messages) <= self._msg_queue_resume_size:
            self._resume_reading_if_drained()

    # ------------------------------------------------------------------ aiohttp's loop

    def hide_waiter(self) -> asyncio.Future[None] | None:
        """If ``start()`` is parked, hide its waiter (returned) so parsing does not wake it."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            self._waiter = None
            return waiter
        return None

    def restore_waiter(self, waiter: asyncio.Future[None]) -> None:
        self._waiter = waiter

    def parked_waiter(self) -> asyncio.Future[None] | None:
        """``start()``'s waiter while it waits for a request, else None."""
        waiter = self._waiter
        return waiter if waiter is not None and not waiter.done() else None

    def wake_loop(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @property
    def serving(self) -> bool:
        """``start()`` is serving a request."""
        return self._current_request is not None

    @property
    def past_http(self) -> bool:
        """The connection was upgraded, or a body is being parsed."""
        return self._upgraded or self._payload_parser is not None

    @property
    def closing(self) -> bool:
        return self._force_close or self._close

    @property
    def event_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    @property
    def server(self) -> Any:
        return self._manager

    # ------------------------------------------------------------------ keep-alive

    def busy_elsewhere(self) -> bool:
        """Overridden where requests are served outside ``start()`` (it then looks idle)."""
        return False

    def _process_keepalive(self) -> None:
        if self.busy_elsewhere():
            self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout
        super()._process_keepalive()

    def keep_alive_from_now(self) -> None:
        """A request served outside ``start()`` ended: the idle timer starts over."""
        loop = self._loop
        self._next_keepalive_close_time = loop.time() + self._keepalive_timeout
        if self._keepalive_handle is None and self._keepalive_timeout > 0:
            self._keepalive_handle = loop.call_at(self._next_keepalive_close_time,
                                                  self._process_keepalive)


class Server(web.Server):
    """aiohttp's server, making ``protocol`` for each connection."""

    def __init__(self, handler: Any, *, protocol: type[RequestHandler], **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.protocol = protocol

    def __call__(self) -> RequestHandler:
        return self.protocol(self, loop=self._loop, **self._kwargs)

    def _make_request(self, message: RawRequestMessage, *args: Any, **kwargs: Any
                      ) -> web.BaseRequest:
        # The parser layer's refusals are answered in HTTP/1.1, whatever the client sent.
        return super()._make_request(_ERROR_11 if message is ERROR else message, *args,
                                     **kwargs)


def complete_body(payload: StreamReader) -> bytes | None:
    """All of a complete (at EOF) request body, taken from its reader without
    ``read_nowait`` and the parsing step it runs (see the module docstring); None for a
    reader that is not complete, failed, or was read from already (read it as usual)."""
    if payload._buffer_offset or not payload.is_eof() or payload.exception() is not None:
        return None
    chunks = payload._buffer
    body = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
    chunks.clear()
    payload._size = 0
    payload._cursor += len(body)
    return body


def multidict_freelist_clear() -> Callable[[], object] | None:
    """multidict's call that empties its free lists, or None (see the module docstring)."""
    try:
        from multidict import _multidict  # type: ignore[attr-defined]
    except ImportError:
        return None
    clear: Callable[[], object] | None = getattr(_multidict, "_freelist_clear", None)
    return clear


async def drain(protocol: BaseProtocol) -> None:
    """Wait until the client's socket takes what was written (flow control)."""
    await protocol._drain_helper()


def splice_protocol(protocol: Any, link: Any) -> None:
    """Hand the connection's bytes to ``link`` for good (a spliced WebSocket): from here
    on it carries frames, never HTTP again, so the HTTP parser goes (aiohttp only consults
    it while no payload parser is set)."""
    protocol.set_parser(link)
    protocol._parser = None
