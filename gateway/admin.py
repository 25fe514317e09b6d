"""The admin listener (loopback by default): /healthz, /readyz and /metrics.

Kept off the public port so probes and scrapes never compete with visitors, and so that
nothing here is reachable from the internet unless an operator binds it there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

log = logging.getLogger("gateway.admin")


@dataclass
class Readiness:
    """What /readyz reports: draining, plus upstream and backend checks (cached briefly)."""

    draining: bool = False
    upstreams: Callable[[], list[tuple[str, int]]] = list
    checks: Callable[[], list[Callable[[], Awaitable[None]]]] = list
    cache_for: float = 2.0
    connect_timeout: float = 1.0
    _cached: tuple[float, int, dict[str, str]] | None = field(default=None, repr=False)

    async def evaluate(self) -> tuple[int, dict[str, str]]:
        if self.draining:
            return 503, {"status": "draining"}
        now = time.monotonic()
        if self._cached is not None and now - self._cached[0] < self.cache_for:
            return self._cached[1], self._cached[2]
        report: dict[str, str] = {}
        ok = True
        for host, port in self.upstreams():
            key = f"upstream {host}:{port}"
            try:
                async with asyncio.timeout(self.connect_timeout):
                    _, writer = await asyncio.open_connection(host, port)
                writer.close()
                report[key] = "ok"
            except (OSError, TimeoutError) as exc:
                ok = False
                report[key] = f"unreachable ({type(exc).__name__})"
        for check in self.checks():
            name = getattr(check, "__qualname__", "check")
            try:
                async with asyncio.timeout(self.connect_timeout * 2):
                    await check()
                report[name] = "ok"
            except Exception as exc:  # any failure of a backend means not ready
                ok = False
                report[name] = f"failed ({type(exc).__name__})"
        status = 200 if ok else 503
        report["status"] = "ready" if ok else "not ready"
        self._cached = (now, status, report)
        return status, report


READINESS = web.AppKey("readiness", Readiness)
RENDER_METRICS: web.AppKey[Callable[[], bytes]] = web.AppKey("render_metrics")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    status, report = await request.app[READINESS].evaluate()
    return web.json_response(report, status=status)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[RENDER_METRICS]()
    return web.Response(body=body, content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


def create_admin_app(readiness: Readiness, render_metrics: Callable[[], bytes]
                     ) -> web.Application:
    app = web.Application()
    app[READINESS] = readiness
    app[RENDER_METRICS] = render_metrics
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
