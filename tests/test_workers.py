"""The worker supervisor (gateway/workers.py) as a real master with real worker processes.

- "listening ... with N workers" is logged only once every worker listens;
- a worker that cannot start fails the start: the master exits non-zero, never "listening";
- a master that gives up on workers that keep dying exits non-zero (systemd restarts it);
- a `gateway/` folder in the working directory is not what the workers import.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lifecycle_helpers import children

GATEWAY = str(Path(sys.executable).parent / "gateway")  # the installed console script


class Master:
    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, needle: str, within: float = 30.0) -> bool:
        """True once ``needle`` is logged; False if the master exits first."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if needle in self.text():
                return True
            if self.proc.poll() is not None:
                return needle in self.text()
            time.sleep(0.02)
        raise AssertionError(f"{needle!r} not logged within {within}s:\n{self.text()}")


@contextlib.contextmanager
def master(tmp_path: Path, config: str, *, cwd: Path | None = None,
           workers: int = 2, env: dict[str, str] | None = None) -> Iterator[Master]:
    conf = tmp_path / "gateway.yaml"
    conf.write_text(config)
    log = tmp_path / "master.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen([GATEWAY, "run", "-c", str(conf), "--workers", str(workers)],
                                stdout=sink, stderr=sink, cwd=str(cwd or tmp_path), env=env)
    try:
        yield Master(proc, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "5")
        self.end_headers()
        self.wfile.write(b"hello")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def site() -> Iterator[str]:
    """An upstream in a thread (these tests block; an upstream on the test's loop would not
    answer)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def config(site: str, admin_port: int) -> str:
    return f"""
listen: {{host: 127.0.0.1, port: 0}}
routes: [{{prefix: /, upstream: "{site}/"}}]
admin: {{host: 127.0.0.1, port: {admin_port}}}
timeouts: {{shutdown_grace: 1s}}
"""


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def test_listening_is_logged_once_every_worker_listens(tmp_path: Path, site: str) -> None:
    admin = free_port()
    with master(tmp_path, config(site, admin)) as m:
        assert m.wait_for("with 2 workers"), m.text()
        # At that moment both workers are up: the supervisor's /readyz, which asks every
        # worker over its admin socket (started after its listener), is 200 without waiting.
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=5) as resp:
            report = json.loads(resp.read())
        assert report["status"] == "ready", report
        assert report["worker 0"]["status"] == report["worker 1"]["status"] == "ready", report


def test_a_worker_that_cannot_start_fails_the_start(tmp_path: Path, site: str) -> None:
    # Worker 1 dies while its interpreter starts (a sitecustomize on PYTHONPATH, which the
    # workers' `python -P` still honours), before it could say it listens.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, sys\n"
        "if os.environ.get('GATEWAY_WORKER_INDEX') == '1':\n"
        "    sys.exit(3)\n")
    env = dict(os.environ, PYTHONPATH=str(hook))
    with master(tmp_path, config(site, free_port()), env=env) as m:
        code = m.proc.wait(60)
        log = m.text()
    assert code == 1, log
    assert "listening on" not in log
    assert "before it was ready" in log
    assert not children(m.proc.pid)


def test_a_master_that_gives_up_exits_non_zero(tmp_path: Path, site: str) -> None:
    with master(tmp_path, config(site, 0)) as m:
        assert m.wait_for("with 2 workers"), m.text()
        deadline = time.monotonic() + 60
        while m.proc.poll() is None and time.monotonic() < deadline:
            for pid in children(m.proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        code = m.proc.wait(30)
    assert "giving up" in m.text()
    assert code == 1, m.text()


def test_a_gateway_folder_in_the_working_directory_is_not_imported(
        tmp_path: Path, site: str) -> None:
    cwd = tmp_path / "site"
    bogus = cwd / "gateway"
    bogus.mkdir(parents=True)
    marker = tmp_path / "bogus-imported"
    body = f"open({str(marker)!r}, 'w').close()\nraise SystemExit(3)\n"
    for name in ("__init__.py", "__main__.py", "cli.py"):
        (bogus / name).write_text(body)
    with master(tmp_path, config(site, 0), cwd=cwd) as m:
        assert m.wait_for("with 2 workers"), m.text()
        port = int(m.text().split("listening on http://127.0.0.1:")[1].split()[0])
        for _ in range(4):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/x", timeout=5) as resp:
                assert resp.status == 200
    assert not marker.exists(), m.text()
    assert "exited" not in m.text()
