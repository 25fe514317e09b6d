"""Start and stop a real ``redis-server`` on a free loopback port for tests.

No persistence (``--save ''``, ``--appendonly no``), its own temporary directory, killed on stop.
A missing binary is an error with a clear message, never a skip: the token tests need Redis.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.support.ports import free_port

REDIS_SERVER = "/usr/bin/redis-server"


class RedisServerMissing(RuntimeError):
    """redis-server is not installed where the tests look for it."""


def _pong(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            # NOAUTH: up, but the default user is switched off (an ACL test).
            return s.recv(16).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


class RedisServer:
    """One redis-server process; ``url`` is ``redis://127.0.0.1:<port>/0`` once started."""

    def __init__(self, binary: str = REDIS_SERVER, extra: Sequence[str] = ()) -> None:
        self.binary = binary
        self.extra = list(extra)  # more redis-server options: TLS, ACL users, --replicaof
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0, port: int | None = None) -> None:
        """Start, wait for PONG; ``port`` reuses a port (a restart), else a free one is picked."""
        if not (Path(self.binary).is_file() or shutil.which(self.binary)):
            raise RedisServerMissing(
                f"{self.binary} not found: the token tests need a real Redis; "
                "install it with `apt-get install redis-server`"
            )
        self._dir = Path(tempfile.mkdtemp(prefix="gw-redis-"))
        # A port picked free can be taken before redis binds it: try a few.
        for _ in range(1 if port else 5):
            self.port = port or free_port()
            self._proc = subprocess.Popen(
                [
                    self.binary,
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self._dir),
                    "--logfile",
                    str(self._dir / "redis.log"),
                    "--daemonize",
                    "no",
                    *self.extra,
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self._proc.poll() is None:
                if _pong(self.port):
                    return
                time.sleep(0.02)
            self._kill()
        log = (self._dir / "redis.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"redis-server did not start; its log ends with:\n{log}")

    @property
    def dir(self) -> Path:
        assert self._dir is not None
        return self._dir

    def _kill(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        self._proc = None

    def stop(self) -> None:
        """Stop the server (idempotent) and remove its directory."""
        self._kill()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


@contextlib.contextmanager
def running_redis(binary: str = REDIS_SERVER, extra: Sequence[str] = ()
                  ) -> Iterator[RedisServer]:
    """A started redis-server (with ``extra`` options), stopped on the way out."""
    server = RedisServer(binary, extra)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def redis_or_fail() -> Iterator[RedisServer]:
    """A started server for a fixture; a missing redis-server fails the test (not a skip)."""
    import pytest

    server = RedisServer()
    try:
        server.start()
    except RedisServerMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        server.stop()
