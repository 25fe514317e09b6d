"""Issue 14: token mode keeps bounded state, whatever anonymous visitors send.

100,000 cookie-less chat-script POSTs in token mode with ``identity.fallback: guest``: before,
each one minted and stored a token for ``token.ttl`` (about 570 bytes each, never capped).
Now a guest without a valid cookie gets no token (a 307 to the same target with the new guest
cookie, which a browser follows), so the gateway process's resident memory (read from /proc)
must not grow by more than 10 MiB. The requests are pipelined raw bytes over
a few connections to a raw upstream, so the run is bounded by the gateway's own speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

from tests.integration.conftest import (
    CLIENT,
    PROJECT,
    Site,
    Upstream,
    free_port,
    third_user_data,
    token_config,
)

REQUESTS = 100_000
CONNECTIONS = 4
BATCH = 250  # requests written at once on a connection before reading their answers
MAX_GROWTH = 10 * 1024 * 1024


class _RawUpstream(asyncio.Protocol):
    """Answers every request (pipelined or not) with a tiny 200; records nothing."""

    answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/javascript\r\n"
              b"Content-Length: 2\r\n\r\nok")

    forwarded = 0

    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        answers = 0
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = bytes(buf[:end]).lower()
            length = 0
            marker = head.find(b"\r\ncontent-length:")
            if marker >= 0:
                line_end = head.find(b"\r\n", marker + 2)
                value = head[marker + 17: line_end if line_end >= 0 else len(head)]
                length = int(value.strip())
            if len(buf) < end + 4 + length:
                break
            del buf[: end + 4 + length]
            answers += 1
        _RawUpstream.forwarded += answers
        if answers and self.transport is not None:
            self.transport.write(self.answer * answers)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc status")


@contextlib.asynccontextmanager
async def gateway_pid(config_text: str, workdir: Path, port: int) -> AsyncIterator[int]:
    """``python -m gateway run`` (one process) until the context ends; yields its pid."""
    conf, log = workdir / "gateway.yaml", workdir / "gateway.log"
    conf.write_text(config_text, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CEC_", "GATEWAY_"))}
    with log.open("wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "run", "-c", str(conf),
            stdout=sink, stderr=sink, cwd=str(PROJECT), env=env)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:
            assert proc.returncode is None, log.read_text(errors="replace")
            assert loop.time() < deadline, log.read_text(errors="replace")
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            await asyncio.sleep(0.05)
        yield proc.pid
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def blast(port: int, request: bytes, count: int) -> Counter[int]:
    """Send ``count`` copies of ``request`` pipelined in batches; the answers' statuses."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    statuses: Counter[int] = Counter()
    buf = b""
    try:
        sent = 0
        while sent < count:
            n = min(BATCH, count - sent)
            writer.write(request * n)
            sent += n
            while n:
                end = buf.find(b"\r\n\r\n")
                if end >= 0:
                    head = buf[:end].lower()
                    marker = head.find(b"\r\ncontent-length:")
                    length = 0
                    if marker >= 0:
                        stop = head.find(b"\r\n", marker + 2)
                        length = int(head[marker + 17: stop if stop >= 0 else None])
                    if len(buf) >= end + 4 + length:
                        statuses[int(head[9:12])] += 1
                        buf = buf[end + 4 + length:]
                        n -= 1
                        continue
                chunk = await asyncio.wait_for(reader.read(256 * 1024), 30)
                assert chunk, f"the gateway closed the connection after {statuses}"
                buf += chunk
    finally:
        writer.close()
    return statuses


async def test_cookieless_posts_in_token_mode_keep_memory_flat(
        site: Site, tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    upstream = await loop.create_server(_RawUpstream, "127.0.0.1", 0)
    cec_port = upstream.sockets[0].getsockname()[1]
    port = free_port()
    config = token_config(Upstream(f"http://127.0.0.1:{cec_port}"), site, fallback=True,
                          port=port) + "access_log: false\n"
    body = json.dumps(third_user_data()).encode()
    request = (f"POST {CLIENT}?t=1 HTTP/1.1\r\nHost: www.example.com\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
               ).encode() + body
    try:
        async with gateway_pid(config, tmp_path, port) as pid:
            # Warm up (imports, pools, allocator arenas), then measure from there.
            assert sum((await blast(port, request, 2000)).values()) == 2000
            before = rss_bytes(pid)
            started = loop.time()
            per = REQUESTS // CONNECTIONS
            answered = await asyncio.gather(*(blast(port, request, per)
                                              for _ in range(CONNECTIONS)))
            elapsed = loop.time() - started
            after = rss_bytes(pid)
    finally:
        upstream.close()
        await upstream.wait_closed()
    growth = after - before
    assert growth < MAX_GROWTH, (
        f"RSS grew by {growth / 2**20:.1f} MiB over {REQUESTS} cookie-less POSTs "
        f"({before / 2**20:.1f} -> {after / 2**20:.1f} MiB, {elapsed:.1f}s)")
    # Each one was answered 307 (retry with the guest cookie just set); none was forwarded.
    assert sum(answered, Counter()) == {307: REQUESTS}
    assert _RawUpstream.forwarded == 0
