"""Who the visitor is, asked of the enterprise site (``cec.identity.source: url``).

The gateway calls the configured endpoint (e.g. ``GET http://127.0.0.1:3000/api/me``) with only
the visitor's ``Cookie`` header, and reads userId and userName from the JSON answer. A non-200
answer, a redirect, bad JSON or missing fields mean "not logged in" (None). Headers sent by the
browser are never taken as identity.

Answers are cached ``cache_ttl`` seconds per Cookie value (keyed by its SHA-256, so the cache
holds no session cookies), in a bounded LRU; concurrent look-ups for the same cookie share one
call to the site. Only definite answers are cached (200 with an identity, 401/403/redirects);
site errors and timeouts are not, so a hiccup does not log everybody out for ``cache_ttl``.

The guest source is handled by the caller with the guest cookie; ``make_identity`` returns None
for it, so a caller combines the two as ``(url and await url.identify(r)) or guest``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from aiohttp import hdrs, web

from gateway.config import CecIdentity, IdentityUrl

log = logging.getLogger("gateway.identity")

MAX_RESPONSE = 64 * 1024
MAX_FIELD_LENGTH = 256
DEFAULT_CACHE_SIZE = 10_000


@dataclass(frozen=True)
class Identity:
    """A logged-in visitor as the enterprise site names them."""

    user_id: str
    user_name: str


class IdentityProvider(Protocol):
    """Anything that can tell who sent a request (None: anonymous)."""

    async def identify(self, request: web.BaseRequest) -> Identity | None: ...


def _lookup(data: Any, name: str) -> Any:
    """``data[name]``; a dotted name (``data.user.id``) walks nested objects if no key matches."""
    if not isinstance(data, dict):
        return None
    if name in data:
        return data[name]
    node: Any = data
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _text(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return None
    text: str = value.strip()
    if not text or len(text) > MAX_FIELD_LENGTH:
        return None
    return text


class UrlIdentity:
    """Identity from the enterprise site's "who am I" endpoint (``cec.identity.url``)."""

    def __init__(
        self,
        cfg: IdentityUrl,
        session: aiohttp.ClientSession,
        *,
        max_entries: int = DEFAULT_CACHE_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # The session belongs to the caller, who must create it with aiohttp.DummyCookieJar so
        # one visitor's cookies never leak into another visitor's call.
        self._cfg = cfg
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=cfg.timeout)
        self._max_entries = max_entries
        self._clock = clock
        self._cache: OrderedDict[str, tuple[float, Identity | None]] = OrderedDict()
        self._inflight: dict[str, asyncio.Task[tuple[Identity | None, bool]]] = {}
        self.calls = 0
        """Calls made to the site (for metrics and tests)."""

    def __repr__(self) -> str:
        return f"UrlIdentity(url={self._cfg.url!r}, cache_ttl={self._cfg.cache_ttl})"

    async def identify(self, request: web.BaseRequest) -> Identity | None:
        """The visitor's identity per the site, or None when not logged in (or no cookie)."""
        cookies = request.headers.getall(hdrs.COOKIE, [])
        if not cookies:
            return None  # nothing to identify with: do not bother the site
        cookie = "; ".join(cookies)
        key = hashlib.sha256(cookie.encode("utf-8", "surrogateescape")).hexdigest()

        now = self._clock()
        hit = self._cache.get(key)
        if hit is not None:
            if hit[0] > now:
                self._cache.move_to_end(key)
                return hit[1]
            del self._cache[key]

        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._fetch(cookie))
            self._inflight[key] = task
            task.add_done_callback(lambda _t: self._inflight.pop(key, None))
        # Shielded: one impatient visitor (cancelled request) must not cancel the shared call.
        identity, cacheable = await asyncio.shield(task)
        if cacheable and self._cfg.cache_ttl > 0:
            self._cache[key] = (self._clock() + self._cfg.cache_ttl, identity)
            self._cache.move_to_end(key)
            while len(self._cache) > self._max_entries:
                self._cache.popitem(last=False)
        return identity

    def clear_cache(self) -> None:
        self._cache.clear()

    async def _fetch(self, cookie: str) -> tuple[Identity | None, bool]:
        """One call to the site: (identity or None, whether the answer may be cached)."""
        self.calls += 1
        url = self._cfg.url
        try:
            async with self._session.get(
                url,
                headers={hdrs.COOKIE: cookie, hdrs.ACCEPT: "application/json"},
                allow_redirects=False,
                timeout=self._timeout,
            ) as resp:
                if resp.status != 200:
                    # 401/403 or a redirect to a login page: a definite "not logged in".
                    definite = resp.status in (401, 403) or 300 <= resp.status < 400
                    if not definite:
                        log.warning("identity endpoint %s answered %d", url, resp.status)
                    return None, definite
                body = bytearray()
                async for chunk in resp.content.iter_any():
                    body += chunk
                    if len(body) > MAX_RESPONSE:
                        log.warning("identity endpoint %s answer over %d bytes", url, MAX_RESPONSE)
                        return None, False
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("identity endpoint %s failed: %s", url, type(exc).__name__)
            return None, False
        try:
            data = json.loads(bytes(body))
        except ValueError:
            log.warning("identity endpoint %s answered 200 without valid JSON", url)
            return None, False
        user_id = _text(_lookup(data, self._cfg.user_id_field))
        user_name = _text(_lookup(data, self._cfg.user_name_field))
        if user_id is None or user_name is None:
            # Some sites answer 200 {"loggedIn": false}: not logged in, and a definite answer.
            log.info(
                "identity endpoint %s: no usable %r/%r in the answer",
                url,
                self._cfg.user_id_field,
                self._cfg.user_name_field,
            )
            return None, True
        return Identity(user_id, user_name), True


def make_identity(cfg: CecIdentity, session: aiohttp.ClientSession) -> UrlIdentity | None:
    """The provider for ``cec.identity``: a UrlIdentity for ``source: url``, None for guest."""
    if cfg.source == "url" and cfg.url is not None:
        return UrlIdentity(cfg.url, session)
    return None
