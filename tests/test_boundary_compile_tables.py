"""The trust boundary compiled from a config, and its redirect and cookie edges (issue 19):
which route is a third party (by `cec.context_path` or by `third_party:`), with which
cookies, credentials, namespace and refused names; same-origin judgement of Location and
Refresh values (ports, IPv6 literals, userinfo, quotes); cookie pairs with "=" in values."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import yaml
from aiohttp import web
from yarl import URL

from gateway.boundary import (
    ClientScripts,
    OwnPages,
    RoutePolicy,
    compile_policies,
    rewrite_location,
    rewrite_refresh,
    third_party_policy,
)
from gateway.config import Config, load_config_text
from gateway.headers import UrlMap
from gateway.routing import CompiledRoute, compile_route

CEC_URL = "https://cec.example.com/service-cloud/"
SITE_URL = "http://127.0.0.1:3000/"


def config(routes: list[dict[str, Any]], *, cec: bool = True, cors: bool = False,
           namespace: str = "__x_") -> Config:
    tree: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "routes": routes,
        "trust": {"protected_cookies": ["SESSION"], "cookie_namespace": namespace},
    }
    if cors:
        tree["cors"] = {"allow_origins": ["https://app.example.com"]}
    if cec:
        tree["cec"] = {"tenant_space_id": "202007159031", "channel_config_id": "202011230001",
                       "auth": {"mode": "authorization",
                                "secret_key": "S3cretS3cretS3cretS3cretS3cretS3cretS3cret0"},
                       "guest": {"cookie_name": "Cec_Guest"}}
    return load_config_text(yaml.safe_dump(tree), env={})


ROUTES: list[dict[str, Any]] = [
    # http upstreams: an https one costs a TLS context per compile, seconds per mutant
    {"prefix": "/service-cloud/", "upstream": "http://cec.example.com/service-cloud/"},
    {"prefix": "/service-cloud/api/", "upstream": "http://cec.example.com/api/"},
    {"prefix": "/service-cloudy/", "upstream": SITE_URL},
    {"prefix": "/service-cloud/own/", "upstream": SITE_URL, "third_party": False},
    {"prefix": "/ext/", "upstream": "http://ext.example.net/e/", "third_party": True,
     "forward_cookies": ["locale"], "forward_credentials": True},
    {"prefix": "/", "upstream": SITE_URL},
]


def compiled(cfg: Config, extra: list[CompiledRoute] = (),  # type: ignore[assignment]
             counted: list[str] | None = None) -> dict[str, CompiledRoute]:
    routes = [compile_route(r.prefix, r.upstream) for r in cfg.routes] + list(extra)
    out = compile_policies(cfg, routes, counted.append if counted is not None else None)
    assert [r.prefix for r in out] == [r.prefix for r in routes]
    for before, after in zip(routes, out, strict=True):
        assert (after.upstream, after.urls, after.name) == (before.upstream, before.urls,
                                                            before.name)
    return {r.prefix: r for r in out}


@pytest.mark.parametrize(("prefix", "third_party"), [
    ("/service-cloud/", True), ("/service-cloud/api/", True), ("/service-cloudy/", False),
    ("/service-cloud/own/", False), ("/ext/", True), ("/", False)])
def test_which_routes_are_a_third_party(prefix: str, third_party: bool) -> None:
    route = compiled(config(ROUTES))[prefix]
    policy = route.policy
    assert policy.third_party is third_party
    assert (policy.name, policy.prefix) == (route.name, prefix)
    assert policy.redirects is not None
    # the route's own URL map: the upstream's Location comes back as a gateway path
    up = route.upstream
    location = f"{up.scheme}://{up.host_header}{up.path}a?b"
    assert policy.response_value(b"location", location.encode(), route.urls, False) == (
        f"{prefix}a?b".encode())


def test_without_a_cec_section_every_undeclared_route_is_the_sites() -> None:
    routes = compiled(config(ROUTES, cec=False))
    assert {p: r.policy.third_party for p, r in routes.items()} == {
        "/service-cloud/": False, "/service-cloud/api/": False, "/service-cloudy/": False,
        "/service-cloud/own/": False, "/ext/": True, "/": False}


def test_a_third_party_route_gets_the_trust_section() -> None:
    counted: list[str] = []
    route = compiled(config(ROUTES), counted=counted)["/service-cloud/"]
    policy = route.policy
    assert policy.namespace == b"__x_"
    assert policy.forward_credentials is False
    assert {b"authorization", b"proxy-authorization", b"cookie", b"referer"} <= policy.drop_up
    assert policy.forward_cookies == frozenset({b"ccmessaging-token"})
    assert policy.refused_cookies == frozenset({"session", "cec_guest"})
    for name in ("SESSION", "session", "Cec_Guest", "cec_guest"):
        assert policy.set_cookie(f"{name}=x; Path=/", route.urls, False) is None
    assert counted == [route.name] * 4
    assert policy.set_cookie("lang=de", route.urls, False) == "__x_lang=de"
    assert policy.upstream_cookie([b"__x_lang=de; SESSION=s; ccmessaging-token=t"]) == (
        b"lang=de; ccmessaging-token=t")


def test_a_declared_third_party_keeps_its_cookies_and_credentials() -> None:
    policy = compiled(config(ROUTES))["/ext/"].policy
    assert policy.forward_credentials is True
    assert policy.drop_up == frozenset({b"cookie", b"referer"})
    assert policy.forward_cookies == frozenset({b"ccmessaging-token", b"locale"})
    assert policy.upstream_cookie([b"locale=en; SESSION=s"]) == b"locale=en"


def test_forward_referer_keeps_the_referer_out_of_the_guarded_headers() -> None:
    routes = [dict(r, forward_referer=True) if r["prefix"] == "/ext/" else r for r in ROUTES]
    policy = compiled(config(routes))["/ext/"].policy
    assert policy.drop_up == frozenset({b"cookie"})


def test_an_undeclared_route_under_the_context_path_is_a_closed_third_party() -> None:
    extra = compile_route("/service-cloud/more/", "http://cec.example.com/more/")
    policy = compiled(config(ROUTES), [extra])["/service-cloud/more/"].policy
    assert policy.third_party is True
    assert policy.forward_credentials is False
    assert policy.forward_cookies == frozenset({b"ccmessaging-token"})
    assert policy.refused_cookies == frozenset({"session", "cec_guest"})


@pytest.mark.parametrize("cors", [True, False])
def test_site_routes_strip_upstream_cors_only_when_the_gateway_answers_it(cors: bool) -> None:
    routes = compiled(config(ROUTES, cors=cors))
    site = routes["/"].policy
    assert site.strip_cors is cors
    assert site.response_value(b"access-control-allow-origin", b"*", routes["/"].urls,
                               False) == (None if cors else b"*")
    assert routes["/service-cloud/"].policy.strip_cors is True


# ------------------------------------------------------------------ Location and Refresh

URLS = UrlMap.for_route("/service-cloud/", URL(CEC_URL))
V6 = UrlMap.for_route("/v6/", URL("http://[2001:db8::1]:8080/app/"))
CEC = third_party_policy("cec", "/service-cloud/", URLS)
V6P = third_party_policy("v6", "/v6/", V6)


def loc(policy: RoutePolicy, urls: UrlMap, value: str, https: bool = False) -> str:
    out = policy.response_value(b"location", value.encode(), urls, https)
    assert out is not None
    return out.decode()


@pytest.mark.parametrize(("value", "expected"), [
    ("https://cec.example.com/service-cloud/a", "/service-cloud/a"),
    ("https://cec.example.com:443/service-cloud/a", "/service-cloud/a"),
    ("HTTPS://CEC.EXAMPLE.COM/service-cloud/a", "/service-cloud/a"),
    ("https://cec.example.com:8443/service-cloud/a", "https://cec.example.com:8443/service-cloud/a"),
    ("http://cec.example.com/service-cloud/a", "http://cec.example.com/service-cloud/a"),
    ("https://user@cec.example.com/service-cloud/a", "https://user@cec.example.com/service-cloud/a"),
    ("https://cec.example.com:443x/service-cloud/a", "https://cec.example.com:443x/service-cloud/a"),
    ("https://cec.example.com:/service-cloud/a", "/service-cloud/a"),
    ("https://cec.example.com", "https://cec.example.com"),
    ("https://cec.example.com/service-cloud", "/service-cloud"),
    ("https://cec.example.com/service-cloud/x?y#z", "/service-cloud/x?y#z"),
    ("https://cec.example.com/service-cloud/x#a?b", "/service-cloud/x#a?b"),
    ("https://cec.example.com/service-cloud/x?a#b?c", "/service-cloud/x?a#b?c"),
    ("https://cec.example.com/service-cloud/x?a?b", "/service-cloud/x?a?b"),
    ("https://cec.example.com/service-cloud//evil.example/x", "/service-cloud//evil.example/x"),
    ("///evil.example/x", "http://evil.example/x"),
    ("/a", "/a"),
    ("//evil.example/x", "http://evil.example/x"),
    ("a:b", "a:b"),
    ("x", "x"),
    ("./a:b", "./a:b"),
    ("a/b:c", "a/b:c"),
])
def test_location_same_origin_is_judged_like_a_browser(value: str, expected: str) -> None:
    assert loc(CEC, URLS, value) == expected


def test_location_scheme_relative_follows_the_visitors_scheme() -> None:
    assert loc(CEC, URLS, "//evil.example/x", https=True) == "https://evil.example/x"
    assert loc(CEC, URLS, "//evil.example/x", https=False) == "http://evil.example/x"
    assert loc(CEC, URLS, "//cec.example.com/service-cloud/a", https=True) == "/service-cloud/a"
    # same-origin is judged from the upstream's side (its scheme)
    assert loc(CEC, URLS, "//cec.example.com/service-cloud/a", https=False) == (
        "/service-cloud/a")


ROOT_URLS = UrlMap.for_route("/", URL("https://cec.example.com/app/"))
ROOT = third_party_policy("root", "/", ROOT_URLS)


@pytest.mark.parametrize(("value", "expected"), [
    ("https://cec.example.com/app//evil.example/x", "/evil.example/x"),
    ("https://cec.example.com/app///evil.example/x", "/evil.example/x"),
    ("/app//evil.example/x", "/evil.example/x"),
    ("//evil.example/x", "http://evil.example/x"),
    ("/elsewhere//x", "/elsewhere//x"),
    ("/app/x", "/x"),
])
def test_location_never_becomes_a_path_a_browser_reads_as_a_host(value: str,
                                                                   expected: str) -> None:
    assert loc(ROOT, ROOT_URLS, value) == expected


@pytest.mark.parametrize(("value", "expected"), [
    ("http://[2001:db8::1]:8080/app/x", "/v6/x"),
    ("http://[2001:DB8::1]:8080/app/x", "/v6/x"),
    ("http://[2001:db8::1]/app/x", "http://[2001:db8::1]/app/x"),
    ("http://[2001:db8::1]:8081/app/x", "http://[2001:db8::1]:8081/app/x"),
    ("http://[2001:db8::1]x:8080/app/x", "http://[2001:db8::1]x:8080/app/x"),
    ("http://[2001:db8::1]:8080]/app/x", "http://[2001:db8::1]:8080]/app/x"),
    ("http://[2001:db8::2]:8080/app/x", "http://[2001:db8::2]:8080/app/x"),
])
def test_location_ipv6_literals(value: str, expected: str) -> None:
    assert loc(V6P, V6, value) == expected


@pytest.mark.parametrize(("value", "expected"), [
    ("0; url=https://cec.example.com/service-cloud/r", "0; url=/service-cloud/r"),
    ("0;url=https://cec.example.com/service-cloud/r", "0;url=/service-cloud/r"),
    ("0, url=https://cec.example.com/service-cloud/r", "0, url=/service-cloud/r"),
    ("0 https://cec.example.com/service-cloud/r", "0 /service-cloud/r"),
    ("  5.5 ; URL = 'https://cec.example.com/service-cloud/r' x",
     "  5.5 ; URL = '/service-cloud/r' x"),
    ('1; url="https://cec.example.com/service-cloud/r"', '1; url="/service-cloud/r"'),
    ("1; url='https://cec.example.com/service-cloud/r", "1; url='/service-cloud/r"),
    ("1; url='https://cec.example.com/service-cloud/a'b'", "1; url='/service-cloud/a'b'"),
    (".5; url=https://cec.example.com/service-cloud/r", ".5; url=/service-cloud/r"),
    ("1; urlx=https://cec.example.com/service-cloud/r",
     "1; urlx=https://cec.example.com/service-cloud/r"),
    ("1; url", "1; url"),
    ("1; url=", "1; url="),
    ("1;", "1;"),
    ("1", "1"),
    ("x; url=https://cec.example.com/service-cloud/r",
     "x; url=https://cec.example.com/service-cloud/r"),
    ("1x; url=https://cec.example.com/service-cloud/r",
     "1x; url=https://cec.example.com/service-cloud/r"),
    ("1\t\n\f\r;\turl=https://cec.example.com/service-cloud/r", "1\t\n\f\r;\turl=/service-cloud/r"),
    ("12;  //evil.example/x", "12;  https://evil.example/x"),
])
def test_refresh_url_is_found_as_html_finds_it(value: str, expected: str) -> None:
    out = CEC.response_value(b"refresh", value.encode(), URLS, True)
    assert out is not None and out.decode() == expected


# ------------------------------------------------------------------ cookies


@pytest.mark.parametrize(("header", "expected"), [
    (b"__cec_a=b=c", b"a=b=c"),
    (b"ccmessaging-token=t=1==", b"ccmessaging-token=t=1=="),
    (b"; ;=x; __cec_a=1; junk; ccmessaging-token=t", b"a=1; ccmessaging-token=t"),
    (b"SESSION=s; =v; __cec_a=1", b"a=1"),
    (b"__cec_=x; __cec_ccmessaging-token=forged; x=1", None),
])
def test_upstream_cookie_pairs_split_at_the_first_equals(header: bytes,
                                                         expected: bytes | None) -> None:
    assert CEC.upstream_cookie([header]) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("a=b=c; Path=/service-cloud/x", "__cec_a=b=c; Path=/service-cloud/x"),
    (" \ta=1", "__cec_a=1"),
    ("ccmessaging-token=t=1", "ccmessaging-token=t=1"),
    ("=x", None), (" =x", None), ("noequals", None),
])
def test_set_cookie_name_is_before_the_first_equals(text: str, expected: str | None) -> None:
    assert CEC.set_cookie(text, URLS, False) == expected


def test_set_cookie_secure_added_once_on_https() -> None:
    assert CEC.set_cookie("a=1; Secure", URLS, True) == "__cec_a=1; Secure"
    assert CEC.set_cookie("a=1", URLS, True) == "__cec_a=1; Secure"
    assert CEC.set_cookie("a=1", URLS, False) == "__cec_a=1"


@pytest.mark.parametrize(("path", "expected"), [
    ("/service-cloud/x", "/service-cloud/x"), ("/service-cloud", "/service-cloud"),
    ("/other", "/service-cloud"), ("x", "/service-cloud"),
    ("/service-cloud/../x", "/service-cloud"),
])
def test_set_cookie_path_is_confined_to_the_route(path: str, expected: str) -> None:
    out = CEC.set_cookie(f"a=1; Path={path}", URLS, False)
    assert out == f"__cec_a=1; Path={expected}"


def test_set_cookie_on_a_root_route_keeps_any_mapped_path() -> None:
    urls = UrlMap.for_route("/", URL("https://cec.example.com/"))
    root = third_party_policy("root", "/", urls)
    assert root.set_cookie("a=1; Path=/deep/x", urls, False) == "__cec_a=1; Path=/deep/x"
    assert root.set_cookie("a=1; Path=x", urls, False) == "__cec_a=1; Path=/"


def test_set_cookie_non_ascii_name_is_namespaced_unless_forwarded() -> None:
    value = "é=1".encode()
    out = CEC.response_value(b"set-cookie", value, URLS, False)
    assert out == "__cec_é=1".encode()
    raw = b"\xff=1"  # not UTF-8: passed through byte for byte, namespaced
    assert CEC.response_value(b"set-cookie", raw, URLS, False) == b"__cec_\xff=1"
    assert CEC.response_value(b"location", b"/service-cloud/\xff", URLS, False) == (
        b"/service-cloud/\xff")


# ------------------------------------------------------------------ client scripts

SCRIPTS = ClientScripts(["/service-cloud/webclient/chat_client/js/newThirdPartyClient.js"])


@pytest.mark.parametrize(("path", "looks"), [
    ("/service-cloud/webclient/chat_client/js/newThirdPartyClient.js", True),
    ("/service-cloud/webclient/chat_client/js/newThirdP%61rtyClient.js", True),
    ("/service-cloud/webclient/chat_client/js/newThirdP%61rtyClient.js;x", True),
    ("/service-cloud/webclient/chat_client/js;a=b/newThirdPartyClient.js", True),
    ("/service-cloud/webclient/chat_client/js/newThirdPartyClient.js;v=1", True),
    ("/service-cloud/webclient/chat_client/js/newThirdPartyClient.js/.", True),
    ("/service-cloud/webclient/chat_client/js/newThirdPartyClient.js%20", True),
    ("/service-cloud/webclient/chat_client/js/newThirdPartyClient.js%2f", True),
    ("/service-cloud/webclient/chat_client/js/other.js;x", False),
    ("/service-cloud/webclient/chat_client/js/other%2Ejs", False),
    ("/service-cloud/a%ZZ", False),
])
def test_client_script_spellings(path: str, looks: bool) -> None:
    assert SCRIPTS.looks_like(path) is looks
    assert (SCRIPTS.refusal("POST", path) is not None) is (
        looks and path != "/service-cloud/webclient/chat_client/js/newThirdPartyClient.js")


# ------------------------------------------------------------------ edges the first run left

V6D = UrlMap.for_route("/v6/", URL("http://[2001:db8::1]/app/"))
V6DP = third_party_policy("v6d", "/v6/", V6D)
BARE = UrlMap.for_route("/sc/", URL("https://cec.example.com/"))
BAREP = third_party_policy("bare", "/sc/", BARE)


@pytest.mark.parametrize(("policy", "urls", "value", "https", "expected"), [
    # the query/fragment starts at the first "?" or "#": what follows never joins the path
    (CEC, URLS, "https://cec.example.com/service-cloud/x?/../../y?z", False,
     "/service-cloud/x?/../../y?z"),
    (CEC, URLS, "https://cec.example.com/service-cloud/x#/../../y#z", False,
     "/service-cloud/x#/../../y#z"),
    (CEC, URLS, "//Xevil.example/x", False, "http://Xevil.example/x"),
    # text after a bracketed host that is not a port: not the upstream
    (V6DP, V6D, "http://[2001:db8::1]x/app/x", False, "http://[2001:db8::1]x/app/x"),
    (V6DP, V6D, "http://[2001:db8::1]/app/x", False, "/v6/x"),
    (ROOT, ROOT_URLS, "https://cec.example.com/app//Xa", False, "/Xa"),
    # "http:x" is relative on an http page only
    (CEC, URLS, "http:x", False, "x"),
    (CEC, URLS, "https:x", True, "x"),
    (CEC, URLS, "http:x", True, "http:x"),
    (CEC, URLS, "http:a:b", False, "./a:b"),
    (CEC, URLS, "http: x", False, "./ x"),
    (BAREP, BARE, "https://cec.example.com?q", False, "/sc/?q"),
    (BAREP, BARE, "https://cec.example.com", False, "/sc/"),
    (CEC, URLS, "HTTPS://evil.example/x?a\\b", False, "HTTPS://evil.example/x?a\\b"),
])
def test_location_edges(policy: RoutePolicy, urls: UrlMap, value: str, https: bool,
                        expected: str) -> None:
    assert loc(policy, urls, value, https) == expected


@pytest.mark.parametrize(("value", "expected"), [
    ("; url=https://cec.example.com/service-cloud/r",
     "; url=https://cec.example.com/service-cloud/r"),  # no time: ignored by browsers
    ("X1; url=https://cec.example.com/service-cloud/r",
     "X1; url=https://cec.example.com/service-cloud/r"),
    ("1.25;url=https://cec.example.com/service-cloud/r", "1.25;url=/service-cloud/r"),
    ("1X https://cec.example.com/service-cloud/r", "1X https://cec.example.com/service-cloud/r"),
    ("1 ", "1 "),
    ("0; url=https://cec.example.com/service-cloud/aXXXX/../../b",
     "0; url=https://cec.example.com/service-cloud/aXXXX/../../b"),
    ("1 Xhttps://cec.example.com/service-cloud/r", "1 Xhttps://cec.example.com/service-cloud/r"),
    ("0; url=X//evil.example/xX", "0; url=X//evil.example/xX"),
    ("0; url='https://cec.example.com/service-cloud/a'/../../b",
     "0; url='/service-cloud/a'/../../b"),
    ("0; url='https://cec.example.com/service-cloud/a'/../../b'",
     "0; url='/service-cloud/a'/../../b'"),
    ("1; url='https://cec.example.com/service-cloud", "1; url='/service-cloud"),
    ("1; url='//evil.example/x", "1; url='https://evil.example/x"),
])
def test_refresh_edges(value: str, expected: str) -> None:
    out = CEC.response_value(b"refresh", value.encode(), URLS, True)
    assert out is not None and out.decode() == expected


def test_rewrite_helpers_default_to_an_http_page() -> None:
    assert rewrite_location("//evil.example/x", URLS) == "http://evil.example/x"
    assert rewrite_location("//evil.example/x", URLS, True) == "https://evil.example/x"
    assert rewrite_location("https://cec.example.com/service-cloud/a", URLS) == "/service-cloud/a"
    assert rewrite_refresh("0; url=//evil.example/x", URLS) == "0; url=http://evil.example/x"
    assert rewrite_refresh("0; url=//evil.example/x", URLS, True) == (
        "0; url=https://evil.example/x")
    assert rewrite_refresh("0; url=https://cec.example.com/service-cloud/a", URLS) == (
        "0; url=/service-cloud/a")


@pytest.mark.parametrize(("text", "expected"), [
    ("\x0ba=1", "__cec_\x0ba=1"), ("Xa=1", "__cec_Xa=1"),
])
def test_set_cookie_name_trims_only_spaces_and_tabs(text: str, expected: str) -> None:
    assert CEC.set_cookie(text, URLS, False) == expected


def test_set_cookie_path_through_response_value() -> None:
    out = CEC.response_value(b"set-cookie", b"a=1; Path=/service-cloud/x; Domain=cec.example.com",
                             URLS, True)
    assert out == b"__cec_a=1; Path=/service-cloud/x; Secure"


def test_cookie_path_base_of_a_prefix_ending_in_x() -> None:
    urls = UrlMap.for_route("/chatX/", URL("https://cec.example.com/chatX/"))
    policy = third_party_policy("x", "/chatX/", urls)
    assert policy.set_cookie("a=1; Path=x", urls, False) == "__cec_a=1; Path=/chatX"


def test_refused_cookies_are_counted_and_each_name_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    counted: list[str] = []
    policy = third_party_policy("cec-route", "/service-cloud/", URLS,
                                refused_cookies=["SESSION"], counted=counted.append)
    with caplog.at_level(logging.WARNING, logger="gateway.boundary"):
        assert policy.set_cookie("SESSION=x", URLS, False) is None
        assert policy.set_cookie("SESSION=y", URLS, False) is None
        assert policy.set_cookie("=nameless", URLS, False) is None
    assert counted == ["cec-route"] * 3
    assert policy.stats.refused == 3
    assert [r.getMessage() for r in caplog.records] == [
        "route cec-route: refused a Set-Cookie for 'SESSION' (the name belongs to the site or "
        "the gateway); the browser never gets it",
        "route cec-route: refused a Set-Cookie for '' (a cookie without a name); the browser "
        "never gets it"]


def test_refused_cookie_names_logged_are_bounded(caplog: pytest.LogCaptureFixture) -> None:
    names = [f"n{i}" for i in range(102)]
    policy = third_party_policy("r", "/service-cloud/", URLS, refused_cookies=names)
    with caplog.at_level(logging.WARNING, logger="gateway.boundary"):
        for name in names:
            assert policy.set_cookie(f"{name}=1", URLS, False) is None
    assert len(caplog.records) == 100
    assert policy.stats.refused == 102


@pytest.mark.parametrize(("path", "looks"), [
    ("/service-cloud/webclient/chat_client/js/newThirdPartyClient.js%ff", False),
    ("/service-cloud/webclient/chat_client/js/newThirdPartyClient.jsX", False),
    ("/service-cloud/webclient/chat_client/js/newThirdPartyClient.js%2e", True),
])
def test_client_script_spellings_more(path: str, looks: bool) -> None:
    assert SCRIPTS.looks_like(path) is looks


def test_own_pages_on_a_streamed_answer() -> None:
    pages = OwnPages.build()
    plain = web.StreamResponse()
    pages.apply(plain)
    assert plain.headers["Server"] == "cec-gateway"
    assert plain.headers["X-Content-Type-Options"] == "nosniff"
    assert "Content-Security-Policy" not in plain.headers
    html = web.StreamResponse(headers={"Content-Type": "text/html; charset=utf-8"})
    pages.apply(html)
    assert "frame-ancestors 'self'" in html.headers["Content-Security-Policy"]
    assert html.headers["X-Frame-Options"] == "SAMEORIGIN"


def test_own_page_csp_keeps_its_last_character() -> None:
    pages = OwnPages.build(csp="img-src https://cdn.example/X;")
    assert pages.csp == "img-src https://cdn.example/X; frame-ancestors 'self'"
