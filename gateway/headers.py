"""Header rewriting, as pure functions over raw ``(name, value)`` byte pairs.

Requests going upstream lose hop-by-hop headers and gain forwarded headers; responses
coming back lose hop-by-hop headers. What crosses a route's trust boundary (cookies,
credentials, CORS, redirects) is decided in gateway/boundary.py. Nothing here touches a
socket.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, NamedTuple

from yarl import URL

if TYPE_CHECKING:
    from gateway.boundary import RoutePolicy
    from gateway.tracing import RequestTrace

RawHeaders = Sequence[tuple[bytes, bytes]]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# RFC 9110 7.6.1 plus the de-facto ones nginx also drops.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"proxy-connection", b"proxy-authenticate", b"proxy-authorization",
})
# Set by the gateway itself on the way up, so whatever the client sent is replaced.
_REPLACED_UP = frozenset({
    b"host", b"content-length", b"x-forwarded-for", b"x-forwarded-proto",
    b"x-forwarded-host", b"x-real-ip", b"x-request-id", b"forwarded",
    # The gateway streams bodies itself (and answers 100 Continue on its own).
    b"expect",
})
_DROP_UP = HOP_BY_HOP | _REPLACED_UP
_DROP_UP_AND_TYPE = _DROP_UP | {b"content-type"}
# With tracing on, the gateway's own span is the upstream's parent (gateway/tracing.py).
_TRACE_CONTEXT = frozenset({b"traceparent", b"tracestate"})
_RAW = ("utf-8", "surrogateescape")
_NONE: frozenset[bytes] = frozenset()
# Searched as an integer: ``bytes in bytes`` tries its operand as one first, and pays for
# the TypeError when it is not.
_UNDERSCORE = ord("_")


def connection_tokens(raw: RawHeaders) -> frozenset[bytes]:
    """Header names listed in ``Connection``, which are hop-by-hop for this message only."""
    names: set[bytes] = set()
    for name, value in raw:
        if name.lower() == b"connection":
            names.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(names)


def extra_hop_by_hop(raw: RawHeaders, connection: Sequence[str]) -> frozenset[bytes]:
    """Headers named by ``Connection`` beyond the standard hop-by-hop set (usually none).

    ``connection`` holds the header's values, looked up in aiohttp's C multidict, so the
    common case (absent, or one ``keep-alive``/``close``) costs no pass over the headers.
    """
    if not connection:
        return _NONE
    if len(connection) == 1 and connection[0].lower() in ("keep-alive", "close", "upgrade"):
        return _NONE
    return connection_tokens(raw) - HOP_BY_HOP


class TrustedProxies:
    """Membership test for ``trusted_proxies``, memoised because the same peers recur."""

    def __init__(self, networks: Iterable[IPNetwork]) -> None:
        self._networks = tuple(networks)
        self.contains = lru_cache(maxsize=4096)(self._contains)
        # A plain attribute: the hot path asks on every request, and __bool__ is a call.
        self.any = bool(self._networks)

    def _contains(self, address: str) -> bool:
        if not self._networks:
            return False
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self._networks)

    def __bool__(self) -> bool:
        return self.any


def real_client_ip(peer: str, xff_values: Sequence[str], trusted: TrustedProxies) -> str:
    """nginx realip with ``real_ip_recursive on``.

    Walk ``X-Forwarded-For`` from the right, skipping trusted proxies; the first untrusted
    address is the client. When the peer itself is untrusted the header is the client's
    own words and is ignored.
    """
    if not xff_values or not trusted.contains(peer):
        return peer
    client = peer
    for value in reversed(xff_values):
        for part in reversed(value.split(",")):
            candidate = part.strip()
            if not candidate:
                continue
            if candidate.startswith("[") and "]" in candidate:
                candidate = candidate[1 : candidate.index("]")]
            try:
                ipaddress.ip_address(candidate)
            except ValueError:
                return client  # garbage: stop at the last address we could trust
            client = candidate
            if not trusted.contains(candidate):
                return client
    return client


_HOST_RE = re.compile(
    r"(?:[A-Za-z0-9_][A-Za-z0-9_-]{0,62}(?:\.[A-Za-z0-9_][A-Za-z0-9_-]{0,62})*\.?"
    r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


def valid_host(value: str) -> bool:
    """A ``Host`` a browser could have sent: a DNS name or IP literal, an optional port.

    Spaces, ``@``, ``/``, ``\\``, control and non-ASCII characters never pass: forwarded
    (``preserve_host``, ``X-Forwarded-Host``) they would let a client choose what an
    upstream believes its own URL is.
    """
    if not value or len(value) > 261 or not _HOST_RE.fullmatch(value):
        return False
    if value.startswith("["):
        literal, _, port = value[1:].partition("]")
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            return False
        port = port[1:]
    else:
        _, _, port = value.partition(":")
    # 1 to 5 ASCII digits (the pattern says so): compared as text, no int() per request.
    return len(port) < 5 or port <= "65535"


class Forwarded(NamedTuple):
    """What the gateway tells the upstream about the original request."""

    client_ip: str
    xff: str  # full X-Forwarded-For value to send
    proto: str
    host: str


def forwarded_for(peer: str, xff_values: Sequence[str], trusted: TrustedProxies, scheme: str,
                  host: str, fwd_proto: str | None, fwd_host: str | None) -> Forwarded:
    if not xff_values and not trusted.any:
        # The usual request from a browser straight to the gateway: nothing to walk. (Made
        # as the named tuple's own __new__ makes it, without that Python-level frame.)
        return tuple.__new__(Forwarded, (peer, peer, scheme, host))
    client = real_client_ip(peer, xff_values, trusted)
    # nginx's $proxy_add_x_forwarded_for: what came in, plus the peer.
    prior = ", ".join(v.strip() for v in xff_values if v.strip())
    xff = f"{prior}, {peer}" if prior else peer
    if trusted.contains(peer):
        proto = fwd_proto.split(",")[0].strip() if fwd_proto else scheme
        if fwd_host:
            # A trusted proxy's word, but still a Host: garbage is not passed on.
            first = fwd_host.split(",")[0].strip()
            host = first if valid_host(first) else host
    else:
        proto = scheme
    return Forwarded(client, xff, proto, host)


def upstream_request_head(method: str, target: str, raw: RawHeaders, host: str,
                          fwd: Forwarded, request_id: str | None,
                          extra: Sequence[tuple[bytes, bytes]] = (),
                          upgrade: bool = False, new_content_type: bytes | None = None,
                          connection: Sequence[str] | None = None,
                          policy: RoutePolicy | None = None,
                          trace: RequestTrace | None = None) -> bytearray:
    """The request line and headers for the upstream, as bytes ready to write.

    Body framing (Content-Length / chunked) is appended by the caller, who knows it.
    ``policy`` is the route's trust boundary: on a third-party route it drops the
    credentials, keeps only the route's own cookies and trims a ``Referer`` from the site.
    """
    drop = _DROP_UP if new_content_type is None else _DROP_UP_AND_TYPE
    if trace is not None:
        drop = drop | _TRACE_CONTEXT
    if connection is None:  # not looked up by the caller
        tokens = connection_tokens(raw) if any(n.lower() == b"connection" for n, _ in raw) else ()
    else:
        tokens = extra_hop_by_hop(raw, connection)
    # aiohttp decodes header bytes as UTF-8 with surrogateescape: encoding back the same
    # way sends exactly the bytes the client sent, whatever they were.
    out = bytearray(f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n".encode(*_RAW))
    guarded = policy.drop_up if policy is not None else _NONE
    cookies: list[bytes] = []
    referer: bytes | None = None
    for name, value in raw:
        lname = name.lower()
        # Names with '_' are dropped like nginx does: CGI-style upstreams read X_Real_IP
        # as X-Real-IP, which would let a client spoof what the gateway sets.
        if lname in drop or (tokens and lname in tokens) or _UNDERSCORE in lname:
            continue
        if guarded and lname in guarded:
            if lname == b"cookie":
                cookies.append(value)
            elif lname == b"referer":
                referer = value
            continue
        out += name + b": " + value + b"\r\n"
    # The gateway's own lines in one piece (one encoding, one append).
    rid_line = f"X-Request-ID: {request_id}\r\n" if request_id else ""
    out += (f"X-Real-IP: {fwd.client_ip}\r\nX-Forwarded-For: {fwd.xff}\r\n"
            f"X-Forwarded-Proto: {fwd.proto}\r\nX-Forwarded-Host: {fwd.host}\r\n"
            f"{rid_line}").encode(*_RAW)
    if cookies and policy is not None:
        own = policy.upstream_cookie(cookies)
        if own is not None:
            out += b"Cookie: " + own + b"\r\n"
    if referer is not None and policy is not None:
        kept = policy.upstream_referer(referer)
        if kept is not None:
            out += b"Referer: " + kept + b"\r\n"
    if trace is not None:
        out += trace.upstream_lines()
    for name, value in extra:
        out += name + b": " + value + b"\r\n"
    if new_content_type is not None:
        out += b"Content-Type: " + new_content_type + b"\r\n"
    if upgrade:
        out += b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
    return out


# ------------------------------------------------------------------ responses


@dataclass(frozen=True, slots=True)
class UrlMap:
    """How one route maps the upstream's URL space onto the gateway's."""

    prefix: str  # gateway path prefix, e.g. /service-cloud/
    upstream_path: str  # upstream path the prefix maps to, e.g. /service-cloud/
    upstream_origins: tuple[str, ...]  # e.g. ("https://cec.example.com", "https://cec.example.com:443")
    upstream_host: str  # host name, lower-case, for cookie Domain matching

    @classmethod
    def for_route(cls, prefix: str, upstream: URL) -> UrlMap:
        host = (upstream.host or "").lower()
        shown = f"[{host}]" if ":" in host else host
        origins = {f"{upstream.scheme}://{shown}:{upstream.port}"}
        if upstream.is_default_port():
            origins.add(f"{upstream.scheme}://{shown}")
        return cls(prefix, upstream.raw_path or "/", tuple(sorted(origins, key=len, reverse=True)),
                   host)

    def map_path(self, path: str) -> str | None:
        """Upstream path → gateway path, or None when it lies outside this route."""
        up = self.upstream_path
        if path.startswith(up):
            return self.prefix + path[len(up):]
        if up.endswith("/") and path == up[:-1]:
            trimmed = self.prefix.endswith("/") and len(self.prefix) > 1
            return self.prefix[:-1] if trimmed else self.prefix
        return None


def rewrite_set_cookie(value: str, urls: UrlMap) -> str:
    """Drop a ``Domain`` naming the upstream host; map ``Path`` through the route.

    The cookie then belongs to the gateway's origin, which is what the browser talks to.
    """
    parts = value.split(";")
    out = [parts[0]]
    for attr in parts[1:]:
        name, eq, val = attr.strip().partition("=")
        lname = name.lower()
        if lname == "domain":
            domain = val.strip().lstrip(".").lower()
            if domain == urls.upstream_host or urls.upstream_host.endswith("." + domain):
                continue
        elif lname == "path" and eq:
            mapped = urls.map_path(val.strip())
            if mapped is not None:
                out.append(f" Path={mapped}")
                continue
        out.append(attr)
    return ";".join(out)
