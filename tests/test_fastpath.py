"""The lean path's own recovery: a request it took up but could not send goes to the full
path whole, and nothing the lean path held for it (its upstream connection, its place on
the client connection) outlives the hand-over."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import load_config_text
from gateway.upstream import UpstreamConnection
from tests.support.gateway import GatewayStarter
from tests.support.process import wait_for
from tests.support.rawhttp import KeepAlive
from tests.support.upstreams import run_recorder


async def test_a_request_the_lean_path_fails_to_start_is_served_by_the_full_path(
        start_gateway: GatewayStarter, monkeypatch: pytest.MonkeyPatch) -> None:
    """Something the lean path did not foresee fails once it holds a pooled connection for
    the request (injected here in the connection's start): the request is served once, by
    the full path; the connection the lean path held is closed, never pooled again with
    half a request on it; the next request on the same client connection takes the lean
    path again."""
    async with run_recorder() as rec:
        gw = await start_gateway(load_config_text(f"""
listen: {{host: 127.0.0.1, port: 0}}
access_log: false
routes:
  - prefix: /
    upstream: {rec.url}/
""", env={}))
        client = await KeepAlive.open(gw.port)
        try:
            warm = await client.request("GET", "/warm")  # leaves one idle connection
            assert warm.status == 200, warm

            original = UpstreamConnection.start_cb
            lean_starts: list[str] = []

            def fail_once(conn: UpstreamConnection, head: bytes, **kw: Any) -> None:
                lean_starts.append(head.split(b" ", 2)[1].decode())
                if len(lean_starts) == 1:
                    raise RuntimeError("injected")
                original(conn, head, **kw)

            monkeypatch.setattr(UpstreamConnection, "start_cb", fail_once)
            first = await client.request("GET", "/failed-lean")
            assert first.status == 200 and first.body.endswith(b"GET /failed-lean\n"), first
            # The idle connection the lean path took is closed, unused.
            await wait_for(lambda: rec.conns[0].closed, what="the held connection closed")
            second = await client.request("GET", "/next")
            assert second.status == 200 and second.body.endswith(b"GET /next\n"), second
        finally:
            await client.close()
    assert lean_starts == ["/failed-lean", "/next"]  # the lean path took both
    assert [r.target for r in rec.requests] == ["/warm", "/failed-lean", "/next"]
    assert [r.target for r in rec.conns[0].requests] == ["/warm"]  # then closed, unused
