"""The request policy (gateway/policy.py), case by case (issue 19): who the client is and
which request id is believed, the route and its target, the head the upstream gets, the
CORS extras, and every error answer as bytes, through the calls both request paths make."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import replace

import pytest

from gateway.boundary import third_party_policy
from gateway.config import Cors
from gateway.cors import CorsPolicy
from gateway.errors import (
    BadRequest,
    ClientBodyTimeout,
    GatewayError,
    PayloadTooLarge,
    RetryWithCookie,
    ServiceUnavailable,
    Unauthorized,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.headers import Forwarded, TrustedProxies
from gateway.policy import (
    ErrorAnswer,
    ForwardingPolicy,
    answer_response,
    error_answer,
    error_response,
    log_error,
    render_error,
)
from gateway.routing import RouteTable, compile_route

SITE = compile_route("/", "http://127.0.0.1:3000/")
CEC = compile_route("/service-cloud/", "https://cec.example.com:8443/sc/")
KEPT = compile_route("/kept/", "http://127.0.0.1:3001/", preserve_host=True)
ROUTES = RouteTable([SITE, CEC, KEPT])
PROXY = "10.0.0.5"  # the trusted load balancer
VISITOR = "198.51.100.7"


class Ids:
    def __init__(self) -> None:
        self.n = 0

    def next(self) -> str:
        self.n += 1
        return f"gen{self.n}"


def policy(*, trusted: Sequence[str] = (), scheme: str = "http", public_https: bool = False,
           origins: Sequence[str] = (), routes: RouteTable = ROUTES) -> ForwardingPolicy:
    return ForwardingPolicy(routes=routes,
                            trusted=TrustedProxies(ipaddress.ip_network(n) for n in trusted),
                            scheme=scheme, public_https=public_https,
                            cors=CorsPolicy(Cors(allow_origins=list(origins))),
                            next_id=Ids().next)


# ------------------------------------------------------------------ the client


@pytest.mark.parametrize(("trusted", "xff", "chain"), [
    ((), ["203.0.113.9"], f"203.0.113.9, {VISITOR}"),  # no trusted set at all
    (("10.0.0.0/8",), [], VISITOR),  # a trusted set the peer is not in
])
def test_untrusted_peer_nothing_in_the_request_is_believed(
        trusted: tuple[str, ...], xff: list[str], chain: str) -> None:
    headers = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example",
               "X-Request-ID": "chosen-by-client"}
    fwd, rid, https = policy(trusted=list(trusted)).client(VISITOR, headers,
                                                           "www.example.com", xff)
    assert fwd == Forwarded(VISITOR, chain, "http", "www.example.com")
    assert rid == "gen1"
    assert https is False


def test_trusted_proxy_is_believed() -> None:
    p = policy(trusted=["10.0.0.0/8"])
    headers = {"X-Forwarded-Proto": "HTTPS", "X-Forwarded-Host": "shop.example.com",
               "X-Request-ID": "lb-1234"}
    fwd, rid, https = p.client(PROXY, headers, "internal:8080", [VISITOR])
    assert fwd == Forwarded(VISITOR, f"{VISITOR}, {PROXY}", "HTTPS", "shop.example.com")
    assert rid == "lb-1234"
    assert https is True  # the proto compared without case


def test_trusted_proxy_saying_http_is_http() -> None:
    fwd, _, https = policy(trusted=["10.0.0.0/8"]).client(
        PROXY, {"X-Forwarded-Proto": "http"}, "h", [VISITOR])
    assert (fwd.proto, https) == ("http", False)


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_own_scheme_without_any_proxy(scheme: str) -> None:
    fwd, _, https = policy(scheme=scheme).client(VISITOR, {}, "h", [])
    assert (fwd.proto, https) == (scheme, scheme == "https")


def test_public_https_makes_every_visitor_https() -> None:
    fwd, _, https = policy(public_https=True).client(VISITOR, {}, "h", [])
    assert fwd.proto == "http" and https is True


@pytest.mark.parametrize(("rid", "believed"), [
    ("a" * 128, True),
    ("a" * 129, False),
    ("", False),
    ("id-é", False),  # not ASCII
    ("id\x01x", False),  # not printable
    ("id\tx", False),
    ("id x", True),
    ("~!@#$%^&*()", True),
])
def test_request_id_from_a_trusted_proxy_only_when_sane(rid: str, believed: bool) -> None:
    _, got, _ = policy(trusted=["10.0.0.0/8"]).client(PROXY, {"X-Request-ID": rid}, "h", [])
    assert got == (rid if believed else "gen1")


def test_request_ids_are_fresh_per_request() -> None:
    p = policy()
    assert [p.client(VISITOR, {}, "h", [])[1] for _ in range(3)] == ["gen1", "gen2", "gen3"]


# ------------------------------------------------------------------ CORS extras


def test_cors_headers_for_an_allowed_origin_only() -> None:
    p = policy(origins=["https://app.example.com"])
    assert p.cors_headers("https://app.example.com") == [
        ("Access-Control-Allow-Origin", "https://app.example.com")]
    assert p.cors_headers("https://evil.example") is None
    assert p.cors_headers(None) is None
    assert p.cors_headers("") is None


def test_cors_headers_none_when_cors_is_off() -> None:
    assert policy().cors_headers("https://app.example.com") is None


def test_proxied_extras_vary_on_origin_when_cors_is_on() -> None:
    on = policy(origins=["https://app.example.com"])
    cors = [("Access-Control-Allow-Origin", "https://app.example.com")]
    assert list(on.proxied_extras(cors)) == [*cors, ("Vary", "Origin")]
    assert list(on.proxied_extras(None)) == [("Vary", "Origin")]
    off = policy()
    assert list(off.proxied_extras(None)) == []
    assert list(off.proxied_extras(cors)) == cors


# ------------------------------------------------------------------ routes


@pytest.mark.parametrize(("path", "query", "route", "target"), [
    ("/", "", SITE, "/"),
    ("/shop/a", "q=1", SITE, "/shop/a?q=1"),
    ("/service-cloud/", "", CEC, "/sc/"),
    ("/service-cloud/x/y", "a=b&c", CEC, "/sc/x/y?a=b&c"),
    ("/service-cloudy", "", SITE, "/service-cloudy"),
    ("/kept/z", "", KEPT, "/z"),
])
def test_route_and_target(path: str, query: str, route: object, target: str) -> None:
    assert policy().route(path, query) == (route, target)


@pytest.mark.parametrize("path", ["/service-cloud", "/kept"])
def test_slash_less_prefix_is_redirected_not_proxied(path: str) -> None:
    # even though the site's "/" would match it
    assert policy().route(path, "") is None
    assert policy().route(path, "q=1") is None


def test_no_route_is_none() -> None:
    p = policy(routes=RouteTable([CEC]))
    assert p.route("/elsewhere", "") is None
    assert p.route("/service-cloud/a", "")  == (CEC, "/sc/a")


# ------------------------------------------------------------------ the upstream head

FWD = Forwarded(VISITOR, VISITOR, "https", "www.example.com")
RAW = [(b"Accept", b"*/*"), (b"Content-Type", b"application/x-www-form-urlencoded"),
       (b"Connection", b"keep-alive, X-Secret"), (b"X-Secret", b"s"), (b"X_Real_IP", b"1.2.3.4")]


def lines(head: bytes) -> list[bytes]:
    assert head.endswith(b"\r\n\r\n")
    return head[:-4].split(b"\r\n")


@pytest.mark.parametrize("connection", [None, ["keep-alive, X-Secret"]])
def test_upstream_head_for_the_upstream_host(connection: list[str] | None) -> None:
    head = ForwardingPolicy.upstream_head(CEC, "POST", "/sc/x", RAW, "www.example.com", FWD,
                                          "rid7", connection)
    assert lines(bytes(head)) == [
        b"POST /sc/x HTTP/1.1", b"Host: cec.example.com:8443", b"Accept: */*",
        b"Content-Type: application/x-www-form-urlencoded",
        b"X-Real-IP: " + VISITOR.encode(), b"X-Forwarded-For: " + VISITOR.encode(),
        b"X-Forwarded-Proto: https", b"X-Forwarded-Host: www.example.com",
        b"X-Request-ID: rid7"]


def test_upstream_head_preserve_host_sends_the_clients_host() -> None:
    head = ForwardingPolicy.upstream_head(KEPT, "GET", "/z", [], "www.example.com", FWD, None,
                                          None)
    assert lines(bytes(head))[:2] == [b"GET /z HTTP/1.1", b"Host: www.example.com"]
    assert b"X-Request-ID" not in head


def test_upstream_head_body_type_replaces_the_content_type() -> None:
    head = ForwardingPolicy.upstream_head(CEC, "POST", "/sc/x", RAW, "h", FWD, None, None,
                                          framing=[(b"Content-Length", b"12")],
                                          body_type="application/json")
    got = lines(bytes(head))
    assert [x for x in got if x.lower().startswith(b"content-type")] == [
        b"Content-Type: application/json"]
    assert b"Content-Length: 12" in got


def test_upstream_head_without_body_type_keeps_the_clients() -> None:
    head = ForwardingPolicy.upstream_head(CEC, "POST", "/sc/x", RAW, "h", FWD, None, None,
                                          body_type=None)
    assert [x for x in lines(bytes(head)) if x.lower().startswith(b"content-type")] == [
        b"Content-Type: application/x-www-form-urlencoded"]


def test_upstream_head_upgrade() -> None:
    head = ForwardingPolicy.upstream_head(SITE, "GET", "/ws", [(b"Upgrade", b"websocket")],
                                          "h", FWD, None, None, upgrade=True)
    assert lines(bytes(head))[-2:] == [b"Connection: Upgrade", b"Upgrade: websocket"]
    plain = ForwardingPolicy.upstream_head(SITE, "GET", "/ws", [], "h", FWD, None, None)
    assert b"Upgrade" not in plain


class Trace:
    """Just the part of a RequestTrace the head asks for: its propagation lines."""

    def upstream_lines(self) -> bytes:
        return b"traceparent: 00-gateway-01\r\n"


def test_upstream_head_trace_replaces_the_clients_trace_context() -> None:
    raw = [(b"traceparent", b"00-client-01"), (b"Accept", b"*/*")]
    head = ForwardingPolicy.upstream_head(SITE, "GET", "/", raw, "h", FWD, None, None,
                                          trace=Trace())  # type: ignore[arg-type]
    assert [x for x in lines(bytes(head)) if x.startswith(b"traceparent")] == [
        b"traceparent: 00-gateway-01"]


def test_upstream_head_applies_the_routes_trust_boundary() -> None:
    cec = replace(CEC, policy=third_party_policy("cec", CEC.prefix, CEC.urls))
    raw = [(b"Authorization", b"Basic c2l0ZQ=="), (b"Cookie", b"SESSION=site"),
           (b"Accept", b"*/*")]
    head = bytes(ForwardingPolicy.upstream_head(cec, "GET", "/sc/", raw, "h", FWD, None, None))
    assert b"Authorization" not in head and b"SESSION" not in head and b"Accept" in head
    site = bytes(ForwardingPolicy.upstream_head(SITE, "GET", "/", raw, "h", FWD, None, None))
    assert b"Authorization: Basic" in site and b"Cookie: SESSION=site" in site


# ------------------------------------------------------------------ error answers


@pytest.mark.parametrize(("status", "reason"), [
    (400, b"Bad Request"), (401, b"Unauthorized"), (404, b"Not Found"),
    (408, b"Request Timeout"), (413, b"Content Too Large"), (502, b"Bad Gateway"),
    (503, b"Service Unavailable"), (504, b"Gateway Timeout"), (500, b"Error"), (307, b"Error"),
])
def test_render_error_status_line_for_each_status(status: int, reason: bytes) -> None:
    data = render_error(ErrorAnswer(status, "t"), "r", minor=1, keep_alive=True,
                        head_request=False, date_line=b"Date: D\r\n")
    assert data.split(b"\r\n", 1)[0] == b"HTTP/1.1 %d %s" % (status, reason)
    assert data.endswith(b"\r\n\r\n%d t\n" % status)


@pytest.mark.parametrize("exc", [BadRequest("x"), Unauthorized("x"), ClientBodyTimeout("x"),
                                 PayloadTooLarge("x"), UpstreamError("x"),
                                 ServiceUnavailable("x"), UpstreamTimeout("x"),
                                 GatewayError("x"),
                                 RetryWithCookie("c=1; Path=/", location="/a?b")])
@pytest.mark.parametrize("keep_alive", [True, False])
def test_both_renderings_of_an_error_agree(exc: GatewayError, keep_alive: bool) -> None:
    answer = error_answer(exc)
    data = render_error(answer, "rid9", minor=1, keep_alive=keep_alive, head_request=False,
                        date_line=b"Date: Wed, 02 Dec 2026 00:00:00 GMT\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    got = [line.split(b": ", 1) for line in head.split(b"\r\n")[1:]]
    headers = {k.decode(): v.decode() for k, v in got}
    assert len(headers) == len(got)  # no header twice
    resp = error_response(answer.status, answer.text, answer.headers, close=answer.close)
    assert body == resp.body == answer.body
    assert resp.status == answer.status
    for name, value in resp.headers.items():
        assert headers[name] == value
    assert headers["Date"] == "Wed, 02 Dec 2026 00:00:00 GMT"
    assert headers["Content-Length"] == str(len(body))
    closes = answer.close or not keep_alive
    assert (headers.get("Connection") == "close") is closes
    assert resp.keep_alive is (False if answer.close else None)


def test_render_error_headers_of_the_answer_are_sent() -> None:
    answer = error_answer(RetryWithCookie("cec_guest=abc; Path=/", location="/sc/x?y=1"))
    data = render_error(answer, "r", minor=1, keep_alive=True, head_request=True,
                        date_line=b"")
    assert b"\r\nLocation: /sc/x?y=1\r\n" in data
    assert b"\r\nSet-Cookie: cec_guest=abc; Path=/\r\n" in data
    assert b"\r\nCache-Control: no-store\r\n" in data
    assert data.endswith(b"\r\n\r\n")  # HEAD: no body


def test_answer_response_carries_the_answers_headers() -> None:
    resp = answer_response(error_answer(RetryWithCookie("cec_guest=abc; Path=/",
                                                        location="/sc/x?y=1")))
    assert resp.status == 307
    assert resp.headers["Location"] == "/sc/x?y=1"
    assert resp.headers["Set-Cookie"] == "cec_guest=abc; Path=/"
    assert resp.headers["Cache-Control"] == "no-store"


def test_render_error_close_answer_closes_even_a_keep_alive_connection() -> None:
    for minor in (0, 1):
        data = render_error(error_answer(PayloadTooLarge("x")), "r", minor=minor,
                            keep_alive=True, head_request=False, date_line=b"")
        assert b"\r\nConnection: close\r\n" in data
        assert b"keep-alive" not in data


def test_error_response_headers_and_close() -> None:
    resp = error_response(503, "Service Unavailable", {"Retry-After": "5"}, close=True)
    assert resp.status == 503 and resp.body == b"503 Service Unavailable\n"
    assert resp.headers["Server"] == "cec-gateway" and resp.headers["Retry-After"] == "5"
    assert resp.keep_alive is False
    plain = error_response(404, "Not Found")
    assert plain.keep_alive is None and plain.headers["Server"] == "cec-gateway"
    assert plain.content_type == "text/plain"


@pytest.mark.parametrize(("exc", "level"), [
    (UpstreamError("refused"), logging.WARNING), (GatewayError("boom"), logging.ERROR)])
def test_log_error_logs_at_the_errors_level(caplog: pytest.LogCaptureFixture,
                                            exc: GatewayError, level: int) -> None:
    logger = logging.getLogger("test.policy.tables")
    with caplog.at_level(logging.DEBUG, logger=logger.name):
        log_error(logger, CEC, "rid1", exc, {"k": "v"})
        log_error(logger, None, "rid2", exc)
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (level, f"{CEC.name} rid1: {exc}"), (level, f"gateway rid2: {exc}")]
    assert getattr(caplog.records[0], "k", None) == "v"


def test_log_error_is_silent_for_the_clients_own_mistakes(
        caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.policy.tables")
    with caplog.at_level(logging.DEBUG, logger=logger.name):
        log_error(logger, CEC, "rid1", BadRequest("bad"))
    assert caplog.records == []
