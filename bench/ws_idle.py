"""Idle WebSockets through the gateway: how much gateway memory does one proxied connection cost?

One script plays both ends: it starts itself a second time as the upstream (a minimal
WebSocket server: it answers the handshake with a correct 101 and then echoes bytes), starts
a gateway (1 worker) in front of it, opens N client connections through the gateway, and
reads the gateway's RSS (all its processes) before and after. Both ends are raw asyncio
protocols, so the script itself stays small and quick even at 10,000 connections.

Each proxied connection holds two sockets in the gateway (client side and upstream side),
so one gateway process needs 2*N file descriptors; N is capped to what RLIMIT_NOFILE allows
for the gateway's workers and the cap is reported. With ``--workers 2`` the connections are
shared by two processes (SO_REUSEPORT), so 10,000 fit under a hard limit of 20,000.

    python bench/ws_idle.py -n 10000              # prints one JSON object
    python bench/ws_idle.py -n 10000 --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import cast

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    PROJECT_DIR,
    Procs,
    fd_count,
    free_port,
    gateway_argv,
    gateway_config_yaml,
    process_tree,
    raise_nofile,
    rss_kib,
    venv_python,
    wait_port,
)

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_FD_MARGIN = 64  # listening socket, epoll, pipes, stdio, imported module files


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


# ------------------------------------------------------------------ upstream side


class UpstreamWS(asyncio.Protocol):
    """Answers the upgrade, then echoes raw bytes (enough to prove the splice carries data)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.open = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; cast, don't check
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.open:
            self.transport.write(data)
            return
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            return
        key = b""
        for line in self.head[:end].split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"sec-websocket-key":
                key = value.strip()
        if not key:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            self.transport.close()
            return
        self.open = True
        self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                             b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
                             + accept_key(key) + b"\r\n\r\n")
        rest = self.head[end + 4:]
        self.head = b""
        if rest:
            self.transport.write(rest)


async def serve_upstream(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(UpstreamWS, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


# ------------------------------------------------------------------ client side


class ClientWS(asyncio.Protocol):
    def __init__(self, host: str, path: str) -> None:
        loop = asyncio.get_running_loop()
        self.key = base64.b64encode(os.urandom(16))
        self.request = (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                        "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                        "Sec-WebSocket-Key: ").encode() + self.key + b"\r\n\r\n"
        self.upgraded: asyncio.Future[bool] = loop.create_future()
        self.echo: asyncio.Future[bytes] | None = None
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; cast, don't check
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.upgraded.done():
            if self.echo is not None and not self.echo.done():
                self.echo.set_result(data)
            return
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buf[:end]
        ok = head.startswith(b"HTTP/1.1 101") and accept_key(self.key) in head
        self.upgraded.set_result(ok)

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.upgraded.done():
            self.upgraded.set_result(False)
        if self.echo is not None and not self.echo.done():
            self.echo.set_result(b"")


def masked_text_frame(text: bytes) -> bytes:
    mask = os.urandom(4)
    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(text))
    return bytes([0x81, 0x80 | len(text)]) + mask + payload


async def open_many(port: int, count: int, concurrency: int = 200
                    ) -> tuple[list[ClientWS], int]:
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(concurrency)
    opened: list[ClientWS] = []
    failures = 0

    async def one(i: int) -> None:
        nonlocal failures
        async with sem:
            proto = ClientWS(f"127.0.0.1:{port}", f"/ws/{i}")
            try:
                await loop.create_connection(lambda: proto, "127.0.0.1", port)
                ok = await asyncio.wait_for(proto.upgraded, 30)
            except (OSError, TimeoutError):
                ok = False
            if ok:
                opened.append(proto)
            else:
                failures += 1
                if proto.transport is not None:
                    proto.transport.close()

    await asyncio.gather(*(one(i) for i in range(count)))
    return opened, failures


async def check_echo(conns: list[ClientWS], sample: int = 20) -> int:
    """Send a masked text frame on a few connections; count those whose bytes come back."""
    loop = asyncio.get_running_loop()
    ok = 0
    for proto in random.sample(conns, min(sample, len(conns))):
        frame = masked_text_frame(b"ping")
        proto.echo = loop.create_future()
        assert proto.transport is not None
        proto.transport.write(frame)
        try:
            got = await asyncio.wait_for(proto.echo, 5)
        except TimeoutError:
            got = b""
        ok += got == frame
    return ok


def gateway_rss(pid: int) -> int:
    return sum(rss_kib(p) for p in process_tree(pid))


def gateway_fds(pid: int) -> int:
    return sum(fd_count(p) for p in process_tree(pid))


async def measure(gw_pid: int, port: int, count: int) -> dict[str, object]:
    # Warm the code paths (imports, first-use allocations) before the baseline.
    warm, _ = await open_many(port, 20)
    for proto in warm:
        assert proto.transport is not None
        proto.transport.close()
    await asyncio.sleep(1.0)
    before = gateway_rss(gw_pid)
    started = time.monotonic()
    conns, failures = await open_many(port, count)
    open_seconds = time.monotonic() - started
    await asyncio.sleep(2.0)  # let the gateway settle (timers armed, buffers trimmed)
    after = gateway_rss(gw_pid)
    fds = gateway_fds(gw_pid)
    echo_ok = await check_echo(conns)
    held = len(conns)
    for proto in conns:
        if proto.transport is not None:
            proto.transport.close()
    await asyncio.sleep(0.5)
    per_conn = (after - before) / held if held else None
    return {
        "connections": held,
        "failures": failures,
        "open_seconds": round(open_seconds, 2),
        "gateway_rss_before_kib": before,
        "gateway_rss_after_kib": after,
        "gateway_fds_open": fds,
        "per_connection_kib": round(per_conn, 2) if per_conn is not None else None,
        "echo_ok": f"{echo_ok}/{min(20, held)}",
    }


def run(count: int, workdir: Path, workers: int = 1) -> dict[str, object]:
    hard = raise_nofile()
    # SO_REUSEPORT spreads connections by a hash, not exactly evenly: leave each worker 10 %.
    per_worker = max(1, (hard - _FD_MARGIN) // 2)
    cap = per_worker if workers == 1 else int(per_worker * workers * 0.9)
    result: dict[str, object] = {"requested": count, "nofile_limit": hard, "workers": workers}
    if count > cap:
        result["capped_by_nofile"] = True
        count = cap
    procs = Procs(workdir)
    try:
        up_port, gw_port = free_port(), free_port()
        upstream = procs.start("ws-upstream", [venv_python(), str(Path(__file__).resolve()),
                                               "--upstream", "--port", str(up_port)])
        if not wait_port(up_port, proc=upstream):
            raise RuntimeError("the WebSocket upstream did not start:\n"
                               + procs.log_tail("ws-upstream"))
        config = workdir / "ws-gateway.yaml"
        config.write_text(gateway_config_yaml(
            gw_port, [{"prefix": "/", "upstream": f"http://127.0.0.1:{up_port}/"}],
            workers=workers))
        gw = procs.start("ws-gateway", gateway_argv(config, workers=workers), cwd=PROJECT_DIR)
        if not wait_port(gw_port, proc=gw):
            raise RuntimeError("the gateway did not start:\n" + procs.log_tail("ws-gateway"))
        deadline = time.monotonic() + 30
        while len(process_tree(gw.pid)) < workers + (workers > 1) and time.monotonic() < deadline:
            time.sleep(0.1)  # every worker up before the first connection (supervisor + N)
        time.sleep(1.0 if workers > 1 else 0)  # and listening
        with contextlib.suppress(ImportError):
            import uvloop

            uvloop.install()
        result.update(asyncio.run(measure(gw.pid, gw_port, count)))
    finally:
        procs.stop_all()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--connections", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=1, help="gateway worker processes")
    parser.add_argument("--upstream", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.upstream:
        raise_nofile()
        with contextlib.suppress(ImportError):
            import uvloop

            uvloop.install()
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_upstream(args.port))
        return
    with tempfile.TemporaryDirectory(prefix="gwbench-ws-") as tmp:
        result = run(args.connections, Path(tmp), args.workers)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
