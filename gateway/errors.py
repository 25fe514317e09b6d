"""The gateway's exception hierarchy: everything it raises on purpose is a GatewayError.

Errors are data: each class that reaches a client carries its answer (``status``, the
short public ``text``, whether the connection must close after it, and the level its log
line gets). gateway/policy.py's ``error_answer`` reads them and the one error writer
(gateway/policy.py ``render_error``) writes them, whichever request path met the error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar


class GatewayError(Exception):
    """Root of every error the gateway raises deliberately."""

    status: ClassVar[int] = 500
    text: ClassVar[str] = "Internal Server Error"
    # The rest of an unread request body may still be on the wire: never parse it as a request.
    close: ClassVar[bool] = False
    # The level of its log line (with the route and the request id): an error nobody
    # planned an answer for is logged as one; 0 for the client's own mistakes, whose reason
    # the access line already has.
    log_level: ClassVar[int] = logging.ERROR

    def error_field(self) -> str:
        """The access line's error field (never the client's bytes)."""
        return str(self)

    def public_text(self) -> str:
        """What the client is told (never a host, a path or the client's own bytes)."""
        return self.text

    def headers(self) -> dict[str, str]:
        return {}


@dataclass(frozen=True)
class Problem:
    """One configuration mistake: where, what was found, and how to fix it."""

    path: str
    value: str
    message: str
    fix: str = ""

    def __str__(self) -> str:
        # ``value`` is already what may be shown (gateway/yamlconf.py ``shown_value``): a
        # scalar at a known, non-secret key, or a placeholder.
        text = f"{self.path or '<root>'}: {self.message}"
        if self.value:
            text += f" (got {self.value})"
        if self.fix:
            text += f"\n    fix: {self.fix}"
        return text


class ConfigError(GatewayError):
    """The configuration cannot be used; carries every problem found, not just the first."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class UpstreamError(GatewayError):
    """The upstream could not be reached or broke the exchange (answered as 502)."""

    status = 502
    text = "Bad Gateway: the upstream could not be reached"
    log_level = logging.WARNING


class UpstreamTimeout(UpstreamError):
    """The upstream stayed silent past a timeout (answered as 504)."""

    status = 504
    text = "Gateway Timeout: the upstream did not answer in time"


class UpstreamTLSError(UpstreamError):
    """The upstream's certificate did not verify (answered as 502, logged with the reason)."""

    text = "Bad Gateway: the upstream's certificate was refused"
    log_level = logging.ERROR


class BadRequest(GatewayError):
    """The client's request is malformed (answered as 400)."""

    status = 400
    log_level = 0
    text = "Bad Request"

    def public_text(self) -> str:
        # Raised with a fixed description of what is wrong (never the client's bytes).
        return f"{self.text}: {self}"


class ClientBodyError(GatewayError):
    """The client's body broke off or stalled; nothing sensible can be forwarded."""

    status = 400
    log_level = 0
    text = "Bad Request: request body broke off"
    close = True


class ClientBodyTimeout(GatewayError):
    """The client sent its body too slowly (answered as 408)."""

    status = 408
    log_level = 0
    text = "Request Timeout"
    close = True


class PayloadTooLarge(GatewayError):
    """The client's body is over the configured limit (answered as 413)."""

    status = 413
    log_level = 0
    text = "Content Too Large"
    close = True

    def error_field(self) -> str:
        return "body too large"


class Unauthorized(GatewayError):
    """The visitor must be logged in for this (answered 401)."""

    status = 401
    log_level = 0
    text = "Unauthorized: log in to chat"


class RetryWithCookie(GatewayError):
    """Answered ``307`` to the same target with ``Set-Cookie: set_cookie``: the request needs
    a cookie the client did not have yet (a browser follows, and resends the body, with it)."""

    status = 307
    log_level = 0
    text = "Temporary Redirect"

    def __init__(self, set_cookie: str, location: str = "") -> None:
        super().__init__("retry with the cookie just set")
        self.set_cookie = set_cookie
        self.location = location  # the request's own target (set where it is known)

    def headers(self) -> dict[str, str]:
        return {"Location": self.location, "Set-Cookie": self.set_cookie,
                "Cache-Control": "no-store"}


class NotFound(GatewayError):
    """No route serves the path, or a client-script spelling the CEC must never see
    (answered 404)."""

    status = 404
    log_level = 0
    text = "Not Found"

    def __init__(self, reason: str = "no route") -> None:
        super().__init__(reason)


class MethodNotAllowed(GatewayError):
    """A client script asked for with another method than the POST the gateway rewrites
    (answered 405 with ``Allow: POST``)."""

    status = 405
    log_level = 0
    text = "Method Not Allowed"

    def __init__(self, allow: str = "POST") -> None:
        super().__init__("method not allowed")
        self.allow = allow

    def headers(self) -> dict[str, str]:
        return {"Allow": self.allow}


class MovedPermanently(GatewayError):
    """``/prefix`` of a ``/prefix/`` route: answered 301 to the slash form, as nginx does.
    (Not an error, but an answer of the gateway's own, written by the same writer.)"""

    status = 301
    log_level = 0
    text = "Moved Permanently"

    def __init__(self, location: str) -> None:
        super().__init__("redirect to the route's prefix")
        self.location = location

    def headers(self) -> dict[str, str]:
        return {"Location": self.location}


class ServiceUnavailable(GatewayError):
    """A backend the gateway itself needs (e.g. the token store) is down (answered 503)."""

    status = 503
    text = "Service Unavailable"
    log_level = logging.ERROR
