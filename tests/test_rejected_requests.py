"""Requests refused before routing are seen (access log, metric) and leak nothing to the logs.

The parser layer (``gateway.server``) refuses malformed requests, over-long targets and
headers, unsupported versions and codings, and heads that never finish. Each refusal is one
``gateway.access`` line (method and path only when they parsed, never a query string) and
one ``gateway_rejected_requests_total{status,reason}`` count, with the request id that the
client got in ``X-Request-ID``. No log record of any logger (aiohttp's included) may carry a
header value, cookie, query string or body byte of the client's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.runtime import Running, serving
from tests.hardening.conftest import hardening_config
from tests.support.process import flat
from tests.support.rawhttp import RawResponse, exchange
from tests.support.upstreams import RawRecorder, run_recorder

COOKIE = "COOKIESECRET7"
AUTH = "AUTHSECRET7"
QUERY = "QUERYSECRET7"
BODY = "BODYSECRET7"
PLANTED = [COOKIE, AUTH, QUERY, BODY]
SECRET_HEADERS = (f"Cookie: sid={COOKIE}; guest={COOKIE}\r\n"
                  f"Authorization: Bearer {AUTH}\r\n").encode()
HOST = b"Host: gw.test\r\n"
Q = QUERY.encode()

# name -> (raw request, status, reason, method, path) as the access log must show them
CASES: dict[str, tuple[bytes, int, str, str, str]] = {
    "control_byte_in_header": (
        b"GET /g?q=" + Q + b" HTTP/1.1\r\n" + HOST + SECRET_HEADERS + b"X-A: b\x01c\r\n\r\n",
        400, "bad_header", "-", "-"),
    "control_byte_in_cookie": (
        b"GET /g HTTP/1.1\r\n" + HOST + b"Cookie: sid=" + COOKIE.encode() + b"\x01\r\n\r\n",
        400, "bad_header", "-", "-"),
    "secret_in_header_name": (
        b"GET /g HTTP/1.1\r\n" + HOST + b"Authorization" + AUTH.encode() + b"\x01: x\r\n\r\n",
        400, "bad_header", "-", "-"),
    "invalid_method_with_query": (
        b"G@T /g?token=" + Q + b" HTTP/1.1\r\n" + HOST + SECRET_HEADERS + b"\r\n",
        400, "bad_method", "-", "-"),
    "long_cookie": (
        b"GET /g HTTP/1.1\r\n" + HOST + b"Cookie: sid=" + COOKIE.encode() + b"a" * 10_000
        + b"\r\n\r\n", 431, "header_too_large", "-", "-"),
    "long_authorization": (
        b"GET /g HTTP/1.1\r\n" + HOST + b"Authorization: Bearer " + AUTH.encode()
        + b"a" * 10_000 + b"\r\n\r\n", 431, "header_too_large", "-", "-"),
    "long_target_with_query": (
        b"GET /g?q=" + Q + b"a" * 10_000 + b" HTTP/1.1\r\n" + HOST + b"\r\n",
        414, "uri_too_long", "-", "-"),
    "version_3": (
        b"GET /g?q=" + Q + b" HTTP/3.0\r\n" + HOST + SECRET_HEADERS + b"\r\n",
        505, "version_not_supported", "-", "-"),
    "version_2_parsed": (
        b"GET /g?q=" + Q + b" HTTP/2.0\r\n" + HOST + SECRET_HEADERS + b"\r\n",
        505, "version_not_supported", "GET", "/g"),
    "coding_before_chunked": (
        b"POST /p?q=" + Q + b" HTTP/1.1\r\n" + HOST + SECRET_HEADERS
        + b"Transfer-Encoding: gzip, chunked\r\n\r\nb\r\n" + BODY.encode() + b"\r\n0\r\n\r\n",
        501, "transfer_coding", "POST", "/p"),
    "two_content_lengths": (
        b"POST /p HTTP/1.1\r\n" + HOST + SECRET_HEADERS
        + b"Content-Length: 11\r\nContent-Length: 12\r\n\r\n" + BODY.encode(),
        400, "bad_framing", "-", "-"),
    "te_and_cl": (
        b"POST /p HTTP/1.1\r\n" + HOST + b"Content-Length: 11\r\nTransfer-Encoding: chunked"
        b"\r\n\r\n" + BODY.encode(), 400, "bad_framing", "-", "-"),
}


@pytest.fixture
async def gw() -> AsyncIterator[tuple[Running, RawRecorder]]:
    async with run_recorder() as up:
        cfg = hardening_config(up.url, limits={"max_header_size": "8k"}, access_log=True)
        async with serving(cfg) as running:
            yield running, up


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The access lines' ECS fields, under short names."""
    lines = []
    for record in caplog.records:
        if record.name != "gateway.access":
            continue
        doc = flat(record.access)  # type: ignore[attr-defined]
        lines.append({
            "status": doc["http.response.status_code"],
            "method": doc["http.request.method"],
            "path": doc["url.path"],
            "error": doc.get("error.message", ""),
            "request_id": doc["http.request.id"],
            "client_ip": doc["client.ip"],
            "bytes_out": doc["http.response.body.bytes"],
            "all": doc,
        })
    return lines


def rejected_count(running: Running, status: int, reason: str) -> float:
    text = running.gateway.metrics.render().decode()
    series = f'gateway_rejected_requests_total{{reason="{reason}",status="{status}"}} '
    m = re.search("^" + re.escape(series) + r"(\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def assert_no_secret_logged(caplog: pytest.LogCaptureFixture) -> None:
    formatter = logging.Formatter("%(name)s %(message)s")
    for record in caplog.records:
        text = formatter.format(record) + repr(getattr(record, "access", ""))
        for secret in PLANTED:
            assert secret not in text, (record.name, text)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test_refusal_is_logged_and_counted_without_client_bytes(
        gw: tuple[Running, RawRecorder], caplog: pytest.LogCaptureFixture,
        case: tuple[bytes, int, str, str, str]) -> None:
    running, up = gw
    data, status, reason, method, path = case
    caplog.set_level(logging.DEBUG)  # every logger, aiohttp's and asyncio's too
    answers, closed = await exchange(running.port, data, responses=2)
    assert [a.status for a in answers] == [status]
    assert closed
    rid = answers[0].header("X-Request-ID")
    assert rid
    lines = access_lines(caplog)
    assert len(lines) == 1, lines
    line = lines[0]
    assert (line["status"], line["method"], line["path"], line["error"]) == (
        status, method, path, reason)
    assert line["request_id"] == rid
    assert line["client_ip"] == "127.0.0.1"
    assert line["bytes_out"] == len(answers[0].body)
    assert rejected_count(running, status, reason) == 1
    assert_no_secret_logged(caplog)
    assert up.requests == []


async def test_garbage_after_a_valid_request_is_one_more_line(
        gw: tuple[Running, RawRecorder], caplog: pytest.LogCaptureFixture) -> None:
    running, _ = gw
    caplog.set_level(logging.DEBUG)
    data = (b"GET /g?q=" + Q + b" HTTP/1.1\r\n" + HOST + SECRET_HEADERS + b"\r\n"
            + b"\x01" + AUTH.encode() + b"\r\n\r\n")
    answers, _ = await exchange(running.port, data, responses=3)
    assert [a.status for a in answers] == [200, 400]
    lines = access_lines(caplog)
    assert [(x["status"], x["method"], x["path"]) for x in lines] == [
        (200, "GET", "/g"), (400, "-", "-")]
    assert [x["request_id"] for x in lines] == [a.header("X-Request-ID") for a in answers]
    assert_no_secret_logged(caplog)


async def test_http09_refusal_is_logged(gw: tuple[Running, RawRecorder],
                                        caplog: pytest.LogCaptureFixture) -> None:
    running, _ = gw
    caplog.set_level(logging.DEBUG)
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    writer.write(b"GET /g?q=" + Q + b"\r\n\r\n")
    async with asyncio.timeout(3):
        got = await reader.read()
    writer.close()
    assert got.startswith(b"400 ")
    lines = access_lines(caplog)
    assert [(x["status"], x["method"], x["path"], x["error"]) for x in lines] == [
        (400, "GET", "/g", "http_0_9")]
    assert rejected_count(running, 400, "http_0_9") == 1
    assert_no_secret_logged(caplog)


async def test_unfinished_head_is_a_408_line_and_an_idle_connection_none(
        gw: tuple[Running, RawRecorder], caplog: pytest.LogCaptureFixture) -> None:
    """nginx logs 408 for a head that never finished, and nothing for a silent connection."""
    running, _ = gw
    caplog.set_level(logging.DEBUG)
    partial = await asyncio.open_connection("127.0.0.1", running.port)
    idle = await asyncio.open_connection("127.0.0.1", running.port)
    partial[1].write(b"GET /g?q=" + Q + b" HTTP/1.1\r\n" + HOST + SECRET_HEADERS)
    async with asyncio.timeout(4):  # client_header is 1 s in the hardening config
        assert await partial[0].read() == b""
        assert await idle[0].read() == b""
    for _, writer in (partial, idle):
        writer.close()
    lines = access_lines(caplog)
    assert [(x["status"], x["method"], x["path"], x["error"]) for x in lines] == [
        (408, "-", "-", "client_header_timeout")]
    assert rejected_count(running, 408, "client_header_timeout") == 1
    assert_no_secret_logged(caplog)


def _response_ids(answers: list[RawResponse]) -> list[str | None]:
    return [a.header("X-Request-ID") for a in answers]


async def test_request_ids_of_refusals_are_unique(gw: tuple[Running, RawRecorder]) -> None:
    running, _ = gw
    ids: list[str | None] = []
    for _ in range(3):
        answers, _ = await exchange(running.port, b"G@T / HTTP/1.1\r\n\r\n")
        ids += _response_ids(answers)
    assert len(set(ids)) == 3 and None not in ids


async def test_no_refusal_logs_a_client_byte(gw: tuple[Running, RawRecorder],
                                             caplog: pytest.LogCaptureFixture) -> None:
    """Only the log check, over every case: aiohttp's parser messages quote the request."""
    running, _ = gw
    caplog.set_level(logging.DEBUG)
    for data, *_ in CASES.values():
        # The answers are checked above; here only what reached the logs matters.
        with contextlib.suppress(AssertionError, TimeoutError):
            await exchange(running.port, data, responses=2, limit_s=2.0)
    assert any(r.name == "gateway.server" for r in caplog.records)  # refusals are logged
    assert_no_secret_logged(caplog)


@pytest.mark.parametrize(("data", "reason", "method", "path"), [
    (b"GET /%2e%2e/x?q=" + Q + b" HTTP/1.1\r\n" + HOST + b"\r\n", "bad_path", "GET",
     "/%2e%2e/x"),
    (b"OPTIONS * HTTP/1.1\r\n" + HOST + b"\r\n", "bad_target", "OPTIONS", "*"),
    (b"POST /p HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "bad_framing", "POST",
     "/p"),
], ids=["path_above_root", "asterisk_form", "te_in_http10"])
async def test_request_line_refusals_are_counted_too(
        gw: tuple[Running, RawRecorder], caplog: pytest.LogCaptureFixture, data: bytes,
        reason: str, method: str, path: str) -> None:
    running, up = gw
    caplog.set_level(logging.DEBUG)
    answers, _ = await exchange(running.port, data)
    assert [a.status for a in answers] == [400]
    lines = access_lines(caplog)
    assert [(x["status"], x["method"], x["path"], x["error"], x["request_id"])
            for x in lines] == [(400, method, path, reason, answers[0].header("X-Request-ID"))]
    assert rejected_count(running, 400, reason) == 1
    assert_no_secret_logged(caplog)
    assert up.requests == []
