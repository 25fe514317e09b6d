"""Route selection and path mapping (nginx ``location`` + ``proxy_pass`` with a URI).

Everything is computed once per config: routes are sorted longest prefix first, and each
carries its upstream's connection key, Host header and URL map. Per request there is one
path normalisation (a no-op for ordinary paths) and one prefix scan.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

from yarl import URL

from gateway.boundary import RoutePolicy, site_policy
from gateway.errors import BadRequest
from gateway.headers import UrlMap


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where a route's requests go: the pool key and what to put in Host."""

    scheme: str
    host: str
    port: int
    path: str
    host_header: str
    ssl: ssl.SSLContext | None
    # The pool key, built once: it is looked up twice per proxied request.
    key: tuple[str, int, bool] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", (self.host, self.port, self.ssl is not None))


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    prefix: str
    upstream: Upstream
    preserve_host: bool
    websocket: bool
    urls: UrlMap
    name: str
    # What crosses this route's trust boundary (gateway/boundary.py), compiled with the route.
    policy: RoutePolicy = field(default_factory=lambda: site_policy("", "/"))

    def target(self, path: str, query: str) -> str:
        """The upstream request target: the prefix replaced by the upstream path."""
        mapped = self.upstream.path + path[len(self.prefix):]
        return f"{mapped}?{query}" if query else mapped


def make_client_ssl(ca_file: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def compile_route(prefix: str, upstream_url: str, *, preserve_host: bool = False,
                  ca_file: Path | None = None, websocket: bool = True) -> CompiledRoute:
    url = URL(upstream_url)
    assert url.host is not None and url.port is not None
    host = url.host
    shown = f"[{host}]" if ":" in host else host
    host_header = shown if url.is_default_port() else f"{shown}:{url.port}"
    up = Upstream(url.scheme, host, url.port, url.raw_path or "/", host_header,
                  make_client_ssl(ca_file) if url.scheme == "https" else None)
    urls = UrlMap.for_route(prefix, url)
    return CompiledRoute(prefix, up, preserve_host, websocket, urls, name=prefix,
                         policy=site_policy(prefix, prefix, urls))


class RouteTable:
    def __init__(self, routes: list[CompiledRoute]) -> None:
        self._routes = sorted(routes, key=lambda r: len(r.prefix), reverse=True)
        # `location /service-cloud/` also answers `/service-cloud` with a redirect (nginx does),
        # ahead of any shorter prefix; a route of its own for the slash-less form wins.
        prefixes = {r.prefix for r in self._routes}
        self._slash_redirects = {r.prefix[:-1]: r.prefix for r in self._routes
                                 if r.prefix.endswith("/") and len(r.prefix) > 1
                                 and r.prefix[:-1] not in prefixes}

    @property
    def routes(self) -> list[CompiledRoute]:
        return list(self._routes)

    def match(self, path: str) -> CompiledRoute | None:
        for route in self._routes:
            if path.startswith(route.prefix):
                return route
        return None

    def redirect_for(self, path: str) -> str | None:
        """Where `/prefix` is sent when `/prefix/` is a route: checked before ``match``."""
        return self._slash_redirects.get(path)


def normalize_path(raw: str) -> str:
    """Resolve dot segments (plain or percent-encoded) the way nginx does before matching.

    Encoded ``/``, ``\\`` and NUL are refused outright: forwarded as they are, an upstream
    that decodes them could be walked outside the route's path.
    """
    if not raw.startswith("/"):
        raise BadRequest("request target must be an absolute path")
    if "%" not in raw and "/." not in raw and "\\" not in raw and "//" not in raw:
        return raw  # the usual path: nothing to resolve
    if "\\" in raw:
        raise BadRequest("backslash in path")
    segments = raw.split("/")[1:]
    last = len(segments) - 1
    out: list[str] = []
    trailing = False
    for i, seg in enumerate(segments):
        trailing = False
        decoded = seg
        if "%" in seg:
            low = seg.lower()
            if "%2f" in low or "%5c" in low or "%00" in low:
                raise BadRequest("encoded '/', '\\' or NUL in path")
            decoded = unquote(seg, errors="replace")
        if ";" in decoded and decoded.split(";", 1)[0] in (".", ".."):
            # Servlet containers drop ";params" and then resolve the dot segment.
            raise BadRequest("dot segment with parameters in path")
        if decoded == "" and i != last:
            continue  # merge_slashes, like nginx
        if decoded == ".":
            trailing = True
            continue
        if decoded == "..":
            if not out:
                raise BadRequest("path climbs above the root")
            out.pop()
            trailing = True
            continue
        out.append(seg)
    path = "/" + "/".join(out)
    if trailing and not path.endswith("/"):
        path += "/"
    return path
