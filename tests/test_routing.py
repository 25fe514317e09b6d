"""Route selection and nginx ``proxy_pass``-with-URI path mapping (pure, no sockets)."""

from __future__ import annotations

from urllib.parse import unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import BadRequest
from gateway.routing import RouteTable, compile_route, normalize_path

CEC = compile_route("/service-cloud/", "https://cec.example.com/service-cloud/")
SITE = compile_route("/", "http://127.0.0.1:3000/", preserve_host=True)
API = compile_route("/service-cloud/rest/", "http://10.0.0.5:8081/internal/rest/")
TABLE = RouteTable([SITE, CEC, API])


def test_compile_route_upstream_fields() -> None:
    up = CEC.upstream
    assert (up.scheme, up.host, up.port, up.path) == ("https", "cec.example.com", 443,
                                                        "/service-cloud/")
    assert up.host_header == "cec.example.com"  # default port is not written
    assert up.ssl is not None
    assert SITE.upstream.host_header == "127.0.0.1:3000"
    assert SITE.upstream.ssl is None
    assert SITE.preserve_host is True and CEC.preserve_host is False


def test_ipv6_upstream_host_header() -> None:
    route = compile_route("/", "http://[::1]:8080/")
    assert route.upstream.host == "::1"
    assert route.upstream.host_header == "[::1]:8080"


def test_longest_prefix_wins_whatever_the_order() -> None:
    assert TABLE.match("/service-cloud/rest/x") is API
    assert TABLE.match("/service-cloud/webclient/a.js") is CEC
    assert TABLE.match("/index.html") is SITE
    assert TABLE.match("/service-cloudX") is SITE
    assert [r.prefix for r in TABLE.routes] == ["/service-cloud/rest/", "/service-cloud/", "/"]


def test_no_match_without_catch_all() -> None:
    table = RouteTable([CEC])
    assert table.match("/other") is None
    # nginx answers `location /service-cloud/` for `/service-cloud` with a redirect
    assert table.redirect_for("/service-cloud") == "/service-cloud/"
    assert table.redirect_for("/other") is None


def test_slashless_prefix_redirects_even_with_a_catch_all() -> None:
    # nginx: `location /service-cloud/` answers `/service-cloud` with a 301 although `/`
    # matches it too; a location of its own for `/service-cloud` is used instead.
    assert TABLE.redirect_for("/service-cloud") == "/service-cloud/"
    assert TABLE.redirect_for("/service-cloud/rest") == "/service-cloud/rest/"
    assert TABLE.redirect_for("/") is None
    exact = compile_route("/service-cloud", "http://127.0.0.1:3001/")
    assert RouteTable([SITE, CEC, exact]).redirect_for("/service-cloud") is None


@pytest.mark.parametrize(("path", "query", "expected"), [
    ("/service-cloud/webclient/chat_client/js/thirdPartyClient.js", "&t=1",
     "/service-cloud/webclient/chat_client/js/thirdPartyClient.js?&t=1"),
    ("/service-cloud/", "", "/service-cloud/"),
    ("/service-cloud/a%20b", "q=%2F..%2F&x", "/service-cloud/a%20b?q=%2F..%2F&x"),
])
def test_prefix_replaced_and_query_unchanged(path: str, query: str, expected: str) -> None:
    assert CEC.target(path, query) == expected


def test_prefix_replaced_by_a_different_upstream_path() -> None:
    route = compile_route("/demo/", "https://servicestage.besclouds.com/")
    assert route.target("/demo/a/b.js", "v=1") == "/a/b.js?v=1"
    assert API.target("/service-cloud/rest/x", "") == "/internal/rest/x"


@pytest.mark.parametrize(("raw", "expected"), [
    ("/a/b", "/a/b"),
    ("/a/./b", "/a/b"),
    ("/a/../b", "/b"),
    ("/a/b/..", "/a/"),
    ("/a/b/.", "/a/b/"),
    ("/a/%2e%2e/b", "/b"),
    ("/a/%2E%2e/b", "/b"),
    ("/a/.%2e/b", "/b"),
    ("/a/%2e/b", "/a/b"),
    ("//a///b", "/a/b"),
    ("/a/b/", "/a/b/"),
    ("/a%20b/c%41", "/a%20b/c%41"),  # other escapes pass as they are
    ("/", "/"),
])
def test_normalize_path(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected


@pytest.mark.parametrize("raw", [
    "/..", "/../etc/passwd", "/a/../../b", "/%2e%2e/x", "/a/%2e%2e/%2e%2e/x",
    "/a%2fb", "/a%2F..%2Fb", "/a/..%2f..%2fb", "/a%5c..", "/a%00b", "/a\\..\\b", "relative",
])
def test_normalize_refuses(raw: str) -> None:
    with pytest.raises(BadRequest):
        normalize_path(raw)


def test_traversal_cannot_leave_the_route() -> None:
    for raw in ("/service-cloud/../admin", "/service-cloud/%2e%2e/admin",
                "/service-cloud/x/%2E%2E/%2e%2e/admin"):
        path = normalize_path(raw)
        route = TABLE.match(path)
        assert route is SITE, raw  # it left the CEC route, so it is not sent to the CEC
        assert route.target(path, "") == "/admin"


_SEGMENTS = st.sampled_from([
    "a", "b", "..", ".", "%2e%2e", "%2E%2E", ".%2e", "%2e.", "%2e", "", "%2f", "%2F", "%5c",
    "..%2f", "%252e%252e", "x%20y", "%00", "...", "..a",
])


@given(st.lists(_SEGMENTS, max_size=8))
def test_mapped_target_never_escapes_upstream_path(segments: list[str]) -> None:
    raw = "/service-cloud/" + "/".join(segments)
    try:
        path = normalize_path(raw)
    except BadRequest:
        return
    route = TABLE.match(path)
    assert route is not None
    target = route.target(path, "")
    assert target.startswith(route.upstream.path)
    # After one decoding (what an upstream does) no segment climbs or names a directory jump.
    decoded = [unquote(s) for s in target.split("/")]
    assert ".." not in decoded and "." not in decoded
    assert not any("/" in unquote(s) or "\\" in unquote(s) for s in target.split("/"))
