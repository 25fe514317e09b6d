"""Every traversal spelling, refused or resolved before a route is chosen (issue 19).

The hypothesis test in test_routing.py samples segments; this table names each spelling,
so a mutant that forgets one of them (``/..;/admin``, an upper-case escape, a trailing
slash after a dot segment) fails by name.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme

from gateway.errors import BadRequest
from gateway.routing import RouteTable, compile_route, make_client_ssl, normalize_path

CEC = compile_route("/service-cloud/", "https://cec.example.com/service-cloud/")
SITE = compile_route("/", "http://127.0.0.1:3000/", preserve_host=True)
TABLE = RouteTable([SITE, CEC])


@pytest.mark.parametrize("raw", [
    # dot segments with ;params: servlet containers drop the params, then climb
    "/service-cloud/..;/admin", "/service-cloud/..;jsessionid=x/admin", "/..;/admin",
    "/service-cloud/.;/admin", "/service-cloud/%2e%2e;/admin", "/service-cloud/.%2e;x/admin",
    "/service-cloud/%2E;/x",
    # encoded separators and NUL, any case
    "/service-cloud/%2f..", "/service-cloud/%2F..", "/service-cloud/..%2fadmin",
    "/service-cloud/%5c..", "/service-cloud/%5C..", "/service-cloud/a%00", "/a%00/b",
    # a raw backslash, with or without other escapes
    "/service-cloud\\..\\admin", "/a\\b", "/a%41\\b", "/\\",
    # climbing above the root, plain and encoded
    "/..", "/../", "/a/../..", "/%2e%2e", "/%2E%2E/", "/.%2E/x", "/%2e./x", "//../x",
    "/./..", "/a/./../../b",
    # not an absolute path
    "", "service-cloud/x", "*", "http://evil/",
])
def test_refused(raw: str) -> None:
    with pytest.raises(BadRequest):
        normalize_path(raw)


@pytest.mark.parametrize(("raw", "expected"), [
    ("/service-cloud/../admin", "/admin"),
    ("/service-cloud/%2e%2e/admin", "/admin"),
    ("/service-cloud/%2E%2E/admin", "/admin"),
    ("/service-cloud/.%2e/admin", "/admin"),
    ("/service-cloud/%2e./admin", "/admin"),
    ("/service-cloud/x/../../admin", "/admin"),
    ("/service-cloud/./x", "/service-cloud/x"),
    ("/service-cloud/%2e/x", "/service-cloud/x"),
    ("/service-cloud//x", "/service-cloud/x"),
    ("/service-cloud/x/..", "/service-cloud/"),
    ("/service-cloud/x/.", "/service-cloud/x/"),
    ("/service-cloud/x/%2e", "/service-cloud/x/"),
    ("/service-cloud/x/%2e%2e", "/service-cloud/"),
    ("/service-cloud/x/../", "/service-cloud/"),
    ("/service-cloud/x//", "/service-cloud/x/"),
    ("/service-cloud/a;b/../c", "/service-cloud/c"),
    ("/service-cloud/..a/x", "/service-cloud/..a/x"),
    ("/service-cloud/.../x", "/service-cloud/.../x"),
    ("/service-cloud/a%20b/%41", "/service-cloud/a%20b/%41"),
    ("/service-cloud/x;..", "/service-cloud/x;.."),
    ("/.well-known/x", "/.well-known/x"),
    ("/a./b", "/a./b"),
    ("/", "/"),
    ("//", "/"),
    ("/a", "/a"),
])
def test_resolved(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected


@pytest.mark.parametrize("raw", [
    "/service-cloud/../admin", "/service-cloud/%2e%2e/admin", "/service-cloud/x/../../admin",
    "/service-cloud/%2E%2E/admin",
])
def test_a_resolved_climb_leaves_the_third_party_route(raw: str) -> None:
    path = normalize_path(raw)
    assert TABLE.match(path) is SITE
    assert SITE.target(path, "q=1") == "/admin?q=1"


def test_the_decoded_escape_is_not_what_is_forwarded() -> None:
    # Only dot segments are decoded to be resolved; the others pass as the client wrote them.
    assert normalize_path("/service-cloud/%61/./b") == "/service-cloud/%61/b"


@pytest.mark.parametrize(("raw", "message"), [
    ("relative", "request target must be an absolute path"),
    ("/a\\b", "backslash in path"),
    ("/a%2fb", "encoded '/', '\\' or NUL in path"),
    ("/a%00", "encoded '/', '\\' or NUL in path"),
    ("/..;/admin", "dot segment with parameters in path"),
    ("/service-cloud/..;a;b/admin", "dot segment with parameters in path"),
    ("/..", "path climbs above the root"),
])
def test_each_refusal_says_why(raw: str, message: str) -> None:
    with pytest.raises(BadRequest) as info:
        normalize_path(raw)
    assert str(info.value) == message


@pytest.mark.parametrize(("raw", "expected"), [
    ("/a/..", "/"), ("/a/%2e%2e", "/"), ("/a/./..", "/"),
    ("/service-cloud/%ff/x", "/service-cloud/%ff/x"),  # undecodable bytes pass as written
    ("/service-cloud/%ff%2e/x", "/service-cloud/%ff%2e/x"),
])
def test_resolved_edges(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected


def test_compiled_route_fields() -> None:
    route = compile_route("/cec/", "https://cec.example.com:8443/sc/")
    assert route.websocket is True and route.preserve_host is False
    assert route.name == "/cec/"
    assert route.urls.prefix == "/cec/" and route.urls.upstream_path == "/sc/"
    assert route.urls.upstream_origins == ("https://cec.example.com:8443",)
    assert route.policy.prefix == "/cec/" and route.policy.name == "/cec/"
    assert route.policy.third_party is False
    assert route.policy.redirects is not None
    assert route.policy.redirects.location("https://cec.example.com:8443/sc/x", True) == "/cec/x"
    assert compile_route("/", "http://h/", websocket=False).websocket is False


def test_the_pool_key_separates_tls_from_plain() -> None:
    tls = compile_route("/a/", "https://cec.example.com:8443/").upstream
    plain = compile_route("/b/", "http://cec.example.com:8443/").upstream
    assert tls.key == ("cec.example.com", 8443, True)
    assert plain.key == ("cec.example.com", 8443, False)


def test_a_configured_ca_is_what_the_upstream_tls_trusts(tmp_path: Path) -> None:
    ca = trustme.CA()
    pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(pem))
    route = compile_route("/a/", "https://cec.example.com/", ca_file=pem)
    assert route.upstream.ssl is not None
    assert len(route.upstream.ssl.get_ca_certs()) == 1
    assert len(make_client_ssl(pem).get_ca_certs()) == 1
    assert make_client_ssl(None).get_ca_certs() != route.upstream.ssl.get_ca_certs()
