"""Several worker processes on one port (SO_REUSEPORT), supervised by a small master.

The master reserves the port (bound, never listening, so the kernel gives it no
connections), starts N workers that each bind the same port with SO_REUSEPORT, restarts a
worker that dies, forwards SIGHUP, and on SIGTERM/SIGINT stops them all within the grace
period.

Each worker writes one byte to its own pipe once it listens; the master says "listening"
only when every worker has. A worker that dies before it is ready fails the start (like a
single process that cannot listen), and a master that gives up on workers that keep dying
exits non-zero so that systemd's ``Restart=on-failure`` (or Kubernetes) starts it again.

Workers run the installed package the master runs: ``python -P`` keeps the working
directory off ``sys.path`` (a ``gateway/`` folder there is not imported), and the master's
own package directory is passed along for a gateway run from a source checkout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
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
READY_ENV = "GATEWAY_WORKER_READY_FD"
START_TIMEOUT = 60.0
# -P: no working directory on sys.path. argv[1] is the directory the master imported
# `gateway` from; added only when not already on the path (a source checkout).
_BOOT = ("import sys; root = sys.argv.pop(1)\n"
         "if root not in sys.path: sys.path.insert(0, root)\n"
         "from gateway.cli import main; raise SystemExit(main(sys.argv[1:]))")


def worker_command(args: list[str]) -> list[str]:
    """The command line of a worker running ``gateway ARGS`` from the master's package."""
    root = str(Path(__file__).resolve().parent.parent)
    return [sys.executable, "-P", "-c", _BOOT, root, *args]


def tell_master_ready() -> None:
    """In a worker: tell the master this process listens (no-op when not a worker)."""
    fd = os.environ.pop(READY_ENV, None)
    if fd is None:
        return
    try:
        os.write(int(fd), b"1")
        os.close(int(fd))
    except (OSError, ValueError):
        log.warning("could not tell the master this worker is ready")


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
        self._ready_pipes: dict[int, int] = {}  # index -> read end, until the worker is ready
        self._stopping = False
        self._restarts: list[float] = []
        self.admin: HostAdmin | None = None  # admin.port for the whole host, when configured

    def _spawn(self, index: int, port: int) -> None:
        old = self._ready_pipes.pop(index, None)
        if old is not None:
            os.close(old)
        read_end, write_end = os.pipe()
        env = dict(os.environ, **{PORT_ENV: str(port), INDEX_ENV: str(index),
                                  READY_ENV: str(write_end)})
        if self.admin is not None:
            env[ADMIN_SOCKET_ENV] = self.admin.socket_for(index)
        cmd = worker_command([*self.extra, "run", "-c", str(Path(self.config_path)),
                              "--workers", "1"])
        try:
            self.procs[index] = subprocess.Popen(  # noqa: S603 - our own interpreter
                cmd, env=env, pass_fds=(write_end,))
        finally:
            os.close(write_end)
        self._ready_pipes[index] = read_end

    def _wait_all_ready(self, timeout: float = START_TIMEOUT) -> bool:
        """True once every worker said it listens; False if one died first or time ran out."""
        deadline = time.monotonic() + timeout
        while self._ready_pipes and not self._stopping:
            for index, proc in self.procs.items():
                code = proc.poll()
                if code is not None and index in self._ready_pipes:
                    log.error("worker %d (pid %d) exited with %s before it was ready; "
                              "not starting (its log lines above say why)", index, proc.pid, code)
                    return False
            left = deadline - time.monotonic()
            if left <= 0:
                log.error("%d of %d workers not ready after %gs; not starting",
                          len(self._ready_pipes), self.n, timeout)
                return False
            fds = list(self._ready_pipes.values())
            try:
                readable, _, _ = select.select(fds, [], [], min(left, 0.2))
            except InterruptedError:  # pragma: no cover - a signal; loop and look again
                continue
            for index, fd in list(self._ready_pipes.items()):
                if fd not in readable:
                    continue
                if os.read(fd, 1) == b"1":
                    del self._ready_pipes[index]
                    os.close(fd)
                    continue
                # End of file: the worker closed the pipe by dying; the next round says how.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.procs[index].wait(5)
        return not self._stopping

    def _collect_ready(self) -> None:
        # Replacement workers: read their byte (or end of file) so the pipe does not linger.
        for index, fd in list(self._ready_pipes.items()):
            readable, _, _ = select.select([fd], [], [], 0)
            if readable:
                os.read(fd, 1)
                del self._ready_pipes[index]
                os.close(fd)

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
        code = 0
        try:
            for i in range(self.n):
                self._spawn(i, port)
            if not self._wait_all_ready():
                return 0 if self._stopping else 1
            scheme = "https" if self.cfg.listen.tls else "http"
            host = self.cfg.listen.host
            shown = f"[{host}]" if ":" in host else host
            log.info("listening on %s://%s:%d with %d workers (master pid %d)", scheme, shown,
                     port, self.n, os.getpid())
            while not self._stopping:
                time.sleep(0.2)
                self._collect_ready()
                for index, proc in list(self.procs.items()):
                    status = proc.poll()
                    if status is None or self._stopping:
                        continue
                    now = time.monotonic()
                    self._restarts = [t for t in self._restarts if now - t < 60]
                    if len(self._restarts) >= 5 * self.n:
                        log.error("workers keep dying (%d restarts in 60s); giving up "
                                  "(exit status 1, for the service manager to restart us)",
                                  len(self._restarts))
                        self._stopping = True
                        code = 1
                        break
                    self._restarts.append(now)
                    log.warning("worker %d (pid %d) exited with %s; restarting", index, proc.pid,
                                status)
                    self._spawn(index, port)
        finally:
            self._shutdown()
            for fd in self._ready_pipes.values():
                os.close(fd)
            self._ready_pipes.clear()
            reserved.close()
            if self.admin is not None:
                self.admin.stop()
            if self.cfg.pid_file is not None:
                Path(self.cfg.pid_file).unlink(missing_ok=True)
        return code

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
