"""OpenTelemetry traces: a server span per request, a client span per upstream exchange.

Off unless the config has a ``tracing:`` section; then ``Gateway.tracing`` is a ``Tracing``
and each request carries a ``RequestTrace`` on its ``Exchange`` (``ex.trace``), made when the
request starts, from both request paths:

- the W3C trace context (``traceparent``/``tracestate``) is taken only from a trusted proxy
  (``trusted_proxies``); anyone else's is ignored and the request starts a new trace, so an
  internet client can neither join a trace of the site's nor choose what gets sampled;
- the client span starts when the upstream request head is built, and its context replaces
  whatever trace context the client sent (``headers.upstream_request_head``);
- both spans end in ``Gateway.finished`` (where the access line is written), with explicit
  start and end times, and carry the stable HTTP semantic-convention attributes.

Spans go through the SDK's batch processor (its own thread) to the OTLP/HTTP exporter, so
an unreachable collector costs dropped spans, never a slow request. Config beats the
standard ``OTEL_*`` variables where both say something (endpoint, sampler ratio, service
name); the rest (headers, timeout, compression, certificates, resource attributes, batch
sizes) come from the environment as the SDK reads it. The context is W3C trace context
only: ``OTEL_PROPAGATORS`` is not consulted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING, TypeVar

from opentelemetry import trace as otel
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway import __version__
from gateway.accesslog import split_host
from gateway.logs import CURRENT_TRACE

if TYPE_CHECKING:
    from gateway.config import Tracing as TracingConfig
    from gateway.headers import TrustedProxies
    from gateway.proxy import Exchange
    from gateway.routing import CompiledRoute

log = logging.getLogger("gateway.tracing")
T = TypeVar("T")

# RFC 9110's methods plus PATCH: anything else is "_OTHER" (the semantic conventions' rule,
# which also keeps a client from minting span names).
_KNOWN_METHODS = frozenset({"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST",
                            "PUT", "TRACE"})


class RequestTrace:
    """The spans of one request, from its start to ``Gateway.finished``."""

    __slots__ = ("_tracing", "client", "ended", "lines", "server")

    def __init__(self, tracing: Tracing, server: otel.Span) -> None:
        self._tracing = tracing
        self.server = server
        self.client: otel.Span | None = None
        self.lines = b""
        self.ended = False

    def ids(self) -> tuple[str, str] | None:
        """(trace id, server span id) in hex, for log lines; None if nothing is traced."""
        ctx = self.server.get_span_context()
        if not ctx.is_valid:
            return None
        return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"

    async def within(self, coro: Awaitable[T]) -> T:
        """Await ``coro`` with this request current, so log lines about it carry its ids."""
        token = CURRENT_TRACE.set(self)
        try:
            return await coro
        finally:
            CURRENT_TRACE.reset(token)

    def upstream_lines(self) -> bytes:
        """Header lines carrying the client span's context upstream (starts that span).

        Called where the upstream request head is built; a retry reuses the head, so the
        one client span covers every attempt (``http.request.resend_count`` says so).
        """
        if self.client is None:
            tracing = self._tracing
            self.client = tracing.tracer.start_span(
                "HTTP", context=otel.set_span_in_context(self.server, Context()),
                kind=SpanKind.CLIENT, start_time=time.time_ns())
            carrier: dict[str, str] = {}
            tracing.propagator.inject(carrier, context=otel.set_span_in_context(self.client))
            self.lines = "".join(f"{k}: {v}\r\n" for k, v in carrier.items()).encode("latin-1")
        return self.lines

    def end(self, *, method: str, path: str, scheme: str, minor: int, status: int,
            route: CompiledRoute | None, ex: Exchange, client_ip: str, host: str | None,
            user_agent: str | None) -> None:
        now = time.time_ns()
        self.ended = True
        known = method in _KNOWN_METHODS
        attr_method = method if known else "_OTHER"
        server = self.server
        if server.is_recording():
            attrs: dict[str, str | int] = {
                "http.request.method": attr_method,
                "url.path": path,
                "url.scheme": scheme,
                "network.protocol.version": f"1.{minor}",
                "client.address": client_ip,
                "http.response.status_code": status,
            }
            if not known:
                attrs["http.request.method_original"] = method
            if host:
                name, port = split_host(host)
                attrs["server.address"] = name
                if port is not None:
                    attrs["server.port"] = port
            if user_agent:
                attrs["user_agent.original"] = user_agent
            if route is not None:
                attrs["http.route"] = route.name
            if status >= 500:
                attrs["error.type"] = str(status)
                server.set_status(Status(StatusCode.ERROR))
            server.set_attributes(attrs)
            server.update_name(f"{attr_method} {route.name}" if route is not None
                               else attr_method)
            server.end(end_time=now)
        client = self.client
        if client is not None and client.is_recording() and route is not None:
            up = route.upstream
            shown = f"[{up.host}]" if ":" in up.host else up.host
            cattrs: dict[str, str | int] = {
                "http.request.method": attr_method,
                "server.address": up.host,
                "server.port": up.port,
                # The query stays out, as in the access log: integrators put tokens there.
                "url.full": f"{up.scheme}://{shown}:{up.port}{route.target(path, '')}",
                "network.protocol.version": "1.1",
            }
            if ex.retried:
                cattrs["http.request.resend_count"] = 1
            if ex.upstream_status:
                cattrs["http.response.status_code"] = ex.upstream_status
                if ex.upstream_status >= 500:
                    cattrs["error.type"] = str(ex.upstream_status)
                    client.set_status(Status(StatusCode.ERROR))
            elif ex.error:
                # No answer: timed out, refused, broken off, or the client left first.
                cattrs["error.type"] = "timeout" if status == 504 else (
                    "cancelled" if status == 499 else "connection")
                client.set_status(Status(StatusCode.ERROR))
            client.set_attributes(cattrs)
            client.update_name(attr_method)
            client.end(end_time=now)


class Tracing:
    """One per Gateway (rebuilt on reload): the provider, its exporter and the sampler."""

    def __init__(self, cfg: TracingConfig, trusted: TrustedProxies) -> None:
        self._trusted = trusted
        attrs: dict[str, str] = {SERVICE_VERSION: __version__}
        if cfg.service_name:
            attrs[SERVICE_NAME] = cfg.service_name
        resource = Resource.create(attrs)  # OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: "cec-gateway"}))
        sampler: Sampler | None = None
        if cfg.sampler_ratio is not None:
            # A trusted proxy's sampling decision stands; new traces are sampled at the ratio.
            sampler = ParentBased(TraceIdRatioBased(cfg.sampler_ratio))
        self.provider = TracerProvider(resource=resource, sampler=sampler)
        exporter = OTLPSpanExporter(endpoint=cfg.endpoint.rstrip("/") + "/v1/traces")
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("gateway", __version__)
        self.propagator = TraceContextTextMapPropagator()

    def begin(self, headers: Mapping[str, str], peer: str) -> RequestTrace:
        """The server span of a request that starts now (``peer``: the TCP peer's address)."""
        ctx = Context()
        if "traceparent" in headers and self._trusted.contains(peer):
            ctx = self.propagator.extract(headers)
        span = self.tracer.start_span("HTTP", context=ctx, kind=SpanKind.SERVER,
                                      start_time=time.time_ns())
        return RequestTrace(self, span)

    def flush(self, timeout: float = 5.0) -> bool:
        return self.provider.force_flush(int(timeout * 1000))

    async def close(self) -> None:
        # Shutting down flushes the last batch over HTTP: not on the event loop.
        await asyncio.get_running_loop().run_in_executor(None, self.provider.shutdown)
