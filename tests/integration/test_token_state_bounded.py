"""Issue 14: token mode keeps bounded state, whatever anonymous visitors send.

100,000 cookie-less chat-script POSTs in token mode with ``identity.fallback: guest``: before,
each one minted and stored a token for ``token.ttl`` (about 570 bytes each, never capped).
Now a guest without a valid cookie gets no token (a 307 to the same target with the new guest
cookie, which a browser follows), so the gateway process's resident memory (read from /proc)
must not grow by more than 10 MiB. The requests are pipelined raw bytes over
a few connections, so the run is bounded by the gateway's own speed.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

from tests.integration.conftest import (
    CLIENT,
    Site,
    third_user_data,
    token_config,
)
from tests.support.ports import free_port
from tests.support.process import clean_env, gateway_process, proc_memory
from tests.support.rawhttp import read_response
from tests.support.upstreams import RawRecorder

REQUESTS = 100_000
CONNECTIONS = 4
BATCH = 250  # requests written at once on a connection before reading their answers
MAX_GROWTH = 10 * 1024 * 1024


async def blast(port: int, request: bytes, count: int) -> Counter[int]:
    """Send ``count`` copies of ``request`` pipelined in batches; the answers' statuses."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    statuses: Counter[int] = Counter()
    try:
        for sent in range(0, count, BATCH):
            n = min(BATCH, count - sent)
            writer.write(request * n)
            async with asyncio.timeout(30):
                for _ in range(n):
                    resp = await read_response(reader)
                    assert resp is not None, f"the gateway closed the connection after {statuses}"
                    statuses[resp.status] += 1
    finally:
        writer.close()
    return statuses


async def test_cookieless_posts_in_token_mode_keep_memory_flat(
        cec: RawRecorder, site: Site, tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    port = free_port()
    config = token_config(cec, site, fallback=True, port=port) + "access_log: false\n"
    body = json.dumps(third_user_data()).encode()
    request = (f"POST {CLIENT}?t=1 HTTP/1.1\r\nHost: www.example.com\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
               ).encode() + body
    async with gateway_process(config, tmp_path, one_worker=False, env=clean_env()) as gw:
        pid = gw.pid
        # Warm up (imports, pools, allocator arenas), then measure from there.
        assert sum((await blast(port, request, 2000)).values()) == 2000
        before = proc_memory(pid)["VmRSS"]
        started = loop.time()
        per = REQUESTS // CONNECTIONS
        answered = await asyncio.gather(*(blast(port, request, per)
                                          for _ in range(CONNECTIONS)))
        elapsed = loop.time() - started
        after = proc_memory(pid)["VmRSS"]
    growth = after - before
    assert growth < MAX_GROWTH, (
        f"RSS grew by {growth / 2**20:.1f} MiB over {REQUESTS} cookie-less POSTs "
        f"({before / 2**20:.1f} -> {after / 2**20:.1f} MiB, {elapsed:.1f}s)")
    # Each one was answered 307 (retry with the guest cookie just set); none was forwarded.
    assert sum(answered, Counter()) == {307: REQUESTS}
    assert cec.requests == []
