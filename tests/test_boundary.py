"""The trust boundary between the site and the CEC, tried as an attacker would, on sockets.

A scripted hostile CEC (raw bytes: Set-Cookie for the site's and the gateway's cookies,
Access-Control-* for any origin, redirects that browsers read as another host) and a
recording site stand behind a real gateway. Each test says what the browser, the CEC and
the site each received. GET requests run twice: on the fast path (``gateway/fastpath.py``,
taken once an upstream connection is pooled; a spy checks it really was) and with the fast
path switched off, so that both request paths are held to the same policy.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import quote, unquote

import pytest
import yaml
from yarl import URL

from gateway.boundary import ClientScripts, third_party_policy
from gateway.config import load_config_text
from gateway.headers import UrlMap, valid_host
from gateway.runtime import Running, serving
from tests.conformance.harness import PathSwitch
from tests.support.rawhttp import RawResponse, raw_exchange
from tests.support.upstreams import RawRecorder, UpConn, UpRequest, run_recorder

SECRET = "S3cretS3cretS3cretS3cretS3cretS3cretS3cret0"  # 43 characters, shape of a CEC key
GW_HOST = "gw.test"


def _answer(status: str, headers: list[tuple[str, str]], body: bytes = b"ok") -> bytes:
    head = f"HTTP/1.1 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1") + body


ORIGIN_WIDE_HEADERS = [("Clear-Site-Data", '"cookies", "storage"'),
                       ("Service-Worker-Allowed", "/"),
                       ("Strict-Transport-Security", "max-age=63072000; includeSubDomains"),
                       ("Alt-Svc", 'h2="evil.example:443"')]


def hostile_cec(port_of: Callable[[], int]) -> Callable[[UpRequest, UpConn, Any],
                                                         Awaitable[bool]]:
    """The CEC, as hostile as a third party on the site's origin could be."""

    async def behaviour(req: UpRequest, conn: UpConn, writer: Any) -> bool:
        path, _, query = req.target.partition("?")
        own = f"http://127.0.0.1:{port_of()}"
        headers: list[tuple[str, str]] = [("Content-Type", "text/plain")]
        status = "200 OK"
        if path.endswith("/set-cookies"):
            headers += [
                ("Set-Cookie", "cec_guest=forged; Path=/; HttpOnly"),
                ("Set-Cookie", f"SESSION=fixated; Domain={GW_HOST}; Path=/"),
                ("Set-Cookie", "ccmessaging-token=t1; Domain=127.0.0.1; Path=/service-cloud; "
                               "HttpOnly; SameSite=Lax"),
                ("Set-Cookie", "JSESSIONID=j1; Path=/"),
                ("Set-Cookie", "pref=1; Domain=.gw.test; Path=/service-cloud/x/"),
            ]
        elif path.endswith("/cors"):
            headers += [("Access-Control-Allow-Origin", "https://evil.example"),
                        ("Access-Control-Allow-Credentials", "true"),
                        ("Access-Control-Allow-Headers", "*"),
                        ("access-control-expose-headers", "X-Secret")]
        elif path.endswith("/origin-wide"):
            headers += ORIGIN_WIDE_HEADERS
        elif path.endswith("/redirect"):
            to = unquote(query.partition("to=")[2]).replace("{own}", own)
            status = "302 Found"
            headers += [("Location", to), ("Content-Location", to), ("Refresh", f"0; url={to}")]
        writer.write(_answer(status, headers))
        await writer.drain()
        return True

    return behaviour


def site_answer(port_of: Callable[[], int]) -> Callable[[UpRequest, UpConn, Any],
                                                         Awaitable[bool]]:
    async def behaviour(req: UpRequest, conn: UpConn, writer: Any) -> bool:
        path, _, query = req.target.partition("?")
        headers = [("Content-Type", "text/plain")]
        status = "200 OK"
        if path.endswith("/origin-wide"):
            headers += ORIGIN_WIDE_HEADERS
        if path.endswith("/redirect"):
            to = unquote(query.partition("to=")[2]).replace("{own}",
                                                            f"http://127.0.0.1:{port_of()}")
            status = "302 Found"
            headers += [("Location", to), ("Refresh", f"0; url={to}")]
        writer.write(_answer(status, headers))
        await writer.drain()
        return True

    return behaviour


class Stack:
    def __init__(self, running: Running, cec: RawRecorder, site: RawRecorder) -> None:
        self.running = running
        self.cec = cec
        self.site = site

    @property
    def port(self) -> int:
        return self.running.port


def config_tree(cec: RawRecorder, site: RawRecorder, **extra: Any) -> dict[str, Any]:
    tree: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "access_log": False,
        "timeouts": {"shutdown_grace": "1s"},
        "trusted_proxies": ["10.9.9.9/32"],
        "routes": [
            {"prefix": "/service-cloud/", "upstream": f"{cec.url}/service-cloud/"},
            {"prefix": "/", "upstream": f"{site.url}/", "preserve_host": True},
        ],
        "cors": {"allow_origins": ["https://allowed.example"], "allow_credentials": True},
        "trust": {"protected_cookies": ["SESSION"]},
        "cec": {"tenant_space_id": "202007159031", "channel_config_id": "202011230001",
                "auth": {"mode": "authorization", "secret_key": SECRET}},
    }
    for key, value in extra.items():
        tree[key] = value
    return tree


@contextlib.asynccontextmanager
async def stack(**extra: Any) -> AsyncIterator[Stack]:
    ports: dict[str, int] = {}
    async with run_recorder(hostile_cec(lambda: ports["cec"])) as cec, \
            run_recorder(site_answer(lambda: ports["site"])) as site:
        ports["cec"], ports["site"] = cec.port, site.port
        config = load_config_text(yaml.safe_dump(config_tree(cec, site, **extra)), env={})
        async with serving(config) as running:
            yield Stack(running, cec, site)


@pytest.fixture
async def gw() -> AsyncIterator[Stack]:
    async with stack() as s:
        yield s


@pytest.fixture
def path_mode(path: PathSwitch) -> list[tuple[str, bool]]:
    """The fast path's decisions under the request path being tested (the ``path`` fixture
    of tests/conftest.py), headed by the mode: a GET is served inline only on ``fast``."""
    path.taken.append((path.name, path.name == "fast"))
    return path.taken


def request(path: str, *headers: str, method: str = "GET", host: str = GW_HOST,
            body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close", *headers]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join([*lines, "", ""])).encode("utf-8", "surrogateescape") + body


async def get(gw: Stack, mode: list[tuple[str, bool]], path: str, *headers: str,
              host: str = GW_HOST) -> RawResponse:
    """A GET through the path under test; on the fast path the upstream pool is warmed first
    and the spy must show the request was taken inline."""
    fast = mode[0] == ("fast", True)
    if fast:
        await raw_exchange("127.0.0.1", gw.port, request(path.split("?")[0] + "?warm=1"))
    before = len(mode)
    resp = await raw_exchange("127.0.0.1", gw.port, request(path, *headers, host=host))
    offered = [took for target, took in mode[before:] if target == path]
    assert offered, "the request never reached the fast path's decision"
    assert offered[-1] is fast, f"expected the {'fast' if fast else 'full'} path"
    return resp


def cookie_pairs(value: str | None) -> list[str]:
    return [p.strip() for p in (value or "").split(";") if p.strip()]


# ------------------------------------------------------------------ cookies to the CEC

BROWSER_COOKIES = ("Cookie: SESSION=site-session; cec_guest=guest-cookie; "
                   "ccmessaging-token=tok; __cec_JSESSIONID=j1; JSESSIONID=site-j")


async def test_only_the_cecs_own_cookies_and_no_credentials_reach_it(
        gw: Stack, path_mode: list[tuple[str, bool]]) -> None:
    resp = await get(gw, path_mode, "/service-cloud/x", BROWSER_COOKIES,
                     "Authorization: Bearer site-credential",
                     "Proxy-Authorization: Basic cHJveHk6c2VjcmV0")
    assert resp.status == 200
    got = gw.cec.requests[-1]
    assert got.target == "/service-cloud/x"
    # ccmessaging-token as it is; the CEC's JSESSIONID restored from its namespace; the
    # site's session, the gateway's guest cookie and the site's JSESSIONID never.
    assert got.all("Cookie") == ["ccmessaging-token=tok; JSESSIONID=j1"]
    assert got.header("Authorization") is None and got.header("Proxy-Authorization") is None
    assert b"site-session" not in got.raw and b"guest-cookie" not in got.raw
    assert b"site-j" not in got.raw and b"site-credential" not in got.raw


async def test_the_site_route_keeps_every_cookie_and_credential(
        gw: Stack, path_mode: list[tuple[str, bool]]) -> None:
    resp = await get(gw, path_mode, "/account", BROWSER_COOKIES,
                     "Authorization: Bearer site-credential")
    assert resp.status == 200
    got = gw.site.requests[-1]
    assert got.header("Cookie") == BROWSER_COOKIES.partition(": ")[2]
    assert got.header("Authorization") == "Bearer site-credential"
    assert gw.cec.requests == []


async def test_a_cec_without_cookies_of_its_own_gets_no_cookie_header(gw: Stack) -> None:
    resp = await raw_exchange("127.0.0.1", gw.port, request(
        "/service-cloud/y", "Cookie: SESSION=site-session; cec_guest=g"))
    assert resp.status == 200
    assert gw.cec.requests[-1].header("Cookie") is None


async def test_configured_cookie_names_and_credentials_are_forwarded() -> None:
    async with run_recorder() as cec, run_recorder() as site:
        tree = config_tree(cec, site)
        tree["routes"][0].update(forward_cookies=["locale"], forward_credentials=True)
        config = load_config_text(yaml.safe_dump(tree), env={})
        async with serving(config) as running:
            await raw_exchange("127.0.0.1", running.port, request(
                "/service-cloud/z", "Cookie: locale=en; SESSION=s", "Authorization: Basic eA=="))
    got = cec.requests[-1]
    assert got.header("Cookie") == "locale=en"
    assert got.header("Authorization") == "Basic eA=="


SITE_PAGE = "https://shop.example/orders/4711?token=site-secret&q=x#frag"


async def test_the_cec_gets_only_the_origin_of_a_site_pages_referer(
        gw: Stack, path_mode: list[tuple[str, bool]]) -> None:
    resp = await get(gw, path_mode, "/service-cloud/x", f"Referer: {SITE_PAGE}")
    assert resp.status == 200
    got = gw.cec.requests[-1]
    assert got.all("Referer") == ["https://shop.example/"]
    assert b"site-secret" not in got.raw and b"4711" not in got.raw


async def test_the_cecs_own_page_as_referer_reaches_it_as_it_is(
        gw: Stack, path_mode: list[tuple[str, bool]]) -> None:
    own = "https://shop.example/service-cloud/webclient/chat.html?lang=en"
    resp = await get(gw, path_mode, "/service-cloud/y", f"Referer: {own}")
    assert resp.status == 200
    assert gw.cec.requests[-1].all("Referer") == [own]


async def test_the_site_route_gets_the_referer_as_it_is(
        gw: Stack, path_mode: list[tuple[str, bool]]) -> None:
    resp = await get(gw, path_mode, "/account", f"Referer: {SITE_PAGE}")
    assert resp.status == 200
    assert gw.site.requests[-1].header("Referer") == SITE_PAGE


async def test_forward_referer_sends_it_in_full() -> None:
    async with run_recorder() as cec, run_recorder() as site:
        tree = config_tree(cec, site)
        tree["routes"][0].update(forward_referer=True)
        config = load_config_text(yaml.safe_dump(tree), env={})
        async with serving(config) as running:
            await raw_exchange("127.0.0.1", running.port, request(
                "/service-cloud/z", f"Referer: {SITE_PAGE}"))
    assert cec.requests[-1].header("Referer") == SITE_PAGE


async def test_a_websocket_upgrade_to_the_cec_carries_only_its_cookies(gw: Stack) -> None:
    await raw_exchange("127.0.0.1", gw.port, request(
        "/service-cloud/ws", BROWSER_COOKIES, "Authorization: Bearer site-credential",
        "Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="))
    got = gw.cec.requests[-1]
    assert got.header("Upgrade") == "websocket"
    assert got.all("Cookie") == ["ccmessaging-token=tok; JSESSIONID=j1"]
    assert got.header("Authorization") is None


# ------------------------------------------------------------------ cookies from the CEC


def cookies_by_name(resp: RawResponse) -> dict[str, str]:
    return {v.partition("=")[0]: v for v in resp.all("Set-Cookie")}


async def test_cec_set_cookie_is_confined_namespaced_and_never_overwrites_ours(
        gw: Stack, path_mode: list[tuple[str, bool]]) -> None:
    resp = await get(gw, path_mode, "/service-cloud/set-cookies")
    cookies = cookies_by_name(resp)
    # The gateway's guest cookie and the site's session cookie: refused, not renamed.
    assert set(cookies) == {"ccmessaging-token", "__cec_JSESSIONID", "__cec_pref"}, cookies
    token = cookies["ccmessaging-token"]
    assert token.startswith("ccmessaging-token=t1;")
    assert "Path=/service-cloud" in token and "HttpOnly" in token and "SameSite=Lax" in token
    assert "domain" not in " ".join(resp.all("Set-Cookie")).lower()
    # Path=/ from the CEC is confined to its prefix, a deeper path is kept.
    assert "Path=/service-cloud" in cookies["__cec_JSESSIONID"]
    assert "Path=/service-cloud/x/" in cookies["__cec_pref"]
    for value in resp.all("Set-Cookie"):
        assert "Secure" not in value  # plain http: a Secure cookie would not come back
    route = gw.running.gateway.routes.match("/service-cloud/x")
    responses = 2 if path_mode[0] == ("fast", True) else 1  # the warm-up request counts too
    assert route is not None and route.policy.stats.refused == 2 * responses
    scraped = gw.running.gateway.metrics.render().decode()
    assert f'gateway_cookies_refused_total{{route="/service-cloud/"}} {2.0 * responses}' \
        in scraped


@pytest.mark.parametrize("how", ["trusted X-Forwarded-Proto", "public_url"])
async def test_cec_cookies_get_secure_when_the_visitor_uses_https(how: str) -> None:
    extra: dict[str, Any] = {}
    headers: tuple[str, ...] = ()
    if how == "public_url":
        extra["public_url"] = "https://www.example.com"
    ports: dict[str, int] = {}
    async with run_recorder(hostile_cec(lambda: ports["cec"])) as cec, \
            run_recorder() as site:
        ports["cec"] = cec.port
        tree = config_tree(cec, site, **extra)
        if how != "public_url":
            tree["trusted_proxies"] = ["127.0.0.1/32"]
            headers = ("X-Forwarded-Proto: https",)
        config = load_config_text(yaml.safe_dump(tree), env={})
        async with serving(config) as running:
            resp = await raw_exchange("127.0.0.1", running.port,
                                      request("/service-cloud/set-cookies", *headers))
    values = resp.all("Set-Cookie")
    assert len(values) == 3
    assert all(v.endswith("; Secure") for v in values), values


async def test_an_untrusted_forwarded_proto_adds_no_secure(gw: Stack) -> None:
    # The client's own X-Forwarded-Proto (its peer is not a trusted proxy) is not believed.
    resp = await raw_exchange("127.0.0.1", gw.port, request(
        "/service-cloud/set-cookies", "X-Forwarded-Proto: https"))
    values = resp.all("Set-Cookie")
    assert len(values) == 3 and not any("Secure" in v for v in values), values


async def test_the_cecs_own_cookie_round_trips(gw: Stack) -> None:
    resp = await raw_exchange("127.0.0.1", gw.port, request("/service-cloud/set-cookies"))
    jar = [v.split(";")[0] for v in resp.all("Set-Cookie")]
    await raw_exchange("127.0.0.1", gw.port, request(
        "/service-cloud/chat", "Cookie: " + "; ".join([*jar, "SESSION=site-session"])))
    assert gw.cec.requests[-1].header("Cookie") == "ccmessaging-token=t1; JSESSIONID=j1; pref=1"


async def test_headers_acting_on_the_whole_origin_never_come_from_the_cec(
        gw: Stack, path_mode: list[tuple[str, bool]]) -> None:
    # Clear-Site-Data would wipe the site's session and the guest cookie, a
    # Service-Worker-Allowed: / would let a CEC worker control every page of the site.
    resp = await get(gw, path_mode, "/service-cloud/origin-wide")
    names = {k.lower() for k, _ in resp.headers}
    assert not names & {k.lower() for k, _ in ORIGIN_WIDE_HEADERS}, resp.headers
    site = await get(gw, path_mode, "/origin-wide")  # the site decides for its origin
    assert {k.lower() for k, _ in ORIGIN_WIDE_HEADERS} <= {k.lower() for k, _ in site.headers}


# ------------------------------------------------------------------ CORS


@pytest.mark.parametrize("origin", ["https://allowed.example", "https://evil.example", None])
async def test_exactly_one_set_of_cors_headers_and_only_for_configured_origins(
        gw: Stack, origin: str | None) -> None:
    headers = (f"Origin: {origin}",) if origin else ()
    resp = await raw_exchange("127.0.0.1", gw.port, request("/service-cloud/cors", *headers))
    assert resp.status == 200
    acao = resp.all("Access-Control-Allow-Origin")
    if origin == "https://allowed.example":
        assert acao == [origin]
        assert resp.all("Access-Control-Allow-Credentials") == ["true"]
    else:
        assert acao == []
        assert resp.all("Access-Control-Allow-Credentials") == []
    assert resp.all("Access-Control-Allow-Headers") == []
    assert resp.all("Access-Control-Expose-Headers") == []


async def test_upstream_cors_is_stripped_on_the_fast_path_too(
        gw: Stack, path_mode: list[tuple[str, bool]]) -> None:
    resp = await get(gw, path_mode, "/service-cloud/cors")
    assert not [k for k, _ in resp.headers if k.lower().startswith("access-control-")]


# ------------------------------------------------------------------ redirects


async def redirect(gw: Stack, mode: list[tuple[str, bool]], route: str, to: str
                   ) -> RawResponse:
    resp = await get(gw, mode, f"{route}redirect?to={quote(to, safe='')}")
    assert resp.status == 302
    return resp


async def test_the_tab_open_redirect_stays_on_the_gateway(
        gw: Stack, path_mode: list[tuple[str, bool]]) -> None:
    # The case: "http://<own host>/\t/evil.example/x" became "/\t/evil.example/x",
    # which a browser follows to //evil.example/x.
    resp = await redirect(gw, path_mode, "/", "{own}/\t/evil.example/x")
    assert resp.header("Location") == "/evil.example/x"
    assert resp.header("Refresh") == "0; url=/evil.example/x"
    resp = await redirect(gw, path_mode, "/service-cloud/",
                          "{own}/service-cloud/\t/\\evil.example/x")
    # A path on the gateway (merged to /service-cloud/evil.example/x there), not a host.
    assert resp.header("Location") == "/service-cloud///evil.example/x"
    assert resp.header("Content-Location") == resp.header("Location")


@pytest.mark.parametrize("to", ["/\t/evil.example/x", "\\\\evil.example/x", "/\\evil.example",
                                "//evil.example/x", " \t//evil.example"])
async def test_scheme_relative_targets_become_absolute(
        gw: Stack, path_mode: list[tuple[str, bool]], to: str) -> None:
    resp = await redirect(gw, path_mode, "/service-cloud/", to)
    location = resp.header("Location")
    assert location is not None and location.startswith("http://evil.example"), location
    refresh = resp.header("Refresh") or ""
    assert refresh.partition("url=")[2].strip(" \t") == location, refresh


async def test_a_same_origin_redirect_still_maps(
        gw: Stack, path_mode: list[tuple[str, bool]]) -> None:
    resp = await redirect(gw, path_mode, "/service-cloud/", "{own}/service-cloud/next?a=1#f")
    assert resp.header("Location") == "/service-cloud/next?a=1#f"
    assert resp.header("Content-Location") == "/service-cloud/next?a=1#f"
    assert resp.header("Refresh") == "0; url=/service-cloud/next?a=1#f"


async def test_an_off_site_redirect_stays_absolute(
        gw: Stack, path_mode: list[tuple[str, bool]]) -> None:
    resp = await redirect(gw, path_mode, "/service-cloud/", "https://login.example/sso?x=1")
    assert resp.header("Location") == "https://login.example/sso?x=1"


# ------------------------------------------------------------------ client-script paths

SCRIPT = "/service-cloud/webclient/chat_client/js/newThirdPartyClient.js"
OLD_SCRIPT = "/service-cloud/webclient/chat_client/js/thirdPartyClient.js"


@pytest.mark.parametrize(("method", "path", "status"), [
    ("POST", SCRIPT + "/", 404),
    ("POST", SCRIPT + ";/", 404),
    ("POST", SCRIPT + ";jsessionid=1", 404),
    ("POST", SCRIPT + ".", 404),
    ("POST", SCRIPT[:-3] + "%2Ejs", 404),
    ("POST", SCRIPT.upper(), 404),
    ("POST", SCRIPT.replace("Third", "Th%C4%B1rd"), 404),  # dotless i
    ("POST", SCRIPT.replace("js/new", "j%C5%BF/new"), 404),  # long s
    ("POST", OLD_SCRIPT.replace("Client", "CLIENT"), 404),
    ("PUT", SCRIPT, 405),
    ("PATCH", SCRIPT, 405),
    ("GET", SCRIPT, 405),
    ("DELETE", OLD_SCRIPT, 405),
])
async def test_client_script_spellings_and_methods_never_reach_the_cec(
        gw: Stack, method: str, path: str, status: int) -> None:
    body = b'{"thirdUserId": "victim", "thirdUserName": "page-chosen"}'
    resp = await raw_exchange("127.0.0.1", gw.port, request(
        path, "Content-Type: application/json", method=method, body=body))
    assert resp.status == status, resp
    if status == 405:
        assert resp.header("Allow") == "POST"
    assert gw.cec.requests == []


async def test_a_get_variant_is_refused_on_the_fast_path_too(
        gw: Stack, path_mode: list[tuple[str, bool]]) -> None:
    await raw_exchange("127.0.0.1", gw.port, request("/service-cloud/warm"))
    resp = await raw_exchange("127.0.0.1", gw.port, request(SCRIPT + "/"))
    assert resp.status == 404
    assert [r.target for r in gw.cec.requests] == ["/service-cloud/warm"]


async def test_the_canonical_post_is_still_rewritten(gw: Stack) -> None:
    body = b'{"thirdUserId": "victim", "thirdUserName": "Tom"}'
    resp = await raw_exchange("127.0.0.1", gw.port, request(
        SCRIPT, "Content-Type: application/json", method="POST", body=body))
    assert resp.status == 200
    [got] = gw.cec.requests
    assert got.target == SCRIPT and b"victim" not in got.body


# ------------------------------------------------------------------ Host


@pytest.mark.parametrize("host", ["gw.test evil", "user@gw.test", "gw.test/x", "gw.test\\x",
                                  "gw.t\u00e9st", "gw.test\udcff", "gw\x01test", "gw\x7ftest",
                                  "gw.test:99999", "[::1", "gw..test", "",
                                  "gw.test\r\nHost: evil.example"])
async def test_an_invalid_host_is_400_and_forwarded_nowhere(
        gw: Stack, path_mode: list[tuple[str, bool]], host: str) -> None:
    if path_mode[0] == ("fast", True):
        await raw_exchange("127.0.0.1", gw.port, request("/warm"))
        await raw_exchange("127.0.0.1", gw.port, request("/service-cloud/warm"))
    sent_site, sent_cec = len(gw.site.requests), len(gw.cec.requests)
    for path in ("/page", "/service-cloud/page"):
        resp = await raw_exchange("127.0.0.1", gw.port, request(path, host=host))
        assert resp.status == 400, (host, path)
    assert len(gw.site.requests) == sent_site and len(gw.cec.requests) == sent_cec


async def test_valid_hosts_pass(gw: Stack) -> None:
    for host in ("gw.test", "gw.test:8080", "127.0.0.1:1", "[::1]:8080", "my_host.local"):
        resp = await raw_exchange("127.0.0.1", gw.port, request("/page", host=host))
        assert resp.status == 200, host
        assert gw.site.requests[-1].header("Host") == host


async def test_a_garbage_forwarded_host_from_a_trusted_proxy_is_not_passed_on() -> None:
    async with run_recorder() as cec, run_recorder() as site:
        tree = config_tree(cec, site)
        tree["trusted_proxies"] = ["127.0.0.1/32"]
        config = load_config_text(yaml.safe_dump(tree), env={})
        async with serving(config) as running:
            await raw_exchange("127.0.0.1", running.port, request(
                "/service-cloud/a", "X-Forwarded-Host: evil.example/@x y"))
    assert cec.requests[-1].header("X-Forwarded-Host") == GW_HOST


# ------------------------------------------------------------------ own pages


@pytest.mark.parametrize("path", ["/chat/", "/gateway/chat.js"])
async def test_own_pages_name_no_versions_and_forbid_sniffing(gw: Stack, path: str) -> None:
    resp = await raw_exchange("127.0.0.1", gw.port, request(path))
    assert resp.all("Server") == ["cec-gateway"]
    assert resp.header("X-Content-Type-Options") == "nosniff"
    if path == "/chat/":
        csp = resp.header("Content-Security-Policy") or ""
        assert "default-src 'self'" in csp and "frame-ancestors 'self'" in csp
        assert "object-src 'none'" in csp
        assert resp.header("X-Frame-Options") == "SAMEORIGIN"
        # Scripts run only with this response's nonce, which the page's own tags carry.
        nonce = csp.split("'nonce-")[1].split("'")[0]
        assert f'<script nonce="{nonce}" src="/gateway/chat.js"'.encode() in resp.body
        again = await raw_exchange("127.0.0.1", gw.port, request(path))
        assert nonce not in (again.header("Content-Security-Policy") or "")


async def test_own_error_pages_too(gw: Stack) -> None:
    resp = await raw_exchange("127.0.0.1", gw.port, request(SCRIPT + "/", method="POST"))
    assert resp.status == 404
    assert resp.all("Server") == ["cec-gateway"]
    assert resp.header("X-Content-Type-Options") == "nosniff"


async def test_frame_ancestors_is_configurable() -> None:
    async with stack(trust={"frame_ancestors": ["'self'", "https://portal.example"]}) as s:
        resp = await raw_exchange("127.0.0.1", s.port, request("/chat/"))
    assert "frame-ancestors 'self' https://portal.example" in (
        resp.header("Content-Security-Policy") or "")
    assert resp.header("X-Frame-Options") is None  # it cannot say "these two"



# ------------------------------------------------------------------ pure logic

CEC_URLS = UrlMap.for_route("/service-cloud/", URL("https://cec.example.com/service-cloud/"))
POLICY = third_party_policy("/service-cloud/", "/service-cloud/", CEC_URLS,
                            forward_cookies=["locale"], refused_cookies=["SESSION", "cec_guest"])


@pytest.mark.parametrize(("value", "expected"), [
    ("a=1", None),
    ("ccmessaging-token=t; __cec_a=1; a=site", "ccmessaging-token=t; a=1"),
    ("__cec_=x; __cec_locale=evil; locale=en", "locale=en"),  # no empty or shadowing name
    ("ccmessaging-token", None),  # no '=': not a cookie
])
def test_upstream_cookie(value: str, expected: str | None) -> None:
    out = POLICY.upstream_cookie([value.encode()])
    assert out == (expected.encode() if expected is not None else None)


@pytest.mark.parametrize(("value", "expected"), [
    ("https://shop.example/orders?token=t", "https://shop.example/"),
    ("HTTPS://shop.example:8443/a/b#f", "https://shop.example:8443/"),
    ("https://user:pw@shop.example/a", "https://shop.example/"),  # never credentials
    ("https://shop.example", "https://shop.example/"),
    ("https://shop.example?x=1", "https://shop.example/"),
    ("https://shop.example/service-cloud/p?x=1#f", "https://shop.example/service-cloud/p?x=1"),
    ("https://u@shop.example/service-cloud/p", "https://shop.example/service-cloud/p"),
    # Paths that only look like the route's: its prefix exactly, nothing that resolves away.
    ("https://shop.example/service-cloud", "https://shop.example/"),
    ("https://shop.example/service-cloudy/p", "https://shop.example/"),
    ("https://shop.example/service-cloud/../orders?token=t", "https://shop.example/"),
    ("https://shop.example/service-cloud/%2e%2e/orders", "https://shop.example/"),
    ("https://shop.example/service-cloud\\..\\orders", "https://shop.example/"),
    # (A browser reads a backslash as a slash: this is /orders.)
    ("https://shop.example/service-cloud/x\\..\\..\\orders", "https://shop.example/"),
    # Escapes and dots in the route's own page's query are the CEC's own business.
    ("https://shop.example/service-cloud/p?q=a%20b&r=../x",
     "https://shop.example/service-cloud/p?q=a%20b&r=../x"),
    ("https://shop.example/orders?next=/service-cloud/", "https://shop.example/"),
    # Not an absolute URL: left out.
    ("/orders?token=t", None),
    ("shop.example/orders", None),
    ("https:///orders", None),
    ("https://@/orders", None),
    ("https://shop.example/a b", None),
    ("", None),
])
def test_upstream_referer(value: str, expected: str | None) -> None:
    out = POLICY.upstream_referer(value.encode())
    assert out == (expected.encode() if expected is not None else None)


@pytest.mark.parametrize(("value", "https", "expected"), [
    ("a=1; Path=/; Domain=cec.example.com", False, "__cec_a=1; Path=/service-cloud"),
    ("a=1; Path=/service-cloud/x; Path=/", False,
     "__cec_a=1; Path=/service-cloud/x; Path=/service-cloud"),
    ("a=1; Path=/service-cloud/../../", False, "__cec_a=1; Path=/service-cloud"),
    ("locale=en; Max-Age=60", True, "locale=en; Max-Age=60; Secure"),
    ("a=1; secure", True, "__cec_a=1; secure"),
    ("SESSION=x; Path=/", False, None),
    ("session=x", False, None),  # refused whatever the case
    ("=x", False, None),
    ("novalue", False, None),
])
def test_set_cookie(value: str, https: bool, expected: str | None) -> None:
    assert POLICY.set_cookie(value, CEC_URLS, https) == expected


@pytest.mark.parametrize(("method", "path", "status"), [
    ("POST", SCRIPT, None),
    ("POST", OLD_SCRIPT, None),
    ("POST", SCRIPT.replace("js/new", "js//new"), 404),
    ("POST", SCRIPT + "%20", 404),
    ("POST", SCRIPT.replace("Client", "Cl%C4%B0ent"), 404),  # Java lower-cases İ to i
    ("GET", "/service-cloud/webclient/other.js", None),
    ("GET", "/party/time", None),
    ("HEAD", SCRIPT, 405),
])
def test_client_scripts(method: str, path: str, status: int | None) -> None:
    scripts = ClientScripts([SCRIPT, OLD_SCRIPT])
    assert scripts.refusal(method, path) == status


@pytest.mark.parametrize(("host", "ok"), [
    ("example.com", True), ("example.com.", True), ("EXAMPLE.com:443", True),
    ("1.2.3.4:80", True), ("[2001:db8::1]:8443", True), ("_dmarc.example", True),
    ("[zz::1]", False), ("a b", False), ("a@b", False), ("a/b", False), ("a\\b", False),
    ("a:b", False), ("a:", False), (":80", False), ("-a.example", False),
    ("a" * 300, False), ("é.example", False), ("a\x00b", False),
])
def test_valid_host(host: str, ok: bool) -> None:
    assert valid_host(host) is ok
