"""The one answer to each error (gateway/policy.py reading gateway/errors.py), pure."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import pytest
from aiohttp import web
from multidict import CIMultiDict

from gateway.app import Extensions, Gateway, Rewriter
from gateway.boundary import ClientScripts
from gateway.config import load_config_text
from gateway.errors import (
    BadRequest,
    ClientBodyError,
    ClientBodyTimeout,
    GatewayError,
    PayloadTooLarge,
    RetryWithCookie,
    ServiceUnavailable,
    Unauthorized,
    UpstreamError,
    UpstreamTimeout,
    UpstreamTLSError,
)
from gateway.policy import (
    LEAN_BODY_MAX,
    ForwardingPolicy,
    Header,
    answer_response,
    error_answer,
    render_error,
)


@pytest.mark.parametrize(("exc", "status", "body", "close"), [
    (UpstreamError("refused at 10.0.0.1:80"), 502,
     b"502 Bad Gateway: the upstream could not be reached\n", False),
    (UpstreamTimeout("no answer in 5s"), 504,
     b"504 Gateway Timeout: the upstream did not answer in time\n", False),
    (UpstreamTLSError("hostname mismatch"), 502,
     b"502 Bad Gateway: the upstream's certificate was refused\n", False),
    (BadRequest("JSON body is over 10 bytes"), 400,
     b"400 Bad Request: JSON body is over 10 bytes\n", False),
    (ClientBodyError("client body broke off"), 400,
     b"400 Bad Request: request body broke off\n", True),
    (ClientBodyTimeout("client body timeout"), 408, b"408 Request Timeout\n", True),
    (PayloadTooLarge("body of 9 bytes"), 413, b"413 Content Too Large\n", True),
    (Unauthorized("no session"), 401, b"401 Unauthorized: log in to chat\n", False),
    (ServiceUnavailable("redis down at 10.0.0.2"), 503, b"503 Service Unavailable\n", False),
    (GatewayError("anything unplanned"), 500, b"500 Internal Server Error\n", False),
])
def test_each_error_is_its_own_answer(exc: GatewayError, status: int, body: bytes,
                                      close: bool) -> None:
    answer = error_answer(exc)
    assert (answer.status, answer.body, answer.close) == (status, body, close)
    resp = answer_response(answer)
    assert resp.status == status and resp.body == body
    assert resp.headers["Server"] == "cec-gateway"
    assert (resp.keep_alive is False) if close else resp.keep_alive is None


def test_upstream_details_stay_in_the_log_not_the_answer() -> None:
    assert b"10.0.0.1" not in error_answer(UpstreamError("refused at 10.0.0.1:80")).body
    assert UpstreamError.log_level == logging.WARNING
    assert GatewayError.log_level == logging.ERROR  # unplanned: logged as an error
    assert BadRequest.log_level == 0  # the client's mistake: the access line says it


def test_retry_with_cookie_carries_its_headers() -> None:
    exc = RetryWithCookie("cec_guest=abc; Path=/", location="/service-cloud/x?y=1")
    answer = error_answer(exc)
    assert answer.status == 307
    assert dict(answer.headers) == {"Location": "/service-cloud/x?y=1",
                                    "Set-Cookie": "cec_guest=abc; Path=/",
                                    "Cache-Control": "no-store"}


@pytest.mark.parametrize(("keep_alive", "head_request", "minor"),
                         [(True, False, 1), (False, False, 1), (True, True, 1), (True, False, 0)])
def test_the_fast_path_bytes_are_the_same_answer(keep_alive: bool, head_request: bool,
                                                 minor: int) -> None:
    answer = error_answer(UpstreamTimeout("x"))
    data = render_error(answer, "rid1", minor=minor, keep_alive=keep_alive,
                        head_request=head_request, date_line=b"Date: D\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.%d 504 Gateway Timeout" % minor
    headers = dict(line.split(b": ", 1) for line in lines[1:])
    assert headers[b"Content-Length"] == b"%d" % len(answer.body)
    assert headers[b"Server"] == b"cec-gateway"
    assert headers[b"X-Content-Type-Options"] == b"nosniff"
    assert headers[b"X-Request-ID"] == b"rid1"
    assert headers[b"Content-Type"] == b"text/plain; charset=utf-8"
    assert body == (b"" if head_request else answer.body)
    connection = headers.get(b"Connection")
    if not keep_alive:
        assert connection == b"close"
    else:
        assert connection == (b"keep-alive" if minor == 0 else None)


# ------------------------------------------------------------------ which path may serve

SCRIPT = "/service-cloud/webclient/chat_client/js/newThirdPartyClient.js"
OTHER_SCRIPT = "/service-cloud/webclient/chat_client/js/thirdPartyClient.js"


def _sync_rewrite(headers: Mapping[str, str], body: bytes) -> tuple[bytes, list[Header]]:
    return body, []


async def _async_rewrite(request: web.BaseRequest, body: bytes) -> tuple[bytes, list[Header]]:
    return body, []


async def _own(request: web.BaseRequest) -> web.StreamResponse:
    return web.Response()


def lean_policy(*, synchronous: bool = True, max_body: str = "32k",
                extensions: bool = True) -> ForwardingPolicy:
    config = load_config_text(f"""
listen: {{host: 127.0.0.1, port: 0}}
limits: {{client_max_body_size: {max_body}}}
routes:
  - prefix: /app/
    upstream: http://127.0.0.1:1/up/
  - prefix: /
    upstream: http://127.0.0.1:1/root/
""", env={})
    gw = Gateway(config)
    if not extensions:
        return gw.policy
    rw = Rewriter(100, _async_rewrite, "application/json",
                  now=_sync_rewrite if synchronous else None)
    gw.ext = Extensions(endpoints={"/own": _own}, rewriters={SCRIPT: rw},
                        scripts=ClientScripts((SCRIPT, OTHER_SCRIPT)))
    return gw.policy


def _h(*pairs: tuple[str, str]) -> CIMultiDict[str]:
    return CIMultiDict((("Host", "gw.test"), *pairs))


@pytest.mark.parametrize(("method", "target", "headers", "expected"), [
    ("GET", "/app/x?q=1", _h(), ("/up/x?q=1", 0)),
    ("HEAD", "/x", _h(), ("/root/x", 0)),
    ("POST", "/app/x", _h(("Content-Length", "4096")), ("/up/x", 4096)),
    ("PUT", "/app/x", _h(("Content-Length", "0")), ("/up/x", 0)),
    ("POST", "/app/x", _h(("Content-Length", str(32 * 1024 + 1))), None),  # 413 on the full path
    ("POST", "/app/x", _h(("Transfer-Encoding", "chunked")), None),
    ("POST", "/app/x", _h(("Content-Length", "5"), ("Expect", "100-continue")), None),
    ("GET", "/app/x", _h(("Origin", "https://a.example")), ("/up/x", 0)),  # CORS on both
    ("GET", "/app/x", _h(("Upgrade", "websocket")), None),
    ("OPTIONS", "/app/x", _h(), None),
    ("CONNECT", "/app/x", _h(), None),
    ("GET", "/app/x", CIMultiDict(), None),  # no Host: 400 on the full path
    ("GET", "/app/x", CIMultiDict(Host="bad host"), None),
    ("GET", "/app/../x", _h(), None),  # everything to normalise or refuse: the full path
    ("GET", "/app//x", _h(), None),
    ("GET", "/app/%2e%2e/x", _h(), None),
    ("GET", "/app\\x", _h(), None),
    ("GET", "/app/x#frag", _h(), None),
    ("GET", "*", _h(), None),
    ("GET", "/app", _h(), None),  # answered with a redirect to /app/
    ("GET", "/own", _h(), None),  # the gateway's own endpoint
    ("POST", SCRIPT.upper(), _h(("Content-Length", "2")), None),  # another spelling: 404
    ("GET", SCRIPT, _h(), None),  # 405
])
def test_lean_path_is_offered_only_plain_requests(
        method: str, target: str, headers: CIMultiDict[str],
        expected: tuple[str, int] | None) -> None:
    lean = lean_policy().lean(method, target, headers)
    if expected is None:
        assert lean is None
    else:
        assert lean is not None
        assert (lean[1], lean[2], lean[3]) == (*expected, None)


def test_lean_path_takes_a_rewrite_only_when_it_needs_no_io() -> None:
    headers = _h(("Content-Length", "50"))
    lean = lean_policy().lean("POST", SCRIPT + "?t=1", headers)
    assert lean is not None and lean[3] is not None and lean[3].now is _sync_rewrite
    assert lean_policy(synchronous=False).lean("POST", SCRIPT, headers) is None
    # Over the rewriter's own limit: its 400 comes from the full path.
    assert lean_policy().lean("POST", SCRIPT, _h(("Content-Length", "101"))) is None
    # The other client script has no rewriter here: proxied as it is.
    other = lean_policy().lean("POST", OTHER_SCRIPT, headers)
    assert other is not None and other[3] is None


def test_lean_path_names_the_route_it_forwards_to() -> None:
    policy = lean_policy()
    app, root = policy.lean("GET", "/app/x", _h()), policy.lean("GET", "/x", _h())
    assert app is not None and root is not None
    assert (app[0].prefix, app[1]) == ("/app/", "/up/x")
    assert (root[0].prefix, root[1]) == ("/", "/root/x")
    # The Host it checked, handed on (the lean path forwards exactly that one).
    assert app[4] == root[4] == "gw.test"


@pytest.mark.parametrize(("max_body", "length", "lean"), [
    ("32k", 32 * 1024, True),  # the limit itself is allowed (inclusive, as the full path)
    ("32k", 32 * 1024 + 1, False),
    ("1m", LEAN_BODY_MAX, True),  # the lean path's own bound, inclusive
    ("1m", LEAN_BODY_MAX + 1, False),  # streamed by the full path
    ("0", LEAN_BODY_MAX, True),  # no body limit: the lean bound still holds
    ("0", LEAN_BODY_MAX + 1, False),
])
def test_lean_body_bounds(max_body: str, length: int, lean: bool) -> None:
    offered = lean_policy(max_body=max_body).lean(
        "POST", "/app/x", _h(("Content-Length", str(length))))
    assert (offered is not None) is lean
    if offered is not None:
        assert offered[2] == length


def test_lean_rewrite_bound_is_the_rewriters_own_inclusive() -> None:
    at_limit = lean_policy().lean("POST", SCRIPT, _h(("Content-Length", "100")))
    assert at_limit is not None and at_limit[3] is not None


def test_lean_path_without_extensions() -> None:
    """A gateway with no chat features (no extensions): plain requests are still lean."""
    offered = lean_policy(extensions=False).lean("GET", "/app/x", _h())
    assert offered is not None and offered[1] == "/up/x"
