"""Token storage for the vendor's token mode: issue, check, revoke.

A token is 256 bits from :mod:`secrets`. The store never keeps the token itself: it keys the
binding (userId, userName, tenant, expiry) by HMAC-SHA256(signing_key, token), so a memory or
Redis dump cannot be replayed against the validation callback. With ``redis://`` several gateway
processes share tokens and revocations; entries carry a TTL so Redis forgets them on its own.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable

from redis.exceptions import RedisClusterException, RedisError

from gateway.errors import ServiceUnavailable
from gateway.redisconn import RedisAuth, RedisConnection, explain, parse_store_url

log = logging.getLogger("gateway.tokens")

TOKEN_BYTES = 32
"""Random bytes per token (256 bits; the issue asks for at least 128)."""

# token_urlsafe(32) gives 43 characters; anything else cannot be ours, so it is refused before
# hashing (and a huge string never reaches the HMAC).
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
_REDIS_PREFIX = "gateway:token:"
_REUSE_CACHE_SIZE = 10_000
_SWEEP_EVERY = 1_000


_REDIS_ERRORS = (RedisError, RedisClusterException, OSError)


class TokenBackendUnavailable(ServiceUnavailable):
    """The token store or guard backend (Redis) cannot be reached; callers must fail closed.

    Its text ends with the cause (certificate, authentication, MOVED, READONLY, ...), taken
    from the Redis error it was raised from, so every log line that shows it says why.
    """

    def __str__(self) -> str:
        text = super().__str__()
        cause = self.__cause__
        # limits wraps the client's error in a StorageError(.storage_error).
        cause = getattr(cause, "storage_error", None) or cause
        if cause is None:
            return text
        return f"{text}: {explain(cause)}"


@dataclass(frozen=True)
class IssuedToken:
    """A freshly issued (or reused) token and when it stops being valid (epoch seconds)."""

    token: str = field(repr=False)
    expires_at: float

    @property
    def expires_at_iso(self) -> str:
        """Expiry as ISO 8601 UTC with a ``Z`` suffix, e.g. ``2026-01-02T03:04:05Z``."""
        stamp = datetime.fromtimestamp(self.expires_at, UTC).isoformat(timespec="seconds")
        return stamp.replace("+00:00", "Z")


@runtime_checkable
class TokenStore(Protocol):
    """What the gateway needs from a token store; all methods may raise TokenBackendUnavailable."""

    ttl: float

    async def issue(self, user_id: str, user_name: str, tenant: str) -> IssuedToken: ...

    async def token_for(self, user_id: str, user_name: str, tenant: str) -> IssuedToken: ...

    async def check(self, token: str, user_id: str, user_name: str, tenant: str) -> bool: ...

    async def revoke(self, token: str) -> bool: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


class _BaseStore:
    """Hashing, binding encoding and the per-user reuse cache shared by both back ends."""

    def __init__(self, signing_key: bytes, ttl: float) -> None:
        if not signing_key:
            raise ValueError("signing_key must not be empty")
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        self._key = signing_key
        self.ttl = float(ttl)
        # Plain tokens live only here, in process memory, so the same user gets the same
        # token back while it has more than half its life left (a page reload does not mint a
        # new one). Bounded; an entry is always re-checked against the store before reuse, so a
        # revocation made by another process is honoured.
        self._recent: OrderedDict[tuple[str, str, str], IssuedToken] = OrderedDict()
        self._recent_by_hash: dict[str, tuple[str, str, str]] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ttl={self.ttl})"

    def _digest(self, token: str) -> str:
        return hmac.new(self._key, token.encode("utf-8"), hashlib.sha256).hexdigest()

    @staticmethod
    def _encode(user_id: str, user_name: str, tenant: str, expires_at: float) -> bytes:
        binding = {"u": user_id, "n": user_name, "t": tenant, "e": expires_at}
        return json.dumps(binding, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    @staticmethod
    def _matches(raw: bytes, user_id: str, user_name: str, tenant: str, now: float) -> bool:
        try:
            binding = json.loads(raw)
            bound = (str(binding["u"]), str(binding["n"]), str(binding["t"]))
            expires_at = float(binding["e"])
        except (ValueError, KeyError, TypeError):
            log.error("token store holds an unreadable entry; treating it as invalid")
            return False
        # Evaluate every comparison (no short-circuit) so timing does not tell which field failed.
        ok = _same(bound[0], user_id) & _same(bound[1], user_name) & _same(bound[2], tenant)
        return ok and now < expires_at

    # Back-end primitives -------------------------------------------------------------------
    async def _put(self, digest: str, value: bytes, ttl: float) -> None:
        raise NotImplementedError

    async def _get(self, digest: str) -> bytes | None:
        raise NotImplementedError

    async def _delete(self, digest: str) -> bool:
        raise NotImplementedError

    # Public API -----------------------------------------------------------------------------
    async def issue(self, user_id: str, user_name: str, tenant: str) -> IssuedToken:
        """Mint a new token bound to exactly these three values, valid for ``ttl`` seconds."""
        token = secrets.token_urlsafe(TOKEN_BYTES)
        expires_at = time.time() + self.ttl
        await self._put(
            self._digest(token), self._encode(user_id, user_name, tenant, expires_at), self.ttl
        )
        issued = IssuedToken(token, expires_at)
        self._remember((user_id, user_name, tenant), issued)
        return issued

    async def token_for(self, user_id: str, user_name: str, tenant: str) -> IssuedToken:
        """A still-valid token for this user (more than half its life left), else a new one."""
        # No lock: two concurrent first calls may both mint a token, which is harmless.
        who = (user_id, user_name, tenant)
        cached = self._recent.get(who)
        if cached is not None and cached.expires_at - time.time() > self.ttl / 2:
            if await self.check(cached.token, user_id, user_name, tenant):
                self._recent.move_to_end(who)
                return cached
        return await self.issue(user_id, user_name, tenant)

    async def check(self, token: str, user_id: str, user_name: str, tenant: str) -> bool:
        """True only for an existing, unexpired, unrevoked token bound to exactly these values."""
        if not isinstance(token, str) or not _TOKEN_RE.fullmatch(token):
            return False
        raw = await self._get(self._digest(token))
        if raw is None:
            return False
        return self._matches(raw, user_id, user_name, tenant, time.time())

    async def revoke(self, token: str) -> bool:
        """Forget the token; True when it existed (and had not yet expired)."""
        if not isinstance(token, str) or not _TOKEN_RE.fullmatch(token):
            return False
        digest = self._digest(token)
        who = self._recent_by_hash.pop(digest, None)
        if who is not None:
            self._recent.pop(who, None)
        return await self._delete(digest)

    def _remember(self, who: tuple[str, str, str], issued: IssuedToken) -> None:
        old = self._recent.pop(who, None)
        if old is not None:
            self._recent_by_hash.pop(self._digest(old.token), None)
        self._recent[who] = issued
        self._recent_by_hash[self._digest(issued.token)] = who
        while len(self._recent) > _REUSE_CACHE_SIZE:
            _, dropped = self._recent.popitem(last=False)
            self._recent_by_hash.pop(self._digest(dropped.token), None)


class MemoryTokenStore(_BaseStore):
    """Tokens in this process only (``store: memory``): lost on restart, not shared."""

    def __init__(self, signing_key: bytes, ttl: float) -> None:
        super().__init__(signing_key, ttl)
        self._entries: dict[str, tuple[bytes, float]] = {}
        self._writes = 0

    async def _put(self, digest: str, value: bytes, ttl: float) -> None:
        self._entries[digest] = (value, time.monotonic() + ttl)
        self._writes += 1
        if self._writes % _SWEEP_EVERY == 0:
            self._sweep()

    async def _get(self, digest: str) -> bytes | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if entry[1] <= time.monotonic():
            self._entries.pop(digest, None)
            return None
        return entry[0]

    async def _delete(self, digest: str) -> bool:
        entry = self._entries.pop(digest, None)
        return entry is not None and entry[1] > time.monotonic()

    def _sweep(self) -> None:
        # Amortised clean-up so expired entries do not accumulate without bound.
        now = time.monotonic()
        for digest in [d for d, (_, until) in self._entries.items() if until <= now]:
            del self._entries[digest]

    def __len__(self) -> int:
        return len(self._entries)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._entries.clear()
        self._recent.clear()
        self._recent_by_hash.clear()


def redis_connection(url: str, auth: RedisAuth | None = None) -> RedisConnection:
    """A client for a Redis ``token.store`` URL (single, TLS, sentinel or cluster form),
    with short timeouts so an unreachable Redis fails fast instead of hanging the callback."""
    return RedisConnection(parse_store_url(url), auth)


class RedisTokenStore(_BaseStore):
    """Tokens in Redis (``store: redis://...``), shared by every gateway process using it."""

    def __init__(self, url: str, signing_key: bytes, ttl: float, *,
                 auth: RedisAuth | None = None) -> None:
        super().__init__(signing_key, ttl)
        self._conn = redis_connection(url, auth)
        self._redis = self._conn.client

    def __repr__(self) -> str:
        # The URL may carry a password: keep it out.
        return f"RedisTokenStore(ttl={self.ttl})"

    async def _put(self, digest: str, value: bytes, ttl: float) -> None:
        try:
            await self._redis.set(_REDIS_PREFIX + digest, value, px=max(1, int(ttl * 1000)))
        except _REDIS_ERRORS as exc:
            raise TokenBackendUnavailable("token store") from exc

    async def _get(self, digest: str) -> bytes | None:
        try:
            raw = await self._redis.get(_REDIS_PREFIX + digest)
        except _REDIS_ERRORS as exc:
            raise TokenBackendUnavailable("token store") from exc
        return raw if isinstance(raw, bytes) else None

    async def _delete(self, digest: str) -> bool:
        try:
            removed = await self._redis.delete(_REDIS_PREFIX + digest)
        except _REDIS_ERRORS as exc:
            raise TokenBackendUnavailable("token store") from exc
        return bool(removed)

    async def ping(self) -> None:
        """Reachable *and writable*: a replica (READONLY) or a cluster node holding another
        slot (MOVED) answers PING but fails every token, so a short-lived key is written."""
        try:
            await self._redis.set(_REDIS_PREFIX + "probe", b"1", px=5000)
        except _REDIS_ERRORS as exc:
            raise TokenBackendUnavailable("token store") from exc

    async def close(self) -> None:
        await self._conn.close()


def open_store(url: str, signing_key: bytes, ttl: float, *,
               auth: RedisAuth | None = None) -> TokenStore:
    """``"memory"`` → MemoryTokenStore; any Redis form (gateway.redisconn) → RedisTokenStore.

    Nothing is connected yet (Redis connects on first use); call ``ping()`` to check early.
    A URL that is not a store raises ValueError (config validation uses the same parser).
    """
    if url == "memory":
        return MemoryTokenStore(signing_key, ttl)
    return RedisTokenStore(url, signing_key, ttl, auth=auth)
