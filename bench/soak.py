"""Soak: mixed traffic with injected faults through a gateway, for minutes on end.

It starts an upstream (in this process) and a gateway (``python -m gateway run``, its own
process, so its RSS is its own), then keeps a few clients busy with a weighted mix:

    small GET, 1 MiB GET, 64 KiB POST, WebSocket session          (must all succeed)
    upstream reset mid-body, slow upstream (0.3 s), refused route  (faults: must fail *cleanly*)

A fault must end the way the gateway promises (reset: the client sees a truncated body or a
cut connection; refused: 502; slow: a normal 200); anything else counts as an unexpected
error. Every ``--interval`` seconds it prints one line: requests and errors per kind, latency
percentiles of the normal kinds, and the gateway's RSS and open file descriptors. At the
end it prints (and with ``--json`` writes) a summary and exits 1 on unexpected errors or
when the gateway's RSS grew by more than ``--max-rss-growth`` MiB after warm-up.

    .venv/bin/python bench/soak.py                    # 10 minutes
    .venv/bin/python bench/soak.py --duration 20      # CI-sized
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    PROJECT_DIR,
    Procs,
    fd_count,
    free_port,
    gateway_argv,
    rss_kib,
    wait_port,
)

MIB = 1 << 20
LARGE = MIB
POST_SIZE = 64 * 1024
NORMAL = ("small", "large", "post", "ws", "slow")
# kind -> weight
MIX = {"small": 50, "large": 8, "post": 15, "ws": 5, "reset": 7, "slow": 7, "refused": 8}
_BLOCK = bytes(range(256)) * 256


# ------------------------------------------------------------------ the upstream


async def upstream_handler(request: web.BaseRequest) -> web.StreamResponse:
    path = request.path
    if path == "/small":
        return web.Response(text="ok " * 20)
    if path == "/large":
        resp = web.StreamResponse()
        resp.content_length = LARGE
        await resp.prepare(request)
        for _ in range(LARGE // len(_BLOCK)):
            await resp.write(_BLOCK)
        return resp
    if path == "/post":
        n = 0
        async for chunk in request.content.iter_any():
            n += len(chunk)
        return web.Response(text=str(n))
    if path == "/slow":
        await asyncio.sleep(0.3)
        return web.Response(text="slow")
    if path == "/reset":
        resp = web.StreamResponse()
        resp.content_length = 10 * len(_BLOCK)
        await resp.prepare(request)
        await resp.write(_BLOCK)
        assert request.transport is not None
        request.transport.abort()  # the upstream dies mid-body
        return resp
    if path == "/ws":
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str(msg.data)
        return ws
    return web.Response(status=404)


# ------------------------------------------------------------------ the clients


class Unexpected(Exception):
    """An outcome the gateway does not promise."""


@dataclass
class Stats:
    ok: Counter[str] = field(default_factory=Counter)
    expected_fail: Counter[str] = field(default_factory=Counter)
    unexpected: Counter[str] = field(default_factory=Counter)
    samples: list[str] = field(default_factory=list)
    latency: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def reset_window(self) -> None:
        self.latency = defaultdict(list)


async def one(session: aiohttp.ClientSession, base: str, kind: str) -> bool:
    """Run one operation; True when it succeeded, False for a clean expected failure."""
    timeout = aiohttp.ClientTimeout(total=10)
    if kind in ("small", "slow"):
        async with session.get(f"{base}/{kind}", timeout=timeout) as resp:
            body = await resp.read()
            if resp.status != 200 or not body:
                raise Unexpected(f"{kind}: {resp.status}")
        return True
    if kind == "large":
        async with session.get(f"{base}/large", timeout=timeout) as resp:
            n = 0
            async for chunk in resp.content.iter_any():
                n += len(chunk)
            if resp.status != 200 or n != LARGE:
                raise Unexpected(f"large: {resp.status}, {n} bytes")
        return True
    if kind == "post":
        async with session.post(f"{base}/post", data=os.urandom(POST_SIZE),
                                timeout=timeout) as resp:
            text = await resp.text()
            if resp.status != 200 or text != str(POST_SIZE):
                raise Unexpected(f"post: {resp.status} {text[:40]!r}")
        return True
    if kind == "ws":
        async with session.ws_connect(f"{base}/ws", timeout=aiohttp.ClientWSTimeout(ws_close=5)
                                      ) as ws:
            for i in range(5):
                await ws.send_str(f"m{i}")
                msg = await asyncio.wait_for(ws.receive(), 5)
                if msg.type != aiohttp.WSMsgType.TEXT or msg.data != f"m{i}":
                    raise Unexpected(f"ws: {msg.type} {msg.data!r}")
        return True
    if kind == "refused":
        async with session.get(f"{base}/refused/x", timeout=timeout) as resp:
            await resp.read()
            if resp.status != 502:
                raise Unexpected(f"refused: {resp.status}")
        return False
    if kind == "reset":
        try:
            async with session.get(f"{base}/reset", timeout=timeout) as resp:
                body = await resp.read()
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError,
                aiohttp.ClientOSError):
            return False  # the truncation was visible: as promised
        raise Unexpected(f"reset: a whole-looking answer {resp.status}, {len(body)} bytes")
    raise AssertionError(kind)


async def client(session: aiohttp.ClientSession, base: str, stats: Stats, stop: asyncio.Event,
                 rng: random.Random) -> None:
    kinds, weights = zip(*MIX.items(), strict=True)
    while not stop.is_set():
        kind = rng.choices(kinds, weights)[0]
        start = time.monotonic()
        try:
            if await one(session, base, kind):
                stats.ok[kind] += 1
            else:
                stats.expected_fail[kind] += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every other outcome is a finding
            stats.unexpected[kind] += 1
            if len(stats.samples) < 20:
                stats.samples.append(f"{kind}: {exc!r}"[:300])
        if kind in NORMAL:
            stats.latency[kind].append(time.monotonic() - start)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


# ------------------------------------------------------------------ the run


def gateway_config(port: int, upstream: int, refused: int) -> str:
    return f"""\
listen:
  host: 127.0.0.1
  port: {port}
  workers: 1
access_log: false
limits:
  client_max_body_size: 0
timeouts:
  connect: 2s
  read: 3s
  client_header: 5s
  client_body: 5s
  shutdown_grace: 2s
routes:
  - prefix: /refused/
    upstream: http://127.0.0.1:{refused}/
  - prefix: /
    upstream: http://127.0.0.1:{upstream}/
"""


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    server = web.Server(upstream_handler)
    runner = web.ServerRunner(server, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    up_port = runner.addresses[0][1]
    refused = free_port()  # nothing listens there
    gw_port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    conf = workdir / "gateway.yaml"
    conf.write_text(gateway_config(gw_port, up_port, refused))
    procs = Procs(workdir)
    proc = procs.start("gateway", gateway_argv(conf), cwd=PROJECT_DIR)
    report: dict[str, Any] = {"duration": args.duration, "intervals": []}
    try:
        if not wait_port(gw_port, 30, proc):
            raise SystemExit(f"the gateway did not start:\n{procs.log_tail('gateway')}")
        base = f"http://127.0.0.1:{gw_port}"
        stats = Stats()
        stop = asyncio.Event()
        rng = random.Random(args.seed)
        connector = aiohttp.TCPConnector(limit=args.clients * 2)
        async with aiohttp.ClientSession(connector=connector,
                                         cookie_jar=aiohttp.DummyCookieJar()) as session:
            tasks = [asyncio.ensure_future(client(session, base, stats, stop,
                                                  random.Random(rng.random())))
                     for _ in range(args.clients)]
            start = time.monotonic()
            baseline: int | None = None
            peak = 0
            next_report = start + args.interval
            while time.monotonic() - start < args.duration:
                await asyncio.sleep(max(0.0, min(next_report, start + args.duration)
                                        - time.monotonic()))
                if proc.poll() is not None:
                    raise SystemExit(f"the gateway died:\n{procs.log_tail('gateway')}")
                rss = rss_kib(proc.pid)
                peak = max(peak, rss)
                if baseline is None:
                    baseline = rss  # after the first interval: pools and caches warmed up
                line = {
                    "t": round(time.monotonic() - start, 1),
                    "requests": sum(stats.ok.values()) + sum(stats.expected_fail.values()),
                    "unexpected": sum(stats.unexpected.values()),
                    "rss_mib": round(rss / 1024, 1),
                    "fds": fd_count(proc.pid),
                    "p50_ms": {k: round(percentile(v, 0.5) * 1000, 1)
                               for k, v in stats.latency.items()},
                    "p99_ms": {k: round(percentile(v, 0.99) * 1000, 1)
                               for k, v in stats.latency.items()},
                }
                report["intervals"].append(line)
                print(json.dumps(line), flush=True)
                stats.reset_window()
                next_report += args.interval
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
        final = rss_kib(proc.pid)
        report.update({
            "ok": dict(stats.ok), "expected_failures": dict(stats.expected_fail),
            "unexpected": dict(stats.unexpected), "unexpected_samples": stats.samples,
            "rss_baseline_mib": round((baseline or final) / 1024, 1),
            "rss_final_mib": round(final / 1024, 1), "rss_peak_mib": round(peak / 1024, 1),
            "rss_growth_mib": round((final - (baseline or final)) / 1024, 1),
            "gateway_alive": proc.poll() is None,
        })
    finally:
        procs.stop_all()
        await runner.cleanup()
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("--interval", type=float, default=0.0,
                        help="seconds between report lines (default: duration/10, 2..30)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--max-rss-growth", type=float, default=64.0,
                        help="MiB the gateway may grow after warm-up before the run fails")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args()
    if not args.interval:
        args.interval = min(30.0, max(2.0, args.duration / 10))
    report = asyncio.run(soak(args))
    failures = []
    if report["unexpected"]:
        failures.append(f"unexpected errors: {report['unexpected']}")
    if report["rss_growth_mib"] > args.max_rss_growth:
        failures.append(f"gateway RSS grew {report['rss_growth_mib']} MiB")
    if not report["gateway_alive"]:
        failures.append("the gateway exited")
    report["failures"] = failures
    summary = json.dumps(report, indent=None)
    print(summary, flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.flush()
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
