"""The gateway's exception hierarchy: everything it raises on purpose is a GatewayError."""

from __future__ import annotations

from dataclasses import dataclass


class GatewayError(Exception):
    """Root of every error the gateway raises deliberately."""


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


class UpstreamTimeout(UpstreamError):
    """The upstream stayed silent past a timeout (answered as 504)."""


class UpstreamTLSError(UpstreamError):
    """The upstream's certificate did not verify (answered as 502, logged with the reason)."""


class BadRequest(GatewayError):
    """The client's request is malformed (answered as 400)."""


class PayloadTooLarge(GatewayError):
    """The client's body is over the configured limit (answered as 413)."""


class Unauthorized(GatewayError):
    """The visitor must be logged in for this (answered 401)."""


class RetryWithCookie(GatewayError):
    """Answered ``307`` to the same target with ``Set-Cookie: set_cookie``: the request needs
    a cookie the client did not have yet (a browser follows, and resends the body, with it)."""

    def __init__(self, set_cookie: str) -> None:
        super().__init__("retry with the cookie just set")
        self.set_cookie = set_cookie


class ServiceUnavailable(GatewayError):
    """A backend the gateway itself needs (e.g. the token store) is down (answered 503)."""
