"""The request dispatcher: client address, CORS, the gateway's own endpoints, then a route."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web
from yarl import URL

from gateway.accesslog import AccessLog, clean_host, clean_user_agent
from gateway.boundary import ClientScripts, OwnPages, compile_policies
from gateway.config import POOL_KEYS, Config
from gateway.cors import CorsPolicy
from gateway.errors import (
    BadRequest,
    ClientBodyTimeout,
    GatewayError,
    MethodNotAllowed,
    MovedPermanently,
    NotFound,
    RetryWithCookie,
)
from gateway.headers import Forwarded, TrustedProxies, valid_host
from gateway.keys import CLIENT_IP, REQUEST_ID
from gateway.metrics import Metrics
from gateway.policy import (
    ForwardingPolicy,
    answer_response,
    error_answer,
    error_response,
    log_error,
)
from gateway.proxy import (
    Exchange,
    Proxy,
    ProxySettings,
    Sent,
    response_header_bytes,
)
from gateway.routing import CompiledRoute, RouteTable, compile_route, normalize_path
from gateway.upstream import PoolLimits, UpstreamPool
from gateway.websocket import Splice, splice

if TYPE_CHECKING:
    from gateway.tracing import Tracing

log = logging.getLogger("gateway.app")

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
# Rewrites a request body before it is forwarded (the chat injection); returns the new
# body and extra response headers (e.g. the guest cookie).
BodyRewriter = Callable[[web.BaseRequest, bytes], Awaitable[tuple[bytes, list[tuple[str, str]]]]]
# (the request's headers, body) -> the same, synchronously.
SyncBodyRewriter = Callable[[Mapping[str, str], bytes], tuple[bytes, list[tuple[str, str]]]]



# RFC 9112 3.2.2's absolute-form: "http" or "https", an authority of a host name, IPv4 or
# bracketed IPv6 literal and an optional port (no userinfo: RFC 9110 4.2.4), then the path.
_ABSOLUTE = re.compile(
    r"^[Hh][Tt][Tt][Pp][Ss]?://"
    r"((?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}"
    r"[A-Za-z0-9])?\.?|\[[0-9A-Fa-f:.]{2,45}\])(:[0-9]{1,5})?([/?].*)?$", re.DOTALL)


def origin_form(target: str) -> tuple[str, str] | None:
    """An absolute-form target as (authority, origin-form target), or None if it is not one.

    A server MUST accept the absolute form (RFC 9112 3.2.2); as nginx does, its authority
    replaces Host and the path is routed like any other: this is not a forward proxy.
    """
    m = _ABSOLUTE.match(target)
    if m is None:
        return None
    host, port, rest = m.group(1), m.group(2) or "", m.group(3) or ""
    if port and not 0 < int(port[1:]) < 65536:
        return None
    if rest.startswith("?"):
        rest = "/" + rest
    return host + port, rest or "/"


@dataclass(frozen=True)
class Rewriter:
    """A POST body rewritten before forwarding (the chat injection)."""

    max_size: int
    rewrite: BodyRewriter
    content_type: str  # the rewritten body's type, replacing the page's
    signs: bool = False  # each rewrite makes an auth-v2 signature (counted in the metrics)
    # The same rewrite when it needs no I/O (guests from the signed cookie): what ``rewrite``
    # itself runs then, callable without a request object, so the lean path can take it.
    now: SyncBodyRewriter | None = None


@dataclass
class Extensions:
    """What the chat, token and sandbox features plug into the request path."""

    endpoints: dict[str, Handler] = field(default_factory=dict)
    # (path, max body) -> rewriter, applied to POSTs on the proxy path
    rewriters: dict[str, Rewriter] = field(default_factory=dict)
    # The CEC's client-script paths: only an exact POST (rewritten) reaches them.
    scripts: ClientScripts = field(default_factory=lambda: ClientScripts(()))


def pool_limits(config: Config) -> dict[tuple[str, int, bool], PoolLimits]:
    """Each upstream's pool limits, from the routes to it (config.py checks that they agree)."""
    found: dict[tuple[str, int, bool], dict[str, Any]] = {}
    for route in config.routes:
        values = found.setdefault(route.upstream_key, {})
        for key in POOL_KEYS:
            value = getattr(route, key)
            if value is not None:
                values[key] = value
    return {key: PoolLimits(**values) for key, values in found.items()}


class RequestIds:
    """Unique request ids without a uuid4 per request: a random process prefix and a counter."""

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(6)
        self._n = 0

    def next(self) -> str:
        self._n += 1
        return f"{self._prefix}{self._n:010x}"

    def remake(self) -> None:
        """A new object for the counter (see ``Metrics.remake``)."""
        self._n += 0


class Gateway:
    """Runtime state built once from a Config; ``handle`` is the per-request entry point."""

    def __init__(self, config: Config, *, pool: UpstreamPool | None = None,
                 extensions: Extensions | None = None, metrics: Metrics | None = None) -> None:
        self.config = config
        self.scheme = "https" if config.listen.tls else "http"
        # Visitors use https also when TLS ends at a load balancer (public_url says so).
        self.public_https = (config.public_url or "").startswith("https://")
        self.metrics = metrics or Metrics()
        refused = self.metrics.cookies_refused
        self.routes = RouteTable(compile_policies(config, [
            compile_route(r.prefix, r.upstream, preserve_host=r.preserve_host,
                          ca_file=r.ca_file, websocket=r.websocket)
            for r in config.routes
        ], lambda route: refused.labels(route).inc()))
        self.own_pages = OwnPages.build(config.trust.frame_ancestors, config.trust.page_csp)
        self.trusted = TrustedProxies(config.trusted_proxies)
        self.cors = CorsPolicy(config.cors)
        read = config.timeouts.read
        self.pool = pool or UpstreamPool(connect_timeout=config.timeouts.connect,
                                         tick=min(1.0, max(0.05, read / 5)) if read else 1.0,
                                         max_header_size=config.limits.max_upstream_header_size)
        for key, limits in pool_limits(config).items():
            self.pool.configure(key, limits)
        self.proxy = Proxy(self.pool, ProxySettings(
            read_timeout=config.timeouts.read,
            client_body_timeout=config.timeouts.client_body,
            max_body=config.limits.client_max_body_size,
            send_timeout=config.timeouts.send,
        ))
        self.access = AccessLog(enabled=config.access_log, tls=config.listen.tls is not None)
        self.ws_idle = config.timeouts.websocket_idle
        self.metrics_hook: Callable[[str, str], None] = self.metrics.token_event
        # Token store/guard pings for the health monitor, and the guard's unlock (set by
        # features): diagnostics and operations only, never part of readiness.
        self.store_checks: list[Callable[[], Awaitable[None]]] = []
        self.unlock: Callable[[str, str], Awaitable[bool]] | None = None
        self.splices: set[Splice] = set()
        self.ids = RequestIds()
        self.policy = ForwardingPolicy(routes=self.routes, trusted=self.trusted,
                                       scheme=self.scheme, public_https=self.public_https,
                                       cors=self.cors, next_id=self.ids.next,
                                       max_body=config.limits.client_max_body_size)
        self.ext = extensions or Extensions()
        self.tracing: Tracing | None = None
        if config.tracing is not None:  # the SDK is imported only when it is used
            from gateway.tracing import Tracing

            self.tracing = Tracing(config.tracing, self.trusted)

    @property
    def ext(self) -> Extensions:
        return self._ext

    @ext.setter
    def ext(self, ext: Extensions) -> None:
        # The policy decides what reaches the gateway's own endpoints and rewriters.
        self._ext = ext
        self.policy.ext = ext

    def finished(self, client_ip: str, rid: str, method: str, raw_path: str, minor: int,
                 status: int, route: CompiledRoute | None, ex: Exchange, duration: float,
                 end: float | None = None) -> None:
        """Every request ends here, from either path: one access-log line, the metrics.
        ``end``: the ``time.perf_counter()`` value the duration was taken at."""
        if ex.trace is not None:
            self._end_trace(method, raw_path, minor, status, route, ex, client_ip)
        access = self.access
        if access.enabled:
            access.log_exchange(client_ip, rid, method, raw_path, minor, status, route, ex,
                                duration, end)
        upstream_error = None
        if ex.error and not ex.upstream_status:
            upstream_error = "timeout" if status == 504 else "error" if status == 502 else None
        self.metrics.observe(route.name if route else "gateway", method, status, duration,
                             upstream_error)

    def rejected(self, client_ip: str, rid: str, method: str, raw_path: str, status: int,
                 reason: str, bytes_out: int, duration: float) -> None:
        """A request the parser layer refused: its access-log line and metrics."""
        ex = Exchange()
        ex.error = reason
        ex.bytes_out = bytes_out
        self.metrics.rejected.labels(str(status), reason).inc()
        self.finished(client_ip, rid, method, raw_path, 1, status, None, ex, duration)

    def _end_trace(self, method: str, raw_path: str, minor: int, status: int,
                   route: CompiledRoute | None, ex: Exchange, client_ip: str) -> None:
        assert ex.trace is not None
        headers = ex.headers or {}
        ex.trace.end(method=method, path=raw_path.partition("?")[0], scheme=self.scheme,
                     minor=minor, status=status, route=route, ex=ex, client_ip=client_ip,
                     host=clean_host(headers.get("Host")),
                     user_agent=clean_user_agent(headers.get("User-Agent")))

    def going_away(self) -> None:
        """Shutdown: tell every spliced WebSocket the server is going away (1001)."""
        for link in list(self.splices):
            link.going_away()

    async def close(self) -> None:
        await self.pool.close()
        if self.tracing is not None:
            await self.tracing.close()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        # Durations from perf_counter: uvloop's loop clock ticks in whole milliseconds.
        start = time.perf_counter()
        if not request.raw_path.startswith("/") and request.method != "CONNECT":
            absolute = origin_form(request.raw_path)
            if absolute is not None:
                request = request.clone(rel_url=URL(absolute[1], encoded=True),
                                        host=absolute[0])
        ex = Exchange(headers=request.headers, transport=request.transport)
        route: CompiledRoute | None = None
        resp: web.StreamResponse | None = None
        status_override = 499  # nginx's "client closed request" when nothing was answered
        headers = request.headers
        peer = request.remote or ""
        if self.tracing is not None:
            ex.trace = self.tracing.begin(headers, peer)
        fwd, rid, ex.https = self.policy.client(peer, headers, request.host,
                                                headers.getall("X-Forwarded-For", ()))
        request[CLIENT_IP] = fwd.client_ip
        request[REQUEST_ID] = rid
        ex.extra_response_headers.append(("X-Request-ID", rid))
        try:
            if ex.trace is None:
                resp, route = await self._dispatch(request, fwd, rid, ex)
                return resp
            # The request's span is current for every log line it causes.
            answer = await ex.trace.within(self._dispatch(request, fwd, rid, ex))
            resp, route = answer
            return answer[0]
        except asyncio.CancelledError:
            if ex.upstream_status == 101:
                # A spliced WebSocket ends by closing the client side, which cancels us.
                status_override = 101
            else:
                ex.error = "client went away"
            raise
        finally:
            if resp is not None and not resp.prepared:
                # The gateway's own answer (page, script, endpoint or error).
                resp.headers["X-Request-ID"] = rid
                self.own_pages.apply(resp)
            status = resp.status if resp is not None else status_override
            route = route or ex.route
            if not ex.upstream_status:
                ex.bytes_in = request.content.total_bytes
                if isinstance(resp, web.Response):
                    body = resp.body
                    ex.bytes_out = len(body) if isinstance(body, bytes | bytearray) else 0
            end = time.perf_counter()
            self.finished(fwd.client_ip, rid, request.method, request.raw_path,
                          request.version.minor, status, route, ex, end - start, end)

    async def _dispatch(self, request: web.BaseRequest, fwd: Forwarded, rid: str, ex: Exchange
                        ) -> tuple[web.StreamResponse, CompiledRoute | None]:
        method = request.method
        raw_target = request.raw_path
        if method == "CONNECT" or not raw_target.startswith("/"):
            # Authority- and asterisk-form, and absolute forms that are not http(s) to a
            # plain host (``handle`` turned the others into origin form): not a forward proxy.
            return self._refuse(ex, "bad_target",
                                "Bad Request: only origin-form targets are served"), None
        if request.version < (1, 1) and "Transfer-Encoding" in request.headers:
            # RFC 9112 6.1: chunked framing in HTTP/1.0 is faulty; never keep reading after it.
            return self._close_after(self._refuse(
                ex, "bad_framing", "Bad Request: Transfer-Encoding in HTTP/1.0")), None
        hosts = request.headers.getall("Host", ())
        if len(hosts) > 1 or (hosts and not valid_host(hosts[0])):
            return self._refuse(ex, "bad_host", "Bad Request: invalid Host header"), None
        # A fragment never belongs on the wire (RFC 9110 4.2.4); some clients send one.
        path, _, query = raw_target.partition("#")[0].partition("?")
        try:
            path = normalize_path(path)
        except BadRequest as exc:
            return self._refuse(ex, "bad_path", f"Bad Request: {exc}"), None

        origin = request.headers.get("Origin")
        cors_headers = None
        if origin and self.cors.enabled:
            if method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
                asked = request.headers.get("Access-Control-Request-Headers")
                pre = self.cors.preflight(origin, asked)
                answer = web.Response(status=204 if pre else 403)
                if pre:
                    answer.headers.extend(pre)
                answer.headers["Vary"] = "Origin"
                return answer, None
            cors_headers = self.policy.cors_headers(origin)

        handler = self.ext.endpoints.get(path)
        if handler is not None:
            resp = await handler(request)
            if cors_headers and not resp.prepared:
                resp.headers.extend(cors_headers)
            return resp, None

        if self.ext.scripts:
            refused = self.ext.scripts.refusal(method, path)
            if refused == 404:
                return answer_response(error_answer(NotFound("client script"))), None
            if refused == 405:
                return answer_response(error_answer(MethodNotAllowed("POST"))), None

        # `location /prefix/` answers `/prefix` with a redirect even when a shorter route
        # (the site's `/`) matches it, as nginx does.
        redirect = self.routes.redirect_for(path)
        if redirect is not None:
            location = redirect + ("?" + query if query else "")
            return answer_response(error_answer(MovedPermanently(location))), None
        routed = self.policy.route(path, query)
        if routed is None:
            return answer_response(error_answer(NotFound())), None
        route, target = routed
        ex.route = route
        extras = self.policy.proxied_extras(cors_headers)
        try:
            if request.headers.get("Upgrade", "").lower() == "websocket" and route.websocket:
                return await self._websocket(request, route, target, fwd, rid, ex), route
            body: bytes | None = None
            body_type: str | None = None
            if method == "POST":
                # Other spellings of a rewritten path were refused above (ext.scripts).
                rw = self.ext.rewriters.get(path)
                if rw is not None:
                    body, extra = await self._rewrite(request, rw)
                    if rw.signs:
                        self.metrics.signatures += 1
                    body_type = rw.content_type
                    ex.extra_response_headers.extend(extra)
            resp = await self.proxy.forward(request, route, target, fwd, rid, ex, body=body,
                                            body_type=body_type, cors=extras)
            return resp, route
        except TimeoutError:
            # Only the client's body has a deadline here (the upstream's raise UpstreamTimeout).
            return self._error(ClientBodyTimeout("client body timeout"), route, rid, ex), route
        except GatewayError as exc:
            if isinstance(exc, RetryWithCookie):
                exc.location = raw_target
            return self._error(exc, route, rid, ex), route

    @staticmethod
    def _error(exc: GatewayError, route: CompiledRoute, rid: str, ex: Exchange) -> web.Response:
        ex.error = exc.error_field()
        log_error(log, route, rid, exc)
        return answer_response(error_answer(exc))

    def _refuse(self, ex: Exchange, reason: str, text: str) -> web.Response:
        """A 400 for the request line, counted with the parser layer's refusals."""
        ex.error = reason
        self.metrics.rejected.labels("400", reason).inc()
        return error_response(400, text)

    @staticmethod
    def _close_after(resp: web.StreamResponse) -> web.StreamResponse:
        # The rest of an unread body is still on the wire; don't parse it as a request.
        resp.force_close()
        return resp

    async def _rewrite(self, request: web.BaseRequest, rw: Rewriter
                       ) -> tuple[bytes, list[tuple[str, str]]]:
        limit = rw.max_size
        length = request.content_length
        if length is not None and length > limit:
            raise BadRequest(f"JSON body is over {limit} bytes")
        content = request.content
        if content.is_eof():
            # The usual case: a small JSON body that came with the head.
            body = content.read_nowait(-1)
            if len(body) > limit:
                raise BadRequest(f"JSON body is over {limit} bytes")
            return await rw.rewrite(request, body)
        data = bytearray()
        async with asyncio.timeout(self.config.timeouts.client_body or None):
            while True:
                chunk = await request.content.readany()
                if not chunk:
                    break
                data += chunk
                if len(data) > limit:
                    raise BadRequest(f"JSON body is over {limit} bytes")
        return await rw.rewrite(request, bytes(data))

    async def _websocket(self, request: web.BaseRequest, route: CompiledRoute, target: str,
                         fwd: Forwarded, rid: str, ex: Exchange) -> web.StreamResponse:
        request_head = self.policy.upstream_head(route, "GET", target, request.raw_headers,
                                                 request.host, fwd, rid, None, upgrade=True,
                                                 trace=ex.trace)
        conn = await self.pool.acquire(route.upstream, fresh=True)
        fut = conn.start(bytes(request_head), method="GET",
                         read_timeout=self.config.timeouts.read, upgrade=True)
        conn.arm_read_timeout()
        try:
            message, payload = await fut
        except BaseException:
            conn.abort()
            raise
        if message.code != 101:
            # Refused upgrade: an ordinary response.
            return await self.proxy._respond(request, route, conn, message, payload, None, ex, None)
        ex.upstream_status = 101
        conn.finish_for_tunnel()
        head = (b"HTTP/1.1 101 Switching Protocols\r\n"
                + response_header_bytes(message.raw_headers, route,
                                        message.headers.getall("Connection", ()), ex.https)
                + b"Upgrade: " + message.headers.get("Upgrade", "websocket").encode("latin-1")
                + b"\r\nConnection: Upgrade\r\nX-Request-ID: " + rid.encode() + b"\r\n\r\n")
        self.metrics.websockets.inc()
        try:
            await splice(request, conn, head, self.ws_idle, self.splices, ex)
        finally:
            self.metrics.websockets.dec()
        return Sent(101, keep_alive=False)  # type: ignore[return-value]
