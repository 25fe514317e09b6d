"""Bodies stream with bounded memory: 128 MiB up and down through a gateway process.

The gateway runs as ``python -m gateway run`` so its memory is its own: the peak resident
size (VmHWM in /proc/<pid>/status) after the transfers may exceed the resident size before
them by less than 64 MiB. Each direction also pauses one side mid-transfer (a slow client,
a slow upstream) so that only flow control, not luck, keeps the memory bounded.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.gateway import ROUTES
from tests.support.process import GatewayProcess, proc_memory, start_gateway_process
from tests.support.upstreams import Echo, pattern_sha256

MiB = 1024 * 1024
SIZE = 128 * MiB
LIMIT = 64 * MiB
BLOCK = bytes(range(256)) * 256  # 64 KiB

pytestmark = pytest.mark.slow


def blocks_sha256(n: int) -> str:
    h = hashlib.sha256()
    for _ in range(n // len(BLOCK)):
        h.update(BLOCK)
    return h.hexdigest()


async def upload_content_length(gw: GatewayProcess, path: str, size: int) -> dict[str, object]:
    """A Content-Length upload written block by block on a raw socket (never all in memory)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(f"PUT {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
                     f"Content-Length: {size}\r\n\r\n".encode())
        for _ in range(size // len(BLOCK)):
            writer.write(BLOCK)
            await writer.drain()
        async with asyncio.timeout(60):
            data = await reader.read()
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    import json

    result: dict[str, object] = json.loads(body)
    return result


async def test_bounded_memory_upload_and_download(tmp_path: Path, echo: Echo) -> None:
    text = ROUTES.replace("${ECHO}", echo.url) + """
listen: {host: 127.0.0.1, port: 0}
limits: {client_max_body_size: 0}
timeouts: {read: 30s, client_body: 30s}
access_log: false
"""
    gw = await start_gateway_process(text, tmp_path)
    try:
        async with aiohttp.ClientSession(auto_decompress=False) as http:
            # warm up: imports, pool, buffers, so the baseline is a running gateway
            for _ in range(3):
                async with http.post(gw.url + "/app/warm", data=BLOCK * 16) as resp:
                    assert resp.status == 200
            await asyncio.sleep(0.2)
            base = proc_memory(gw.pid)["VmRSS"]

            # 1. Content-Length upload to an upstream that pauses before reading
            reply = await upload_content_length(gw, "/app/up?pause=1.5", SIZE)
            assert reply["body_len"] == SIZE
            assert reply["sha256"] == blocks_sha256(SIZE)
            assert echo.seen[-1].header("Content-Length") == str(SIZE)

            # 2. chunked upload
            async def gen() -> AsyncIterator[bytes]:
                for _ in range(SIZE // len(BLOCK)):
                    yield BLOCK

            async with http.post(gw.url + "/app/chunked-up", data=gen()) as resp:
                assert resp.status == 200
                reply = await resp.json()
            assert reply["body_len"] == SIZE
            assert reply["sha256"] == blocks_sha256(SIZE)

            # 3. downloads, Content-Length and chunked, with a client that stalls midway
            for chunked in ("0", "1"):
                h = hashlib.sha256()
                got = 0
                stalled = False
                async with http.get(f"{gw.url}/app/do/download?n={SIZE}&chunked={chunked}"
                                    ) as resp:
                    assert resp.status == 200
                    async for block in resp.content.iter_chunked(256 * 1024):
                        h.update(block)
                        got += len(block)
                        if not stalled and got > 8 * MiB:
                            stalled = True
                            await asyncio.sleep(1.5)
                            during = proc_memory(gw.pid)["VmRSS"]
                            assert during - base < LIMIT, (
                                f"gateway grew by {(during - base) / MiB:.1f} MiB while the "
                                "client was not reading")
                assert got == SIZE
                assert h.hexdigest() == pattern_sha256(SIZE)

        mem = proc_memory(gw.pid)
        growth = mem["VmHWM"] - base
        assert growth < LIMIT, f"gateway peak RSS grew by {growth / MiB:.1f} MiB"
    finally:
        assert await gw.stop() == 0
