"""Pure header rewriting: client IP (nginx realip, recursive), forwarded headers, hop-by-hop,
and the mapping of Set-Cookie, Location and Refresh from the upstream to the gateway."""

from __future__ import annotations

import ipaddress

import pytest
from yarl import URL

from gateway.boundary import rewrite_location, rewrite_refresh
from gateway.headers import (
    Forwarded,
    TrustedProxies,
    UrlMap,
    connection_tokens,
    forwarded_for,
    real_client_ip,
    rewrite_set_cookie,
    upstream_request_head,
)


def trusted(*cidrs: str) -> TrustedProxies:
    return TrustedProxies(ipaddress.ip_network(c) for c in cidrs)


TRUST = trusted("10.0.0.0/8", "192.168.0.0/16", "2001:db8::/32")
NONE = trusted()


# ------------------------------------------------------------------ real_client_ip


def test_untrusted_peer_ignores_forwarded_for() -> None:
    assert real_client_ip("203.0.113.7", ["6.6.6.6"], TRUST) == "203.0.113.7"
    assert real_client_ip("127.0.0.1", ["6.6.6.6"], NONE) == "127.0.0.1"


def test_no_header_means_peer() -> None:
    assert real_client_ip("10.0.0.1", [], TRUST) == "10.0.0.1"


def test_trusted_peer_walks_from_the_right() -> None:
    # A client that wrote 6.6.6.6 itself, then went through two of our proxies.
    xff = ["6.6.6.6, 198.51.100.9, 192.168.1.1"]
    assert real_client_ip("10.0.0.1", xff, TRUST) == "198.51.100.9"


def test_all_trusted_gives_leftmost() -> None:
    assert real_client_ip("10.0.0.1", ["10.1.1.1, 192.168.2.2"], TRUST) == "10.1.1.1"


def test_several_header_lines_are_one_list() -> None:
    assert real_client_ip("10.0.0.1", ["198.51.100.1", "10.2.2.2"], TRUST) == "198.51.100.1"
    assert real_client_ip("10.0.0.1", ["10.2.2.2", "198.51.100.1"], TRUST) == "198.51.100.1"


def test_garbage_never_becomes_the_client() -> None:
    assert real_client_ip("10.0.0.1", ["evil, 10.3.3.3"], TRUST) == "10.3.3.3"
    assert real_client_ip("10.0.0.1", ["unknown"], TRUST) == "10.0.0.1"
    assert real_client_ip("10.0.0.1", [" , ,"], TRUST) == "10.0.0.1"


def test_ipv6_walk() -> None:
    assert real_client_ip("2001:db8::1", ["2001:db9::5, 2001:db8::2"], TRUST) == "2001:db9::5"
    assert real_client_ip("2001:db8::1", ["[2001:db9::6]"], TRUST) == "2001:db9::6"
    assert real_client_ip("::1", ["2001:db9::5"], TRUST) == "::1"


def test_ipv4_mapped_peer_is_matched_as_ipv4() -> None:
    assert TRUST.contains("::ffff:10.0.0.1")
    assert real_client_ip("::ffff:10.0.0.1", ["198.51.100.4"], TRUST) == "198.51.100.4"


def test_trusted_proxies_membership() -> None:
    assert TRUST.contains("10.255.0.1")
    assert not TRUST.contains("11.0.0.1")
    assert not TRUST.contains("not-an-ip")
    assert not NONE.contains("10.0.0.1")
    assert bool(TRUST) and not bool(NONE)


# ------------------------------------------------------------------ forwarded_for


def test_forwarded_appends_peer_and_sets_proto_host() -> None:
    fwd = forwarded_for("127.0.0.1", ["6.6.6.6"], NONE, "http", "gw.example:8080",
                        "https", "evil.example")
    assert fwd.client_ip == "127.0.0.1"
    assert fwd.xff == "6.6.6.6, 127.0.0.1"
    # untrusted peer: its X-Forwarded-Proto/Host are not believed
    assert fwd.proto == "http" and fwd.host == "gw.example:8080"


def test_forwarded_from_trusted_proxy_keeps_its_proto_and_host() -> None:
    fwd = forwarded_for("10.0.0.9", ["198.51.100.2"], TRUST, "http", "internal:8080",
                        "https, http", "www.example.com")
    assert fwd.client_ip == "198.51.100.2"
    assert fwd.xff == "198.51.100.2, 10.0.0.9"
    assert fwd.proto == "https" and fwd.host == "www.example.com"


def test_forwarded_without_prior_header() -> None:
    fwd = forwarded_for("::1", [], NONE, "https", "[::1]:8443", None, None)
    assert fwd == Forwarded("::1", "::1", "https", "[::1]:8443")


# ------------------------------------------------------------------ request head


def _parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    pairs = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(": ")
            pairs.append((name, value))
    return lines[0], pairs


def test_connection_tokens() -> None:
    raw = [(b"Connection", b"keep-alive, X-Secret"), (b"connection", b"Foo")]
    assert connection_tokens(raw) == {b"keep-alive", b"x-secret", b"foo"}


def test_upstream_head_drops_hop_by_hop_and_replaces_forwarded() -> None:
    raw = [
        (b"Host", b"gw.example"), (b"Connection", b"keep-alive, X-Secret"), (b"X-Secret", b"1"),
        (b"Keep-Alive", b"timeout=5"), (b"TE", b"trailers"), (b"Trailer", b"X-T"),
        (b"Transfer-Encoding", b"chunked"), (b"Upgrade", b"h2c"),
        (b"Proxy-Authorization", b"Basic eA=="), (b"Proxy-Connection", b"keep-alive"),
        (b"X-Forwarded-For", b"6.6.6.6"), (b"X-Real-IP", b"6.6.6.6"),
        (b"X-Forwarded-Proto", b"gopher"), (b"X-Forwarded-Host", b"evil"),
        (b"Forwarded", b"for=6.6.6.6"), (b"Content-Length", b"999"),
        (b"Cookie", b"a=1"), (b"X-Custom", b"kept"), (b"Authorization", b"Bearer t"),
    ]
    fwd = Forwarded("127.0.0.1", "6.6.6.6, 127.0.0.1", "http", "gw.example")
    head = upstream_request_head("POST", "/up/x?y=1", raw, "cec.example.com", fwd, "rid1",
                                 [(b"Content-Length", b"3")])
    line, pairs = _parse_head(bytes(head))
    assert line == "POST /up/x?y=1 HTTP/1.1"
    names = [n.lower() for n, _ in pairs]
    for hop in ("connection", "x-secret", "keep-alive", "te", "trailer", "transfer-encoding",
                "upgrade", "proxy-authorization", "proxy-connection", "forwarded"):
        assert hop not in names, hop
    d = {n.lower(): v for n, v in pairs}
    assert names.count("host") == 1 and d["host"] == "cec.example.com"
    assert names.count("content-length") == 1 and d["content-length"] == "3"
    assert d["x-real-ip"] == "127.0.0.1"
    assert d["x-forwarded-for"] == "6.6.6.6, 127.0.0.1"
    assert d["x-forwarded-proto"] == "http" and d["x-forwarded-host"] == "gw.example"
    assert names.count("x-forwarded-for") == 1 and names.count("x-real-ip") == 1
    assert d["x-request-id"] == "rid1"
    assert d["cookie"] == "a=1" and d["x-custom"] == "kept" and d["authorization"] == "Bearer t"


def test_upstream_head_for_websocket_upgrade() -> None:
    raw = [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket"),
           (b"Sec-WebSocket-Key", b"k"), (b"Sec-WebSocket-Version", b"13")]
    fwd = Forwarded("127.0.0.1", "127.0.0.1", "http", "gw")
    head = upstream_request_head("GET", "/ws", raw, "up", fwd, None, upgrade=True)
    _, pairs = _parse_head(bytes(head))
    lower = [(n.lower(), v) for n, v in pairs]
    assert ("connection", "Upgrade") in lower and ("upgrade", "websocket") in lower
    assert [n for n, _ in lower].count("upgrade") == 1
    assert ("sec-websocket-key", "k") in lower
    assert "x-request-id" not in [n for n, _ in lower]


# ------------------------------------------------------------------ responses

CEC = UrlMap.for_route("/service-cloud/", URL("https://cec.example.com/service-cloud/"))
DEMO = UrlMap.for_route("/demo/", URL("http://10.0.0.5:8080/"))


@pytest.mark.parametrize(("value", "expected"), [
    ("https://cec.example.com/service-cloud/login?x=1#top", "/service-cloud/login?x=1#top"),
    ("https://cec.example.com:443/service-cloud/a", "/service-cloud/a"),
    ("HTTPS://CEC.EXAMPLE.COM/service-cloud/a", "/service-cloud/a"),
    ("https://cec.example.com/service-cloud", "/service-cloud"),
    ("/service-cloud/relative", "/service-cloud/relative"),
    # outside the route's upstream path, another host, another scheme: untouched
    ("https://cec.example.com/other/x", "https://cec.example.com/other/x"),
    ("https://cec.example.com.evil.example/service-cloud/", "https://cec.example.com.evil.example/service-cloud/"),
    ("http://cec.example.com/service-cloud/a", "http://cec.example.com/service-cloud/a"),
    ("https://elsewhere.example/service-cloud/a", "https://elsewhere.example/service-cloud/a"),
    # scheme-relative: the upstream's own host is mapped, another one made absolute
    ("//cec.example.com/service-cloud/a", "/service-cloud/a"),
    ("//evil.example/x", "http://evil.example/x"),
])
def test_rewrite_location(value: str, expected: str) -> None:
    assert rewrite_location(value, CEC) == expected


def test_rewrite_location_other_prefix() -> None:
    assert rewrite_location("http://10.0.0.5:8080/next?a=b", DEMO) == "/demo/next?a=b"
    assert rewrite_location("http://10.0.0.5:8080", DEMO) == "/demo/"
    assert rewrite_location("/next", DEMO) == "/demo/next"
    assert rewrite_location("http://10.0.0.5:8081/next", DEMO) == "http://10.0.0.5:8081/next"


@pytest.mark.parametrize(("value", "expected"), [
    ("0; url=https://cec.example.com/service-cloud/x", "0; url=/service-cloud/x"),
    ("5;URL='https://cec.example.com/service-cloud/y'", "5;URL='/service-cloud/y'"),
    ("3", "3"),
    ("0; url=https://other.example/", "0; url=https://other.example/"),
])
def test_rewrite_refresh(value: str, expected: str) -> None:
    assert rewrite_refresh(value, CEC) == expected


def test_set_cookie_domain_dropped_and_path_mapped() -> None:
    out = rewrite_set_cookie(
        "ccmessaging-token=abc; Domain=cec.example.com; Path=/service-cloud/; HttpOnly; Secure",
        CEC)
    assert out.startswith("ccmessaging-token=abc")
    assert "domain" not in out.lower()
    assert "Path=/service-cloud/" in out
    assert "HttpOnly" in out and "Secure" in out


@pytest.mark.parametrize("domain", ["cec.example.com", ".cec.example.com", "CEC.Example.com",
                                    "example.com"])
def test_set_cookie_domains_covering_the_upstream_are_dropped(domain: str) -> None:
    out = rewrite_set_cookie(f"t=1; Domain={domain}; Path=/", CEC)
    assert "domain" not in out.lower()


def test_set_cookie_foreign_domain_kept() -> None:
    out = rewrite_set_cookie("t=1; Domain=analytics.example.net", CEC)
    assert "Domain=analytics.example.net" in out
    # a suffix that only looks similar is not the upstream's parent domain
    assert "Domain=ample.com" in rewrite_set_cookie("t=1; Domain=ample.com", CEC)


def test_set_cookie_path_mapped_through_a_different_prefix() -> None:
    assert "Path=/demo/app" in rewrite_set_cookie("s=1; Path=/app", DEMO)
    # a path outside the route's upstream path is left alone
    assert "Path=/other" in rewrite_set_cookie("s=1; Path=/other", CEC)


def test_set_cookie_value_untouched() -> None:
    value = "t=a=b;c; Path=/service-cloud/"
    assert rewrite_set_cookie(value, CEC).startswith("t=a=b;c")
