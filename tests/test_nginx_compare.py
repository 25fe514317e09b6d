"""The real nginx with the vendor guide's recipe, side by side with the gateway.

Both proxy to the same echo upstream; what the upstream receives (path, query, body,
X-Forwarded-For, X-Real-IP, Host) is compared. Two regression tests pin the recipe's bugs:
the missing slash really gives ``/service-cloudwebclient/...`` in nginx while the gateway's
config check refuses that route, and the recipe's regex makes a client-written
``X-Forwarded-For: 6.6.6.6`` the X-Real-IP in nginx but never in the gateway.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.errors import ConfigError
from gateway.runtime import Running, serving
from tests.support.gateway import build_config
from tests.support.nginx import needs_nginx, run_nginx
from tests.support.ports import free_port
from tests.support.rawhttp import raw_exchange
from tests.support.upstreams import Echo, Seen

pytestmark = needs_nginx

# The guide's recipe, with upstream hosts replaced by the echo. Server 1 is the recipe
# corrected for its slash bug; server 2 keeps the bug; server 3 replaces the regex with
# realip (trusting 10.0.0.0/8); server 4 is realip trusting loopback too.
NGINX_SERVERS = """

    server {{
        listen 127.0.0.1:{p1};
        location /demo/ {{
            proxy_set_header Host $host;
            set $Real $proxy_add_x_forwarded_for;
            if ($Real ~ (\\d+)\\.(\\d+)\\.(\\d+)\\.(\\d+)\\,(.*)){{
                set $Real $1.$2.$3.$4;
            }}
            proxy_set_header X-Real-IP $Real;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_pass http://127.0.0.1:{echo}/;
        }}
        location /service-cloud/ {{
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_request_buffering off;
            proxy_pass http://127.0.0.1:{echo}/service-cloud/;
        }}
    }}
    server {{
        listen 127.0.0.1:{p2};
        location /service-cloud/ {{
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_request_buffering off;
            proxy_pass http://127.0.0.1:{echo}/service-cloud;
        }}
    }}
    server {{
        listen 127.0.0.1:{p3};
        set_real_ip_from 10.0.0.0/8;
        real_ip_header X-Forwarded-For;
        real_ip_recursive on;
        location /demo/ {{
            proxy_set_header Host $host;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_pass http://127.0.0.1:{echo}/;
        }}
    }}
    server {{
        listen 127.0.0.1:{p4};
        set_real_ip_from 10.0.0.0/8;
        set_real_ip_from 127.0.0.0/8;
        real_ip_header X-Forwarded-For;
        real_ip_recursive on;
        location /demo/ {{
            proxy_set_header Host $host;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_pass http://127.0.0.1:{echo}/;
        }}
    }}
"""

GATEWAY_CONF = """
routes:
  - prefix: /service-cloud/
    upstream: ${ECHO}/service-cloud/
  - prefix: /demo/
    upstream: ${ECHO}/
    preserve_host: true
"""


@dataclass
class Nginx:
    corrected: int
    buggy: int
    realip: int
    realip_loopback: int


@contextlib.asynccontextmanager
async def run_nginx_servers(echo: Echo, tmp: Path) -> AsyncIterator[Nginx]:
    ports = Nginx(free_port(), free_port(), free_port(), free_port())
    servers = NGINX_SERVERS.format(
        echo=echo.port, p1=ports.corrected, p2=ports.buggy, p3=ports.realip,
        p4=ports.realip_loopback)
    async with run_nginx(servers, tmp, ports.realip_loopback):
        yield ports


@pytest.fixture
async def nginx(echo: Echo, tmp_path: Path) -> AsyncIterator[Nginx]:
    async with run_nginx_servers(echo, tmp_path) as ports:
        yield ports


@pytest.fixture
async def gw(echo: Echo) -> AsyncIterator[Running]:
    async with serving(build_config(GATEWAY_CONF, echo)) as running:
        yield running


def request(method: str, target: str, *headers: str, body: bytes = b"",
            host: str = "www.example.com") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Connection: close", *headers]
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def through(port: int, echo: Echo, data: bytes) -> tuple[int, Seen | None]:
    before = len(echo.seen)
    resp = await raw_exchange("127.0.0.1", port, data)
    return resp.status, (echo.seen[-1] if len(echo.seen) > before else None)


def compared(seen: Seen) -> dict[str, object]:
    return {
        "path": seen.path, "query": seen.query, "body_len": seen.body_len,
        "sha256": seen.sha256, "x-forwarded-for": seen.all("X-Forwarded-For"),
        "x-real-ip": seen.all("X-Real-IP"), "host": seen.all("Host"),
    }


BODY = hashlib.sha256(b"seed").digest() * 4000  # 128 kB, binary

CASES = [
    request("GET", "/service-cloud/webclient/chat_client/js/thirdPartyClient.js?&t=1700000000"),
    request("GET", "/service-cloud/rest/a?x=%2F..%2F&y=%E4%B8%AD&z"),
    request("POST", "/service-cloud/rest/chat/v1/send?q=1", "Content-Type: application/json",
            body=BODY),
    request("PUT", "/service-cloud/upload", body=b""),
    request("GET", "/service-cloud/a/../webclient/x.js"),
    request("GET", "/service-cloud/./b//c"),
    request("GET", "/demo/index.html?from=nginx"),
    request("POST", "/demo/form", body=b"a=1&b=2"),
    # (any X-Forwarded-For from the client hits the recipe's regex: see the regression test)
]


@pytest.mark.parametrize("data", CASES, ids=lambda d: d.split(b"\r\n")[0].decode()[:60])
async def test_gateway_sends_what_nginx_sends(nginx: Nginx, gw: Running, echo: Echo,
                                              data: bytes) -> None:
    n_status, n_seen = await through(nginx.corrected, echo, data)
    g_status, g_seen = await through(gw.port, echo, data)
    assert n_status == g_status == 200
    assert n_seen is not None and g_seen is not None
    assert compared(g_seen) == compared(n_seen)


async def test_traversal_out_of_routes_refused_by_both(nginx: Nginx, gw: Running,
                                                       echo: Echo) -> None:
    for target in ("/service-cloud/../etc/passwd", "/service-cloud/%2e%2e/etc/passwd",
                   "/demo/%2e%2e/%2e%2e/etc/passwd"):
        n_status, n_seen = await through(nginx.corrected, echo, request("GET", target))
        g_status, g_seen = await through(gw.port, echo, request("GET", target))
        assert n_seen is None and g_seen is None, target
        assert n_status in (400, 404) and g_status in (400, 404), target


async def test_slash_bug_regression(nginx: Nginx, echo: Echo) -> None:
    """The uncorrected recipe loses a slash in nginx; the gateway refuses such a route."""
    target = "/service-cloud/webclient/chat_client/js/thirdPartyClient.js"
    status, seen = await through(nginx.buggy, echo, request("GET", target))
    assert status == 200 and seen is not None
    assert seen.path == "/service-cloudwebclient/chat_client/js/thirdPartyClient.js"

    buggy = f"""
routes:
  - prefix: /service-cloud/
    upstream: http://127.0.0.1:{echo.port}/service-cloud
"""
    with pytest.raises(ConfigError) as info:
        build_config(buggy, echo)
    text = str(info.value)
    assert "/service-cloudwebclient/chat_client/js/thirdPartyClient.js" in text
    assert f"http://127.0.0.1:{echo.port}/service-cloud/" in text  # the fix


async def test_forged_forwarded_for_regression(nginx: Nginx, gw: Running, echo: Echo) -> None:
    """The recipe's regex believes the client; the gateway (like realip) does not."""
    data = request("GET", "/demo/who", "X-Forwarded-For: 6.6.6.6")
    _, n_seen = await through(nginx.corrected, echo, data)
    assert n_seen is not None
    assert n_seen.all("X-Real-IP") == ["6.6.6.6"]  # the bug, measured

    _, r_seen = await through(nginx.realip, echo, data)
    _, g_seen = await through(gw.port, echo, data)
    assert r_seen is not None and g_seen is not None
    assert g_seen.all("X-Real-IP") == ["127.0.0.1"]
    assert compared(g_seen) == compared(r_seen)


async def test_realip_recursive_matches_nginx(nginx: Nginx, echo: Echo) -> None:
    """Trusting loopback and 10/8, both walk X-Forwarded-For from the right."""
    conf = GATEWAY_CONF + "trusted_proxies: [10.0.0.0/8, 127.0.0.0/8]\n"
    async with serving(build_config(conf, echo)) as gw:
        for xff in ("6.6.6.6, 198.51.100.7, 10.1.1.1", "10.2.2.2, 10.1.1.1", "203.0.113.5",
                    "garbage, 10.1.1.1"):
            data = request("GET", "/demo/who?x=1", f"X-Forwarded-For: {xff}")
            _, n_seen = await through(nginx.realip_loopback, echo, data)
            _, g_seen = await through(gw.port, echo, data)
            assert n_seen is not None and g_seen is not None
            assert g_seen.all("X-Real-IP") == n_seen.all("X-Real-IP"), xff
            assert (g_seen.path, g_seen.query, g_seen.all("Host")) == (
                n_seen.path, n_seen.query, n_seen.all("Host"))
            # nginx appends its $remote_addr *after* realip replaced it; the gateway appends
            # the actual peer, as the issue asks.
            assert g_seen.all("X-Forwarded-For") == [f"{xff}, 127.0.0.1"]
