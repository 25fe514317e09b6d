"""The trust boundary between the site and a third party (the CEC) sharing one origin.

A route to a third party is declared in config (``routes[].third_party``, by default the
route serving ``cec.context_path``) and compiled once, at config load, into a
``RoutePolicy``. The header code consults it on both request paths (the fast path and the
full one), so every rule below is enforced in this one module:

- request side: only the route's own cookies go upstream (``ccmessaging-token``, the names
  listed in ``forward_cookies`` and the cookies the third party set through the gateway,
  whose names are restored from their namespace); ``Authorization`` and
  ``Proxy-Authorization`` only with ``forward_credentials``; a ``Referer`` from a page of
  the site is cut to its origin (what a browser sends to another origin), unless
  ``forward_referer``;
- response side: a third party's ``Set-Cookie`` is renamed into the namespace, confined to
  the route's prefix (like nginx ``proxy_cookie_path``), loses its ``Domain``, gains
  ``Secure`` when the visitor uses https, and is refused when it names a cookie the gateway
  or the site owns; upstream ``Access-Control-*`` headers are removed wherever the gateway
  answers CORS (and always on a third-party route); ``Location``, ``Content-Location`` and
  ``Refresh`` are resolved the way a browser resolves them (WHATWG URL parsing) before
  anything is mapped, and an off-site target stays absolute;
- the client-script paths of the CEC can only be reached by an exact ``POST`` (whose body
  the gateway rewrites), never by a spelling the CEC might read as the same script;
- ``Host`` values are checked before anything is forwarded;
- the gateway's own pages carry ``nosniff``, a CSP with ``frame-ancestors`` and one
  ``Server`` value without versions.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING
from urllib.parse import unquote

from aiohttp import web

from gateway.headers import UrlMap, rewrite_set_cookie, valid_host

if TYPE_CHECKING:
    from gateway.config import Config
    from gateway.routing import CompiledRoute

log = logging.getLogger("gateway.boundary")

SERVER = "cec-gateway"
CEC_SESSION_COOKIE = "ccmessaging-token"  # the CEC visitor session
DEFAULT_NAMESPACE = "__cec_"
# Response headers that act on the whole origin, not on the response: from a third party
# they would let it wipe the site's cookies, claim the site's scope for a service worker, or
# set the host's transport policy. Dropped on third-party routes.
ORIGIN_WIDE = frozenset({b"clear-site-data", b"service-worker-allowed",
                         b"strict-transport-security", b"alt-svc", b"set-cookie2"})
# Every response header name the policy looks at (plus any Access-Control-*).
RESPONSE_HEADERS = ORIGIN_WIDE | {b"set-cookie", b"location", b"refresh", b"content-location"}
# Enough for the gateway's own page: everything from this origin. Scripts need the
# response's nonce ('strict-dynamic' lets the loader run what it loads, among which the
# CEC's answer, which the vendor's protocol runs as script text); 'self' is for browsers
# without CSP3.
DEFAULT_PAGE_CSP = ("default-src 'self'; script-src 'nonce-{nonce}' 'strict-dynamic' 'self'; "
                    "style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
                    "font-src 'self' data:; connect-src 'self'; frame-src 'self'; "
                    "media-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'")


# ------------------------------------------------------------------ Host (gateway/headers.py)


__all__ = ["valid_host"]  # checked by the dispatcher and the fast path


# ------------------------------------------------------------------ URLs as browsers read them


_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
# An absolute URL as a Referer carries it: scheme, authority, the rest (path, query).
_REFERER = re.compile(rb"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#\s]+)([^\s#]*)(?:#\S*)?")
_C0_OR_SPACE = "".join(chr(i) for i in range(0x21))
_NEWLINES = str.maketrans("", "", "\t\n\r")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_SINGLE_DOTS = frozenset({".", "%2e"})
_DOUBLE_DOTS = frozenset({"..", ".%2e", "%2e.", "%2e%2e"})
_PLAIN_HOST = re.compile(r"[a-z0-9.\-]+|\[[0-9a-f:.]+\]")


def browser_clean(value: str) -> str:
    """The WHATWG URL parser's first steps: C0 controls and spaces trimmed, tabs/newlines gone."""
    return value.strip(_C0_OR_SPACE).translate(_NEWLINES)


@dataclass(frozen=True, slots=True)
class BrowserRef:
    """A URL reference split the way a browser splits it (for an http(s) document).

    ``scheme`` is None for a reference relative to the document (same origin) and "" for a
    scheme-relative one (``//host/...``, also spelt ``/\\host`` or ``\\\\host``).
    """

    scheme: str | None
    authority: str
    path: str  # backslashes already turned into slashes
    tail: str  # "?query#fragment", untouched


def browser_split(value: str, base_scheme: str) -> BrowserRef | None:
    """Split ``value`` as a browser on a ``base_scheme`` page would; None: not http(s)."""
    s = browser_clean(value)
    scheme: str | None = None
    m = _SCHEME_RE.match(s)
    if m:
        scheme = m.group()[:-1].lower()
        if scheme not in _DEFAULT_PORTS:
            return None  # javascript:, data:, mailto:, ftp:...: never a path on our origin
        s = s[m.end():]
    cut = len(s)
    for ch in "?#":
        i = s.find(ch)
        if i != -1 and i < cut:
            cut = i
    # For special schemes a backslash is a slash, up to the query (RFC 3986 says otherwise;
    # browsers are what follow the redirect).
    head, tail = s[:cut].replace("\\", "/"), s[cut:]
    if scheme is not None and scheme == base_scheme and not head.startswith("//"):
        return BrowserRef(None, "", head, tail)  # "http:x" on an http page is relative
    if scheme is not None or head.startswith("//"):
        rest = head.lstrip("/")  # special schemes skip any number of slashes
        end = rest.find("/")
        if end == -1:
            end = len(rest)
        return BrowserRef(scheme or "", rest[:end], rest[end:], tail)
    return BrowserRef(None, "", head, tail)


def remove_dot_segments(path: str) -> str:
    """WHATWG path resolution of an absolute path (``%2e`` counts as a dot)."""
    out: list[str] = []
    segments = path.split("/")[1:]
    for i, seg in enumerate(segments):
        low = seg.lower()
        last = i == len(segments) - 1
        if low in _DOUBLE_DOTS:
            if out:
                out.pop()
            if last:
                out.append("")
        elif low in _SINGLE_DOTS:
            if last:
                out.append("")
        else:
            out.append(seg)
    return "/" + "/".join(out)


def _host_port(authority: str, scheme: str) -> tuple[str, int] | None:
    """Host and port of a plain authority, or None for anything a browser might read
    differently from us (userinfo, percent-escapes, IDNA, odd IPv4 forms...)."""
    if "@" in authority:
        return None
    host = authority.lower()
    port = _DEFAULT_PORTS[scheme]
    if host.startswith("["):
        literal, _, after = host.partition("]")
        host = literal + "]"
        port_text = after[1:] if after.startswith(":") else None
        if after and port_text is None:
            return None
    else:
        host, colon, port_text_ = host.partition(":")
        port_text = port_text_ if colon else None
    if port_text:
        if not port_text.isdigit() or not port_text.isascii():
            return None
        port = int(port_text)
    if not _PLAIN_HOST.fullmatch(host):
        return None
    return host, port


def _collapse(path: str) -> str:
    # A path emitted for the browser never starts with "//" (that would name a host); the
    # gateway merges slashes like nginx, so "/x" is the same resource as "//x".
    return "/" + path.lstrip("/") if path.startswith("//") else path


class Redirects:
    """``Location``/``Content-Location``/``Refresh`` mapping for one route.

    Same-origin targets (the upstream's own URLs) become gateway paths; everything else stays
    an absolute URL to the same place the browser would have gone, never a path that a
    browser reads as another host.
    """

    __slots__ = ("_hosts", "_scheme", "_urls")

    def __init__(self, urls: UrlMap) -> None:
        self._urls = urls
        first = urls.upstream_origins[0] if urls.upstream_origins else "http://"
        self._scheme = first.partition(":")[0]
        hosts = set()
        for origin in urls.upstream_origins:
            scheme, _, rest = origin.partition("://")
            found = _host_port(rest, scheme)
            if found is not None:
                hosts.add((scheme, *found))
        self._hosts = frozenset(hosts)

    def location(self, value: str, https: bool) -> str:
        # Split as the visitor's browser will (its page's scheme decides whether "http:x"
        # is relative); same-origin is then judged from the upstream's side.
        ref = browser_split(value, "https" if https else "http")
        if ref is None:
            return value
        if ref.scheme is None:
            if not ref.path.startswith("/"):
                # Relative to the document: stays on this origin ("./" so that "a:b" is
                # not read as a URL of scheme "a", nor a leading space trimmed away).
                dot = "./" if ref.path and (ref.path[0] <= " " or _SCHEME_RE.match(ref.path)
                                            ) else ""
                return dot + ref.path + ref.tail
            return self._mapped(remove_dot_segments(ref.path), ref.tail)
        scheme = ref.scheme or self._scheme
        found = _host_port(ref.authority, scheme)
        if found is not None and (scheme, *found) in self._hosts:
            path = remove_dot_segments(ref.path or "/")
            mapped = self._urls.map_path(path)
            if mapped is not None:
                return _collapse(mapped) + ref.tail
        # Off-site (or the upstream outside this route): absolute, to where a browser would
        # have gone with the original value.
        if ref.scheme == "":
            return ("https" if https else "http") + "://" + ref.authority + ref.path + ref.tail
        if value == browser_clean(value) and "\\" not in value.partition("?")[0]:
            return value
        return ref.scheme + "://" + ref.authority + ref.path + ref.tail

    def _mapped(self, path: str, tail: str) -> str:
        mapped = self._urls.map_path(path)
        return _collapse(mapped if mapped is not None else path) + tail

    def refresh(self, value: str, https: bool) -> str:
        """The URL of a ``Refresh`` value, found as HTML's declarative refresh steps find it."""
        n = len(value)
        pos = _skip_ws(value, 0)
        start = pos
        while pos < n and value[pos].isdigit() and value[pos].isascii():
            pos += 1
        if pos == start and not (pos < n and value[pos] == "."):
            return value  # no time: the browser ignores the header
        while pos < n and (value[pos] == "." or (value[pos].isdigit() and value[pos].isascii())):
            pos += 1
        if pos >= n:
            return value
        if value[pos] not in ";, \t\n\f\r":
            return value
        pos = _skip_ws(value, pos)
        if pos < n and value[pos] in ";,":
            pos = _skip_ws(value, pos + 1)
        if pos >= n:
            return value
        url_start = pos
        if value[pos:pos + 3].lower() == "url":
            after = _skip_ws(value, pos + 3)
            if after < n and value[after] == "=":
                url_start = _skip_ws(value, after + 1)
        quote = ""
        if url_start < n and value[url_start] in "'\"":
            quote = value[url_start]
            url_start += 1
        end = n
        if quote:
            q = value.find(quote, url_start)
            if q != -1:
                end = q
        return value[:url_start] + self.location(value[url_start:end], https) + value[end:]


def rewrite_location(value: str, urls: UrlMap, https: bool = False) -> str:
    return Redirects(urls).location(value, https)


def rewrite_refresh(value: str, urls: UrlMap, https: bool = False) -> str:
    return Redirects(urls).refresh(value, https)


def _skip_ws(value: str, pos: int) -> int:
    while pos < len(value) and value[pos] in " \t\n\f\r":
        pos += 1
    return pos


# ------------------------------------------------------------------ cookies


class CookieStats:
    """Refused third-party cookies, for the metrics; each name is logged once per route."""

    __slots__ = ("_logged", "counted", "refused")

    def __init__(self, counted: Callable[[str], None] | None = None) -> None:
        self.refused = 0
        self.counted = counted
        self._logged: set[str] = set()

    def refuse(self, route: str, name: str, why: str) -> None:
        self.refused += 1
        if self.counted is not None:
            self.counted(route)
        if name not in self._logged and len(self._logged) < 100:
            self._logged.add(name)
            log.warning("route %s: refused a Set-Cookie for %r (%s); the browser never gets it",
                        route, name, why)


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    """What may cross one route's boundary, compiled once per config."""

    name: str
    third_party: bool
    prefix: str
    strip_cors: bool
    redirects: Redirects | None = None
    forward_cookies: frozenset[bytes] = frozenset()
    namespace: bytes = DEFAULT_NAMESPACE.encode()
    forward_credentials: bool = True
    refused_cookies: frozenset[str] = frozenset()  # lower-case
    stats: CookieStats = field(default_factory=CookieStats)
    # Request headers never sent upstream as they are on this route (beyond the hop-by-hop
    # ones): dropped, or (cookie, referer) reduced to what the route may see.
    drop_up: frozenset[bytes] = frozenset()
    # The prefix as the request head's bytes carry it (a Referer's path is compared to it).
    prefix_bytes: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix_bytes", self.prefix.encode("utf-8", "surrogateescape"))

    # ---------------------------------------------------------------- request side

    def upstream_cookie(self, values: Iterable[bytes]) -> bytes | None:
        """The ``Cookie`` value for a third-party upstream: its own cookies only."""
        ns = self.namespace
        kept: list[bytes] = []
        for header in values:
            for part in header.split(b";"):
                name, eq, val = part.strip().partition(b"=")
                name = name.strip()
                if not eq or not name:
                    continue
                if name.startswith(ns):
                    restored = name[len(ns):]
                    if restored and restored not in self.forward_cookies:
                        kept.append(restored + b"=" + val)
                elif name in self.forward_cookies:
                    kept.append(name + b"=" + val)
        return b"; ".join(kept) if kept else None

    def upstream_referer(self, value: bytes) -> bytes | None:
        """The ``Referer`` for a third-party upstream, or None (left out).

        A page of the route itself (its path under the route's prefix) is the third
        party's own and goes as it is. Any other page is the site's, and its URL may carry
        what the site put there (a search, an order number, a token in the query): the
        third party gets only its origin, as a browser would send it to another origin
        (``strict-origin-when-cross-origin``). Without credentials or a fragment, as
        browsers send it; something that is not an absolute URL is left out.
        """
        m = _REFERER.fullmatch(value)
        if m is None:
            return None
        scheme, authority, path = m.groups()
        authority = authority.rpartition(b"@")[2]
        if not authority:
            return None
        origin = scheme.lower() + b"://" + authority
        # (A path with dot segments or escapes may resolve outside the prefix: origin only.)
        page = path.partition(b"?")[0]
        if (page.startswith(self.prefix_bytes) and b"/." not in page and b"%" not in page
                and b"\\" not in page):
            return origin + path
        return origin + b"/"

    # ---------------------------------------------------------------- response side

    def set_cookie(self, text: str, urls: UrlMap, https: bool) -> str | None:
        """A third party's ``Set-Cookie`` as the browser may see it, or None (refused)."""
        pair, sep, attrs = text.partition(";")
        name, eq, value = pair.partition("=")
        name = name.strip(" \t")
        if not eq or not name:
            self.stats.refuse(self.name, "", "a cookie without a name")
            return None
        if name.lower() in self.refused_cookies:
            self.stats.refuse(self.name, name, "the name belongs to the site or the gateway")
            return None
        ns = self.namespace.decode("latin-1")
        if name.encode("utf-8", "surrogateescape") not in self.forward_cookies:
            name = ns + name
        out = [f"{name}={value}"]
        secure = False
        for attr in attrs.split(";") if sep else ():
            key, eq, val = attr.strip().partition("=")
            low = key.strip().lower()
            if low == "domain":
                continue  # host-only: the gateway's own host, nothing wider
            if low == "path":
                out.append(f" Path={self._confined(val.strip(), urls)}")
                continue
            if low == "secure":
                secure = True
            out.append(attr)
        if https and not secure:
            out.append(" Secure")
        return ";".join(out)

    def _confined(self, path: str, urls: UrlMap) -> str:
        """The cookie path inside this route's prefix (nginx ``proxy_cookie_path``)."""
        base = self.prefix.rstrip("/") or "/"
        if not path.startswith("/"):
            return base
        mapped = urls.map_path(remove_dot_segments(path))
        if mapped is None:
            return base
        if mapped == base or mapped.startswith(self.prefix) or self.prefix == "/":
            return mapped
        return base

    def response_value(self, lname: bytes, value: bytes, urls: UrlMap, https: bool
                       ) -> bytes | None:
        """One upstream response header's value for the browser; None drops the header.

        Called for the names in ``RESPONSE_HEADERS`` and ``Access-Control-*`` only.
        """
        if lname.startswith(b"access-control-"):
            return None if self.strip_cors else value
        if lname in ORIGIN_WIDE:
            return None if self.third_party else value
        text = value.decode("utf-8", "surrogateescape")
        if lname == b"set-cookie":
            if self.third_party:
                out = self.set_cookie(text, urls, https)
                if out is None:
                    return None
                text = out
            else:
                text = rewrite_set_cookie(text, urls)
        elif self.redirects is None:
            return value
        elif lname == b"refresh":
            text = self.redirects.refresh(text, https)
        else:
            text = self.redirects.location(text, https)
        return text.encode("utf-8", "surrogateescape")


def site_policy(name: str, prefix: str, urls: UrlMap | None = None, *,
                strip_cors: bool = False) -> RoutePolicy:
    """The site's route: cookies and credentials pass as they always did."""
    return RoutePolicy(name, False, prefix, strip_cors,
                       Redirects(urls) if urls is not None else None)


def third_party_policy(name: str, prefix: str, urls: UrlMap, *,
                       forward_cookies: Sequence[str] = (), namespace: str = DEFAULT_NAMESPACE,
                       forward_credentials: bool = False, forward_referer: bool = False,
                       refused_cookies: Iterable[str] = (),
                       counted: Callable[[str], None] | None = None) -> RoutePolicy:
    names = frozenset(n.encode() for n in (CEC_SESSION_COOKIE, *forward_cookies))
    drop = frozenset() if forward_credentials else frozenset({b"authorization",
                                                              b"proxy-authorization"})
    return RoutePolicy(name, True, prefix, True, Redirects(urls), names, namespace.encode(),
                       forward_credentials, frozenset(n.lower() for n in refused_cookies),
                       CookieStats(counted),
                       drop_up=drop | {b"cookie"} | (set() if forward_referer else {b"referer"}))


# ------------------------------------------------------------------ client scripts


_SLASHES = re.compile(r"/{2,}")
_DOTTED_I = {0x130: "i"}


def _script_key(path: str) -> str:
    """``path`` as a lenient upstream might read it: decoded, ``;params`` dropped, trailing
    dots and slashes ignored, case folded (Java's and JavaScript's folds included)."""
    if "%" in path or ";" in path:
        path = "/".join(unquote(seg.partition(";")[0], errors="replace").partition(";")[0]
                        for seg in path.split("/"))
    # upper() then casefold() matches what Java's equalsIgnoreCase and JavaScript's
    # toUpperCase accept (dotless i U+0131 -> I, long s U+017F -> s, Kelvin U+212A -> k);
    # U+0130 is Java's "i" too.
    path = _SLASHES.sub("/", path).translate(_DOTTED_I)
    return path.rstrip("/. \t").upper().casefold()


class ClientScripts:
    """The CEC's client-script paths: reachable only as an exact POST to the canonical path.

    Any other spelling that an upstream could take for the same script (case, a trailing
    slash or dot, ``;params``, percent-encoding) is answered 404 by the gateway, and another
    method on the canonical path 405, so that no body reaches those scripts unrewritten.
    """

    __slots__ = ("_canonical", "_keys")

    def __init__(self, canonical: Iterable[str]) -> None:
        self._canonical = frozenset(canonical)
        self._keys = frozenset(_script_key(p) for p in self._canonical)

    def __bool__(self) -> bool:
        return bool(self._canonical)

    def looks_like(self, path: str) -> bool:
        """Whether ``path`` names a client script, however spelt (cheap for other paths)."""
        if path.isascii() and "%" not in path and ";" not in path and (
                "party" not in path.lower()):
            return False  # the usual path: no spelling of a client script
        return _script_key(path) in self._keys

    def refusal(self, method: str, path: str) -> int | None:
        """404/405 for a request that must not reach a client script, else None."""
        if not self.looks_like(path):
            return None
        if path not in self._canonical:
            return 404
        if method != "POST":
            return 405
        return None


# ------------------------------------------------------------------ the gateway's own pages


@dataclass(frozen=True, slots=True)
class OwnPages:
    """Headers on every response the gateway writes itself (pages, scripts, errors)."""

    csp: str  # may hold "{nonce}", filled per response
    frame_ancestors: tuple[str, ...]

    @classmethod
    def build(cls, frame_ancestors: Sequence[str] = ("'self'",),
              csp: str | None = None) -> OwnPages:
        ancestors = tuple(frame_ancestors) or ("'none'",)
        policy = DEFAULT_PAGE_CSP if csp is None else csp.replace("{", "{{").replace("}", "}}")
        return cls(f"{policy.rstrip('; ')}; frame-ancestors {' '.join(ancestors)}", ancestors)

    def apply(self, resp: web.StreamResponse) -> None:
        """Set the headers on ``resp`` (not yet prepared); an HTML page also gets a fresh
        nonce on its own ``<script>`` tags, named in its CSP."""
        headers = resp.headers
        headers["Server"] = SERVER
        headers["X-Content-Type-Options"] = "nosniff"
        if not headers.get("Content-Type", "").startswith("text/html"):
            return
        nonce = secrets.token_urlsafe(18)
        body = resp.body if isinstance(resp, web.Response) else None
        if isinstance(body, bytes) and b"<script" in body:
            # The page is the gateway's own template: every "<script" in it is a tag (the
            # values it shows are escaped, so none can spell one).
            assert isinstance(resp, web.Response)
            resp.body = re.sub(rb"<script(?=[\s>])", b'<script nonce="%s"' % nonce.encode(),
                               body)
        headers["Content-Security-Policy"] = self.csp.format(nonce=nonce)
        if self.frame_ancestors == ("'self'",):
            headers["X-Frame-Options"] = "SAMEORIGIN"
        elif self.frame_ancestors == ("'none'",):
            headers["X-Frame-Options"] = "DENY"


# ------------------------------------------------------------------ compiling a config


def compile_policies(config: Config, routes: list[CompiledRoute],
                     counted: Callable[[str], None] | None = None) -> list[CompiledRoute]:
    """Each route with its trust policy, from ``routes[]`` and the ``trust:`` section;
    ``counted(route)`` is told of every refused cookie (the metrics)."""
    by_prefix = {r.prefix: r for r in config.routes}
    cec = config.cec
    trust = config.trust
    refused = [*trust.protected_cookies]
    if cec is not None:
        refused.append(cec.guest.cookie_name)
    strip_cors = bool(config.cors.allow_origins)
    out = []
    for route in routes:
        declared = by_prefix.get(route.prefix)
        third_party = declared.third_party if declared is not None else None
        if third_party is None:
            third_party = cec is not None and (
                route.prefix == cec.context_path or route.prefix.startswith(cec.context_path + "/"))
        if third_party:
            policy = third_party_policy(
                route.name, route.prefix, route.urls,
                forward_cookies=declared.forward_cookies if declared is not None else (),
                namespace=trust.cookie_namespace,
                forward_credentials=declared.forward_credentials if declared is not None
                else False,
                forward_referer=declared.forward_referer if declared is not None else False,
                refused_cookies=refused, counted=counted)
        else:
            policy = site_policy(route.name, route.prefix, route.urls, strip_cors=strip_cors)
        out.append(replace(route, policy=policy))
    return out
