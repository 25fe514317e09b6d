"""Guessing and flood protection for the token validation callback.

Counters come from the ``limits`` library, in process memory or in Redis (``async+redis``) so
that several gateway processes sharing one Redis count failures together and lock out together:

* failures per client address and per userId in a moving window; reaching ``max_failures``
  starts a lock-out of ``lockout`` seconds (a fixed-window marker of one hit), during which even
  a correct token is refused;
* a global rate limit on the callback (``limits`` notation, e.g. ``50/second``);
* a per-process concurrency limit (a plain counter: concurrency is about this process's load).

``limits`` counts in whole seconds, so ``window`` and ``lockout`` are rounded up to a whole
second (at least one). Any backend failure raises TokenBackendUnavailable: the callback must
fail closed.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Iterator

from limits import RateLimitItem, RateLimitItemPerSecond, parse
from limits.aio.storage import MemoryStorage, RedisClusterStorage, RedisStorage, Storage
from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter
from limits.errors import StorageError
from redis.exceptions import RedisError

from gateway.config import TokenConfig
from gateway.redisconn import RedisAuth, client_options, parse_store_url
from gateway.tokens.store import TokenBackendUnavailable, redis_connection

_BACKEND_ERRORS = (StorageError, RedisError, OSError)
_KEY_PREFIX = "gateway-limits"


def _seconds(value: float) -> int:
    return max(1, math.ceil(value))


def _user_key(user_id: str) -> str:
    # Hashed: user ids are caller-controlled text and must not shape storage keys.
    return hashlib.sha256(user_id.encode("utf-8")).hexdigest()[:32]


class Guard:
    """Failure counting, lock-out, global rate and concurrency limits for one callback."""

    def __init__(
        self,
        storage: Storage,
        *,
        max_failures: int,
        window: float,
        lockout: float,
        rate_limit: str,
        max_concurrency: int,
        pool: object | None = None,
    ) -> None:
        if max_failures < 1:
            raise ValueError("max_failures must be at least 1")
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self._storage = storage
        self._pool = pool
        self._failures = MovingWindowRateLimiter(storage)
        self._fixed = FixedWindowRateLimiter(storage)
        self._moving = MovingWindowRateLimiter(storage)
        self.lockout = _seconds(lockout)
        self._fail_item: RateLimitItem = RateLimitItemPerSecond(
            max_failures, _seconds(window), namespace="tokfail"
        )
        self._lock_item: RateLimitItem = RateLimitItemPerSecond(
            1, self.lockout, namespace="toklock"
        )
        self._rate_item: RateLimitItem = parse(rate_limit)
        self.max_concurrency = max_concurrency
        self._active = 0

    def __repr__(self) -> str:
        return (
            f"Guard(failures={self._fail_item!r}, lockout={self.lockout}s, "
            f"rate={self._rate_item!r}, max_concurrency={self.max_concurrency})"
        )

    @staticmethod
    def _subjects(client_ip: str, user_id: str | None) -> list[tuple[str, str]]:
        subjects = [("ip", client_ip)]
        if user_id is not None:
            subjects.append(("user", _user_key(user_id)))
        return subjects

    async def lockout_remaining(self, client_ip: str, user_id: str | None = None) -> float:
        """Seconds until the address (and the userId, if given) may try again; 0.0 when free."""
        remaining = 0.0
        try:
            for subject in self._subjects(client_ip, user_id):
                if not await self._fixed.test(self._lock_item, *subject):
                    stats = await self._fixed.get_window_stats(self._lock_item, *subject)
                    # A marker whose TTL just ran out still reads as locked for a moment: 1 s.
                    remaining = max(remaining, stats.reset_time - time.time(), 1.0)
        except _BACKEND_ERRORS as exc:
            raise TokenBackendUnavailable(f"guard: {type(exc).__name__}") from exc
        return remaining

    async def record_failure(self, client_ip: str, user_id: str | None = None) -> float:
        """Count one failure; returns the lock-out length if this failure started one, else 0."""
        started = 0.0
        try:
            for subject in self._subjects(client_ip, user_id):
                counted = await self._failures.hit(self._fail_item, *subject)
                if not counted or not await self._failures.test(self._fail_item, *subject):
                    await self._fixed.hit(self._lock_item, *subject)
                    # A fresh allowance once the lock-out is over, even if window > lockout.
                    await self._failures.clear(self._fail_item, *subject)
                    started = float(self.lockout)
        except _BACKEND_ERRORS as exc:
            raise TokenBackendUnavailable(f"guard: {type(exc).__name__}") from exc
        return started

    async def reserve_user_attempt(self, user_id: str) -> tuple[float, bool]:
        """Count a guess against ``user_id`` *before* it is checked.

        Counting after the check let concurrent guesses all pass the lock-out test before
        any failure was recorded; counting first (an atomic hit in ``limits``) admits at
        most ``max_failures`` checks per window, however many arrive at once. Returns
        (seconds locked out, whether this attempt started the lock-out); (0.0, False) admits.
        A correct token gives the attempt back (``user_succeeded``).
        """
        subject = ("user", _user_key(user_id))
        try:
            if await self._failures.hit(self._fail_item, *subject):
                return 0.0, False
            await self._fixed.hit(self._lock_item, *subject)
            await self._failures.clear(self._fail_item, *subject)
        except _BACKEND_ERRORS as exc:
            raise TokenBackendUnavailable(f"guard: {type(exc).__name__}") from exc
        return float(self.lockout), True

    async def user_failed(self, user_id: str) -> bool:
        """The reserved attempt was a wrong guess: lock out once the allowance is used up."""
        subject = ("user", _user_key(user_id))
        try:
            if await self._failures.test(self._fail_item, *subject):
                return False
            await self._fixed.hit(self._lock_item, *subject)
            await self._failures.clear(self._fail_item, *subject)
        except _BACKEND_ERRORS as exc:
            raise TokenBackendUnavailable(f"guard: {type(exc).__name__}") from exc
        return True

    async def user_succeeded(self, user_id: str) -> None:
        """A correct token: the user's provisional count starts again."""
        try:
            await self._failures.clear(self._fail_item, "user", _user_key(user_id))
        except _BACKEND_ERRORS as exc:
            raise TokenBackendUnavailable(f"guard: {type(exc).__name__}") from exc

    async def reset(self, client_ip: str, user_id: str | None = None) -> None:
        """Forget failures and lock-outs for these subjects (an operator's unlock)."""
        try:
            for subject in self._subjects(client_ip, user_id):
                await self._failures.clear(self._fail_item, *subject)
                await self._fixed.clear(self._lock_item, *subject)
        except _BACKEND_ERRORS as exc:
            raise TokenBackendUnavailable(f"guard: {type(exc).__name__}") from exc

    async def admit(self) -> float:
        """Take one unit of the global rate; 0.0 when admitted, else seconds to wait."""
        try:
            if await self._moving.hit(self._rate_item, "validate"):
                return 0.0
            stats = await self._moving.get_window_stats(self._rate_item, "validate")
        except _BACKEND_ERRORS as exc:
            raise TokenBackendUnavailable(f"guard: {type(exc).__name__}") from exc
        return max(1.0, stats.reset_time - time.time())

    @contextlib.contextmanager
    def slot(self) -> Iterator[bool]:
        """``with guard.slot() as ok:`` — ok is False when max_concurrency calls are running."""
        if self._active >= self.max_concurrency:
            yield False
            return
        self._active += 1
        try:
            yield True
        finally:
            self._active -= 1

    @property
    def active(self) -> int:
        """Callbacks being processed right now in this process."""
        return self._active

    async def ping(self) -> None:
        """Raise TokenBackendUnavailable when the counter storage is unreachable."""
        try:
            healthy = await self._storage.check()
        except _BACKEND_ERRORS as exc:
            raise TokenBackendUnavailable(f"guard: {type(exc).__name__}") from exc
        if not healthy:
            raise TokenBackendUnavailable("guard: storage check failed")

    async def close(self) -> None:
        disconnect = getattr(self._pool, "disconnect", None)
        if disconnect is not None:
            await disconnect()


class _ClusterCloser:
    """``disconnect()`` for the cluster client limits made (Guard.close calls it)."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    async def disconnect(self) -> None:
        client = getattr(getattr(self._storage, "bridge", None), "storage", None)
        if client is not None:
            await client.aclose()


def open_guard(
    url: str,
    *,
    max_failures: int,
    window: float,
    lockout: float,
    rate_limit: str,
    max_concurrency: int,
    auth: RedisAuth | None = None,
) -> Guard:
    """A Guard on ``"memory"`` or a Redis URL (same values as ``token.store``)."""
    storage: Storage
    pool: object | None = None
    if url == "memory":
        storage = MemoryStorage()
    else:
        target = parse_store_url(url)
        if target.kind != "cluster":
            pool = redis_connection(url, auth).pool
            # The URI only selects the storage class; connections come from our pool (timeouts,
            # TLS, credentials, sentinel discovery and database number as configured).
            storage = RedisStorage(
                "async+redis://",
                implementation="redispy",
                wrap_exceptions=True,
                key_prefix=_KEY_PREFIX,
                connection_pool=pool,  # type: ignore[arg-type]
            )
        else:  # limits builds its own cluster client, from the same options
            hosts = ",".join(f"{h}:{p}" for h, p in target.nodes)
            storage = RedisClusterStorage(
                f"async+redis+cluster://{hosts}",
                implementation="redispy",
                wrap_exceptions=True,
                key_prefix=_KEY_PREFIX,
                **client_options(target, auth),
            )
            pool = _ClusterCloser(storage)
    return Guard(
        storage,
        max_failures=max_failures,
        window=window,
        lockout=lockout,
        rate_limit=rate_limit,
        max_concurrency=max_concurrency,
        pool=pool,
    )


def guard_from_config(cfg: TokenConfig) -> Guard:
    """The Guard for ``token:`` (counters in ``token.store``)."""
    return open_guard(
        cfg.store,
        max_failures=cfg.guard.max_failures,
        window=cfg.guard.window,
        lockout=cfg.guard.lockout,
        rate_limit=cfg.rate_limit,
        max_concurrency=cfg.max_concurrency,
        auth=RedisAuth.from_config(cfg.redis),
    )
