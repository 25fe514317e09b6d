"""The access line's ECS fields: cleaned client header values, TLS facts, both paths."""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import re
import select
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from ecs_logging._utils import json_dumps as ecs_json_dumps

from gateway import accesslog, logs
from gateway.accesslog import AccessLog, LineWriter, clean_host, clean_user_agent, split_host
from gateway.proxy import Exchange
from gateway.routing import CompiledRoute, compile_route
from gateway.runtime import serving
from tests.support.gateway import ROUTES, build_config
from tests.support.ports import busy_port
from tests.support.process import PROJECT, PYTHON
from tests.support.rawhttp import read_response
from tests.support.upstreams import Echo
from tests.test_observability import TIME_RE


def test_user_agent_is_printable_ascii_without_quotes_and_bounded() -> None:
    assert clean_user_agent("Mozilla/5.0 (X11; Linux x86_64)") == "Mozilla/5.0 (X11; Linux x86_64)"
    assert clean_user_agent('a"b\\c\x01d\u00e9\n') == "a?b?c?d??"
    assert clean_user_agent("x" * 1000) == "x" * 256
    assert clean_user_agent(None) is None and clean_user_agent("") is None


@pytest.mark.parametrize(("raw", "logged"), [
    ("Example.COM", "example.com"),
    ("example.com:8443", "example.com:8443"),
    ("[2001:db8::1]:443", "[2001:db8::1]:443"),
    ("127.0.0.1", "127.0.0.1"),
    ("evil.com/<script>", None),
    ("a b", None),
    ("host:port", None),
    ("x" * 300, None),
    ("", None),
])
def test_host_only_when_well_formed(raw: str, logged: str | None) -> None:
    assert clean_host(raw) == logged


def test_split_host() -> None:
    assert split_host("example.com:8443") == ("example.com", 8443)
    assert split_host("example.com") == ("example.com", None)
    assert split_host("[::1]:80") == ("::1", 80)
    assert split_host("[::1]") == ("::1", None)


@pytest.fixture
def pems(tmp_path: Path) -> Iterator[dict[str, Path]]:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    paths = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "cert.pem",
             "key": tmp_path / "key.pem"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    leaf.private_key_and_cert_chain_pem.write_to_path(str(paths["cert"]))
    leaf.private_key_pem.write_to_path(str(paths["key"]))
    yield paths


async def test_tls_version_and_cleaned_headers_on_both_paths(
        echo: Echo, pems: dict[str, Path],
        access_records: Callable[[], list[dict[str, Any]]]) -> None:
    cfg = build_config(ROUTES + f"""
listen:
  tls: {{cert_file: "{pems['cert']}", key_file: "{pems['key']}"}}
""", echo)
    ctx = ssl.create_default_context(cafile=str(pems["ca"]))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # the line must say what was negotiated
    odd_agent = b'curl/8 "quoted" \\ \xc3\xa9' + b"z" * 400
    async with serving(cfg) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port, ssl=ctx)
        try:
            answers = []
            for method, host in (("GET", b"Shop.Example:8443"), ("GET", b"bad<host>"),
                                 ("POST", b"shop.example")):
                body = b"abc" if method == "POST" else b""
                writer.write(b"%s /app/t?token=SECRET HTTP/1.1\r\nHost: %s\r\n"
                             b"User-Agent: %s\r\nCookie: sid=COOKIESECRET\r\n"
                             b"Content-Length: %d\r\n\r\n%s"
                             % (method.encode(), host, odd_agent, len(body), body))
                answer = await read_response(reader)
                assert answer is not None and answer.complete
                answers.append(answer)
        finally:
            writer.close()
    # An invalid Host is refused (gateway/boundary.py) and still logged, without the host.
    assert [a.status for a in answers] == [200, 400, 200]
    records = access_records()
    assert len(records) == 3
    for record in records:
        assert record["tls.version"] == "1.2" and record["tls.version_protocol"] == "tls"
        assert record["http.version"] == "1.1"
        agent = record["user_agent.original"]
        assert agent.startswith('curl/8 ?quoted? ? ?zz') and len(agent) == 256
    assert (records[0]["url.domain"], records[0]["url.port"]) == ("shop.example", 8443)
    assert "url.domain" not in records[1]  # not a host name: left out
    assert records[2]["url.domain"] == "shop.example" and "url.port" not in records[2]
    text = repr(records)
    assert "SECRET" not in text and "sid=" not in text


# ------------------------------------------------------------------ the line's shape


class _Trace:
    def ids(self) -> tuple[str, str]:
        return "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"


class _TLS:
    def version(self) -> str:
        return "TLSv1.3"


class _Transport:
    def get_extra_info(self, name: str) -> object:
        return _TLS() if name == "ssl_object" else None


def _logged(shape: str, write: Callable[[AccessLog], None], level: int = logging.INFO) -> str:
    """What a process logging ``shape`` to a pipe writes while ``write`` logs exchanges."""
    r, w = os.pipe()
    handler = logs._ProcessHandler(os.fdopen(w, "w", closefd=False), shape)
    logger = logging.getLogger("gateway.access")
    saved = logger.handlers, logger.propagate, logger.level
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(level)  # (the attribute alone would leave logging's cached answers)
    try:
        write(AccessLog())
        if handler.lines is not None:
            handler.lines.close()
    finally:
        logger.handlers, logger.propagate = saved[:2]
        logger.setLevel(saved[2])
        os.close(w)
    with os.fdopen(r, "rb") as f:
        return f.read().decode()


def _line(exchange: Exchange, route: CompiledRoute | None, path: str = "/app/x?q=1") -> str:
    """The JSON line a process logging ECS to a pipe writes for ``exchange``."""
    return _logged("json", lambda access: access.log_exchange(
        "203.0.113.9", "rid-1", "POST", path, 1, 502, route, exchange, 0.0123456))


def test_each_line_logs_its_own_request_user_agent_and_host() -> None:
    """Consecutive lines from one process log each request's own User-Agent and Host (the
    cleaned values of the previous line are reused only when the raw value is the same)."""
    seen = [("a.example", "agent-1"), ("a.example", "agent-1"), ("B.example", "agent-1"),
            ("B.example", "agent\n2"), (None, None), ("a.example", "agent-1")]

    def write(access: AccessLog) -> None:
        for host, agent in seen:
            ex = Exchange()
            ex.headers = {k: v for k, v in (("Host", host), ("User-Agent", agent)) if v}
            access.log_exchange("203.0.113.9", "rid", "GET", "/x", 1, 200, None, ex, 0.001)

    lines = _logged("text", write).splitlines()
    logged = [(re.search(r" host=(\S+)", line).group(1),  # type: ignore[union-attr]
               re.search(r' ua="([^"]*)"', line).group(1))  # type: ignore[union-attr]
              for line in lines]
    assert logged == [("a.example", "agent-1"), ("a.example", "agent-1"),
                      ("b.example", "agent-1"), ("b.example", "agent?2"), ("-", "-"),
                      ("a.example", "agent-1")]


def test_json_line_is_ecs_loggings_shape_with_every_field() -> None:
    """Parsed, the line has every field; re-serialised by ecs-logging, it is the same text
    (same key order, same escaping), so it reads like every other line of the process."""
    route = compile_route("/app/", "http://upstream.internal:8080/base/")
    ex = Exchange()
    ex.headers = {"Host": "Shop.Example:8443", "User-Agent": 'agent "x"'}
    ex.transport = _Transport()  # type: ignore[assignment]
    ex.trace = _Trace()  # type: ignore[assignment]
    ex.bytes_in, ex.bytes_out, ex.upstream_status, ex.upstream_time = 4, 5, 503, 0.01
    ex.error = "upstream said \"no\""
    text = _line(ex, route)
    assert text.endswith("}\n") and text.count("\n") == 1
    doc = json.loads(text)
    assert ecs_json_dumps(json.loads(text)) == text[:-1]
    assert TIME_RE.match(doc.pop("@timestamp"))
    assert doc == {
        "log.level": "info",
        "message": '203.0.113.9 POST /app/x HTTP/1.1 502 4/5 12.3ms host=shop.example:8443 '
                   'ua="agent ?x?" tls=1.3 route=/app/ upstream=503@upstream.internal:8080 '
                   "rid=rid-1 trace=0af7651916cd43dd8448eb211c80319c span=b7ad6b7169203331",
        "client": {"ip": "203.0.113.9"},
        "destination": {"address": "upstream.internal", "port": 8080},
        "ecs.version": "1.6.0",
        "error": {"message": 'upstream said "no"'},
        "event": {"dataset": "gateway.access", "duration": 12345600},
        "gateway": {"route": "/app/", "upstream": {"duration": 10000000, "status_code": 503}},
        "http": {"request": {"body": {"bytes": 4}, "id": "rid-1", "method": "POST"},
                 "response": {"body": {"bytes": 5}, "status_code": 502}, "version": "1.1"},
        "log": {"logger": "gateway.access"},
        "span": {"id": "b7ad6b7169203331"},
        "tls": {"version": "1.3", "version_protocol": "tls"},
        "trace": {"id": "0af7651916cd43dd8448eb211c80319c"},
        "url": {"domain": "shop.example", "path": "/app/x", "port": 8443},
        "user_agent": {"original": "agent ?x?"},
    }


def test_json_line_without_the_optional_fields_and_a_non_ascii_path() -> None:
    text = _line(Exchange(), None, "/caf\u00e9/\\\"x")
    doc = json.loads(text)
    assert ecs_json_dumps(json.loads(text)) == text[:-1]  # ASCII with \u escapes
    assert set(doc) == {"@timestamp", "log.level", "message", "client", "ecs.version",
                        "event", "http", "log", "url"}
    assert doc["url"] == {"path": "/caf\u00e9/\\\"x"}


# Requests one after the other, each different from the last in every value the line keeps
# from the previous one (route parts, cleaned Host and User-Agent, the method's JSON
# string, the timestamp) and with the characters JSON must escape where a client or a
# trusted proxy can put them (an IPv6 zone, a trusted X-Request-ID, the path).
_ROUTES = [compile_route("/app/", "http://a.internal:8080/"),
           compile_route("/b/", "https://b.internal/x/"), None]
_REQUESTS = [
    # client_ip, rid, method, raw path, minor, status, route, Host, User-Agent, seconds
    ("203.0.113.9", "rid-1", "GET", "/app/1?token=SECRET", 1, 200, 0, "a.example", "ua-1", 0.0),
    ("fe80::1%a\"b", 'r"\\d', "POST", '/b/"q\\?x=1', 0, 502, 1, "B.example:81", "ua\n2", 0.0004),
    ("198.51.100.7", "rid-3", "DELETE", "/caf\u00e9", 1, 404, 2, None, None, 0.002),
    ("203.0.113.9", "rid-4", "GET", "/app/4", 1, 304, 0, "a.example", "ua-1", 1.5),
]


_PERF_AT_START = 5000.0  # perf_counter when the wall clock says 1_764_000_000


def _log_requests(access: AccessLog, times: list[float]) -> None:
    for i, (ip, rid, method, raw, minor, status, r, host, agent, dt) in enumerate(_REQUESTS):
        ex = Exchange()
        ex.headers = {k: v for k, v in (("Host", host), ("User-Agent", agent)) if v}
        ex.bytes_in, ex.bytes_out = i, 100 + i
        route = _ROUTES[r]
        if route is not None:
            ex.upstream_status, ex.upstream_time = status, 0.001 * (i + 1)
        times.append(1_764_000_000.25 + dt)
        access.log_exchange(ip, rid, method, raw, minor, status, route, ex, 0.01 * (i + 1),
                            _PERF_AT_START + 0.25 + dt)


def test_each_line_carries_its_own_requests_values_and_end_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Text and JSON: every line has its own request's values and the time it ended, to the
    millisecond; the JSON ``message`` is the text line's message, whatever the escaping."""
    now: list[float] = []
    # The wall clock and perf_counter, moving together: each line's end is given on the
    # latter, and both clocks are read 0.3 s after it (the line is of the end, not of when
    # it was written).
    monkeypatch.setattr("gateway.accesslog._time",
                        lambda: (now[-1] if now else 1_763_999_000) + 0.3)
    monkeypatch.setattr("gateway.accesslog._perf", lambda: (
        (now[-1] if now else 1_763_999_000) - 1_764_000_000 + _PERF_AT_START + 0.3))
    text = _logged("text", lambda access: _log_requests(access, now)).splitlines()
    docs = [json.loads(line) for line in _logged(
        "json", lambda access: _log_requests(access, now)).splitlines()]
    assert len(text) == len(docs) == len(_REQUESTS)
    for i, (line, doc) in enumerate(zip(text, docs, strict=True)):
        ip, rid, method, raw, minor, status, r, host, agent, dt = _REQUESTS[i]
        route = _ROUTES[r]
        ended = 1_764_000_000.25 + dt
        local = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ended))
        assert line.startswith(f"{local},{int(ended * 1000) % 1000:03d} INFO gateway.access: ")
        assert doc["@timestamp"] == time.strftime(
            "%Y-%m-%dT%H:%M:%S", time.gmtime(ended)) + f".{int(ended * 1000) % 1000:03d}Z"
        message = line.split(" INFO gateway.access: ", 1)[1]
        assert doc["message"] == message
        path = raw.partition("?")[0]
        assert message.startswith(f"{ip} {method} {path} HTTP/1.{minor} {status} {i}/{100 + i} ")
        assert f" host={host.lower() if host else '-'} " in message
        assert f' ua="{clean_user_agent(agent) or "-"}" ' in message
        assert message.endswith(f"rid={rid}")
        assert doc["client"] == {"ip": ip}
        assert doc["http"]["request"] == {"body": {"bytes": i}, "id": rid, "method": method}
        assert doc["http"]["response"] == {"body": {"bytes": 100 + i}, "status_code": status}
        assert doc["http"]["version"] == f"1.{minor}"
        assert doc["event"]["duration"] == round(0.01 * (i + 1) * 1e9)
        assert doc["url"]["path"] == path
        assert doc.get("user_agent", {}).get("original") == clean_user_agent(agent)
        if route is None:
            assert " route=None upstream=- rid=" in message
            assert "gateway" not in doc and "destination" not in doc
        else:
            up = route.upstream
            assert f" route={route.name} upstream={status}@{up.host_header} rid=" in message
            assert doc["destination"] == {"address": up.host, "port": up.port}
            assert doc["gateway"] == {"route": route.name, "upstream": {
                "duration": round(0.001 * (i + 1) * 1e9), "status_code": status}}
        if host is None:
            assert doc["url"] == {"path": path}
        else:
            domain, port = split_host(host.lower())
            assert doc["url"]["domain"] == domain and doc["url"].get("port") == port
    assert "SECRET" not in repr(text) + repr(docs)


def test_a_step_of_the_wall_clock_shows_in_the_lines_within_a_second(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Lines are stamped from ``perf_counter``, the wall clock being read once a second: after
    the system clock is set (here an hour and a quarter of a second ahead), a line ending up
    to a second later may keep the old reading, and every later one has the new."""
    wall_minus_perf = [1_764_000_000.0 - 5000.0]
    perf = [5000.0]
    monkeypatch.setattr("gateway.accesslog._perf", lambda: perf[0])
    monkeypatch.setattr("gateway.accesslog._time", lambda: perf[0] + wall_minus_perf[0])
    ends = [5000.125, 5000.5, 5000.875, 5001.25, 5001.625, 5002.25, 5002.375]  # (binary)

    def write(access: AccessLog) -> None:
        for n, end in enumerate(ends):
            if n == 3:
                wall_minus_perf[0] += 3600.25
            perf[0] = end + 0.0625  # the line is written a little after the request ended
            access.log_exchange("203.0.113.9", f"rid-{n}", "GET", "/x", 1, 200, None,
                                Exchange(), 0.001, end)

    stamps = [json.loads(line)["@timestamp"] for line in _logged("json", write).splitlines()]
    assert stamps[:3] == ["2025-11-24T16:00:00.125Z", "2025-11-24T16:00:00.500Z",
                          "2025-11-24T16:00:00.875Z"]
    assert stamps[3] in ("2025-11-24T16:00:01.250Z", "2025-11-24T17:00:01.500Z")
    assert stamps[4:] == ["2025-11-24T17:00:01.875Z", "2025-11-24T17:00:02.500Z",
                          "2025-11-24T17:00:02.625Z"]


@pytest.mark.parametrize(("minor", "status", "upstream", "written"), [
    (0, 204, 0, "HTTP/1.0 204 0/0 "),
    (1, 999, 999, "HTTP/1.1 999 0/0 "),
    (1, 1000, 1234, "HTTP/1.1 1000 0/0 "),  # not a status a parser passes; still written
    (2, 200, 200, "HTTP/1.2 200 0/0 "),
])
def test_version_and_status_codes_as_written(minor: int, status: int, upstream: int,
                                             written: str) -> None:
    """The version and the codes come from tables; what is outside them is formatted."""
    route = compile_route("/app/", "http://a.internal:8080/")

    def write(access: AccessLog) -> None:
        ex = Exchange()
        ex.upstream_status = upstream
        access.log_exchange("203.0.113.9", "rid", "GET", "/app/x", minor, status,
                            route if upstream else None, ex, 0.001)

    line = _logged("text", write)
    assert f" GET /app/x {written}" in line
    assert f" upstream={upstream or '-'}" in line
    doc = json.loads(_logged("json", write))
    assert doc["http"]["response"]["status_code"] == status
    assert doc["http"]["version"] == f"1.{minor}"
    if upstream:
        assert doc["gateway"]["upstream"]["status_code"] == upstream


@pytest.mark.parametrize(("duration", "written"), [
    (0.0, "0.0ms"), (0.00004, "0.0ms"), (0.00006, "0.1ms"), (0.01234, "12.3ms"),
    (0.01236, "12.4ms"), (0.19994, "199.9ms"), (0.19996, "200.0ms"), (0.25, "250.0ms"),
    (3.21, "3210.0ms"),  # past the table: formatted
])
def test_duration_in_milliseconds_to_the_nearest_tenth(duration: float, written: str) -> None:
    def write(access: AccessLog) -> None:
        access.log_exchange("203.0.113.9", "rid", "GET", "/x", 1, 200, None, Exchange(),
                            duration)

    assert f" 200 0/0 {written} host=" in _logged("text", write)


def test_no_access_line_when_the_process_logs_above_info() -> None:
    """``--log-level WARNING``: decided once when the access log is made, no line at all."""
    made: list[AccessLog] = []

    def write(access: AccessLog) -> None:
        made.append(access)
        access.log_exchange("203.0.113.9", "rid", "GET", "/x", 1, 200, None, Exchange(), 0.001)

    assert _logged("text", write, level=logging.WARNING) == ""
    assert not made[0].enabled  # Gateway.finished does not even call it


# ------------------------------------------------------------------ the writer


def _pipe(size: int = 4096) -> tuple[int, int]:
    """A pipe holding at most ``size`` bytes (the kernel rounds up to a page)."""
    r, w = os.pipe()
    fcntl.fcntl(r, fcntl.F_SETPIPE_SZ, size)
    return r, w


def _drain(fd: int) -> bytes:
    """Everything until every writer closed the pipe."""
    out = bytearray()
    while chunk := os.read(fd, 1 << 16):
        out += chunk
    return bytes(out)


async def test_writer_writes_a_lone_line_within_flush_after() -> None:
    """A line waits for its batch, but not longer than ``flush_after`` when no other comes."""
    r, w = _pipe()
    os.set_blocking(r, False)
    writer = LineWriter(w, flush_after=0.2)
    try:
        writer.add("the only line\n")
        with pytest.raises(BlockingIOError):
            os.read(r, 100)  # batched: not written at once
        started = time.monotonic()
        async with asyncio.timeout(5):
            while True:
                try:
                    got = os.read(r, 100)
                    break
                except BlockingIOError:
                    await asyncio.sleep(0.01)
        assert got == b"the only line\n"
        assert time.monotonic() - started < 2.0
    finally:
        writer.close()
        os.close(w)
        os.close(r)


async def test_writer_asks_for_the_running_loop_once_per_batch(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding the running loop costs a system call (getpid, Python 3.11): asked when a
    batch starts, not for every line."""
    asked: list[object] = []
    real = accesslog._running_loop

    def counting() -> asyncio.AbstractEventLoop | None:
        loop = real()
        asked.append(loop)
        return loop

    monkeypatch.setattr(accesslog, "_running_loop", counting)
    r, w = _pipe()
    writer = LineWriter(w, flush_after=0.05)
    try:
        for i in range(200):
            writer.add(f"line {i}\n")
        assert asked == [asyncio.get_running_loop()]
        writer.flush()
        writer.add("the next batch\n")
        assert len(asked) == 2
    finally:
        writer.close()
        os.close(w)
        os.close(r)


def test_writer_whose_flush_was_pending_in_a_closed_loop_flushes_from_the_next() -> None:
    """A loop that ended before its pending flush ran (one event loop after another, as
    tests and embedding applications run them) does not hold the next loop's lines."""
    r, w = _pipe()
    os.set_blocking(r, False)
    writer = LineWriter(w, flush_after=0.05)

    async def add(line: str) -> None:
        writer.add(line)

    async def add_and_wait(line: str) -> bytes:
        writer.add(line)
        out = b""
        async with asyncio.timeout(5):
            while not out.endswith(line.encode()):
                try:
                    out += os.read(r, 1000)
                except BlockingIOError:
                    await asyncio.sleep(0.01)
        return out

    try:
        asyncio.run(add("from the first loop\n"))  # its flush never ran
        got = asyncio.run(add_and_wait("from the second loop\n"))
        assert got == b"from the first loop\nfrom the second loop\n"
    finally:
        writer.close()
        os.close(w)
        os.close(r)


async def test_writer_drops_and_counts_when_nobody_reads_and_never_blocks() -> None:
    r, w = _pipe()
    writer = LineWriter(w, pending_limit=16 << 10, batch=4 << 10)
    lines = [f"line {i:05d} " + "x" * 90 + "\n" for i in range(2000)]  # 200 KB in all
    try:
        async with asyncio.timeout(5):  # a blocking write would hang the loop here
            for i, line in enumerate(lines):
                writer.add(line)
                if i % 50 == 0:
                    await asyncio.sleep(0)  # let the loop iterate, as requests would
        assert writer.dropped > 0
    finally:
        reading = asyncio.create_task(asyncio.to_thread(_drain, r))
        await asyncio.to_thread(writer.close)
        os.close(w)
    got = (await reading).decode().splitlines(keepends=True)
    os.close(r)
    # Whole lines only, in order, and every line is either written or counted.
    assert set(got) <= set(lines) and got == sorted(got)
    assert len(got) + writer.dropped == len(lines)


async def test_writer_writes_all_pending_lines_on_close() -> None:
    r, w = _pipe()
    writer = LineWriter(w, exit_timeout=5.0)
    lines = [f"line {i:05d} " + "y" * 90 + "\n" for i in range(500)]  # 50 KB: the pipe fills
    for line in lines:
        writer.add(line)
    await asyncio.sleep(0)
    reading = asyncio.create_task(asyncio.to_thread(_drain, r))
    await asyncio.to_thread(writer.close)
    os.close(w)
    assert (await reading).decode().splitlines(keepends=True) == lines
    assert writer.dropped == 0
    os.close(r)


def test_pipe_writes_end_at_line_ends_within_pipe_buf() -> None:
    """Several workers share one stderr: a write to a pipe is atomic only up to PIPE_BUF."""
    r, w = os.pipe()
    writer = LineWriter(w)
    sizes: list[int] = []
    real_write = os.write

    def write(fd: int, data: bytes | memoryview) -> int:
        sizes.append(len(data))
        assert bytes(data).endswith(b"\n")
        return real_write(fd, data)

    lines = [f"{i:04d}{'z' * 300}\n" for i in range(100)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("gateway.accesslog.os.write", write)
        for line in lines:
            writer.add(line)  # no running loop: handed over at once
        reading = threading.Thread(target=lambda: out.append(_drain(r)))
        out: list[bytes] = []
        reading.start()
        writer.close()
    os.close(w)
    reading.join(5)
    os.close(r)
    assert out[0].decode().splitlines(keepends=True) == lines
    assert sizes and max(sizes) <= select.PIPE_BUF


# ------------------------------------------------------------------ a real gateway process


TEXT_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: ")


@dataclass
class PipedGateway:
    proc: asyncio.subprocess.Process
    log: int  # the read end of the gateway's stderr, read by nobody until ``finish``
    url: str
    admin_url: str
    head: bytes  # what it wrote before listening
    text: str = ""  # all it wrote, once ``finish`` has read it


async def start_piped(tmp_path: Path, echo: Echo, fmt: str = "json", *,
                      upstream: str | None = None, access_log: bool = True) -> PipedGateway:
    conf = tmp_path / "gateway.yaml"
    conf.write_text(f"""
listen: {{host: 127.0.0.1, port: 0}}
admin: {{host: 127.0.0.1, port: 0}}
timeouts: {{shutdown_grace: 2s}}
access_log: {'true' if access_log else 'false'}
routes:
  - prefix: /
    upstream: {upstream or echo.url + '/root/'}
""", encoding="utf-8")
    r, w = _pipe()
    proc = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "gateway", "--log-format", fmt, "run", "-c", str(conf),
        "--workers", "1", stdout=subprocess.DEVNULL, stderr=w, cwd=str(PROJECT))
    os.close(w)
    head = b""
    async with asyncio.timeout(20):
        while b"listening on" not in head:
            chunk = await asyncio.to_thread(os.read, r, 4096)
            assert chunk, head.decode()
            head += chunk
    text = head.decode()
    listen = re.search(r"listening on (http://[^\s,\"]+)", text)
    admin = re.search(r"admin on (http://[^\s,\"]+)", text)
    assert listen and admin, text
    return PipedGateway(proc, r, listen.group(1), admin.group(1), head)


async def finish(gw: PipedGateway) -> tuple[int, list[str], int]:
    """SIGTERM, then read the log to its end: (exit status, the access lines, the lines it
    says it dropped)."""
    gw.proc.send_signal(signal.SIGTERM)
    rest = await asyncio.to_thread(_drain, gw.log)
    os.close(gw.log)
    async with asyncio.timeout(10):
        code = await gw.proc.wait()
    gw.text = (gw.head + rest).decode()
    lines = gw.text.splitlines()
    said = re.search(r"log: (\d+) line\(s\) dropped", "\n".join(lines))
    access = [line for line in lines
              if "gateway.access:" in line or '"logger":"gateway.access"}' in line]
    return code, access, int(said.group(1)) if said else 0


async def get_many(url: str, n: int, connections: int = 8, status: int = 200) -> float:
    """``n`` GETs over ``connections`` kept-alive connections, each answered ``status``; the
    slowest one's seconds."""
    slowest = 0.0
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as http:
        async def one(i: int) -> None:
            nonlocal slowest
            started = time.monotonic()
            async with http.get(f"{url}/r{i}") as resp:
                assert resp.status == status
                await resp.read()
            slowest = max(slowest, time.monotonic() - started)

        await asyncio.gather(*(one(i) for i in range(n)))
    return slowest


async def dropped(gw: PipedGateway) -> float:
    async with aiohttp.ClientSession() as http:
        async with http.get(gw.admin_url + "/metrics") as resp:
            text = await resp.text()
    m = re.search(r"^gateway_access_log_dropped_total (\S+)$", text, re.M)
    assert m, text
    return float(m.group(1))


async def flood_until_dropped(gw: PipedGateway, status: int = 200) -> tuple[int, float]:
    """GETs in batches of 500 until the gateway counts a dropped log line, each batch
    answered ``status`` within 5 s (a stalled loop would hold every request until the log
    is read): the requests sent, and the count."""
    sent = 0
    async with asyncio.timeout(60):
        while await dropped(gw) == 0:
            slowest = await get_many(gw.url, 500, status=status)
            sent += 500
            assert slowest < 5.0
    return sent, await dropped(gw)


async def test_a_log_nobody_reads_drops_lines_and_requests_go_on(tmp_path: Path,
                                                                echo: Echo) -> None:
    gw = await start_piped(tmp_path, echo)
    try:
        sent, counted = await flood_until_dropped(gw)  # 1 MiB may wait: about 2,000 lines
        assert sent <= 10_000
    finally:
        code, lines, lost = await finish(gw)
    assert code == 0
    # Every request is either a whole line in the log or counted as dropped (the count
    # said at exit includes the lines still waiting when the metric was read, and the few
    # other lines the process logged meanwhile, at shutdown, that the full log dropped).
    assert 0 < counted <= lost
    assert sent <= len(lines) + lost <= sent + 5
    assert all(json.loads(line)["url"]["path"].startswith("/r") for line in lines)


async def test_warnings_nobody_reads_are_dropped_and_requests_go_on(tmp_path: Path,
                                                                   echo: Echo) -> None:
    """Not only access lines: with the access log off and an upstream that refuses every
    connection, each request logs a warning (written at once); once the pipe nobody reads
    is full, they are dropped and counted, and the loop never waits on the log."""
    with busy_port(listen=False) as port:
        gw = await start_piped(tmp_path, echo, "text", upstream=f"http://127.0.0.1:{port}/",
                               access_log=False)
        try:
            sent, counted = await flood_until_dropped(gw, status=502)
            assert sent <= 20_000
        finally:
            code, _, lost = await finish(gw)
    assert code == 0
    assert 0 < counted <= lost
    # What did get through: whole lines, among them the warnings about the upstream.
    lines = gw.text.splitlines()
    assert all(TEXT_LINE.match(line) for line in lines), lines
    warned = [line for line in lines if " WARNING " in line and " / " in line]
    assert warned and len(warned) + lost >= sent


@pytest.mark.parametrize("fmt", ["json", "text"])
async def test_sigterm_writes_every_pending_line(tmp_path: Path, echo: Echo, fmt: str) -> None:
    gw = await start_piped(tmp_path, echo, fmt)
    try:
        # About 150 KB of lines for a 4 KiB pipe nobody reads yet: most of them wait in the
        # gateway when the signal comes.
        await get_many(gw.url, 300)
        assert await dropped(gw) == 0
    finally:
        code, lines, lost = await finish(gw)
    assert code == 0 and lost == 0
    assert len(lines) == 300
    paths = sorted(json.loads(line)["url"]["path"] if fmt == "json"
                   else line.split()[6] for line in lines)
    assert paths == sorted(f"/r{i}" for i in range(300))
