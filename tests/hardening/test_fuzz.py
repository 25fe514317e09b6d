"""Property-based fuzzing: header rewriting, path mapping, and the request entry point.

The pure functions get invariants that must hold for any input (hypothesis shrinks a
counter-example to its essence). The entry point gets random bytes and mutated valid
requests on a raw socket to a running gateway: no crash (it keeps serving), no hang
(every connection ends within the timeouts), memory bounded, and nothing malformed ever
reaches the upstream (the recorder frames strictly).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import re
import time
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from yarl import URL

from gateway.boundary import browser_split, rewrite_location
from gateway.errors import BadRequest
from gateway.headers import (
    TrustedProxies,
    UrlMap,
    forwarded_for,
    real_client_ip,
    rewrite_set_cookie,
)
from gateway.routing import compile_route, normalize_path
from gateway.runtime import Running
from tests.hardening.rawhttp import RawRecorder, exchange
from tests.hardening.test_slow_clients import rss_bytes

PURE = settings(max_examples=300, deadline=None)

# ------------------------------------------------------------------ strategies

ROUTES = [
    ("/service-cloud/", "https://cec.example.com/service-cloud/"),
    ("/app/", "http://10.0.0.5:8080/up/"),
    ("/", "http://origin.example:8080/root/"),
    ("/demo/", "http://[2001:db8::5]/"),
]
URLMAPS = [UrlMap.for_route(p, URL(u)) for p, u in ROUTES]

segment_alphabet = st.sampled_from(
    ["a", "b", "..", ".", "", "%2e", "%2E", "%2e%2e", ".%2e", "%2e.", "..;", "..;x", ".;",
     "%2e%2e;", "x;y", "%", "%zz", "%41", "~", "%20", "%c0%ae", "%252e%252e", "é", "%C3%A9"])
paths = st.lists(st.one_of(segment_alphabet, st.text("abc.%;", max_size=4)), max_size=8).map(
    lambda segs: "/" + "/".join(segs))

_V4 = st.ip_addresses(v=4).map(str)
_V6 = st.ip_addresses(v=6).map(str)
addresses = st.one_of(_V4, _V6, st.sampled_from(["10.1.2.3", "192.168.0.9", "6.6.6.6",
                                                  "::ffff:10.0.0.1", "2001:db8::1"]))
junk = st.text(max_size=12)
xff_entry = st.one_of(addresses, addresses.map(lambda a: f"[{a}]" if ":" in a else a), junk)
xff_values = st.lists(st.lists(xff_entry, max_size=4).map(", ".join), max_size=3)
TRUSTED = TrustedProxies(ipaddress.ip_network(c) for c in ("10.0.0.0/8", "192.168.0.0/16",
                                                           "::ffff:10.0.0.0/104"))


# ------------------------------------------------------------------ normalize_path


def resolve_like_an_upstream(path: str, *, params: bool) -> str:
    """How a typical upstream resolves a target: percent-decode, drop ``;params`` (servlet
    containers do), then dot segments (RFC 3986 5.2.4)."""
    out: list[str] = []
    for seg in path.split("/")[1:]:
        seg = unquote(seg)
        if params:
            seg = seg.split(";", 1)[0]
        if seg == ".":
            continue
        if seg == "..":
            if out:
                out.pop()
            continue
        out.append(seg)
    return "/" + "/".join(out)


@PURE
@given(paths)
@example("/%2e%2e/etc/passwd")
@example("/a/.%2e/.%2E/b")
def test_normalize_path_leaves_no_dot_segments(raw: str) -> None:
    try:
        path = normalize_path(raw)
    except BadRequest:
        return
    assert path.startswith("/")
    for seg in path.split("/")[1:]:
        assert unquote(seg) not in (".", ".."), (raw, path)
    assert normalize_path(path) == path, "normalising twice changes nothing"


@PURE
@given(paths)
@example("/service-cloud/..;/admin")
def test_normalize_path_never_lets_servlet_dot_segments_through(raw: str) -> None:
    """``/..;/`` is ``..`` to a servlet container (path parameters are stripped first)."""
    try:
        path = normalize_path(raw)
    except BadRequest:
        return
    for seg in path.split("/")[1:]:
        assert unquote(seg).split(";", 1)[0] not in (".", ".."), (raw, path)


@PURE
@given(st.sampled_from(ROUTES), paths)
@example(("/app/", "http://10.0.0.5:8080/up/"), "/app/%2e%2e/%2e%2e/secret")
def test_mapped_path_never_escapes_the_upstream_prefix(route: tuple[str, str], raw: str) -> None:
    prefix, upstream = route
    compiled = compile_route(prefix, upstream)
    try:
        path = normalize_path(prefix + raw.lstrip("/"))
    except BadRequest:
        return
    if not path.startswith(prefix):
        return  # another route's business
    target = compiled.target(path, "")
    assert target.startswith(compiled.upstream.path)
    resolved = resolve_like_an_upstream(target, params=False)
    base = compiled.upstream.path.rstrip("/")
    assert resolved == base or resolved.startswith(base + "/"), (raw, path, target, resolved)


@PURE
@given(st.sampled_from(ROUTES), paths)
def test_mapped_path_never_escapes_for_a_servlet_upstream(route: tuple[str, str],
                                                          raw: str) -> None:
    prefix, upstream = route
    compiled = compile_route(prefix, upstream)
    try:
        path = normalize_path(prefix + raw.lstrip("/"))
    except BadRequest:
        return
    if not path.startswith(prefix):
        return
    resolved = resolve_like_an_upstream(compiled.target(path, ""), params=True)
    base = compiled.upstream.path.rstrip("/")
    assert resolved == base or resolved.startswith(base + "/"), (raw, path, resolved)


@PURE
@given(st.text(max_size=40))
def test_normalize_path_total(raw: str) -> None:
    """Any text: a path or BadRequest, nothing else."""
    try:
        normalize_path(raw)
    except BadRequest:
        pass


# ------------------------------------------------------------------ Location / Set-Cookie

locations = st.one_of(
    st.text(max_size=30),
    st.builds(lambda o, p, t: o + p + t,
              st.sampled_from(["https://cec.example.com", "https://cec.example.com:443",
                               "http://10.0.0.5:8080", "http://origin.example:8080",
                               "http://[2001:db8::5]", "https://CEC.example.com",
                               "https://cec.example.com.evil", "https://evil.example", ""]),
              st.sampled_from(["/service-cloud/", "/service-cloud", "/up/", "/up", "/root/",
                               "/", "/other/", "//", "/root//", "/root/\\", "/up//"]),
              st.text("ab/\\?#.:@%", max_size=12)),
)


@PURE
@given(st.sampled_from(URLMAPS), locations)
@example(URLMAPS[2], "http://origin.example:8080/root//evil.example/")
@example(URLMAPS[2], "/root/\\evil.example")
def test_rewrite_location_never_makes_an_off_site_redirect(urls: UrlMap, value: str) -> None:
    out = rewrite_location(value, urls)
    # A path the gateway emits is never scheme-relative ("//host"), which a browser follows
    # to another site (browsers read "\\" as "/" and drop tabs and newlines first).
    ref = browser_split(out, "http")
    if ref is not None and ref.scheme is None:
        assert not ref.path.startswith("//"), (value, out)
    # A mapped path stays in the route (tests/test_boundary.py resolves it like a browser).
    if out != value and out.startswith("/") and ref is not None and ref.scheme is None:
        mapped_from_us = any(value.lower().startswith(o) for o in urls.upstream_origins)
        if mapped_from_us:
            assert out.startswith(urls.prefix.rstrip("/") or "/"), (value, out)


@PURE
@given(st.sampled_from(URLMAPS), locations)
def test_rewrite_location_leaves_foreign_urls_alone(urls: UrlMap, value: str) -> None:
    lowered = value.lower()
    ours = any(lowered.startswith(o) for o in urls.upstream_origins)
    plain = value.startswith(("http://", "https://")) and "\\" not in value
    if plain and not ours:
        assert rewrite_location(value, urls) == value


cookie_attr = st.one_of(
    st.builds(lambda d: f" Domain={d}", st.sampled_from(
        ["cec.example.com", ".cec.example.com", "example.com", ".EXAMPLE.com", "evil.example",
         "10.0.0.5", "origin.example", "ample.com", "com"])),
    st.builds(lambda p: f" Path={p}", st.sampled_from(
        ["/", "/service-cloud/", "/service-cloud", "/up/", "/up/x", "/root/a", "/other"])),
    st.sampled_from([" HttpOnly", " Secure", " SameSite=Lax", " Max-Age=60", "", " =",
                     " Domain", " Path"]),
    st.text(alphabet=st.characters(blacklist_characters=";"), max_size=10),
)


@PURE
@given(st.sampled_from(URLMAPS), st.text(alphabet=st.characters(blacklist_characters=";"),
                                         max_size=20),
       st.lists(cookie_attr, max_size=6))
def test_rewrite_set_cookie_invariants(urls: UrlMap, pair: str, attrs: list[str]) -> None:
    value = ";".join([pair, *attrs])
    out = rewrite_set_cookie(value, urls)
    parts = out.split(";")
    assert parts[0] == pair, "the name=value pair is never touched"
    kept = []
    for attr in parts[1:]:
        name, eq, val = attr.strip().partition("=")
        if name.lower() == "domain" and eq:
            domain = val.strip().lstrip(".").lower()
            # Never a Domain that names the upstream host or a parent of it.
            assert not (domain == urls.upstream_host
                        or urls.upstream_host.endswith("." + domain)), (value, out)
        if not (name.lower() == "path" and eq):
            kept.append(attr)
    # Everything but Domain (dropped) and Path (mapped) survives, in order.
    expected = []
    for attr in attrs:
        name, eq, val = attr.strip().partition("=")
        if name.lower() == "path" and eq:
            continue
        if name.lower() == "domain":
            domain = val.strip().lstrip(".").lower()
            if domain == urls.upstream_host or urls.upstream_host.endswith("." + domain):
                continue
        expected.append(attr)
    assert kept == expected
    for attr in parts[1:]:
        name, eq, val = attr.strip().partition("=")
        if name.lower() == "path" and eq and val.strip().startswith(urls.upstream_path):
            assert val.strip().startswith(urls.prefix), (value, out)


# ------------------------------------------------------------------ forwarded / real IP


def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:
        text = text[1:text.index("]")]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


@PURE
@given(addresses, xff_values)
def test_untrusted_peer_is_the_client_whatever_it_claims(peer: str, xff: list[str]) -> None:
    assume(not TRUSTED.contains(peer))
    fwd = forwarded_for(peer, xff, TRUSTED, "https", "gw.example", "http", "evil.example")
    assert fwd.client_ip == peer
    assert fwd.proto == "https" and fwd.host == "gw.example"
    assert fwd.xff.endswith(peer)


@PURE
@given(st.sampled_from(["10.0.0.1", "192.168.1.1", "::ffff:10.9.9.9"]), xff_values)
@example("10.0.0.1", ["6.6.6.6, 203.0.113.9"])
def test_real_ip_is_never_merely_claimed(peer: str, xff: list[str]) -> None:
    """Walking right to left, every hop after the chosen address is a trusted proxy: an
    address only an untrusted party wrote can never become X-Real-IP."""
    client = real_client_ip(peer, xff, TRUSTED)
    chain = [p.strip() for v in xff for p in v.split(",") if p.strip()] + [peer]
    positions = [i for i, hop in enumerate(chain)
                 if _parse_ip(hop) is not None and _parse_ip(hop) == _parse_ip(client)]
    assert positions, (client, chain)
    i = max(positions)
    for hop in chain[i + 1:]:
        assert TRUSTED.contains(hop.strip("[]")), (client, chain)
    assert _parse_ip(client) is not None
    # The result goes into a header line: printable ASCII only.
    assert client.isascii() and client.isprintable(), repr(client)


@PURE
@given(addresses, xff_values, st.booleans())
def test_forwarded_for_appends_the_peer(peer: str, xff: list[str], trust_all: bool) -> None:
    trusted = TrustedProxies([ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
                             if trust_all else [])
    fwd = forwarded_for(peer, xff, trusted, "http", "gw", None, None)
    prior = [v.strip() for v in xff if v.strip()]
    assert fwd.xff == ", ".join([*prior, peer])


# ------------------------------------------------------------------ the request entry point

VALID = [
    b"GET /a?x=1 HTTP/1.1\r\nHost: gw.test\r\nAccept: */*\r\n\r\n",
    b"POST /b HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /c HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: gw.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"HEAD /d HTTP/1.0\r\nHost: gw.test\r\nConnection: keep-alive\r\n\r\n",
]
TOKENS = [b"\r\n", b"\n", b"\r", b" ", b"\t", b"\x00", b":", b",", b";", b"chunked",
          b"Transfer-Encoding: chunked\r\n", b"Content-Length: 3\r\n", b"Content-Length: 99\r\n",
          b"0\r\n\r\n", b"ffffffffffffffffff", b"-1", b"\r\n ", b"GET /x HTTP/1.1\r\n",
          b"Host: other\r\n", b"%2e%2e/", b"/../", b"\xff", b"HTTP/1.0",
          b"Expect: 100-continue\r\n", b"Connection: close\r\n", b"Upgrade: h2c\r\n"]


@st.composite
def mutated_requests(draw: st.DrawFn) -> bytes:
    data = bytearray(b"".join(draw(st.lists(st.sampled_from(VALID), min_size=1, max_size=3))))
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["insert", "delete", "replace", "flip"]))
        if kind == "insert":
            data[pos:pos] = draw(st.sampled_from(TOKENS))
        elif kind == "delete":
            del data[pos:pos + draw(st.integers(1, 8))]
        elif kind == "replace":
            data[pos:pos + draw(st.integers(1, 4))] = draw(st.sampled_from(TOKENS))
        elif data:
            i = min(pos, len(data) - 1)
            data[i] ^= 1 << draw(st.integers(0, 7))
    return bytes(data)


entry_inputs = st.one_of(st.binary(max_size=300), mutated_requests())


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


async def _probe(port: int) -> None:
    answers, _ = await exchange(
        port, b"GET /health HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n", limit_s=2)
    assert [a.status for a in answers] == [200], answers


async def _send_and_wait(port: int, data: bytes, *, settle: float = 0.03
                         ) -> tuple[bytes, float]:
    """Send, collect answers until the line is quiet for ``settle``, then half-close and
    read until the gateway closes. Returns (bytes received, seconds to the close)."""
    start = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    got = bytearray()
    try:
        with contextlib.suppress(ConnectionError):
            writer.write(data)
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                while chunk := await asyncio.wait_for(reader.read(65536), settle):
                    got += chunk
            if writer.can_write_eof():
                writer.write_eof()
        with contextlib.suppress(ConnectionError):
            # Bounded: client_header (1 s) or the read timeout (1 s), plus lingering (2 s).
            async with asyncio.timeout(4.0):
                while chunk := await reader.read(65536):
                    got += chunk
    finally:
        writer.close()
    return bytes(got), time.monotonic() - start


_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


@settings(max_examples=200, deadline=None, derandomize=False,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=entry_inputs)
async def test_entry_point_survives_random_and_mutated_requests(
        gw: Running, recorder: RawRecorder, data: bytes) -> None:
    errors = _Errors()
    watched = [logging.getLogger(n) for n in ("asyncio", "gateway", "aiohttp")]
    for logger in watched:
        logger.addHandler(errors)
    try:
        before = len(recorder.requests)
        got, took = await _send_and_wait(gw.port, data)
        assert took < 4.0, f"no answer and no close within the timeouts for {data!r}"
        # Nothing malformed reaches the upstream, and no more requests than request lines
        # (an HTTP/0.9-style "GET /" line without a version counts as one, then closes).
        # A body the client itself cut short is streamed as far as it came and the upstream
        # connection is then aborted (nginx with proxy_request_buffering off does the same):
        # the upstream sees an incomplete request it cannot act on, never a malformed one.
        malformed = [e for e in recorder.errors if "body cut short" not in e]
        assert not malformed, (data, recorder.errors)
        forwarded = len(recorder.requests) - before
        assert forwarded <= data.count(b"HTTP/") + 1, (data, recorder.requests[before:])
        for code in _STATUS.findall(got):
            assert int(code) != 500 and int(code) < 600, (data, got[:300])
        await _probe(gw.port)
    finally:
        for logger in watched:
            logger.removeHandler(errors)
    assert not errors.records, errors.records


NON_ASCII = {
    "host_invalid_utf8": b"GET /a HTTP/1.1\r\nHost: \x80\r\n\r\n",
    "host_invalid_utf8_post": (b"POST /a HTTP/1.1\r\nHost: gw\xff\r\n"
                               b"Content-Length: 0\r\n\r\n"),
    "host_non_latin1": "GET /a HTTP/1.1\r\nHost: 中文.example\r\n\r\n".encode(),
    "xff_invalid_utf8": b"GET /a HTTP/1.1\r\nHost: gw.test\r\nX-Forwarded-For: \xff\r\n\r\n",
    "xff_invalid_utf8_post": (b"POST /a HTTP/1.1\r\nHost: gw.test\r\nX-Forwarded-For: 1.2.3.4\xfe"
                              b"\r\nContent-Length: 0\r\n\r\n"),
    "obs_text_in_other_header": (b"GET /a HTTP/1.1\r\nHost: gw.test\r\n"
                                 b"X-Name: \xe9\xff\r\n\r\n"),
}


@pytest.mark.parametrize("warm", [False, True], ids=["full_path", "fast_path"])
@pytest.mark.parametrize("data", NON_ASCII.values(), ids=NON_ASCII.keys())
async def test_non_ascii_header_bytes_never_crash(gw: Running, recorder: RawRecorder,
                                                  data: bytes, warm: bool) -> None:
    """obs-text (bytes >= 0x80) is legal in field values; refuse it or pass it on, but never
    answer 500 or drop the connection without an answer."""
    if warm:  # an idle pooled connection: body-less GETs take the fast path
        await _probe(gw.port)
    errors = _Errors()
    watched = [logging.getLogger(n) for n in ("asyncio", "gateway", "aiohttp")]
    for logger in watched:
        logger.addHandler(errors)
    try:
        answers, _ = await exchange(gw.port, data, limit_s=3)
    finally:
        for logger in watched:
            logger.removeHandler(errors)
    assert [a.status for a in answers] in ([200], [400]), answers
    assert not errors.records, errors.records
    assert not recorder.errors
    if answers[0].status == 200:
        req = recorder.requests[-1]
        assert req.target == "/a"
        assert req.header("X-Real-IP") == "127.0.0.1"


async def test_entry_point_memory_and_connections_bounded(gw: Running,
                                                          recorder: RawRecorder) -> None:
    """Many junk connections at once: memory returns, every connection is closed."""
    blobs = [bytes([i % 256]) * 2000 + b"\r\n\r\n" for i in range(200)]
    blobs += [VALID[1][: i % len(VALID[1])] for i in range(200)]  # cut-off requests
    rss_before = rss_bytes()
    results = await asyncio.gather(*(_send_and_wait(gw.port, blob, settle=0)
                                     for blob in blobs))
    assert max(took for _, took in results) < 4.0
    await _probe(gw.port)
    server = gw.listener.server
    async with asyncio.timeout(3):
        while len(getattr(server, "connections", ())) > 0:  # noqa: ASYNC110 (no event to wait on)
            await asyncio.sleep(0.05)
    gc.collect()
    assert rss_bytes() - rss_before < 48 << 20
    assert not recorder.errors
