"""The worker supervisor (gateway/workers.py) as a real master with real worker processes.

- "listening ... with N workers" is logged only once every worker listens;
- a worker that cannot start fails the start: the master exits non-zero, never "listening";
- a master that gives up on workers that keep dying exits non-zero (systemd restarts it);
- a `gateway/` folder in the working directory is not what the workers import.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.ports import free_port
from tests.support.process import GatewayProcess, children, gateway_process, launch_gateway
from tests.support.rawhttp import get, raw_exchange
from tests.support.upstreams import run_echo

GATEWAY = (str(Path(sys.executable).parent / "gateway"),)  # the installed console script


@pytest.fixture
async def site() -> AsyncIterator[str]:
    async with run_echo() as echo:
        yield echo.url


def master(tmp_path: Path, config: str, *, cwd: Path | None = None,
           env: dict[str, str] | None = None) -> contextlib.AbstractAsyncContextManager[
               GatewayProcess]:
    """The master with two workers, started as production starts it; killed at the end."""
    return gateway_process(config, tmp_path, "--workers", "2", command=GATEWAY,
                           cwd=cwd or tmp_path, env=env)


def config(site: str, admin_port: int) -> str:
    return f"""
listen: {{host: 127.0.0.1, port: 0}}
routes: [{{prefix: /, upstream: "{site}/"}}]
admin: {{host: 127.0.0.1, port: {admin_port}}}
timeouts: {{shutdown_grace: 1s}}
"""


async def test_listening_is_logged_once_every_worker_listens(tmp_path: Path,
                                                             site: str) -> None:
    admin = free_port()
    async with master(tmp_path, config(site, admin)) as m:
        await m.wait_log("with 2 workers", within=30)
        # At that moment both workers are up: the supervisor's /readyz, which asks every
        # worker over its admin socket (started after its listener), is 200 without waiting.
        resp = await raw_exchange("127.0.0.1", admin, get("/readyz"))
        assert resp.status == 200, resp
        report = json.loads(resp.body)
        assert report["status"] == "ready", report
        assert report["worker 0"]["status"] == report["worker 1"]["status"] == "ready", report


async def test_a_worker_that_cannot_start_fails_the_start(tmp_path: Path, site: str) -> None:
    # Worker 1 dies while its interpreter starts (a sitecustomize on PYTHONPATH, which the
    # workers' `python -P` still honours), before it could say it listens.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, sys\n"
        "if os.environ.get('GATEWAY_WORKER_INDEX') == '1':\n"
        "    sys.exit(3)\n")
    env = dict(os.environ, PYTHONPATH=str(hook))
    m = await launch_gateway(config(site, free_port()), tmp_path, "--workers", "2",
                             command=GATEWAY, cwd=tmp_path, env=env)
    try:
        assert not await m.listening(60), m.log_text()
        log = m.log_text()
        assert m.proc.returncode == 1, log
        assert "listening on" not in log
        assert "before it was ready" in log
        assert not children(m.proc.pid)
    finally:
        await m.kill()


async def test_a_master_that_gives_up_exits_non_zero(tmp_path: Path, site: str) -> None:
    async with master(tmp_path, config(site, 0)) as m, asyncio.timeout(60):
        await m.wait_log("with 2 workers", within=30)
        while m.proc.returncode is None:
            for pid in children(m.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            await asyncio.sleep(0.05)
        assert "giving up" in m.log_text()
        assert m.proc.returncode == 1, m.log_text()


async def test_a_gateway_folder_in_the_working_directory_is_not_imported(
        tmp_path: Path, site: str) -> None:
    cwd = tmp_path / "site"
    bogus = cwd / "gateway"
    bogus.mkdir(parents=True)
    marker = tmp_path / "bogus-imported"
    body = f"open({str(marker)!r}, 'w').close()\nraise SystemExit(3)\n"
    for name in ("__init__.py", "__main__.py", "cli.py"):
        (bogus / name).write_text(body)
    async with master(tmp_path, config(site, 0), cwd=cwd) as m:
        await m.wait_log("with 2 workers", within=30)
        for _ in range(4):
            assert (await raw_exchange("127.0.0.1", m.port, get("/x"))).status == 200
        assert await m.stop() == 0, m.log_text()
    assert not marker.exists(), m.log_text()
    assert "exited" not in m.log_text()
