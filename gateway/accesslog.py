"""One access-log line per request through the ``gateway.access`` logger.

With ``--log-format json`` the line is an ECS document (gateway/logs.py); the fields are
built here from values already at hand (one nested dict, no formatter walk), named as in the
Elastic Common Schema, with the gateway's own facts under ``gateway.*``. With the text
format the same facts make one nginx-like line.

Never logged: query strings, cookies, tokens, Authorization, or any header value except two
that every proxy's access log carries, each cleaned first: ``User-Agent`` (printable ASCII,
at most 256 characters, others replaced by ``?``) and ``Host`` (only when it is a well-formed
host name or address with an optional port; otherwise left out). The path is logged without
its query string because integrators put tokens there.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.proxy import Exchange
    from gateway.routing import CompiledRoute

access_logger = logging.getLogger("gateway.access")

_UA_MAX = 256
_UNSAFE = re.compile(r'[^\x20-\x7e]|["\\]')
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9_.-]{1,253})(?::\d{1,5})?")


def clean_user_agent(value: str | None) -> str | None:
    """The User-Agent as logged: printable ASCII, no quotes or backslashes, 256 at most."""
    if not value:
        return None
    return _UNSAFE.sub("?", value[:_UA_MAX])


def clean_host(value: str | None) -> str | None:
    """The Host header as logged, lower-case, or None unless it is a well-formed host."""
    if not value or len(value) > 261 or not _HOST.fullmatch(value):
        return None
    return value.lower()


def split_host(host: str) -> tuple[str, int | None]:
    """``example.com:8443`` -> (``example.com``, 8443); ``[::1]`` -> (``::1``, None)."""
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit() and (not name.startswith("[") or name.endswith("]")):
        return name.strip("[]"), int(port)
    return host.strip("[]"), None


def tls_version(ex: Exchange) -> str | None:
    """``1.3`` for a TLS 1.3 client connection, None for plain HTTP."""
    transport = ex.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return None
    version: str | None = ssl_object.version()  # "TLSv1.3"
    return version.removeprefix("TLSv") if version else None


class AccessLog:
    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled

    def log_exchange(self, client_ip: str, request_id: str, method: str, raw_path: str,
                     minor: int, status: int, route: CompiledRoute | None, ex: Exchange,
                     duration: float) -> None:
        if not self.enabled or not access_logger.isEnabledFor(logging.INFO):
            return
        path = raw_path.partition("?")[0]
        headers = ex.headers
        user_agent = clean_user_agent(headers.get("User-Agent")) if headers is not None else None
        host = clean_host(headers.get("Host")) if headers is not None else None
        http: dict[str, Any] = {
            "version": f"1.{minor}",
            "request": {"id": request_id, "method": method, "body": {"bytes": ex.bytes_in}},
            "response": {"status_code": status, "body": {"bytes": ex.bytes_out}},
        }
        url: dict[str, Any] = {"path": path}
        fields: dict[str, Any] = {
            "event": {"dataset": "gateway.access", "duration": round(duration * 1e9)},
            "client": {"ip": client_ip},
            "http": http,
            "url": url,
        }
        if host is not None:
            url["domain"], port = split_host(host)
            if port is not None:
                url["port"] = port
        if user_agent is not None:
            fields["user_agent"] = {"original": user_agent}
        tls = tls_version(ex)
        if tls is not None:
            fields["tls"] = {"version": tls, "version_protocol": "tls"}
        if route is not None:
            up = route.upstream
            fields["destination"] = {"address": up.host, "port": up.port}
            gateway: dict[str, Any] = {"route": route.name}
            fields["gateway"] = gateway
            if ex.upstream_status:
                gateway["upstream"] = {"status_code": ex.upstream_status,
                                       "duration": round(ex.upstream_time * 1e9)}
        trace = ex.trace
        ids = trace.ids() if trace is not None else None
        if ids is not None:
            fields["trace"] = {"id": ids[0]}
            fields["span"] = {"id": ids[1]}
        if ex.error:
            fields["error"] = {"message": ex.error}
        access_logger.info(
            '%s %s %s HTTP/1.%d %d %d/%d %.1fms host=%s ua="%s" tls=%s route=%s upstream=%s%s '
            "rid=%s%s",
            client_ip, method, path, minor, status, ex.bytes_in, ex.bytes_out,
            duration * 1000, host or "-", user_agent or "-", tls or "-",
            route.name if route else None, ex.upstream_status or "-",
            f"@{route.upstream.host_header}" if route else "", request_id,
            f" trace={ids[0]} span={ids[1]}" if ids else "",
            extra={"access": fields},
        )
