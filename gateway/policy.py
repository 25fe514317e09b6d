"""The forwarding policy: everything decided about a proxied request, for both request paths.

``ForwardingPolicy`` answers, from the request alone: who the client is and what the
upstream is told about it (X-Forwarded-*, X-Real-IP, through gateway/headers.py), the
request id, the route and the upstream target, the request head the upstream gets (the
route's trust boundary, gateway/boundary.py, filters it), the extra response headers
(CORS and ``Vary: Origin``), and the answer to every error. The full path
(gateway/app.py, gateway/proxy.py) and the fast path (gateway/fastpath.py) both call it;
the fast path only asks ``lean`` *whether* it may serve a request, never decides *how*.

Errors are answered from data (gateway/errors.py): ``error_answer`` turns an exception
into status, text, headers and whether to close; ``error_response`` is that answer for
aiohttp's loop and ``render_error`` the same answer as bytes for the fast path, which has
no request object to hand a response to. tests/test_request_paths.py pins that both
paths' answers are the same.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from gateway.boundary import SERVER
from gateway.cors import CorsPolicy
from gateway.errors import GatewayError
from gateway.headers import (
    Forwarded,
    TrustedProxies,
    forwarded_for,
    upstream_request_head,
    valid_host,
)
from gateway.routing import CompiledRoute, RouteTable

if TYPE_CHECKING:
    from gateway.app import Extensions, Rewriter
    from gateway.tracing import RequestTrace

Header = tuple[str, str]
_VARY_ORIGIN: tuple[Header, ...] = (("Vary", "Origin"),)
# The largest request body the lean path holds in memory and forwards in one write; larger
# ones stream on the full path (as nginx buffers small bodies and spools the rest). A
# constant, not a setting: it only picks the path, never changes an answer, and stays below
# aiohttp's read buffer (64 KiB low water, 128 KiB high), so such a body never pauses reading.
LEAN_BODY_MAX = 64 * 1024
# The methods the lean path forwards (with a Content-Length body or none); others, and
# every request the checks in ``ForwardingPolicy.lean`` refuse, take the full path.
_LEAN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"})
# The full path sends ``Content-Length: 0`` for these when they come without a body.
EMPTY_BODY_FRAMING = frozenset({"POST", "PUT", "PATCH"})
# Replayed once on a fresh connection when a pooled one failed before any answer
# (RFC 9110 9.2.2 idempotent methods; never a POST or PATCH).
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_REASONS = {400: b"Bad Request", 401: b"Unauthorized", 404: b"Not Found",
            408: b"Request Timeout", 413: b"Content Too Large", 502: b"Bad Gateway",
            503: b"Service Unavailable", 504: b"Gateway Timeout"}


@dataclass(frozen=True, slots=True)
class ErrorAnswer:
    """The gateway's own answer to an error: short, plain, what happened and never how."""

    status: int
    text: str
    headers: Mapping[str, str] = field(default_factory=dict)
    close: bool = False

    @property
    def body(self) -> bytes:
        return f"{self.status} {self.text}\n".encode()


def error_answer(exc: GatewayError) -> ErrorAnswer:
    return ErrorAnswer(exc.status, exc.public_text(), exc.headers(), exc.close)


def error_response(status: int, text: str, headers: Mapping[str, str] | None = None, *,
                   close: bool = False) -> web.Response:
    """An error answer for aiohttp's loop (the full path and the parser layer)."""
    resp = web.Response(status=status, text=f"{status} {text}\n",
                        headers={"Server": SERVER, **(headers or {})})
    if close:
        resp.force_close()
    return resp


def answer_response(answer: ErrorAnswer) -> web.Response:
    return error_response(answer.status, answer.text, answer.headers, close=answer.close)


def render_error(answer: ErrorAnswer, rid: str, *, minor: int, keep_alive: bool,
                 head_request: bool, date_line: bytes) -> bytes:
    """The same answer as ``error_response`` + the own-page headers (gateway/boundary.py
    ``OwnPages.apply`` for a plain-text body), as bytes: for the fast path."""
    body = answer.body
    head = bytearray(b"HTTP/1.%d %d %s\r\n" % (minor, answer.status,
                                                _REASONS.get(answer.status, b"Error")))
    head += b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n" % len(body)
    head += date_line
    head += b"Server: %s\r\n" % SERVER.encode()
    for name, value in answer.headers.items():
        head += f"{name}: {value}\r\n".encode("latin-1")
    head += b"X-Request-ID: %s\r\nX-Content-Type-Options: nosniff\r\n" % rid.encode()
    if not keep_alive or answer.close:
        head += b"Connection: close\r\n"
    elif minor == 0:
        head += b"Connection: keep-alive\r\n"
    head += b"\r\n"
    return bytes(head) if head_request else bytes(head) + body


def log_error(logger: logging.Logger, route: CompiledRoute | None, rid: str,
              exc: GatewayError, extra: Mapping[str, object] | None = None) -> None:
    """The log line of an error answered to a client, if its kind has one (on the logger of
    the path that met it)."""
    if exc.log_level:
        logger.log(exc.log_level, "%s %s: %s", route.name if route else "gateway", rid, exc,
                extra=extra)


class ForwardingPolicy:
    """What the gateway does with a proxied request; see the module docstring."""

    def __init__(self, *, routes: RouteTable, trusted: TrustedProxies, scheme: str,
                 public_https: bool, cors: CorsPolicy, next_id: Callable[[], str],
                 max_body: int = 0) -> None:
        self.routes = routes
        self.trusted = trusted
        self.scheme = scheme
        self.public_https = public_https
        self.cors = cors
        self.next_id = next_id
        # A body the lean path may take: small, and never one the full path answers 413.
        self.lean_body_max = min(LEAN_BODY_MAX, max_body) if max_body else LEAN_BODY_MAX
        # The gateway's own paths and body rewriters (gateway/app.py sets them with the
        # features): what ``lean`` leaves to the full path.
        self.ext: Extensions | None = None

    def lean(self, method: str, raw_path: str, headers: Mapping[str, str]
             ) -> tuple[CompiledRoute, str, int, Rewriter | None, str] | None:
        """Whether the lean path (gateway/fastpath.py) may forward this request as it is:
        (route, upstream target, body length, the body's rewriter, the checked Host) when
        nothing about it needs the full path's answers, else None.

        The full path takes everything that needs normalising, refusing or answering by the
        gateway (odd paths, an invalid Host, the gateway's own endpoints and client-script
        spellings, redirects, CORS preflights (OPTIONS is not a lean method), ``Expect``,
        upgrades, chunked or large bodies, a body rewrite that must wait for an identity or
        a token). Both paths answer alike (an ``Origin`` gets ``cors_headers`` on either);
        this only picks the cheaper one.
        """
        if method not in _LEAN_METHODS:
            return None
        path, _, query = raw_path.partition("?")
        # Anything unusual in the path is normalised (or refused) by the full path.
        if (not path.startswith("/") or "%" in path or "/." in path or "//" in path
                or "\\" in path or "#" in raw_path):
            return None
        if "Expect" in headers or "Upgrade" in headers or "Transfer-Encoding" in headers:
            return None
        host = headers.get("Host")
        if not host or not valid_host(host):
            return None  # the full path answers 400
        length = 0
        declared = headers.get("Content-Length")
        if declared is not None:
            length = int(declared)  # the parser accepted it: digits only
            if length > self.lean_body_max:
                return None  # streamed, or answered 413, by the full path
        rewriter = None
        ext = self.ext
        if ext is not None:
            if path in ext.endpoints or ext.scripts.refusal(method, path) is not None:
                return None  # the gateway's own answer (an endpoint, or 404/405)
            if method == "POST" and ext.rewriters:
                rewriter = ext.rewriters.get(path)
                if rewriter is not None and (rewriter.now is None or length > rewriter.max_size):
                    return None  # an identity to wait for, or a 400 to answer
        routed = self.route(path, query)
        if routed is None:
            return None
        return routed[0], routed[1], length, rewriter, host

    def client(self, peer: str, headers: Mapping[str, str], host: str,
               xff: Sequence[str]) -> tuple[Forwarded, str, bool]:
        """(what the upstream is told about the client, the request id, visitor on https?).

        ``xff`` is the request's X-Forwarded-For lines (a multidict's ``getall``). Only a
        trusted proxy's X-Forwarded-Proto/Host and X-Request-ID are believed.
        """
        trusted = self.trusted
        if trusted.any:
            fwd = forwarded_for(peer, xff, trusted, self.scheme, host,
                                headers.get("X-Forwarded-Proto"),
                                headers.get("X-Forwarded-Host"))
            rid = headers.get("X-Request-ID") if trusted.contains(peer) else None
        else:
            # The usual deployment: nothing in the request is believed, nothing to look up.
            fwd = forwarded_for(peer, xff, trusted, self.scheme, host, None, None)
            rid = None
        if not rid or len(rid) > 128 or not rid.isascii() or not rid.isprintable():
            rid = self.next_id()
        return fwd, rid, self.public_https or fwd.proto.lower() == "https"

    def cors_headers(self, origin: str | None) -> list[Header] | None:
        """The CORS headers an actual (non-preflight) answer gets for ``origin``."""
        if origin and self.cors.enabled:
            return self.cors.actual(origin)
        return None

    def proxied_extras(self, cors: Sequence[Header] | None) -> Sequence[Header]:
        """Extra headers of a proxied answer: with CORS on, it depends on Origin even when
        the request had none, so a shared cache must key it on Origin."""
        if not self.cors.enabled:
            return cors or ()
        return (*(cors or ()), *_VARY_ORIGIN)

    def route(self, path: str, query: str) -> tuple[CompiledRoute, str] | None:
        """The route for a normalised path and the upstream target it maps to; None also
        for `/prefix` of a `/prefix/` route, which is answered with a redirect, never proxied
        (as nginx does, even when a shorter route such as the site's `/` matches it)."""
        if self.routes.redirect_for(path) is not None:
            return None
        route = self.routes.match(path)
        if route is None:
            return None
        return route, route.target(path, query)

    @staticmethod
    def upstream_head(route: CompiledRoute, method: str, target: str,
                      raw: Sequence[tuple[bytes, bytes]], client_host: str, fwd: Forwarded,
                      rid: str | None, connection: Sequence[str] | None, *,
                      framing: Sequence[tuple[bytes, bytes]] = (), body_type: str | None = None,
                      upgrade: bool = False, trace: RequestTrace | None = None) -> bytearray:
        """The request head the upstream gets, blank line included (the route's trust
        boundary drops what a third party must not see)."""
        host = client_host if route.preserve_host else route.upstream.host_header
        head = upstream_request_head(method, target, raw, host, fwd, rid, framing,
                                     upgrade=upgrade,
                                     new_content_type=body_type.encode() if body_type else None,
                                     connection=connection, policy=route.policy,
                                     trace=trace)
        head += b"\r\n"
        return head
