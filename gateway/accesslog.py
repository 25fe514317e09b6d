"""One access-log line per request through the ``gateway.access`` logger (text or JSON).

Never logged: query strings, cookies, tokens, Authorization. The path is logged without its
query string because integrators put tokens there.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from gateway.proxy import Exchange
    from gateway.routing import CompiledRoute

access_logger = logging.getLogger("gateway.access")


class JsonFormatter(logging.Formatter):
    """A log record as one JSON object; ``extra={"fields": {...}}`` is merged in."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(out, ensure_ascii=False, separators=(",", ":"))


class AccessLog:
    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled

    def log(self, request: web.BaseRequest, client_ip: str, request_id: str,
            resp: web.StreamResponse | None, route: CompiledRoute | None, ex: Exchange,
            duration: float) -> None:
        if not self.enabled or not access_logger.isEnabledFor(logging.INFO):
            return
        status = resp.status if resp is not None else 499
        if not ex.upstream_status and isinstance(resp, web.Response) and resp.body is not None:
            ex.bytes_out = len(resp.body) if isinstance(resp.body, bytes | bytearray) else 0
        self.log_exchange(client_ip, request_id, request.method, request.raw_path,
                          request.version.minor, status, route, ex, duration)

    def log_exchange(self, client_ip: str, request_id: str, method: str, raw_path: str,
                     minor: int, status: int, route: CompiledRoute | None, ex: Exchange,
                     duration: float) -> None:
        if not self.enabled or not access_logger.isEnabledFor(logging.INFO):
            return
        path = raw_path.partition("?")[0]
        route_name = route.name if route else None
        fields = {
            "request_id": request_id,
            "client_ip": client_ip,
            "method": method,
            "path": path,
            "status": status,
            "bytes_in": ex.bytes_in,
            "bytes_out": ex.bytes_out,
            "duration_ms": round(duration * 1000, 3),
            "route": route_name,
            "upstream_status": ex.upstream_status or None,
            "upstream_ms": round(ex.upstream_time * 1000, 3) if ex.upstream_status else None,
        }
        if ex.error:
            fields["error"] = ex.error
        access_logger.info(
            "%s %s %s HTTP/1.%d %d %d/%d %.1fms route=%s upstream=%s rid=%s",
            client_ip, method, path, minor, status, ex.bytes_in, ex.bytes_out,
            duration * 1000, route_name, ex.upstream_status or "-", request_id,
            extra={"fields": fields},
        )
