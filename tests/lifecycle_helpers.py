"""Helpers for the observability and lifecycle tests: gateway subprocesses, logs, metrics.

``start_gateway_proc`` runs ``python -m gateway [--log-format json] run -c FILE`` with stderr
in a file and waits for the "listening on ... admin on ..." line, so both the public and the
admin address are known even with port 0. ``KeepAlive`` is one raw client connection that is
reused for several requests (to show that a reload reaches already-open connections).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.gwhelpers import PROJECT, PYTHON, GatewayProcess, RawResponse

_LISTEN_RE = re.compile(r"listening on (https?://[^\s,\"]+)")
_ADMIN_RE = re.compile(r"admin on (https?://[^\s,\"]+)")


# ------------------------------------------------------------------ waiting


async def wait_for(predicate: Callable[[], bool | Awaitable[bool]], within: float = 5.0,
                   interval: float = 0.02, what: str = "condition") -> None:
    """Poll ``predicate`` (sync or async) until true; fail the test after ``within`` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(interval)


def port_accepts(port: int, host: str = "127.0.0.1") -> bool:
    """Does a TCP connect to host:port succeed right now?"""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def children(pid: int) -> list[int]:
    """The direct child processes of ``pid`` (Linux /proc)."""
    out: list[int] = []
    task_dir = Path(f"/proc/{pid}/task")
    with contextlib.suppress(OSError):
        for task in task_dir.iterdir():
            with contextlib.suppress(OSError):
                out += [int(p) for p in (task / "children").read_text().split()]
    return sorted(set(out))


def alive(pid: int) -> bool:
    """Is ``pid`` a live process (not a zombie)?"""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# ------------------------------------------------------------------ gateway subprocess


def flat(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """An ECS document with nested objects as dotted keys: ``{"a": {"b": 1}}`` -> ``a.b``."""
    out: dict[str, Any] = {}
    for key, value in doc.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat(value, name + "."))
        else:
            out[name] = value
    return out


@dataclass
class GatewayProc(GatewayProcess):
    """A gateway process as in ``tests.gwhelpers``, plus its admin URL and config file."""

    admin_url: str | None = None
    config: Path | None = None

    def records(self) -> list[dict[str, Any]]:
        """The JSON log lines (``--log-format json``); a non-JSON line fails the test."""
        out = []
        for line in self.log_text().splitlines():
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    raise AssertionError(f"a log line is not JSON: {line!r}") from None
        return out

    def access(self) -> list[dict[str, Any]]:
        """The access lines, flattened to ECS's dotted names (``http.response.status_code``)."""
        return [flat(r) for r in self.records() if flat(r).get("log.logger") == "gateway.access"]

    async def wait_log(self, needle: str, within: float = 5.0, count: int = 1) -> None:
        await wait_for(lambda: self.log_text().count(needle) >= count, within,
                       what=f"{needle!r} in the gateway log")

    async def kill(self) -> None:
        """Last resort in a test's cleanup: the whole process group."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()


async def start_gateway_proc(config_text: str, workdir: Path, *run_args: str,
                             log_format: str = "json", name: str = "gateway"
                             ) -> GatewayProc:
    """Start a gateway process (own process group) and wait until it listens."""
    conf = workdir / f"{name}.yaml"
    conf.write_text(config_text, encoding="utf-8")
    log = workdir / f"{name}.log"
    with log.open("wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            PYTHON, "-m", "gateway", "--log-format", log_format, "run", "-c", str(conf),
            *(run_args or ("--workers", "1")),
            stdout=sink, stderr=sink, cwd=str(PROJECT), start_new_session=True)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while loop.time() < deadline:
        text = log.read_text(encoding="utf-8", errors="replace")
        m = _LISTEN_RE.search(text)
        if m:
            admin = _ADMIN_RE.search(text)
            return GatewayProc(proc, m.group(1), log, admin.group(1) if admin else None, conf)
        if proc.returncode is not None:
            break
        await asyncio.sleep(0.03)
    if proc.returncode is None:
        proc.kill()
    await proc.wait()
    raise AssertionError(f"the gateway did not start:\n{log.read_text()}")


async def gateway_cli(*args: str) -> tuple[int, str, str]:
    """Run ``python -m gateway ARGS`` without blocking the loop: (code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "gateway", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=str(PROJECT))
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


# ------------------------------------------------------------------ metrics


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels`` (0 if none)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                total += sample.value
    return total


def has_metric(text: str, name: str, **labels: str) -> bool:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                return True
    return False


async def scrape(http: aiohttp.ClientSession, admin_url: str) -> str:
    async with http.get(admin_url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        return await resp.text()


async def readyz(http: aiohttp.ClientSession, admin_url: str) -> tuple[int, dict[str, Any]]:
    async with http.get(admin_url + "/readyz") as resp:
        return resp.status, await resp.json()


# ------------------------------------------------------------------ raw keep-alive client


class KeepAlive:
    """One client connection reused for several requests (HTTP/1.1 keep-alive)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1") -> KeepAlive:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    @property
    def local_port(self) -> int:
        port: int = self.writer.get_extra_info("sockname")[1]
        return port

    async def request(self, method: str, path: str, *headers: str, body: bytes = b"",
                      within: float = 5.0) -> RawResponse:
        lines = [f"{method} {path} HTTP/1.1", "Host: gw.test", *headers]
        if body or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(body)}")
        data = ("\r\n".join([*lines, "", ""])).encode("latin-1") + body
        self.writer.write(data)
        await self.writer.drain()
        async with asyncio.timeout(within):
            return await self._read_response(method == "HEAD")

    async def _read_response(self, head_only: bool) -> RawResponse:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        pairs = []
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                pairs.append((name.strip(), value.strip()))
        resp = RawResponse(status, pairs, b"")
        if head_only or status in (204, 304) or 100 <= status < 200:
            return resp
        if (resp.header("Transfer-Encoding") or "").lower() == "chunked":
            body = bytearray()
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    while await self.reader.readuntil(b"\r\n") != b"\r\n":
                        pass  # trailers
                    break
                body += (await self.reader.readexactly(size + 2))[:size]
            resp.body = bytes(body)
        elif resp.header("Content-Length") is not None:
            resp.body = await self.reader.readexactly(int(resp.header("Content-Length") or 0))
        else:
            resp.body = await self.reader.read()
        return resp

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


async def wait_healthy(admin_url: str, within: float = 20.0) -> None:
    """Wait until ``admin_url``/healthz answers 200 (a worker is up)."""
    async with aiohttp.ClientSession() as http:
        async def healthy() -> bool:
            try:
                async with http.get(admin_url + "/healthz",
                                    timeout=aiohttp.ClientTimeout(total=1)) as resp:
                    return resp.status == 200
            except (aiohttp.ClientError, TimeoutError):
                return False

        await wait_for(healthy, within, interval=0.1, what=f"{admin_url}/healthz")
