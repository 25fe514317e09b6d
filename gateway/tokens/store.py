"""Token storage for the vendor's token mode: issue, check, revoke.

A token is 256 bits from :mod:`secrets`. The store never keeps the token itself: it keys the
binding (userId, userName, tenant, expiry) by HMAC-SHA256(signing_key, token), so a memory or
Redis dump cannot be replayed against the validation callback. With ``redis://`` several gateway
processes share tokens and revocations; entries carry a TTL so Redis forgets them on its own.

State is bounded: ``token_for`` keeps one token per userId in this process and hands it out
again until it is close to expiry (a new name for the same userId replaces it, and the old one
is revoked), and the store holds at most ``max_tokens`` live tokens: past that, ``issue``
raises TokenStoreFull (the caller answers 503) and calls ``on_full`` (a metric). With Redis the
count is a sorted set of (digest, expiry) beside the tokens, checked before each write, so
several processes minting at the same instant can overshoot by that many, no more.
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
from collections.abc import Callable
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
_REDIS_INDEX = "gateway:tokens"  # sorted set: digest -> expiry (epoch ms), for the cap
_SWEEP_EVERY = 1_000
DEFAULT_MAX_TOKENS = 100_000
# A reused token keeps at least this share of its life (and at most this many seconds less
# than all of it), so that the CEC's callback, which follows within seconds, still finds it.
_RENEW_SHARE = 0.1
_RENEW_MAX = 60.0
_FULL_LOG_EVERY = 60.0


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


class TokenStoreFull(TokenBackendUnavailable):
    """``max_tokens`` live tokens already: no new one is minted (503, counted)."""


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

    def __init__(self, signing_key: bytes, ttl: float, *, max_tokens: int = DEFAULT_MAX_TOKENS,
                 on_full: Callable[[], None] | None = None) -> None:
        if not signing_key:
            raise ValueError("signing_key must not be empty")
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        self._key = signing_key
        self.ttl = float(ttl)
        self.max_tokens = max_tokens
        self._on_full = on_full
        self._full_logged = -_FULL_LOG_EVERY
        self.refused = 0
        """Tokens not minted because the store was full."""
        # Plain tokens live only here, in process memory, one per userId, so the same user
        # gets the same token back until it is close to expiry (a page reload does not mint a
        # new one). At most max_tokens entries, like the store; an entry is always re-checked
        # against the store before reuse, so a revocation by another process is honoured.
        self._recent: OrderedDict[str, tuple[tuple[str, str, str], IssuedToken]] = OrderedDict()
        self._recent_by_hash: dict[str, str] = {}

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

    async def _count(self) -> int:
        """Live tokens in the store (for the cap)."""
        raise NotImplementedError

    def _full(self) -> TokenStoreFull:
        self.refused += 1
        if self._on_full is not None:
            try:
                self._on_full()
            except Exception:  # a broken metrics hook must not break issuing
                log.exception("token store on_full hook failed")
        now = time.monotonic()
        if now - self._full_logged >= _FULL_LOG_EVERY:
            self._full_logged = now
            log.warning("token store full (%d live tokens, token.max_tokens): new tokens are "
                        "refused until some expire; %d refused so far", self.max_tokens,
                        self.refused)
        return TokenStoreFull("token store full")

    # Public API -----------------------------------------------------------------------------
    async def issue(self, user_id: str, user_name: str, tenant: str) -> IssuedToken:
        """Mint a new token bound to exactly these three values, valid for ``ttl`` seconds.

        Raises TokenStoreFull when ``max_tokens`` live tokens exist already.
        """
        if await self._count() >= self.max_tokens:
            raise self._full()
        token = secrets.token_urlsafe(TOKEN_BYTES)
        expires_at = time.time() + self.ttl
        await self._put(
            self._digest(token), self._encode(user_id, user_name, tenant, expires_at), self.ttl
        )
        return IssuedToken(token, expires_at)

    async def token_for(self, user_id: str, user_name: str, tenant: str) -> IssuedToken:
        """This userId's token while it has life left, else a new one (the old one revoked).

        One token per userId in this process: a different name or tenant for the same userId
        (a guest's page can send any name) replaces the token instead of adding one. Tokens
        minted with ``issue`` (the issuing API) are the caller's and are left alone.
        """
        # No lock: two concurrent first calls may both mint a token; the second replaces
        # (and revokes) the first.
        who = (user_id, user_name, tenant)
        cached = self._recent.get(user_id)
        if cached is not None:
            bound, issued = cached
            left = issued.expires_at - time.time()
            if bound == who and left > min(self.ttl * _RENEW_SHARE, _RENEW_MAX):
                if await self.check(issued.token, user_id, user_name, tenant):
                    self._recent.move_to_end(user_id)
                    return issued
        issued = await self.issue(user_id, user_name, tenant)
        await self._remember(who, issued)
        return issued

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
        user_id = self._recent_by_hash.pop(digest, None)
        if user_id is not None:
            self._recent.pop(user_id, None)
        return await self._delete(digest)

    async def _remember(self, who: tuple[str, str, str], issued: IssuedToken) -> None:
        old = self._recent.pop(who[0], None)
        self._recent[who[0]] = (who, issued)
        self._recent_by_hash[self._digest(issued.token)] = who[0]
        if old is not None:
            # Replaced: the old token goes, so a userId holds one token here, not one per name.
            digest = self._digest(old[1].token)
            self._recent_by_hash.pop(digest, None)
            await self._delete(digest)
        while len(self._recent) > self.max_tokens:
            _, (_, dropped) = self._recent.popitem(last=False)
            self._recent_by_hash.pop(self._digest(dropped.token), None)


class MemoryTokenStore(_BaseStore):
    """Tokens in this process only (``store: memory``): lost on restart, not shared."""

    def __init__(self, signing_key: bytes, ttl: float, *, max_tokens: int = DEFAULT_MAX_TOKENS,
                 on_full: Callable[[], None] | None = None) -> None:
        super().__init__(signing_key, ttl, max_tokens=max_tokens, on_full=on_full)
        self._entries: dict[str, tuple[bytes, float]] = {}
        self._writes = 0

    async def _count(self) -> int:
        if len(self._entries) >= self.max_tokens:
            self._sweep()  # expired entries do not count against the cap
        return len(self._entries)

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
                 auth: RedisAuth | None = None, max_tokens: int = DEFAULT_MAX_TOKENS,
                 on_full: Callable[[], None] | None = None) -> None:
        super().__init__(signing_key, ttl, max_tokens=max_tokens, on_full=on_full)
        self._conn = redis_connection(url, auth)
        self._redis = self._conn.client

    def __repr__(self) -> str:
        # The URL may carry a password: keep it out.
        return f"RedisTokenStore(ttl={self.ttl})"

    async def _count(self) -> int:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.zremrangebyscore(_REDIS_INDEX, "-inf", int(time.time() * 1000))
                pipe.zcard(_REDIS_INDEX)
                _, count = await pipe.execute()
        except _REDIS_ERRORS as exc:
            raise TokenBackendUnavailable("token store") from exc
        return int(count)

    async def _put(self, digest: str, value: bytes, ttl: float) -> None:
        ttl_ms = max(1, int(ttl * 1000))
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.set(_REDIS_PREFIX + digest, value, px=ttl_ms)
                pipe.zadd(_REDIS_INDEX, {digest: int(time.time() * 1000) + ttl_ms})
                # The index goes with the last token when nothing is minted for a while.
                pipe.pexpire(_REDIS_INDEX, ttl_ms)
                await pipe.execute()
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
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.delete(_REDIS_PREFIX + digest)
                pipe.zrem(_REDIS_INDEX, digest)
                removed, _ = await pipe.execute()
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
               auth: RedisAuth | None = None, max_tokens: int = DEFAULT_MAX_TOKENS,
               on_full: Callable[[], None] | None = None) -> TokenStore:
    """``"memory"`` → MemoryTokenStore; any Redis form (gateway.redisconn) → RedisTokenStore.

    Nothing is connected yet (Redis connects on first use); call ``ping()`` to check early.
    A URL that is not a store raises ValueError (config validation uses the same parser).
    """
    if url == "memory":
        return MemoryTokenStore(signing_key, ttl, max_tokens=max_tokens, on_full=on_full)
    return RedisTokenStore(url, signing_key, ttl, auth=auth, max_tokens=max_tokens,
                           on_full=on_full)
