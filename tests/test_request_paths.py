"""The fast path and the full path answer alike: regressions of the ways they once differed
(pipelining past aiohttp's queue limit is pinned in tests/test_aiohttp_contract.py).

Every test here runs on both paths (the ``path`` fixture); where the fast path is meant
to serve, the test also checks that it did, so a fast path that silently declines cannot
make a test pass.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.conformance.harness import PathSwitch
from tests.support.gateway import ROUTES, GatewayFactory
from tests.support.rawhttp import get, parse_response, read_response_head_and_body

pytestmark = pytest.mark.usefixtures("path")

CORS = ROUTES + """
cors:
  allow_origins: [https://www.example.com]
"""


def served_as_expected(path: PathSwitch, marker: str) -> None:
    assert path.served_fast(marker) == (path.name == "fast"), path.taken[-5:]


async def test_vary_origin_on_every_response_of_a_kept_alive_connection(
        gateway: GatewayFactory, path: PathSwitch) -> None:
    """With CORS on, a proxied answer depends on Origin even when the request had none: a
    shared cache must not hand the CORS-less copy to a cross-origin page."""
    gw = await gateway(CORS)
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    try:
        for i in range(3):
            writer.write(b"GET /app/vary%d HTTP/1.1\r\nHost: gw.test\r\n\r\n" % i)
            head, _ = await read_response_head_and_body(reader)
            assert head.startswith(b"HTTP/1.1 200 "), head
            vary = [line for line in head.lower().split(b"\r\n") if line.startswith(b"vary:")]
            assert vary and b"origin" in b",".join(vary), (i, head)
    finally:
        writer.close()
    served_as_expected(path, "/app/vary2")


@pytest.mark.parametrize(("target", "status", "text"), [
    ("/app/do/reset", 502, b"502 Bad Gateway: the upstream could not be reached\n"),
    ("/app/do/slow?delay=3", 504, b"504 Gateway Timeout: the upstream did not answer in time\n"),
])
async def test_upstream_errors_are_one_answer(gateway: GatewayFactory, path: PathSwitch,
                                              target: str, status: int, text: bytes) -> None:
    """A 502/504 reads the same whichever path met the failure (here on a warm pool, which
    is where the fast path serves)."""
    gw = await gateway(ROUTES + "timeouts: {read: 300ms}\n")
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    try:
        writer.write(get("/app/warm").replace(b"Connection: close\r\n", b""))
        await read_response_head_and_body(reader)
        writer.write(b"GET %s HTTP/1.1\r\nHost: gw.test\r\n\r\n" % target.encode())
        head, body = await read_response_head_and_body(reader)
    finally:
        writer.close()
    resp = parse_response(head + body)
    assert resp.status == status
    assert head.startswith(b"HTTP/1.1 %d " % status)
    assert body == text
    names = sorted(name.lower() for name, _ in resp.headers)
    assert names == ["content-length", "content-type", "date", "server",
                     "x-content-type-options", "x-request-id"], names
    assert resp.header("Server") == "cec-gateway"
    assert resp.header("Content-Type") == "text/plain; charset=utf-8"
    assert resp.header("X-Content-Type-Options") == "nosniff"
    served_as_expected(path, "/app/do/")
