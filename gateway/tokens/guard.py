"""Guessing and flood protection for the token endpoints, without an off switch for attackers.

Tokens are 256 random bits and API keys at least 16 characters: guessing is infeasible, so
what is guarded here is noise, load and alarms, and nothing here may give an anonymous
caller a lever over other users:

* A correct token or API key is recognised first and never consumes an attempt, so no amount
  of wrong guesses against a userId denies that user their own valid token, and legitimate
  concurrency never trips a limit.
* Each wrong guess *takes* one attempt from an atomic counter (Redis: one Lua script doing
  INCR and PEXPIRE; memory: no await between read and write). There is no test-then-record
  step, so however many wrong guesses arrive at once, on however many processes sharing one
  Redis, exactly ``max_failures`` get the ordinary failure answer per ``window``; the one
  that crosses the allowance starts a block of ``lockout`` seconds during which wrong
  guesses are answered 429 with Retry-After.
* Counted per userId on the validation callback (whose callers are only the allow-listed CEC
  addresses, which are therefore never counted or locked), and per client address on the
  issuing endpoint (where a locked address is refused even with the right key).
* The callback's ``rate_limit`` caps wrong tokens across all users (503 beyond it); correct
  tokens are not counted against it either.
* A per-process concurrency limit (a plain counter: concurrency is this process's load).

``unlock(kind, value)`` lifts a user's or an address's lock early (``gateway unlock``, the
admin ``/unlock`` endpoint). Any backend failure raises TokenBackendUnavailable: the callback
fails closed. The memory backend keeps at most ``MAX_MEMORY_KEYS`` counters (oldest dropped).
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import NamedTuple, Protocol

from limits import parse
from redis.exceptions import RedisClusterException, RedisError

from gateway.config import TokenConfig
from gateway.redisconn import RedisAuth, RedisConnection
from gateway.tokens.store import TokenBackendUnavailable, redis_connection

_REDIS_ERRORS = (RedisError, RedisClusterException, OSError)

_KEY_PREFIX = "gateway-guard:"
MAX_MEMORY_KEYS = 100_000

# KEYS[1] the counter; ARGV: limit, window ms, block ms. Returns {count after this hit, ms
# until the counter resets}. The first hit starts the window; the hit that crosses the limit
# restarts the expiry as the block. A key found without expiry (never expected) is repaired.
_HIT_SCRIPT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
elseif n == tonumber(ARGV[1]) + 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  ttl = tonumber(ARGV[2])
end
return {n, ttl}
"""


class Attempt(NamedTuple):
    """The outcome of taking one attempt from a counter."""

    allowed: bool  # within the allowance: answer as usual
    started: bool  # this attempt crossed the allowance: the block starts now
    retry_after: float  # seconds until the counter resets (the block's end when not allowed)
    failures: int  # counted in this window, this one included


class Counters(Protocol):
    """Atomic fixed-window counters (seconds), shared by whoever shares the backend."""

    async def hit(self, key: str, limit: int, window: float, block: float) -> tuple[int, float]:
        """Add one; (count after it, seconds until the counter resets)."""
        ...

    async def peek(self, key: str) -> tuple[int, float]:
        """(count, seconds until reset) without adding; (0, 0.0) when absent."""
        ...

    async def clear(self, key: str) -> None: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


class MemoryCounters:
    """Counters in this process; a bounded map (oldest counters dropped beyond ``max_keys``)."""

    def __init__(self, max_keys: int = MAX_MEMORY_KEYS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._entries: OrderedDict[str, list[float]] = OrderedDict()  # key -> [count, reset]
        self._max = max_keys
        self._clock = clock

    def __len__(self) -> int:
        return len(self._entries)

    async def hit(self, key: str, limit: int, window: float, block: float) -> tuple[int, float]:
        now = self._clock()
        entry = self._entries.get(key)
        if entry is None or entry[1] <= now:
            entry = self._entries[key] = [0, now + window]
            self._entries.move_to_end(key)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)
        entry[0] += 1
        if entry[0] == limit + 1:
            entry[1] = now + block
        return int(entry[0]), entry[1] - now

    async def peek(self, key: str) -> tuple[int, float]:
        entry = self._entries.get(key)
        now = self._clock()
        if entry is None or entry[1] <= now:
            return 0, 0.0
        return int(entry[0]), entry[1] - now

    async def clear(self, key: str) -> None:
        self._entries.pop(key, None)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._entries.clear()


class RedisCounters:
    """Counters in Redis: every process using the same Redis counts together."""

    def __init__(self, conn: RedisConnection) -> None:
        # Any token.store form (single, TLS, sentinel, cluster): one key per script call,
        # so the counter works on a cluster too.
        self._conn = conn
        self._redis = conn.client
        self._hit = self._redis.register_script(_HIT_SCRIPT)

    def __repr__(self) -> str:
        return "RedisCounters()"  # the pool's URL may carry a password

    async def hit(self, key: str, limit: int, window: float, block: float) -> tuple[int, float]:
        try:
            count, ttl_ms = await self._hit(
                keys=[key], args=[limit, _ms(window), _ms(block)])
        except _REDIS_ERRORS as exc:
            raise TokenBackendUnavailable(f"guard: {type(exc).__name__}") from exc
        return int(count), max(0, int(ttl_ms)) / 1000

    async def peek(self, key: str) -> tuple[int, float]:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.get(key)
                pipe.pttl(key)
                raw, ttl_ms = await pipe.execute()
        except _REDIS_ERRORS as exc:
            raise TokenBackendUnavailable(f"guard: {type(exc).__name__}") from exc
        if raw is None or int(ttl_ms) <= 0:
            return 0, 0.0
        return int(raw), int(ttl_ms) / 1000

    async def clear(self, key: str) -> None:
        try:
            await self._redis.delete(key)
        except _REDIS_ERRORS as exc:
            raise TokenBackendUnavailable(f"guard: {type(exc).__name__}") from exc

    async def ping(self) -> None:
        try:
            await self._redis.ping()
        except _REDIS_ERRORS as exc:
            raise TokenBackendUnavailable(f"guard: {type(exc).__name__}") from exc

    async def close(self) -> None:
        await self._conn.close()


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def user_key(user_id: str) -> str:
    # Hashed: user ids are caller-controlled text and must not shape storage keys.
    return _KEY_PREFIX + "user:" + hashlib.sha256(user_id.encode("utf-8")).hexdigest()[:32]


def address_key(address: str) -> str:
    """The counter key of a client address; ValueError when it is not an IP address."""
    addr = ipaddress.ip_address(address.strip())
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return _KEY_PREFIX + "addr:" + addr.compressed


_RATE_KEY = _KEY_PREFIX + "rate"


class Guard:
    """Per-user and per-address failure counting, the callback's rate, and concurrency."""

    def __init__(
        self,
        counters: Counters,
        *,
        max_failures: int,
        window: float,
        lockout: float,
        rate_limit: str,
        max_concurrency: int,
    ) -> None:
        if max_failures < 1:
            raise ValueError("max_failures must be at least 1")
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self._counters = counters
        self.max_failures = max_failures
        self.window = max(0.001, window)
        self.lockout = max(0.001, lockout)
        item = parse(rate_limit)
        self._rate = (int(item.amount), float(item.get_expiry()))
        self.max_concurrency = max_concurrency
        self._active = 0

    def __repr__(self) -> str:
        return (
            f"Guard(max_failures={self.max_failures}, window={self.window:g}s, "
            f"lockout={self.lockout:g}s, rate={self._rate[0]}/{self._rate[1]:g}s, "
            f"max_concurrency={self.max_concurrency})"
        )

    async def _fail(self, key: str) -> Attempt:
        count, reset = await self._counters.hit(key, self.max_failures, self.window, self.lockout)
        allowed = count <= self.max_failures
        return Attempt(allowed, count == self.max_failures + 1, reset, count)

    async def user_failed(self, user_id: str) -> Attempt:
        """A wrong token for ``user_id``: take one attempt from the user's allowance."""
        return await self._fail(user_key(user_id))

    async def address_failed(self, client_ip: str) -> Attempt:
        """A wrong API key (or the like) from ``client_ip``: take one attempt."""
        return await self._fail(_address_key_or_raw(client_ip))

    async def address_locked(self, client_ip: str) -> float:
        """Seconds until ``client_ip`` may try again; 0.0 when it is not locked."""
        count, reset = await self._counters.peek(_address_key_or_raw(client_ip))
        return reset if count > self.max_failures else 0.0

    async def user_locked(self, user_id: str) -> float:
        """Seconds until wrong tokens for ``user_id`` are answered as usual again; 0.0 now."""
        count, reset = await self._counters.peek(user_key(user_id))
        return reset if count > self.max_failures else 0.0

    async def failure_rate(self) -> float:
        """Take one unit of the callback's rate of wrong tokens; 0.0 admitted, else wait."""
        amount, per = self._rate
        count, reset = await self._counters.hit(_RATE_KEY, amount, per, per)
        return 0.0 if count <= amount else max(reset, 0.001)

    async def unlock(self, kind: str, value: str) -> bool:
        """Forget the failures of a user (``kind`` "user") or an address ("address")."""
        if kind == "user":
            await self._counters.clear(user_key(value))
        elif kind == "address":
            try:
                key = address_key(value)
            except ValueError:
                raise ValueError(f"{value!r} is not an IP address") from None
            await self._counters.clear(key)
        else:
            raise ValueError("unlock a 'user' or an 'address'")
        return True

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
        await self._counters.ping()

    async def close(self) -> None:
        await self._counters.close()


def _address_key_or_raw(client_ip: str) -> str:
    try:
        return address_key(client_ip)
    except ValueError:
        # The core always gives an address; anything else is counted under one bucket.
        return _KEY_PREFIX + "addr:unknown"


def open_counters(url: str, auth: RedisAuth | None = None) -> Counters:
    """Counters on ``"memory"`` or any Redis form of ``token.store`` (gateway.redisconn)."""
    if url == "memory":
        return MemoryCounters()
    return RedisCounters(redis_connection(url, auth))


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
    return Guard(
        open_counters(url, auth),
        max_failures=max_failures,
        window=window,
        lockout=lockout,
        rate_limit=rate_limit,
        max_concurrency=max_concurrency,
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
