"""The one answer to each error (gateway/policy.py reading gateway/errors.py), pure."""

from __future__ import annotations

import logging

import pytest

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
from gateway.policy import answer_response, error_answer, render_error


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
