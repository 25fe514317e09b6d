"""The trust boundary, member by member (issue 19): every origin-wide header, every
credential, every cookie form, every client-script spelling, through the calls the
request and response paths make (``upstream_request_head(..., policy=, connection=)`` and
``RoutePolicy.response_value``)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from aiohttp import web
from yarl import URL

from gateway.boundary import (
    ORIGIN_WIDE,
    RESPONSE_HEADERS,
    ClientScripts,
    OwnPages,
    Redirects,
    browser_clean,
    browser_split,
    remove_dot_segments,
    site_policy,
    third_party_policy,
)
from gateway.headers import Forwarded, UrlMap, upstream_request_head

URLS = UrlMap.for_route("/service-cloud/", URL("https://cec.example.com/service-cloud/"))
SITE_URLS = UrlMap.for_route("/", URL("http://127.0.0.1:3000/"))
CEC = third_party_policy("/service-cloud/", "/service-cloud/", URLS,
                         forward_cookies=["locale"], refused_cookies=["SESSION", "Cec_Guest"])
CEC_CREDS = third_party_policy("/service-cloud/", "/service-cloud/", URLS,
                               forward_credentials=True)
SITE = site_policy("/", "/", SITE_URLS)
SITE_CORS = site_policy("/", "/", SITE_URLS, strip_cors=True)
FWD = Forwarded("198.51.100.7", "198.51.100.7", "https", "www.example.com")
SCRIPT = "/service-cloud/webclient/chat_client/js/newThirdPartyClient.js"

# Written out, not imported: dropping a member from the gateway's table must fail a test.
ORIGIN_WIDE_NAMES = ["Clear-Site-Data", "Service-Worker-Allowed", "Strict-Transport-Security",
                     "Alt-Svc", "Set-Cookie2"]
CREDENTIALS = ["Authorization", "Proxy-Authorization"]
SHAPES: list[Sequence[str] | None] = [None, (), ["keep-alive"], ["close"]]


def up(policy: object, raw: list[tuple[bytes, bytes]],
       connection: Sequence[str] | None = None) -> bytes:
    return bytes(upstream_request_head("GET", "/x", raw, "cec.example.com", FWD, None,
                                       connection=connection, policy=policy))  # type: ignore[arg-type]


def test_tables_are_the_listed_headers() -> None:
    assert {n.lower().encode() for n in ORIGIN_WIDE_NAMES} == ORIGIN_WIDE
    assert RESPONSE_HEADERS == ORIGIN_WIDE | {b"set-cookie", b"location", b"refresh",
                                              b"content-location"}


@pytest.mark.parametrize("name", ORIGIN_WIDE_NAMES)
def test_tables_origin_wide_headers_never_come_from_the_third_party(name: str) -> None:
    lname = name.lower().encode()
    assert CEC.response_value(lname, b"v", URLS, True) is None
    assert CEC_CREDS.response_value(lname, b"v", URLS, False) is None
    assert SITE.response_value(lname, b"v", SITE_URLS, True) == b"v"


@pytest.mark.parametrize("name", [b"access-control-allow-origin",
                                  b"access-control-allow-credentials",
                                  b"access-control-expose-headers", b"access-control-max-age"])
def test_tables_upstream_cors_is_stripped_where_the_gateway_answers_it(name: bytes) -> None:
    assert CEC.response_value(name, b"*", URLS, True) is None
    assert SITE_CORS.response_value(name, b"*", SITE_URLS, True) is None
    assert SITE.response_value(name, b"*", SITE_URLS, True) == b"*"


@pytest.mark.parametrize(("name", "value", "expected"), [
    (b"location", b"https://cec.example.com/service-cloud/a?b#c", b"/service-cloud/a?b#c"),
    (b"content-location", b"https://cec.example.com:443/service-cloud/a",
     b"/service-cloud/a"),
    (b"refresh", b"0; url=https://cec.example.com/service-cloud/r", b"0; url=/service-cloud/r"),
    (b"location", b"https://evil.example/x", b"https://evil.example/x"),
    (b"set-cookie", b"a=1; Domain=cec.example.com", b"__cec_a=1; Secure"),
    (b"set-cookie", b"SESSION=1", None),
])
def test_tables_response_values_on_the_third_party_route(name: bytes, value: bytes,
                                                         expected: bytes | None) -> None:
    assert CEC.response_value(name, value, URLS, True) == expected


def test_tables_the_site_route_maps_its_own_cookies_and_redirects() -> None:
    assert SITE.response_value(b"set-cookie", b"a=1; Domain=127.0.0.1; Path=/x", SITE_URLS,
                               True) == b"a=1; Path=/x"
    assert SITE.response_value(b"location", b"http://127.0.0.1:3000/p", SITE_URLS,
                               False) == b"/p"
    bare = site_policy("/", "/")
    assert bare.response_value(b"location", b"http://127.0.0.1:3000/p", SITE_URLS,
                               False) == b"http://127.0.0.1:3000/p"


@pytest.mark.parametrize("connection", SHAPES, ids=repr)
@pytest.mark.parametrize("credential", CREDENTIALS)
def test_tables_credentials_reach_a_third_party_only_when_configured(
        credential: str, connection: Sequence[str] | None) -> None:
    raw = [(credential.encode(), b"Bearer secret"), (credential.lower().encode(), b"Basic s2"),
           (b"Accept", b"*/*")]
    sent = up(CEC, raw, connection)
    assert b"secret" not in sent and b"s2" not in sent and b"Accept: */*" in sent
    if credential == "Authorization":  # Proxy-Authorization is hop-by-hop everywhere
        assert b"Bearer secret" in up(CEC_CREDS, raw, connection)
        assert b"Bearer secret" in up(SITE, raw, connection)
        assert b"Bearer secret" in up(None, raw, connection)


@pytest.mark.parametrize("connection", SHAPES, ids=repr)
def test_tables_only_the_third_partys_cookies_reach_it(connection: Sequence[str] | None) -> None:
    raw = [(b"Cookie", b"SESSION=site; ccmessaging-token=t"),
           (b"cookie", b"__cec_a=1; locale=en; __cec_=x; other=2")]
    sent = up(CEC, raw, connection)
    assert sent.startswith(b"GET /x HTTP/1.1\r\nHost: cec.example.com\r\n")
    assert b"\r\nX-Real-IP: 198.51.100.7\r\n" in sent
    assert sent.count(b"Cookie: ") == 1
    assert b"Cookie: ccmessaging-token=t; a=1; locale=en\r\n" in sent
    assert b"site" not in sent and b"other" not in sent
    assert b"Cookie: " not in up(CEC, [(b"Cookie", b"SESSION=site")], connection)
    assert b"Cookie: " not in up(CEC, [], connection)
    site = up(SITE, raw, connection)
    assert b"Cookie: SESSION=site; ccmessaging-token=t\r\n" in site
    assert b"cookie: __cec_a=1; locale=en; __cec_=x; other=2\r\n" in site


@pytest.mark.parametrize(("value", "expected"), [
    (b"ccmessaging-token=t", b"ccmessaging-token=t"),
    (b" ccmessaging-token = t ;locale=en", b"ccmessaging-token= t; locale=en"),
    (b"__cec_x=1", b"x=1"),
    (b"__cec_locale=evil", None),  # a namespaced copy never shadows a forwarded name
    (b"__cec_ccmessaging-token=evil", None),
    (b"__cec_=1", None),
    (b"=1; ;x", None),
    (b"locale", None),
    (b"LOCALE=en", None),  # cookie names are case-sensitive
    (b"__CEC_x=1", None),
    (b"a=1=2; __cec_b=3=4", b"b=3=4"),
])
def test_tables_upstream_cookie_forms(value: bytes, expected: bytes | None) -> None:
    assert CEC.upstream_cookie([value]) == expected


def test_tables_upstream_cookie_reads_every_header_line() -> None:
    assert CEC.upstream_cookie([b"__cec_a=1", b"locale=en"]) == b"a=1; locale=en"


@pytest.mark.parametrize(("value", "https", "expected"), [
    ("a=1", False, "__cec_a=1"),
    ("a=1", True, "__cec_a=1; Secure"),
    ("a=1; Secure", True, "__cec_a=1; Secure"),
    ("a=1; SECURE ; HttpOnly", True, "__cec_a=1; SECURE ; HttpOnly"),
    (" a =1", False, "__cec_a=1"),
    ("\ta=1", False, "__cec_a=1"),
    ("locale=en; domain=.cec.example.com; path=/service-cloud/x", False,
     "locale=en; Path=/service-cloud/x"),
    ("a=1; Path=relative", False, "__cec_a=1; Path=/service-cloud"),
    ("a=1; Path=/elsewhere", False, "__cec_a=1; Path=/service-cloud"),
    ("a=1; Path=/service-cloud", False, "__cec_a=1; Path=/service-cloud"),
    ("a=1; Path=/service-cloud/", False, "__cec_a=1; Path=/service-cloud/"),
    ("a=1; Path=/service-cloud/%2e%2e/x", False, "__cec_a=1; Path=/service-cloud"),
    ("session=1", False, None),
    ("CEC_GUEST=1", False, None),
    (" =1", False, None),
    ("a", False, None),
])
def test_tables_set_cookie_forms(value: str, https: bool, expected: str | None) -> None:
    assert CEC.set_cookie(value, URLS, https) == expected


def test_tables_a_refused_cookie_is_counted() -> None:
    seen: list[str] = []
    policy = third_party_policy("r", "/service-cloud/", URLS, refused_cookies=["SESSION"],
                                counted=seen.append)
    assert policy.set_cookie("session=1", URLS, False) is None
    assert policy.set_cookie("=1", URLS, False) is None
    assert policy.stats.refused == 2 and seen == ["r", "r"]


def test_tables_a_cookie_on_a_root_route_keeps_its_path() -> None:
    root = third_party_policy("/", "/", SITE_URLS)
    assert root.set_cookie("a=1; Path=/x/y", SITE_URLS, False) == "__cec_a=1; Path=/x/y"
    assert root.set_cookie("a=1; Path=x", SITE_URLS, False) == "__cec_a=1; Path=/"


@pytest.mark.parametrize("path", [
    SCRIPT.upper(), SCRIPT.lower(), SCRIPT + "/", SCRIPT + ".", SCRIPT + "./", SCRIPT + " ",
    SCRIPT + "\t", SCRIPT + ";x=1", SCRIPT.replace("/js/", "/js;x/"), SCRIPT + "%20",
    SCRIPT.replace("Client", "%43lient"), SCRIPT.replace("/js/", "//js//"),
    SCRIPT.replace("Client", "Cl\u0131ent"),  # dotless i: Java's upper-case is I
    SCRIPT.replace("Client", "Cl\u0130ent"),  # dotted capital I: Java's lower-case is i
    SCRIPT.replace("js", "j\u017f"),  # long s
    SCRIPT.replace("webclient", "webc%6Cient"), SCRIPT + "%2e", SCRIPT + ";",
    SCRIPT + "%3Bx", SCRIPT + "%3b",
])
def test_tables_every_script_spelling_is_refused(path: str) -> None:
    scripts = ClientScripts([SCRIPT])
    expected = None if path == SCRIPT else 404
    for method in ("POST", "GET", "PUT"):
        assert scripts.refusal(method, path) == expected, (method, path)


def test_tables_kelvin_sign_spelling_is_refused() -> None:
    kelvin = "/party/\u212a.js"
    scripts = ClientScripts(["/party/k.js"])
    assert scripts.refusal("POST", kelvin) == 404
    assert scripts.refusal("POST", "/party/K.js") == 404


def test_tables_only_the_canonical_post_passes() -> None:
    scripts = ClientScripts([SCRIPT])
    assert bool(scripts) and not bool(ClientScripts([]))
    assert scripts.refusal("POST", SCRIPT) is None
    for method in ("GET", "HEAD", "PUT", "DELETE", "OPTIONS", "post"):
        assert scripts.refusal(method, SCRIPT) == 405
    for other in ("/service-cloud/webclient/other.js", "/", "/party", "/x/thirdparty.js"):
        assert scripts.refusal("GET", other) is None
        assert not scripts.looks_like(other)


@pytest.mark.parametrize(("path", "expected"), [
    ("/a/b/../c", "/a/c"), ("/a/%2E%2e/c", "/c"), ("/a/.%2E/c", "/c"), ("/a/%2e./c", "/c"),
    ("/a/b/..", "/a/"), ("/a/b/.", "/a/b/"), ("/a/%2e", "/a/"), ("/..", "/"), ("/../..", "/"),
    ("/a/./b", "/a/b"), ("/a/%2E/b", "/a/b"), ("/a/.../b", "/a/.../b"), ("/", "/"),
    ("/a//b", "/a//b"),
])
def test_tables_remove_dot_segments(path: str, expected: str) -> None:
    assert remove_dot_segments(path) == expected


@pytest.mark.parametrize(("value", "scheme", "expected"), [
    ("/p?q#f", "https", (None, "", "/p", "?q#f")),
    ("//h/p", "https", ("", "h", "/p", "")),
    ("/\\h/p", "https", ("", "h", "/p", "")),
    ("\\\\h\\p?a\\b", "https", ("", "h", "/p", "?a\\b")),
    ("https:x", "https", (None, "", "x", "")),
    ("http:x", "https", ("http", "x", "", "")),
    ("HTTPS:///h/p", "http", ("https", "h", "/p", "")),
    ("https://h", "https", ("https", "h", "", "")),
    ("  https://h/p\t\n ", "https", ("https", "h", "/p", "")),
    ("h\tt\ntps://h/p#x?y", "https", ("https", "h", "/p", "#x?y")),
    ("x#a?b", "https", (None, "", "x", "#a?b")),
])
def test_tables_browser_split(value: str, scheme: str, expected: tuple[object, ...]) -> None:
    ref = browser_split(value, scheme)
    assert ref is not None
    assert (ref.scheme, ref.authority, ref.path, ref.tail) == expected


@pytest.mark.parametrize("value", ["javascript:alert(1)", "data:text/html,x", "ftp://h/",
                                   "\x00javascript:x", "mailto:a@b"])
def test_tables_browser_split_refuses_other_schemes(value: str) -> None:
    assert browser_split(value, "https") is None


def test_tables_browser_clean() -> None:
    assert browser_clean("\x00 \x1f/a\tb\nc\rd \x20") == "/abcd"


@pytest.mark.parametrize(("value", "https", "expected"), [
    ("https://cec.example.com/service-cloud/x", True, "/service-cloud/x"),
    ("https://CEC.example.com:443/service-cloud/x", True, "/service-cloud/x"),
    ("//cec.example.com/service-cloud/x", True, "/service-cloud/x"),
    ("http://cec.example.com/service-cloud/x", False, "http://cec.example.com/service-cloud/x"),
    ("https://cec.example.com:8443/service-cloud/x", True,
     "https://cec.example.com:8443/service-cloud/x"),
    ("https://user@cec.example.com/service-cloud/x", True,
     "https://user@cec.example.com/service-cloud/x"),
    ("https://cec.example.com:44x/service-cloud/x", True,
     "https://cec.example.com:44x/service-cloud/x"),
    ("https://cec.example.com/other", True, "https://cec.example.com/other"),
    ("https://cec.example.com/service-cloud/../x", True, "https://cec.example.com/service-cloud/../x"),
    ("//evil.example/x", True, "https://evil.example/x"),
    ("//evil.example/x", False, "http://evil.example/x"),
    ("/\\evil.example/x", True, "https://evil.example/x"),
    (" https://evil.example/x", True, "https://evil.example/x"),
    ("https:\\\\evil.example\\x", True, "https://evil.example/x"),
    ("/service-cloud/a/../b", True, "/service-cloud/b"),
    ("/service-cloud//x", True, "/service-cloud//x"),
    ("/other", True, "/other"),
    ("rel/x?y", True, "rel/x?y"),
    ("a:b", True, "a:b"),
    ("javascript:x", True, "javascript:x"),
])
def test_tables_location(value: str, https: bool, expected: str) -> None:
    assert Redirects(URLS).location(value, https) == expected


def test_tables_location_keeps_relatives_relative() -> None:
    redirects = Redirects(URLS)
    assert redirects.location("x:y/z", True) == "x:y/z"  # another scheme: not ours to map
    assert redirects.location("https:rel", True) == "rel"
    assert redirects.location("\x01rel", True) == "rel"


@pytest.mark.parametrize(("value", "expected"), [
    ("0;url=https://cec.example.com/service-cloud/a", "0;url=/service-cloud/a"),
    ("5, URL = 'https://cec.example.com/service-cloud/a' x", "5, URL = '/service-cloud/a' x"),
    ('1.5 ; "https://cec.example.com/service-cloud/a"', '1.5 ; "/service-cloud/a"'),
    (".5 https://cec.example.com/service-cloud/a", ".5 /service-cloud/a"),
    ("0; url='https://cec.example.com/service-cloud/a", "0; url='/service-cloud/a"),
    ("0;urlx=https://cec.example.com/service-cloud/a", "0;urlx=https://cec.example.com/service-cloud/a"),
    ("x; url=https://cec.example.com/service-cloud/a", "x; url=https://cec.example.com/service-cloud/a"),
    ("0x; url=https://cec.example.com/service-cloud/a", "0x; url=https://cec.example.com/service-cloud/a"),
    ("0", "0"), ("0;", "0;"), ("", ""),
    ("\u0661; url=https://cec.example.com/service-cloud/a",
     "\u0661; url=https://cec.example.com/service-cloud/a"),
])
def test_tables_refresh(value: str, expected: str) -> None:
    assert Redirects(URLS).refresh(value, True) == expected


@pytest.mark.parametrize(("ancestors", "xfo", "csp_tail"), [
    (("'self'",), "SAMEORIGIN", "frame-ancestors 'self'"),
    ((), "DENY", "frame-ancestors 'none'"),
    (("'none'",), "DENY", "frame-ancestors 'none'"),
    (("https://a.example", "https://b.example"), None,
     "frame-ancestors https://a.example https://b.example"),
])
def test_tables_own_pages(ancestors: tuple[str, ...], xfo: str | None, csp_tail: str) -> None:
    pages = OwnPages.build(ancestors)
    page = web.Response(body=b"<p>x</p><script>1</script><scripty>", content_type="text/html")
    pages.apply(page)
    assert page.headers["Server"] == "cec-gateway"
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert page.headers.get("X-Frame-Options") == xfo
    csp = page.headers["Content-Security-Policy"]
    assert csp.endswith("; " + csp_tail) and "{" not in csp
    nonce = csp.split("'nonce-")[1].split("'")[0]
    assert len(nonce) >= 24
    assert page.body == f'<p>x</p><script nonce="{nonce}">1</script><scripty>'.encode()
    plain = web.Response(text="{}", content_type="application/json")
    pages.apply(plain)
    assert "Content-Security-Policy" not in plain.headers
    assert plain.headers["X-Content-Type-Options"] == "nosniff"


def test_tables_a_configured_csp_is_taken_literally() -> None:
    pages = OwnPages.build(("'self'",), csp="default-src 'none'; style-src {x}; ")
    page = web.Response(text="<p>", content_type="text/html")
    pages.apply(page)
    assert page.headers["Content-Security-Policy"] == (
        "default-src 'none'; style-src {x}; frame-ancestors 'self'")
