"""The parser layer's pure parts: what a refusal is called, logged and answered (no sockets).

The exceptions are real: raw requests fed to aiohttp's own request parser, the one the
gateway listens with.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any, cast

import pytest
from aiohttp.http_parser import HttpRequestParser
from hypothesis import given
from hypothesis import strategies as st

from gateway.app import origin_form
from gateway.server import classify, describe, vet

SECRET = "PLANTEDSECRET9"


class _Protocol:
    def resume_reading(self) -> None:
        pass


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def parse(loop: asyncio.AbstractEventLoop, data: bytes) -> BaseException | object:
    """The parser's exception for ``data``, or its first message."""
    parser = HttpRequestParser(cast(Any, _Protocol()), loop, 65536, max_line_size=8192,
                               max_field_size=8192, max_headers=100)
    try:
        messages, _, _ = parser.feed_data(data)
    except Exception as exc:
        return exc
    return messages[0][0]


@pytest.mark.parametrize(("data", "status", "reason"), [
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414, "uri_too_long"),
    (b"GET /a HTTP/1.1\r\nX: /" + b"a" * 9000 + b"\r\n\r\n", 431, "header_too_large"),
    (b"GET /a HTTP/1.1\r\nAuthorization: Bearer " + b"a" * 9000 + b"\r\n\r\n", 431,
     "header_too_large"),
    (b"GET /a HTTP/1.1\r\n" + b"".join(b"X%d: 1\r\n" % i for i in range(101)) + b"\r\n", 431,
     "too_many_headers"),
    (b"GET /a HTTP/3.0\r\nHost: x\r\n\r\n", 505, "version_not_supported"),
    (b"GET /a HTTP/1.10\r\nHost: x\r\n\r\n", 400, "bad_request_line"),
    (b"G@T /a HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_method"),
    (b"GET /a HTTP/1.1\r\nHost: x\r\nX: a\x01b\r\n\r\n", 400, "bad_header"),
    (b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400,
     "bad_framing"),
    (b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 400, "bad_framing"),
])
def test_parser_errors_are_classified(loop: asyncio.AbstractEventLoop, data: bytes,
                                      status: int, reason: str) -> None:
    exc = parse(loop, data)
    assert isinstance(exc, Exception), exc
    assert classify(exc)[:2] == (status, reason)


@pytest.mark.parametrize(("line", "status", "reason"), [
    (b"GET /a HTTP/2.0", 505, "version_not_supported"),
    (b"GET /a", 400, "http_0_9"),
])
def test_parsed_versions_other_than_1_are_refused(loop: asyncio.AbstractEventLoop,
                                                  line: bytes, status: int,
                                                  reason: str) -> None:
    msg = parse(loop, line + b"\r\nHost: x\r\n\r\n")
    refused = vet(msg)  # type: ignore[arg-type]
    assert refused is not None
    assert (refused.status, refused.reason, refused.method, refused.path) == (
        status, reason, "GET", "/a")


@pytest.mark.parametrize(("te", "refused"), [
    (b"chunked", False), (b"Chunked ", False), (b"gzip, chunked", True),
    (b"identity,chunked", True),
])
def test_codings_before_chunked_are_refused(loop: asyncio.AbstractEventLoop, te: bytes,
                                            refused: bool) -> None:
    msg = parse(loop, b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: " + te + b"\r\n\r\n")
    got = vet(msg)  # type: ignore[arg-type]
    assert (got is not None) == refused
    if got is not None:
        assert (got.status, got.reason) == (501, "transfer_coding")


def test_describe_keeps_llhttps_reason_only(loop: asyncio.AbstractEventLoop) -> None:
    exc = parse(loop, b"GET /?q=" + SECRET.encode() + b" HTTP/1.1\r\nCookie: a="
                + SECRET.encode() + b"\x01\r\n\r\n")
    assert isinstance(exc, Exception)
    assert SECRET in str(exc)  # aiohttp quotes the line...
    assert describe(exc) == "BadHttpMessage: Invalid header value char"  # ...we do not


_place = st.sampled_from(["target", "query", "name", "value", "cookie", "method", "version"])


@given(place=_place, noise=st.binary(min_size=0, max_size=12), long=st.booleans())
def test_describe_never_quotes_the_request(place: str, noise: bytes, long: bool) -> None:
    secret = SECRET.encode() + noise + (b"z" * 9000 if long else b"")
    target, name, value, method, version = b"/a", b"X-A", b"v", b"GET", b"HTTP/1.1"
    if place == "target":
        target = b"/" + secret
    elif place == "query":
        target = b"/a?t=" + secret
    elif place == "name":
        name = b"X-" + secret
    elif place in ("value", "cookie"):
        value = secret
        name = b"Cookie" if place == "cookie" else name
    elif place == "method":
        method = secret
    else:
        version = b"HTTP/" + secret
    data = method + b" " + target + b" " + version + b"\r\nHost: x\r\n" + name + b": " + value \
        + b"\r\n\r\n"
    loop = asyncio.new_event_loop()
    try:
        exc = parse(loop, data)
    finally:
        loop.close()
    if isinstance(exc, Exception):
        text = describe(exc) + " ".join(map(str, classify(exc)))
        assert SECRET not in text and "z" * 20 not in text, text


@pytest.mark.parametrize(("target", "expected"), [
    ("http://site.example/x?q=1", ("site.example", "/x?q=1")),
    ("HTTPS://Site.Example:8443/", ("Site.Example:8443", "/")),
    ("http://site.example", ("site.example", "/")),
    ("http://site.example?q", ("site.example", "/?q")),
    ("http://[2001:db8::1]:8080/a", ("[2001:db8::1]:8080", "/a")),
    ("http://10.0.0.1/a", ("10.0.0.1", "/a")),
    ("http://u:p@site.example/", None),
    ("ftp://site.example/", None),
    ("http://site.example:0/", None),
    ("http://site.example:65536/", None),
    ("http://site example/", None),
    ("http://-site.example/", None),
    ("http:///x", None),
    ("*", None),
    ("site.example:443", None),
])
def test_origin_form_of_absolute_targets(target: str,
                                         expected: tuple[str, str] | None) -> None:
    assert origin_form(target) == expected
