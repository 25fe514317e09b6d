"""OpenTelemetry traces, received as real OTLP/HTTP exports on a loopback collector.

The collector is a small aiohttp server decoding the protobuf with ``opentelemetry-proto``;
the gateway's batch processor is flushed (``Tracing.flush``) before spans are looked at, so
nothing waits on a timer. Requests go through both request paths: GETs on a kept-alive
connection (the fast path once a pooled upstream connection is idle) and a POST (the full
path).
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from gateway.fastpath import FastRequestHandler
from gateway.logs import EcsFormatter
from gateway.runtime import Running
from tests.gwhelpers import Echo, GatewayFactory, free_port
from tests.lifecycle_helpers import KeepAlive, start_gateway_proc, wait_for

SERVER, CLIENT = 2, 3  # opentelemetry.proto.trace.v1.Span.SpanKind
STATUS_ERROR = 2
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


@dataclass
class Span:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: int
    attrs: dict[str, Any]
    status: int
    start: int
    end: int
    resource: dict[str, Any]


@dataclass
class Collector:
    url: str = ""
    spans: list[Span] = field(default_factory=list)
    content_types: set[str] = field(default_factory=set)
    tokens: set[str | None] = field(default_factory=set)  # X-Collector-Token of each export

    def by_kind(self, kind: int) -> list[Span]:
        return [s for s in self.spans if s.kind == kind]


COLLECTOR = web.AppKey("collector", Collector)


async def _receive(request: web.Request) -> web.Response:
    collector = request.app[COLLECTOR]
    body = await request.read()
    if request.headers.get("Content-Encoding") == "gzip":
        body = gzip.decompress(body)
    collector.content_types.add(request.content_type)
    collector.tokens.add(request.headers.get("X-Collector-Token"))
    export = ExportTraceServiceRequest.FromString(body)
    for rs in export.resource_spans:
        resource = {a.key: _value(a.value) for a in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                collector.spans.append(Span(
                    s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.name, s.kind,
                    {a.key: _value(a.value) for a in s.attributes}, s.status.code,
                    s.start_time_unix_nano, s.end_time_unix_nano, resource))
    return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                        content_type="application/x-protobuf")


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    found = Collector()
    app = web.Application()
    app[COLLECTOR] = found
    app.router.add_post("/v1/traces", _receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    found.url = f"http://127.0.0.1:{port}"
    try:
        yield found
    finally:
        await runner.cleanup()


@pytest.fixture
def fast_path_spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    calls: list[tuple[str, bool]] = []
    original = FastRequestHandler._try_inline

    def spy(self: FastRequestHandler, msg: Any, payload: Any) -> bool:
        taken = original(self, msg, payload)
        calls.append((getattr(msg, "path", "?"), taken))
        return taken

    monkeypatch.setattr(FastRequestHandler, "_try_inline", spy)
    return calls


@pytest.fixture
def access_records(caplog: pytest.LogCaptureFixture) -> Callable[[], list[dict[str, Any]]]:
    caplog.set_level(logging.INFO, logger="gateway.access")

    def get() -> list[dict[str, Any]]:
        return [r.access for r in caplog.records  # type: ignore[attr-defined]
                if r.name == "gateway.access"]

    return get


def tracing_config(collector: Collector, extra: str = "", ratio: float = 1.0,
                   routes: str = "") -> str:
    return f"""
routes:
  - prefix: /app/
    upstream: ${{ECHO}}/up/
{routes}
tracing: {{endpoint: "{collector.url}/", sampler_ratio: {ratio}, service_name: gw-under-test}}
{extra}
"""


async def flush(gw: Running) -> None:
    tracing = gw.gateway.tracing
    assert tracing is not None
    assert await asyncio.get_running_loop().run_in_executor(None, tracing.flush)


def traceparent(value: str | None) -> tuple[str, str, bool]:
    """(trace id, parent span id, sampled?) of a W3C traceparent header."""
    assert value is not None
    version, trace_id, span_id, flags = value.split("-")
    assert version == "00"
    return trace_id, span_id, bool(int(flags, 16) & 1)


async def test_spans_on_both_paths_with_links_attributes_and_log_ids(
        gateway: GatewayFactory, echo: Echo, collector: Collector,
        fast_path_spy: list[tuple[str, bool]],
        access_records: Callable[[], list[dict[str, Any]]]) -> None:
    gw = await gateway(tracing_config(collector))
    sent = f"traceparent: 00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    conn = await KeepAlive.open(gw.port)
    try:
        # The client is not a trusted proxy: its trace context is ignored.
        gets = [await conn.request("GET", f"/app/g{i}?token=SECRET", sent,
                                   "User-Agent: probe/1.0") for i in range(3)]
        post = await conn.request("POST", "/app/p", sent, body=b"x" * 10)
    finally:
        await conn.close()
    assert [a.status for a in [*gets, post]] == [200] * 4
    assert any(taken for path, taken in fast_path_spy if path.startswith("/app/g")), \
        fast_path_spy
    await flush(gw)

    servers, clients = collector.by_kind(SERVER), collector.by_kind(CLIENT)
    assert len(servers) == 4 and len(clients) == 4, collector.spans
    assert collector.content_types == {"application/x-protobuf"}
    upstream_contexts = [traceparent(s.header("traceparent")) for s in echo.seen]
    assert all(len(s.all("traceparent")) == 1 for s in echo.seen)
    for server, client, (up_trace, up_span, flags), answer in zip(
            servers, clients, upstream_contexts, [*gets, post], strict=True):
        # A new trace per request, not the client's.
        assert server.trace_id != CLIENT_TRACE and server.parent_id == ""
        assert client.trace_id == server.trace_id and client.parent_id == server.span_id
        # The upstream's parent is the client span.
        assert (up_trace, up_span, flags) == (server.trace_id, client.span_id, True)
        assert server.start <= client.start <= client.end <= server.end
        assert server.resource["service.name"] == "gw-under-test"
        assert server.resource["service.version"]
        assert client.name in ("GET", "POST")
        assert server.name == f"{client.name} /app/"
        assert server.attrs["http.request.method"] == client.name
        assert server.attrs["http.response.status_code"] == answer.status == 200
        assert server.attrs["http.route"] == "/app/"
        assert server.attrs["url.scheme"] == "http"
        assert server.attrs["network.protocol.version"] == "1.1"
        assert server.attrs["client.address"] == "127.0.0.1"
        assert server.attrs["server.address"] == "gw.test"
        assert client.attrs["server.address"] == "127.0.0.1"
        assert client.attrs["server.port"] == echo.port
        assert client.attrs["http.response.status_code"] == 200
        assert client.attrs["url.full"].startswith(f"http://127.0.0.1:{echo.port}/up/")
        assert server.status != STATUS_ERROR and client.status != STATUS_ERROR
    assert [s.attrs["url.path"] for s in servers] == ["/app/g0", "/app/g1", "/app/g2", "/app/p"]
    assert servers[0].attrs["user_agent.original"] == "probe/1.0"
    assert "SECRET" not in json.dumps([s.attrs for s in collector.spans])

    # Every access line names its trace and server span.
    records = access_records()
    assert [(r["trace"]["id"], r["span"]["id"]) for r in records] == [
        (s.trace_id, s.span_id) for s in servers]


async def test_trace_context_adopted_from_a_trusted_proxy(
        gateway: GatewayFactory, echo: Echo, collector: Collector) -> None:
    gw = await gateway(tracing_config(collector, "trusted_proxies: [127.0.0.1/32]\n"))
    conn = await KeepAlive.open(gw.port)
    try:
        for path in ("/app/a", "/app/b"):
            answer = await conn.request("GET", path,
                                        f"traceparent: 00-{CLIENT_TRACE}-{CLIENT_SPAN}-01",
                                        "tracestate: vendor=opaque")
            assert answer.status == 200
        # A malformed traceparent starts a new trace, even from a trusted proxy.
        assert (await conn.request("GET", "/app/c", "traceparent: 00-zz-yy-01")).status == 200
    finally:
        await conn.close()
    await flush(gw)
    servers, clients = collector.by_kind(SERVER), collector.by_kind(CLIENT)
    assert len(servers) == 3 and len(clients) == 3
    for server, client, seen in zip(servers[:2], clients, echo.seen, strict=False):
        assert server.trace_id == CLIENT_TRACE and server.parent_id == CLIENT_SPAN
        assert traceparent(seen.header("traceparent")) == (CLIENT_TRACE, client.span_id, True)
        assert seen.all("tracestate") == ["vendor=opaque"]
    assert servers[2].trace_id != CLIENT_TRACE and servers[2].parent_id == ""
    assert traceparent(echo.seen[2].header("traceparent"))[0] == servers[2].trace_id


async def test_failed_upstream_marks_both_spans(gateway: GatewayFactory, collector: Collector,
                                                caplog: pytest.LogCaptureFixture) -> None:
    dead = free_port()
    gw = await gateway(tracing_config(collector, routes=f"""
  - prefix: /dead/
    upstream: http://127.0.0.1:{dead}/
"""))
    # The JSON log as `--log-format json` writes it (formatted when the line is logged).
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(EcsFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    caplog.set_level(logging.WARNING)
    conn = await KeepAlive.open(gw.port)
    try:
        assert (await conn.request("GET", "/dead/x")).status == 502
        assert (await conn.request("POST", "/dead/y", body=b"1")).status == 502
        assert (await conn.request("GET", "/nowhere")).status == 404
    finally:
        await conn.close()
        root.removeHandler(handler)
    await flush(gw)
    servers, clients = collector.by_kind(SERVER), collector.by_kind(CLIENT)
    assert [s.attrs["http.response.status_code"] for s in servers] == [502, 502, 404]
    assert [s.status for s in servers[:2]] == [STATUS_ERROR] * 2
    assert servers[2].status != STATUS_ERROR and "http.route" not in servers[2].attrs
    assert servers[2].name == "GET"
    assert [c.attrs.get("error.type") for c in clients] == ["connection", "connection"]
    assert [c.parent_id for c in clients] == [s.span_id for s in servers[:2]]
    # The warning about each failure carries the ids of the request's span.
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    warned = [r for r in lines if r["log"]["logger"] != "gateway.access"
              and str(dead) in r["message"]]
    assert len(warned) >= 2, lines
    ids = {(r.get("trace", {}).get("id"), r.get("span", {}).get("id")) for r in warned}
    assert ids == {(s.trace_id, s.span_id) for s in servers[:2]}, ids


async def test_ratio_zero_exports_nothing_but_still_propagates(
        gateway: GatewayFactory, echo: Echo, collector: Collector) -> None:
    gw = await gateway(tracing_config(collector, ratio=0.0))
    conn = await KeepAlive.open(gw.port)
    try:
        for i in range(3):
            assert (await conn.request("GET", f"/app/{i}")).status == 200
    finally:
        await conn.close()
    await flush(gw)
    assert collector.spans == []
    sampled = [traceparent(s.header("traceparent"))[2] for s in echo.seen]
    assert sampled == [False] * 3


async def test_off_by_default_passes_trace_context_through(gateway: GatewayFactory,
                                                           echo: Echo) -> None:
    gw = await gateway()
    assert gw.gateway.tracing is None
    sent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    conn = await KeepAlive.open(gw.port)
    try:
        for _ in range(2):
            assert (await conn.request("GET", "/app/x", f"traceparent: {sent}")).status == 200
    finally:
        await conn.close()
    assert [s.all("traceparent") for s in echo.seen] == [[sent], [sent]]


async def test_a_gateway_process_honours_the_otel_variables(
        tmp_path: Path, echo: Echo, collector: Collector,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # What an operator sets next to the config: the collector's credentials, the resource,
    # the batch delay; service_name is left out of the config, so OTEL_SERVICE_NAME counts.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-collector-token=tok-123")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "edge-gateway")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=staging")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    config = f"""
listen: {{host: 127.0.0.1, port: 0}}
timeouts: {{shutdown_grace: 2s}}
routes:
  - prefix: /app/
    upstream: {echo.url}/up/
tracing: {{endpoint: "{collector.url}"}}
"""
    gw = await start_gateway_proc(config, tmp_path)
    try:
        port = int(gw.url.rsplit(":", 1)[1])
        conn = await KeepAlive.open(port)
        try:
            for i in range(2):
                assert (await conn.request("GET", f"/app/{i}")).status == 200
        finally:
            await conn.close()
        await wait_for(lambda: len(collector.spans) == 4, within=10, what="4 spans exported")
    finally:
        assert await gw.stop() == 0
    assert collector.tokens == {"tok-123"}
    servers = collector.by_kind(SERVER)
    assert {s.resource["service.name"] for s in collector.spans} == {"edge-gateway"}
    assert {s.resource["deployment.environment.name"] for s in collector.spans} == {"staging"}
    # The JSON access lines name the same traces and spans; nothing else in the log is odd.
    access = gw.access()
    assert [(a["trace.id"], a["span.id"]) for a in access] == [
        (s.trace_id, s.span_id) for s in servers]
    assert "tok-123" not in gw.log_text()


@pytest.mark.parametrize(("tracing", "key"), [
    ("{endpoint: 'ftp://collector:4318'}", "tracing.endpoint"),
    ("{endpoint: 'http://collector:4318/?token=x'}", "tracing.endpoint"),
    ("{endpoint: 'http://collector:4318', sampler_ratio: 1.5}", "tracing.sampler_ratio"),
    ("{sampler_ratio: 0.5}", "tracing.endpoint"),
    ("{endpoint: 'http://collector:4318', exporter: grpc}", "tracing.exporter"),
])
def test_tracing_config_mistakes_name_the_key(tracing: str, key: str) -> None:
    from gateway.config import load_config_text
    from gateway.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        load_config_text(f"routes: [{{prefix: /, upstream: 'http://127.0.0.1:1/'}}]\n"
                         f"tracing: {tracing}\n", env={})
    assert any(key in str(p) for p in caught.value.problems), caught.value.problems


async def test_fast_path_timeout_warning_carries_the_span_ids(
        gateway: GatewayFactory, collector: Collector,
        fast_path_spy: list[tuple[str, bool]]) -> None:
    gw = await gateway(tracing_config(collector, "timeouts: {read: 300ms}\n"))
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(EcsFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    conn = await KeepAlive.open(gw.port)
    try:
        assert (await conn.request("GET", "/app/first")).status == 200
        # Now a pooled upstream connection is idle: the fast path takes this one, and times out.
        assert (await conn.request("GET", "/app/do/slow?delay=1")).status == 504
    finally:
        await conn.close()
        root.removeHandler(handler)
    assert ("/app/do/slow?delay=1", True) in fast_path_spy, fast_path_spy
    await flush(gw)
    slow = [s for s in collector.by_kind(SERVER) if s.attrs["url.path"] == "/app/do/slow"]
    assert len(slow) == 1 and slow[0].attrs["http.response.status_code"] == 504
    assert slow[0].status == STATUS_ERROR
    client = [s for s in collector.by_kind(CLIENT) if s.parent_id == slow[0].span_id]
    assert [c.attrs.get("error.type") for c in client] == ["timeout"]
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    warned = [r for r in lines if r["log"]["logger"] == "gateway.fastpath"]
    assert len(warned) == 1, lines
    assert (warned[0]["trace"]["id"], warned[0]["span"]["id"]) == (slow[0].trace_id,
                                                                  slow[0].span_id)


async def test_websocket_session_is_one_server_and_one_client_span(
        gateway: GatewayFactory, echo: Echo, collector: Collector) -> None:
    gw = await gateway(tracing_config(collector))
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(gw.url.replace("http", "ws") + "/app/do/ws") as ws:
            await ws.send_str("hi")
            assert (await ws.receive()).data == "echo:hi"
    await wait_for(lambda: len(echo.ws_closed) == 1, what="the upstream side to close")

    async def both_ended() -> bool:
        await flush(gw)
        return len(collector.spans) == 2

    await wait_for(both_ended, within=5, what="the session's two spans")
    (server,), (client,) = collector.by_kind(SERVER), collector.by_kind(CLIENT)
    assert server.attrs["http.response.status_code"] == 101
    assert client.attrs["http.response.status_code"] == 101
    assert client.parent_id == server.span_id
    assert traceparent(echo.seen[0].header("traceparent"))[:2] == (server.trace_id,
                                                                   client.span_id)


async def test_reload_switches_tracing_and_retires_the_old_provider(
        tmp_path: Path, echo: Echo, collector: Collector) -> None:
    from gateway.config import load_config
    from gateway.runtime import serving

    def config(name: str) -> str:
        return f"""
listen: {{host: 127.0.0.1, port: 0}}
timeouts: {{shutdown_grace: 0s}}
routes:
  - prefix: /app/
    upstream: {echo.url}/up/
tracing: {{endpoint: "{collector.url}", service_name: {name}}}
"""

    path = tmp_path / "gateway.yaml"
    path.write_text(config("before"))
    async with serving(load_config(path), config_path=str(path)) as gw:
        old = gw.gateway.tracing
        conn = await KeepAlive.open(gw.port)
        try:
            assert (await conn.request("GET", "/app/1")).status == 200
            path.write_text(config("after"))
            assert await gw.runtime.reload()
            assert gw.gateway.tracing is not old
            # The same kept-alive connection: the new gateway traces it.
            assert (await conn.request("GET", "/app/2")).status == 200
        finally:
            await conn.close()
        await flush(gw)
        # The old provider is shut down once its grace is over (its last spans flushed).
        await wait_for(lambda: len(collector.spans) == 4, within=5, what="4 spans")
    names = {(s.attrs.get("url.path", s.name), s.resource["service.name"])
             for s in collector.by_kind(SERVER)}
    assert names == {("/app/1", "before"), ("/app/2", "after")}
