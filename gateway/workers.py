"""Several worker processes on one port (SO_REUSEPORT), supervised by a small master.

The master reserves the port (bound, never listening, so the kernel gives it no
connections), starts N workers that each bind the same port with SO_REUSEPORT, restarts a
worker that dies, forwards SIGHUP, and on SIGTERM/SIGINT stops them all within the grace
period.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from gateway.config import Config
from gateway.hostmetrics import ADMIN_SOCKET_ENV, HostAdmin

log = logging.getLogger("gateway.workers")

PORT_ENV = "GATEWAY_WORKER_PORT"
INDEX_ENV = "GATEWAY_WORKER_INDEX"


def default_workers(cfg: Config) -> tuple[int, str]:
    """Workers to run, and why, when neither --workers nor listen.workers says."""
    if cfg.listen.workers:
        return cfg.listen.workers, "listen.workers"
    local = []
    if cfg.token is not None and cfg.token.store == "memory":
        local.append("token.store is memory")
    if local:
        return 1, f"one worker because {', '.join(local)} (state would differ per process)"
    return os.cpu_count() or 1, "one per core"


def _reserve(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


class Supervisor:
    def __init__(self, config_path: str, cfg: Config, workers: int, extra_args: list[str]) -> None:
        self.config_path = config_path
        self.cfg = cfg
        self.n = workers
        self.extra = extra_args
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self._stopping = False
        self._restarts: list[float] = []
        self.admin: HostAdmin | None = None  # admin.port for the whole host, when configured

    def _spawn(self, index: int, port: int) -> None:
        env = dict(os.environ, **{PORT_ENV: str(port), INDEX_ENV: str(index)})
        if self.admin is not None:
            env[ADMIN_SOCKET_ENV] = self.admin.socket_for(index)
        cmd = [sys.executable, "-m", "gateway", *self.extra, "run", "-c",
               str(Path(self.config_path)), "--workers", "1"]
        self.procs[index] = subprocess.Popen(cmd, env=env)  # noqa: S603 - our own interpreter

    def _wait_listening(self, port: int, timeout: float = 30.0) -> None:
        """Announce only once a worker accepts connections (the master's socket never does)."""
        host = self.cfg.listen.host
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs.values()):
                return  # a worker died at start; the loop below reports and restarts it
            try:
                with socket.create_connection((host, port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)

    def run(self) -> int:
        reserved = _reserve(self.cfg.listen.host, self.cfg.listen.port)
        port = reserved.getsockname()[1]
        if self.cfg.admin is not None:
            try:
                self.admin = HostAdmin(self.cfg.admin.host, self.cfg.admin.port)
            except OSError as exc:
                reserved.close()
                log.error("cannot listen on %s:%s for admin: %s; fix: free the port or change "
                          "admin.port", self.cfg.admin.host, self.cfg.admin.port, exc.strerror)
                return 1
            self.admin.start()
            log.info("admin on %s (metrics of all workers added up)", self.admin.url)

        def stop(signum: int, _frame: object) -> None:
            self._stopping = True

        def hup(_signum: int, _frame: object) -> None:
            for proc in self.procs.values():
                proc.send_signal(signal.SIGHUP)

        if self.cfg.pid_file is not None:
            Path(self.cfg.pid_file).write_text(f"{os.getpid()}\n")
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, hup)
        for i in range(self.n):
            self._spawn(i, port)
        self._wait_listening(port)
        scheme = "https" if self.cfg.listen.tls else "http"
        host = self.cfg.listen.host
        shown = f"[{host}]" if ":" in host else host
        log.info("listening on %s://%s:%d with %d workers (master pid %d)", scheme, shown, port,
                 self.n, os.getpid())
        try:
            while not self._stopping:
                time.sleep(0.2)
                for index, proc in list(self.procs.items()):
                    code = proc.poll()
                    if code is None or self._stopping:
                        continue
                    now = time.monotonic()
                    self._restarts = [t for t in self._restarts if now - t < 60]
                    if len(self._restarts) >= 5 * self.n:
                        log.error("workers keep dying (%d restarts in 60s); giving up",
                                  len(self._restarts))
                        self._stopping = True
                        break
                    self._restarts.append(now)
                    log.warning("worker %d (pid %d) exited with %s; restarting", index, proc.pid,
                                code)
                    self._spawn(index, port)
        finally:
            self._shutdown()
            reserved.close()
            if self.admin is not None:
                self.admin.stop()
            if self.cfg.pid_file is not None:
                Path(self.cfg.pid_file).unlink(missing_ok=True)
        return 0

    def _shutdown(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.cfg.timeouts.shutdown_grace + 5
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker pid %d did not stop in time; killing it", proc.pid)
                proc.kill()
                proc.wait()
        log.info("all workers stopped")
