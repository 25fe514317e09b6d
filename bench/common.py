"""Process and /proc helpers shared by the benchmark scripts (not part of the gateway).

Everything the benchmark starts goes through ``Procs``: each child gets its own process group,
so stopping it also stops whatever it forked (nginx workers, gateway workers).
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_DIR = BENCH_DIR.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None
              ) -> bool:
    """True once something accepts on 127.0.0.1:port; False on timeout or if ``proc`` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (children inherit it); returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class Procs:
    """Children started in their own process groups, all stopped by ``stop_all``."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.running: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen[bytes]:
        log = open(self.logdir / f"{name}.log", "ab")
        try:
            proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                                    start_new_session=True)
        finally:
            log.close()
        self.running.append((name, proc))
        return proc

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.logdir / f"{name}.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
        """SIGTERM the child's process group, then SIGKILL whatever is left after ``grace``."""
        self.running = [(n, p) for n, p in self.running if p is not proc]
        pgid = proc.pid  # start_new_session: the child leads its own group
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(2.0)

    def stop_all(self) -> None:
        for _, proc in reversed(list(self.running)):
            self.stop(proc)


# ------------------------------------------------------------------ /proc


def _status(pid: int) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _kib(value: str) -> int:
    return int(value.split()[0]) if value else 0


def rss_kib(pid: int) -> int:
    return _kib(_status(pid).get("VmRSS", ""))


def hwm_kib(pid: int) -> int:
    return _kib(_status(pid).get("VmHWM", ""))


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time the processes have used so far (0 for one that is gone)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / os.sysconf("SC_CLK_TCK")


def reset_hwm(pid: int) -> bool:
    """Reset the peak-RSS counter (VmHWM) so the next reading covers only what follows."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name may contain spaces and parentheses: split after the last ')'
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def process_tree(pid: int) -> list[int]:
    kids = children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def leaf_processes(pid: int) -> list[int]:
    """The processes doing the work: the children if there are any (nginx, pre-fork), else pid."""
    tree = process_tree(pid)
    return tree[1:] if len(tree) > 1 else tree


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


# ------------------------------------------------------------------ the gateway

def venv_python() -> str:
    """The project's venv interpreter when it exists (the gateway is installed there)."""
    candidate = PROJECT_DIR / ".venv" / "bin" / "python"
    return str(candidate) if candidate.exists() else os.environ.get("PYTHON", "python3")


_workers_flag: bool | None = None


def gateway_supports_workers() -> bool:
    """Whether ``gateway run --help`` offers ``--workers`` (the lead is adding it)."""
    global _workers_flag
    if _workers_flag is None:
        out = subprocess.run([venv_python(), "-m", "gateway", "run", "--help"],
                             capture_output=True, text=True, cwd=PROJECT_DIR, timeout=60)
        _workers_flag = "--workers" in out.stdout
    return _workers_flag


def gateway_argv(config: Path, workers: int = 1, log_level: str = "WARNING",
                 log_format: str = "text") -> list[str]:
    """``log_level`` INFO writes the access log (when the config has it on)."""
    argv = [venv_python(), "-m", "gateway", "--log-level", log_level, "--log-format", log_format,
            "run", "-c", str(config)]
    if gateway_supports_workers():
        argv += ["--workers", str(workers)]
    return argv


def gateway_config_yaml(port: int, routes: list[dict[str, object]], *, workers: int = 1,
                        extra: str = "", access_log: bool = False) -> str:
    """A gateway config for benchmarking: 1 worker, no access log (unless asked), no body
    size limit."""
    lines = [
        "listen:",
        "  host: 127.0.0.1",
        f"  port: {port}",
        f"  workers: {workers}",
        "  backlog: 4096",
        f"access_log: {'true' if access_log else 'false'}",
        "limits:",
        "  client_max_body_size: 0",
        "timeouts:",
        "  read: 60s",
        "  websocket_idle: 1h",
        "routes:",
    ]
    for route in routes:
        lines.append(f"  - prefix: \"{route['prefix']}\"")
        lines.append(f"    upstream: \"{route['upstream']}\"")
        if route.get("preserve_host"):
            lines.append("    preserve_host: true")
        if "max_idle" in route:
            lines.append(f"    max_idle: {route['max_idle']}")
    return "\n".join(lines) + "\n" + extra
