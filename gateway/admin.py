"""The admin listener (loopback by default): /healthz, /readyz, /status, /metrics, /unlock.

Kept off the public port so probes and scrapes never compete with visitors, and so that
nothing here is reachable from the internet unless an operator binds it there.

* ``/healthz``: 200 while the process is alive (liveness).
* ``/readyz``: 200 when *this process* can serve: config loaded, listening, not draining.
  Upstreams and Redis are not part of it (see ``gateway.health``): every replica sees the
  same CEC or Redis outage, and a readiness probe that fails on it takes the whole site out
  of the load balancer for the sake of the chat.
* ``/status``: JSON for humans and dashboards (routes and their upstream state, store state,
  draining, version, worker); runs a fresh round of health checks first.
* ``/metrics``: Prometheus text.
* ``/unlock``: ``POST {"user": ID}`` or ``{"address": IP}`` with ``Authorization: Bearer
  <admin.api_key>`` lifts a token-guard lock early; 404 while no key is configured.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

log = logging.getLogger("gateway.admin")

Unlock = Callable[[str, str], Awaitable[bool]]
"""``unlock(kind, value)`` with kind "user" or "address"; False when there is no guard."""


@dataclass
class Readiness:
    """What /readyz reports: this process's own state only."""

    draining: bool = False
    listening: bool = False

    def evaluate(self) -> tuple[int, dict[str, str]]:
        if self.draining:
            return 503, {"status": "draining"}
        if not self.listening:
            return 503, {"status": "starting"}
        return 200, {"status": "ready"}


@dataclass(frozen=True)
class AdminHooks:
    """What the admin endpoints read from the running process."""

    readiness: Readiness
    render_metrics: Callable[[], bytes]
    status: Callable[[], Awaitable[dict[str, Any]]]
    unlock: Unlock | None = None
    api_key: bytes | None = None


HOOKS = web.AppKey("admin_hooks", AdminHooks)
MAX_UNLOCK_BODY = 4096


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    status, report = request.app[HOOKS].readiness.evaluate()
    return web.json_response(report, status=status, headers={"Cache-Control": "no-store"})


async def status(request: web.Request) -> web.Response:
    report = await request.app[HOOKS].status()
    return web.json_response(report, dumps=_pretty, headers={"Cache-Control": "no-store"})


def _pretty(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=False) + "\n"


async def metrics(request: web.Request) -> web.Response:
    body = request.app[HOOKS].render_metrics()
    return web.Response(body=body, content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


def _json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status,
                             headers={"Cache-Control": "no-store"})


async def unlock(request: web.Request) -> web.Response:
    hooks = request.app[HOOKS]
    if hooks.api_key is None or hooks.unlock is None:
        # Off (no admin.api_key, or no token guard): look like a path that does not exist.
        return _json_error(404, "not found")
    if request.method != "POST":
        resp = _json_error(405, "method not allowed")
        resp.headers["Allow"] = "POST"
        return resp
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if not (scheme.lower() == "bearer"
            and hmac.compare_digest(given.strip().encode("utf-8"), hooks.api_key)):
        log.warning("unlock refused for %s: missing or wrong admin key", request.remote or "?")
        resp = _json_error(401, "unauthorized")
        resp.headers["WWW-Authenticate"] = 'Bearer realm="gateway-admin"'
        return resp
    if request.content_length is not None and request.content_length > MAX_UNLOCK_BODY:
        return _json_error(413, "body too large")
    try:
        body = await request.json()
    except ValueError:
        return _json_error(400, 'expected JSON: {"user": ID} or {"address": IP}')
    kinds = [k for k in ("user", "address") if isinstance(body, dict) and k in body]
    if len(kinds) != 1 or not isinstance(body[kinds[0]], str) or not body[kinds[0]]:
        return _json_error(400, 'expected exactly one of {"user": ID} or {"address": IP}')
    kind, value = kinds[0], body[kinds[0]]
    try:
        done = await hooks.unlock(kind, value)
    except ValueError as exc:
        return _json_error(400, str(exc))
    if not done:
        return _json_error(409, "this gateway has no token guard (no token: section)")
    log.warning("unlock: %s lock lifted by an operator via the admin listener", kind)
    return web.json_response({"unlocked": kind}, headers={"Cache-Control": "no-store"})


def create_admin_app(hooks: AdminHooks) -> web.Application:
    app = web.Application(client_max_size=MAX_UNLOCK_BODY)
    app[HOOKS] = hooks
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    app.router.add_route("*", "/unlock", unlock)
    return app
