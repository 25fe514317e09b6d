"""CORS for the origins the operator trusts: preflights answered here, headers on responses.

All header values are computed once per config; per request this is a dict lookup.
"""

from __future__ import annotations

from gateway.config import Cors

Header = tuple[str, str]


class CorsPolicy:
    def __init__(self, cfg: Cors) -> None:
        self._any = "*" in cfg.allow_origins
        self._origins = frozenset(o.lower() for o in cfg.allow_origins if o != "*")
        self._credentials = cfg.allow_credentials
        self._methods = ", ".join(cfg.allow_methods)
        self._allow_headers = ", ".join(cfg.allow_headers)
        self._expose = ", ".join(cfg.expose_headers)
        self._max_age = str(cfg.max_age)

    @property
    def enabled(self) -> bool:
        return self._any or bool(self._origins)

    def allowed(self, origin: str) -> bool:
        return self._any or origin.lower() in self._origins

    def _base(self, origin: str) -> list[Header]:
        out = [("Access-Control-Allow-Origin", "*" if self._any else origin)]
        if self._credentials:
            out.append(("Access-Control-Allow-Credentials", "true"))
        return out

    def preflight(self, origin: str, request_headers: str | None) -> list[Header] | None:
        """Headers for a preflight answer, or None when the origin is not trusted."""
        if not self.allowed(origin):
            return None
        out = self._base(origin)
        out.append(("Access-Control-Allow-Methods", self._methods))
        headers = self._allow_headers or (request_headers or "")
        if headers:
            out.append(("Access-Control-Allow-Headers", headers))
        out.append(("Access-Control-Max-Age", self._max_age))
        return out

    def actual(self, origin: str) -> list[Header] | None:
        if not self.allowed(origin):
            return None
        out = self._base(origin)
        if self._expose:
            out.append(("Access-Control-Expose-Headers", self._expose))
        return out
