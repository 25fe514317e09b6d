"""The gateway as a process: start it, wait for it, read its log, stop it; and waiting in general.

``launch_gateway`` runs ``python -m gateway [--log-format F] run -c FILE [args]`` in its
own process group with stdout and stderr in a file; ``start_gateway_process`` also waits
for the "listening on ..." line, so the public and the admin address are known even with
port 0. ``gateway_process`` is the same as a context that always stops it.
``gateway_cli``/``run_cli`` run one command.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PYTHON = sys.executable
PROJECT = Path(__file__).resolve().parents[2]
_LISTEN_RE = re.compile(r"listening on (https?://[^\s,\"]+)")
_ADMIN_RE = re.compile(r"admin on (https?://[^\s,\"]+)")


def clean_env() -> dict[str, str]:
    """This process's environment without ``CEC_*``/``GATEWAY_*`` (they would fill config)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("CEC_", "GATEWAY_"))}


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


# ------------------------------------------------------------------ processes (Linux /proc)


def children(pid: int) -> list[int]:
    """The direct child processes of ``pid``."""
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


def proc_memory(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of a process in bytes."""
    out = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


# ------------------------------------------------------------------ the gateway process


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
class GatewayProcess:
    proc: asyncio.subprocess.Process
    url: str
    log: Path
    config: Path
    admin_url: str | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

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

    async def stop(self, within: float = 15.0) -> int:
        """SIGTERM, wait up to ``within`` seconds (then SIGKILL); the exit code."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(within):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        assert self.proc.returncode is not None
        return self.proc.returncode

    async def listening(self, within: float = 30.0) -> bool:
        """True once it logs "listening on ..." (``url``/``admin_url`` then known); False when
        it exits first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while loop.time() < deadline:
            text = self.log_text()
            m = _LISTEN_RE.search(text)
            if m:
                admin = _ADMIN_RE.search(text)
                self.url, self.admin_url = m.group(1), admin.group(1) if admin else None
                return True
            if self.proc.returncode is not None:
                return False
            await asyncio.sleep(0.03)
        raise AssertionError(f"neither listening nor exited within {within}s:\n"
                             f"{self.log_text()}")

    async def kill(self) -> None:
        """Last resort in a test's cleanup: the whole process group."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()


async def launch_gateway(config_text: str, workdir: Path, *run_args: str,
                         log_format: str | None = None, name: str = "gateway",
                         env: dict[str, str] | None = None, one_worker: bool = True,
                         command: tuple[str, ...] = (PYTHON, "-m", "gateway"),
                         cwd: Path = PROJECT) -> GatewayProcess:
    """Start a gateway process (own process group) without waiting for it: see ``listening``.

    ``run_args`` default to ``--workers 1`` (``one_worker=False``: the config's choice);
    ``command``: how the gateway is invoked (the installed console script, say).
    """
    os.makedirs(workdir, exist_ok=True)
    conf = workdir / f"{name}.yaml"
    conf.write_text(config_text, encoding="utf-8")
    log = workdir / f"{name}.log"
    fmt = ("--log-format", log_format) if log_format else ()
    args = run_args or (("--workers", "1") if one_worker else ())
    with log.open("wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            *command, *fmt, "run", "-c", str(conf), *args,
            stdout=sink, stderr=sink, cwd=str(cwd), env=env, start_new_session=True)
    return GatewayProcess(proc, "", log, conf)


async def start_gateway_process(config_text: str, workdir: Path, *run_args: str,
                                **kwargs: Any) -> GatewayProcess:
    """``launch_gateway`` and wait until it listens; a gateway that exits first fails the test."""
    gw = await launch_gateway(config_text, workdir, *run_args, **kwargs)
    if not await gw.listening():
        await gw.kill()
        raise AssertionError(f"the gateway did not start:\n{gw.log_text()}")
    return gw


@contextlib.asynccontextmanager
async def gateway_process(config_text: str, workdir: Path, *run_args: str,
                          **kwargs: Any) -> AsyncIterator[GatewayProcess]:
    """``start_gateway_process`` until the context ends; then its process group is killed
    (a no-op when the test already stopped it)."""
    gw = await start_gateway_process(config_text, workdir, *run_args, **kwargs)
    try:
        yield gw
    finally:
        await gw.kill()


async def gateway_cli(*args: str, env: dict[str, str] | None = None
                      ) -> tuple[int, str, str]:
    """Run ``python -m gateway ARGS`` without blocking the loop: (code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "gateway", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=str(PROJECT), env=env)
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path = PROJECT
            ) -> subprocess.CompletedProcess[str]:
    """Run ``python -m gateway ARGS`` to the end (blocking), output as text."""
    return subprocess.run([PYTHON, "-m", "gateway", *args], capture_output=True, text=True,
                          cwd=str(cwd), timeout=60, env=env, check=False)
