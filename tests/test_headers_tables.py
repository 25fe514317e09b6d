"""Every member of each header table, through the argument shapes the request paths use.

``proxy.py`` and ``fastpath.py`` call ``upstream_request_head(..., connection=<the values of
Connection>)``; the websocket path passes ``upgrade=True`` and no ``connection``. Each
refusal is checked for every member of its set, not one representative (mutation testing,
issue 19, found the siblings unchecked).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import cast

import pytest
from yarl import URL

from gateway.headers import (
    HOP_BY_HOP,
    Forwarded,
    TrustedProxies,
    UrlMap,
    extra_hop_by_hop,
    forwarded_for,
    real_client_ip,
    rewrite_set_cookie,
    upstream_request_head,
    valid_host,
)
from gateway.tracing import RequestTrace

# Written out here, not imported: removing a member from the gateway's table must fail.
HOP = ["Connection", "Keep-Alive", "TE", "Trailer", "Transfer-Encoding", "Upgrade",
       "Proxy-Connection", "Proxy-Authenticate", "Proxy-Authorization"]
# Set by the gateway itself: whatever the client sent never reaches the upstream.
REPLACED = ["Host", "Content-Length", "X-Forwarded-For", "X-Forwarded-Proto",
            "X-Forwarded-Host", "X-Real-IP", "X-Request-ID", "Forwarded", "Expect"]
# What the request paths pass as ``connection``: the Connection header's values.
SHAPES: list[Sequence[str] | None] = [None, (), ["keep-alive"], ["close"], ["Keep-Alive"]]

FWD = Forwarded("198.51.100.7", "198.51.100.7", "https", "www.example.com")


def head(raw: list[tuple[bytes, bytes]], connection: Sequence[str] | None = None,
         **kw: object) -> list[tuple[str, str]]:
    out = upstream_request_head("GET", "/x", raw, "cec.example.com", FWD, "rid-1",
                                connection=connection, **kw)  # type: ignore[arg-type]
    text = bytes(out).decode("latin-1")
    assert text.endswith("\r\n") and not text.endswith("\r\n\r\n")
    lines = text.split("\r\n")[:-1]
    assert lines[0] == "GET /x HTTP/1.1"
    pairs = []
    for line in lines[1:]:
        name, sep, value = line.partition(": ")
        assert sep, line
        pairs.append((name.lower(), value))
    return pairs


def names(pairs: list[tuple[str, str]]) -> list[str]:
    return [n for n, _ in pairs]


def test_the_table_is_exactly_the_listed_headers() -> None:
    assert {h.lower().encode() for h in HOP} == HOP_BY_HOP


@pytest.mark.parametrize("connection", SHAPES, ids=repr)
@pytest.mark.parametrize("hop", HOP)
def test_every_hop_by_hop_header_is_dropped(hop: str, connection: Sequence[str] | None) -> None:
    raw = [(b"Accept", b"*/*"), (hop.encode(), b"v"), (hop.upper().encode(), b"w"),
           (b"X-Kept", b"1")]
    pairs = head(raw, connection)
    assert hop.lower() not in names(pairs)
    assert ("accept", "*/*") in pairs and ("x-kept", "1") in pairs


@pytest.mark.parametrize("listed", [
    ["X-Secret"], ["keep-alive, X-Secret"], ["close", "x-secret"], ["X-Secret ,  , Keep-Alive"],
    ["upgrade, X-Secret"], ["TE, X-SECRET"],
])
def test_a_header_named_by_connection_is_dropped_on_the_request_paths(listed: list[str]) -> None:
    raw = [(b"Connection", v.encode()) for v in listed]
    raw += [(b"X-Secret", b"s"), (b"x-secret", b"t"), (b"X-Other", b"o")]
    for connection in (listed, None):  # the request paths' shape, and the unshaped call
        pairs = head(raw, connection)
        assert "x-secret" not in names(pairs), connection
        assert "connection" not in names(pairs)
        assert ("x-other", "o") in pairs


@pytest.mark.parametrize("value", ["keep-alive", "close", "upgrade", "Close", "UPGRADE"])
def test_a_plain_connection_value_names_nothing_extra(value: str) -> None:
    raw = [(b"Connection", value.encode())]
    assert extra_hop_by_hop(raw, [value]) == frozenset()
    assert extra_hop_by_hop(raw, []) == frozenset()


def test_connection_tokens_beyond_the_standard_set() -> None:
    raw = [(b"Connection", b"Keep-Alive, X-A"), (b"connection", b" x-b ,TE")]
    assert extra_hop_by_hop(raw, ["Keep-Alive, X-A", " x-b ,TE"]) == {b"x-a", b"x-b"}
    assert extra_hop_by_hop([(b"Connection", b"X-C")], ["X-C"]) == {b"x-c"}


@pytest.mark.parametrize("connection", SHAPES, ids=repr)
@pytest.mark.parametrize("replaced", REPLACED)
def test_every_replaced_header_comes_from_the_gateway_only(
        replaced: str, connection: Sequence[str] | None) -> None:
    raw = [(replaced.encode(), b"evil"), (replaced.lower().encode(), b"evil2")]
    pairs = head(raw, connection, extra=[(b"Content-Length", b"3")])
    assert all("evil" not in v for _, v in pairs), pairs
    ours = {"host": "cec.example.com", "content-length": "3", "x-forwarded-for": FWD.xff,
            "x-forwarded-proto": FWD.proto, "x-forwarded-host": FWD.host,
            "x-real-ip": FWD.client_ip, "x-request-id": "rid-1"}
    for name, value in ours.items():
        assert [v for n, v in pairs if n == name] == [value], name
    assert "forwarded" not in names(pairs) and "expect" not in names(pairs)


def test_a_clients_request_id_is_dropped_even_when_the_gateway_sends_none() -> None:
    out = upstream_request_head("GET", "/", [(b"X-Request-ID", b"evil")], "h", FWD, None,
                                connection=())
    assert b"evil" not in out and b"X-Request-ID" not in out


@pytest.mark.parametrize("name", ["X_Real_IP", "X_Forwarded_For", "x_forwarded_proto",
                                  "X_Forwarded_Host", "Some_Header", "_", "Content_Length"])
@pytest.mark.parametrize("connection", [None, ["keep-alive"]], ids=repr)
def test_underscore_names_are_dropped(name: str, connection: Sequence[str] | None) -> None:
    pairs = head([(name.encode(), b"evil"), (b"X-Fine", b"1")], connection)
    assert all("evil" not in v for _, v in pairs)
    assert ("x-fine", "1") in pairs


@pytest.mark.parametrize("connection", SHAPES, ids=repr)
def test_a_rewritten_body_carries_exactly_one_content_type(
        connection: Sequence[str] | None) -> None:
    raw = [(b"Content-Type", b"text/plain"), (b"content-type", b"text/evil")]
    pairs = head(raw, connection, new_content_type=b"application/json")
    assert [v for n, v in pairs if n == "content-type"] == ["application/json"]
    kept = head(raw[:1], connection)
    assert [v for n, v in kept if n == "content-type"] == ["text/plain"]


def test_the_websocket_head_says_upgrade_once() -> None:
    raw = [(b"Connection", b"Upgrade"), (b"Upgrade", b"evil"), (b"Sec-WebSocket-Key", b"k")]
    pairs = head(raw, None, upgrade=True)
    assert [v for n, v in pairs if n == "connection"] == ["Upgrade"]
    assert [v for n, v in pairs if n == "upgrade"] == ["websocket"]
    assert ("sec-websocket-key", "k") in pairs
    plain = head(raw, ["Upgrade"])
    assert "connection" not in names(plain) and "upgrade" not in names(plain)


def test_order_the_gateways_lines_follow_the_clients() -> None:
    pairs = head([(b"Accept", b"a")], ["keep-alive"], extra=[(b"X-Extra", b"e")],
                 new_content_type=b"t/t")
    assert names(pairs) == ["host", "accept", "x-real-ip", "x-forwarded-for",
                            "x-forwarded-proto", "x-forwarded-host", "x-request-id",
                            "x-extra", "content-type"]


def test_client_bytes_pass_unchanged() -> None:
    value = "caf\udce9".encode("utf-8", "surrogateescape")
    out = upstream_request_head("GET", "/caf\udce9", [(b"X-Raw", value)], "h", FWD, None)
    assert b"X-Raw: caf\xe9\r\n" in out and out.startswith(b"GET /caf\xe9 HTTP/1.1\r\n")


# ------------------------------------------------------------------ client address


def trusted(*cidrs: str) -> TrustedProxies:
    return TrustedProxies(ipaddress.ip_network(c) for c in cidrs)


@pytest.mark.parametrize(("address", "inside"), [
    ("10.0.0.1", True), ("10.255.255.255", True), ("11.0.0.0", False),
    ("::ffff:10.1.2.3", True), ("::ffff:11.1.2.3", False), ("fe80::1%eth0", True),
    ("fe80::1", True), ("fe81::1", True), ("2001:db8::1", False), ("", False), ("x", False),
])
def test_trusted_proxies_every_address_form(address: str, inside: bool) -> None:
    proxies = trusted("10.0.0.0/8", "fe80::/10")
    assert proxies.contains(address) is inside
    assert proxies.any is True and bool(proxies) is True
    empty = trusted()
    assert empty.contains(address) is False
    assert empty.any is False and bool(empty) is False


@pytest.mark.parametrize(("xff", "client"), [
    (["198.51.100.1"], "198.51.100.1"),
    (["198.51.100.1, 10.0.0.2"], "198.51.100.1"),
    (["[2001:db8::5]"], "2001:db8::5"),
    (["[2001:db8::5]:4711"], "2001:db8::5"),
    ([" , 198.51.100.3 ,"], "198.51.100.3"),
    (["203.0.113.9", ""], "203.0.113.9"),
    (["bogus"], "10.0.0.1"),
    (["198.51.100.1, bogus, 10.0.0.3"], "10.0.0.3"),
    (["10.0.0.4, 10.0.0.5"], "10.0.0.4"),
])
def test_real_client_ip_table(xff: list[str], client: str) -> None:
    assert real_client_ip("10.0.0.1", xff, trusted("10.0.0.0/8")) == client
    assert real_client_ip("203.0.113.50", xff, trusted("10.0.0.0/8")) == "203.0.113.50"


@pytest.mark.parametrize(("proto", "host", "want_proto", "want_host"), [
    ("https", "www.example.com", "https", "www.example.com"),
    (" https , http", " www.example.com:8443 , other", "https", "www.example.com:8443"),
    (None, None, "http", "gw:8080"),
    ("", "", "http", "gw:8080"),
    ("https", "evil host", "https", "gw:8080"),
    ("https", "a@b", "https", "gw:8080"),
])
def test_a_trusted_proxys_proto_and_host(proto: str | None, host: str | None, want_proto: str,
                                         want_host: str) -> None:
    fwd = forwarded_for("10.0.0.1", [], trusted("10.0.0.0/8"), "http", "gw:8080", proto, host)
    assert (fwd.client_ip, fwd.xff, fwd.proto, fwd.host) == ("10.0.0.1", "10.0.0.1",
                                                             want_proto, want_host)
    # From an untrusted peer the same headers are the client's own words.
    fwd = forwarded_for("203.0.113.1", [" ", "6.6.6.6 "], trusted("10.0.0.0/8"), "http",
                        "gw:8080", proto, host)
    assert fwd == Forwarded("203.0.113.1", "6.6.6.6, 203.0.113.1", "http", "gw:8080")


# ------------------------------------------------------------------ Host


@pytest.mark.parametrize("host", [
    "example.com", "example.com.", "a", "EXAMPLE.com:443", "x:65535", "x:0", "127.0.0.1:80",
    "[::1]", "[::1]:8443", "[2001:db8::1]:65535", "under_score.example", "a" * 63 + ".b",
    ".".join(["a" * 63] * 4) + ":65535",  # 261 characters: the longest accepted
])
def test_valid_hosts(host: str) -> None:
    assert valid_host(host)


@pytest.mark.parametrize("host", [
    "", "x:65536", "x:99999", "x:", "a b", "a@b", "a/b", "a\\b", "a\tb", "caf\xe9", "-a.b",
    "a" * 64, "[::1", "[zz]", "[1.2.3.4]", "[::1]x", "[::1]:65536", ":80", "a..b",
    ".".join(["a" * 63] * 4) + ".b:6553", "x:1:2",  # 262 characters
])
def test_invalid_hosts(host: str) -> None:
    assert not valid_host(host)


# ------------------------------------------------------------------ URL map, Set-Cookie


@pytest.mark.parametrize(("upstream", "origins", "host"), [
    ("https://CEC.example.com/sc/", ("https://cec.example.com:443", "https://cec.example.com"),
     "cec.example.com"),
    ("http://cec.example.com/", ("http://cec.example.com:80", "http://cec.example.com"),
     "cec.example.com"),
    ("http://cec.example.com:8080/", ("http://cec.example.com:8080",), "cec.example.com"),
    ("http://[::1]:8080/", ("http://[::1]:8080",), "::1"),
    ("https://[::1]/", ("https://[::1]:443", "https://[::1]"), "::1"),
])
def test_url_map_origins(upstream: str, origins: tuple[str, ...], host: str) -> None:
    urls = UrlMap.for_route("/p/", URL(upstream))
    assert urls.upstream_origins == origins
    assert urls.upstream_host == host
    assert urls.prefix == "/p/"
    assert urls.upstream_path == URL(upstream).raw_path


@pytest.mark.parametrize(("prefix", "upstream_path", "path", "mapped"), [
    ("/p/", "/sc/", "/sc/a", "/p/a"), ("/p/", "/sc/", "/sc/", "/p/"),
    ("/p/", "/sc/", "/sc", "/p"), ("/", "/sc/", "/sc", "/"), ("/p/", "/sc/", "/scx", None),
    ("/p/", "/sc/", "/other", None), ("/p/", "/sc", "/sc", "/p/"), ("/p", "/sc/", "/sc", "/p"),
    ("//", "/sc/", "/sc", "/"),
])
def test_map_path(prefix: str, upstream_path: str, path: str, mapped: str | None) -> None:
    urls = UrlMap(prefix, upstream_path, ("https://cec",), "cec")
    assert urls.map_path(path) == mapped


@pytest.mark.parametrize(("value", "expected"), [
    ("a=1; Domain=cec.example.com; Path=/sc/x", "a=1; Path=/p/x"),
    ("a=1; domain=.CEC.Example.com", "a=1"),
    ("a=1; Domain=example.com; Secure", "a=1; Secure"),
    ("a=1; Domain=other.example; Path=/elsewhere", "a=1; Domain=other.example; Path=/elsewhere"),
    ("a=1; Domain=ample.com", "a=1; Domain=ample.com"),
    ("a=1; Domain=xcec.example.com", "a=1; Domain=xcec.example.com"),
    ("a=1; Path", "a=1; Path"),
    ("a=1;path= /sc/y ;HttpOnly", "a=1; Path=/p/y;HttpOnly"),
])
def test_rewrite_set_cookie_table(value: str, expected: str) -> None:
    urls = UrlMap.for_route("/p/", URL("https://cec.example.com/sc/"))
    assert rewrite_set_cookie(value, urls) == expected


class _Trace:
    """Stands in for gateway.tracing.RequestTrace: the lines of the gateway's own span."""

    def upstream_lines(self) -> bytes:
        return b"traceparent: 00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01\r\n"


@pytest.mark.parametrize("connection", [None, ["keep-alive"]], ids=repr)
@pytest.mark.parametrize("name", ["traceparent", "tracestate", "TraceParent", "TRACESTATE"])
def test_with_tracing_the_clients_trace_context_is_replaced(
        name: str, connection: Sequence[str] | None) -> None:
    raw = [(name.encode(), b"evil"), (b"Accept", b"a")]
    pairs = head(raw, connection, trace=_Trace())
    assert all(v != "evil" for _, v in pairs)
    assert [n for n in names(pairs) if n == "traceparent"] == ["traceparent"]
    assert ("accept", "a") in pairs
    # Without tracing the client's context passes through untouched (nginx does the same).
    assert (name.lower(), "evil") in head(raw, connection)


def test_the_exact_bytes_of_a_request_head() -> None:
    out = upstream_request_head("POST", "/up?q=1", [(b"Accept", b"a"), (b"Cookie", b"c=1")],
                                "cec.example.com", FWD, "rid-1", [(b"Content-Length", b"2")],
                                new_content_type=b"application/json", connection=["close"],
                                trace=cast(RequestTrace, _Trace()))
    assert bytes(out) == (
        b"POST /up?q=1 HTTP/1.1\r\nHost: cec.example.com\r\nAccept: a\r\nCookie: c=1\r\n"
        b"X-Real-IP: 198.51.100.7\r\nX-Forwarded-For: 198.51.100.7\r\n"
        b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: www.example.com\r\n"
        b"X-Request-ID: rid-1\r\n"
        b"traceparent: 00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01\r\n"
        b"Content-Length: 2\r\nContent-Type: application/json\r\n")


@pytest.mark.parametrize(("xff", "client"), [
    (["x198.51.100.9]"], "10.0.0.1"),  # not bracketed: garbage, never an address
    (["[2001:db8::5]:80]"], "2001:db8::5"),
])
def test_real_client_ip_brackets(xff: list[str], client: str) -> None:
    assert real_client_ip("10.0.0.1", xff, trusted("10.0.0.0/8")) == client


@pytest.mark.parametrize(("address", "inside"), [("10.0.0.1%1", True), ("10.0.0.1%a%b", True)])
def test_trusted_proxies_scope_suffix(address: str, inside: bool) -> None:
    assert trusted("10.0.0.0/8").contains(address) is inside


def test_several_forwarded_for_lines_are_joined() -> None:
    fwd = forwarded_for("203.0.113.1", ["1.1.1.1", " 2.2.2.2 ", ""], trusted(), "http", "h",
                        None, None)
    assert fwd.xff == "1.1.1.1, 2.2.2.2, 203.0.113.1"


@pytest.mark.parametrize(("value", "expected"), [
    ("a=1; Path=/sc/x=y", "a=1; Path=/p/x=y"),
    ("a=1; Domain=XCEC.example.com", "a=1; Domain=XCEC.example.com"),
    ("a=1; Comment=/sc/x", "a=1; Comment=/sc/x"),
])
def test_rewrite_set_cookie_attribute_forms(value: str, expected: str) -> None:
    urls = UrlMap.for_route("/p/", URL("https://cec.example.com/sc/"))
    assert rewrite_set_cookie(value, urls) == expected
