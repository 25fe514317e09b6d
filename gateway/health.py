"""Upstream and store health: a cheap periodic check, for metrics and ``/status`` only.

Readiness (``/readyz``) deliberately ignores what is found here: a replica that can serve the
site must stay in the load balancer while the CEC or Redis is down, because every replica sees
the same outage and taking them all out turns a chat outage into a website outage. A route
whose upstream is down answers 502 on its own; the chat's token features answer 503.

What is checked, every ``interval`` seconds and whenever ``/status`` is asked:

* each route's upstream: a TCP connect (no request, no TLS handshake);
* the token store and guard backend: their ``ping`` (a Redis ``PING``; nothing for memory);

each bounded by ``timeout`` seconds.

Results go to the gauges ``gateway_upstream_up{route}`` and ``gateway_store_up``, and into
``snapshot()``. Checks of different targets run concurrently so one black-holed upstream does
not delay the others' results.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("gateway.health")

Check = Callable[[], Awaitable[None]]


@dataclass
class State:
    """The last result for one target: up (None until checked), why not, and since when."""

    up: bool | None = None
    error: str | None = None
    checked_at: float | None = None  # epoch seconds
    since: float | None = None  # epoch seconds of the last change of ``up``

    def record(self, up: bool, error: str | None, now: float) -> bool:
        """Store a result; True when worth a log line (a change, or down at the first check)."""
        before = self.up
        if up != before:
            self.since = now
        self.up, self.error, self.checked_at = up, error, now
        return up != before and (before is not None or not up)

    def as_json(self) -> dict[str, Any]:
        return {"up": self.up, "error": self.error, "checked_at": _iso(self.checked_at),
                "since": _iso(self.since)}


def _iso(stamp: float | None) -> str | None:
    if stamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))


async def tcp_check(host: str, port: int) -> None:
    """Raise OSError unless a TCP connection to host:port opens (the caller bounds the time)."""
    _, writer = await asyncio.open_connection(host, port)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


class HealthMonitor:
    """Checks upstreams and the store in the background; read by metrics and ``/status``.

    ``targets`` and ``store_checks`` are callables so that a config reload is followed
    without rebuilding the monitor: routes as ``(route name, host, port)``.
    """

    def __init__(
        self,
        targets: Callable[[], list[tuple[str, str, int]]],
        store_checks: Callable[[], list[Check]],
        *,
        on_upstream: Callable[[str, bool], None] | None = None,
        on_store: Callable[[bool], None] | None = None,
        interval: float = 5.0,
        timeout: float = 2.0,
    ) -> None:
        self._targets = targets
        self._store_checks = store_checks
        self._on_upstream = on_upstream
        self._on_store = on_store
        self.interval = interval
        self.timeout = timeout
        self.upstreams: dict[str, State] = {}
        self.store = State()
        self._task: asyncio.Task[None] | None = None
        self._running: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        for task in (self._task, self._running):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._running = None

    async def _loop(self) -> None:
        while True:
            try:
                await self.check_now()
            except Exception:  # a bug here must not stop the checks for good
                log.exception("health check failed")
            await asyncio.sleep(self.interval)

    async def check_now(self) -> None:
        """One round of checks; concurrent callers share the round that is running."""
        running = self._running
        if running is None or running.done():
            running = self._running = asyncio.get_running_loop().create_task(self._round())
        await asyncio.shield(running)

    async def _round(self) -> None:
        targets = self._targets()
        checks = self._store_checks()
        results = await asyncio.gather(
            *(self._probe(tcp_check(host, port)) for _, host, port in targets),
            *(self._probe(check()) for check in checks),
        )
        now = time.time()
        names = {name for name, _, _ in targets}
        for gone in set(self.upstreams) - names:  # a route removed by a reload
            del self.upstreams[gone]
        for (name, host, port), error in zip(targets, results, strict=False):
            state = self.upstreams.setdefault(name, State())
            if state.record(error is None, error, now):
                level = logging.INFO if error is None else logging.WARNING
                log.log(level, "upstream of route %s (%s:%d) is %s", name, host, port,
                        "up" if error is None else f"down: {error}")
            if self._on_upstream is not None:
                self._on_upstream(name, error is None)
        if checks:
            errors = [e for e in results[len(targets):] if e is not None]
            error = errors[0] if errors else None
            if self.store.record(error is None, error, now):
                log.log(logging.INFO if error is None else logging.WARNING,
                        "token store is %s", "up" if error is None else f"down: {error}")
            if self._on_store is not None:
                self._on_store(error is None)

    async def _probe(self, check: Awaitable[None]) -> str | None:
        """None when the check passed, else a short reason (the exception's type and text)."""
        try:
            async with asyncio.timeout(self.timeout):
                await check
        except TimeoutError:
            return "timed out"
        except Exception as exc:  # any failure of a check means "down", with its cause
            text = str(exc)
            return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
        return None
