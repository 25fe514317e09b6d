"""The supervisor's admin listener: one view of the host when several workers serve.

Each worker serves its admin endpoints on a Unix socket in a directory the supervisor makes
for the run (mode 0700, removed at exit); the supervisor listens on ``admin.host:admin.port``
and answers, from a thread of its own:

- ``/metrics``: every worker's registry scraped and added up (counters, histograms and
  gauges summed per label set, ``*_info`` series kept once), so the host's totals come
  from one endpoint; per-process series (``process_*``, ``python_gc_*``, ``python_info``)
  keep a ``worker`` label (``supervisor`` for the supervisor itself) because a sum of
  memory or file descriptors answers no question; ``gateway_worker_up{worker}`` says
  whose answer is in the sum. A worker that does not answer in time is left out of the
  sum (and is 0 in ``gateway_worker_up``) rather than failing the scrape.
- ``/healthz``: 200 while at least one worker says it is alive.
- ``/readyz``: 200 when every worker is ready, with each worker's report.
- ``/status``: each worker's ``/status`` report, keyed by worker.
- ``POST /unlock``: passed to every worker as it came (the workers check the key), so that
  a lock held in any worker's memory is lifted; 200 only when every worker said 200.

Summing the workers' own registries (rather than prometheus-client's multiprocess mode)
keeps each worker's bookkeeping plain integers and keeps the process and GC collectors,
which multiprocess mode cannot serve.
"""

from __future__ import annotations

import http.client
import json
import logging
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

log = logging.getLogger("gateway.hostmetrics")

ADMIN_SOCKET_ENV = "GATEWAY_WORKER_ADMIN_SOCKET"
_PER_PROCESS = ("process_", "python_gc_", "python_info")
_TIMEOUT = 2.0
_MAX_UNLOCK_BODY = 4096


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=_TIMEOUT)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(_TIMEOUT)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def ask_worker(path: str, target: str, *, method: str = "GET", body: bytes | None = None,
               headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """Ask ``target`` of a worker's admin socket: (status, body); OSError if it is down."""
    conn = _UnixHTTPConnection(path)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def aggregate(texts: dict[str, str]) -> list[Metric]:
    """Metric families from several processes' expositions, added up as the module says."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for source, text in texts.items():
        for family in text_string_to_metric_families(text):
            per_process = family.name.startswith(_PER_PROCESS)
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            into = values[family.name]
            for sample in family.samples:
                labels = dict(sample.labels)
                if per_process:
                    labels["worker"] = source
                key = (sample.name, tuple(sorted(labels.items())))
                old = into.get(key)
                if old is None:
                    into[key] = sample.value
                elif sample.name.endswith("_created"):
                    into[key] = min(old, sample.value)  # the earliest start of a series
                elif family.name.endswith("_info"):
                    into[key] = max(old, sample.value)
                else:
                    into[key] = old + sample.value
    out = []
    for name, family in families.items():
        for (sample_name, pairs), value in values[name].items():
            family.add_sample(sample_name, dict(pairs), value)
        out.append(family)
    return out


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


# The admin listener's bounds: a thread per connection, so a client that connects and
# sends nothing (or a flood of them) must neither hold a thread for ever nor make
# threads without limit. Beyond the cap a connection gets a short 503 and is closed.
MAX_ADMIN_CONNECTIONS = 64
ADMIN_IDLE_TIMEOUT = 10.0  # seconds a connection may wait for a byte of the request
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
         b"Content-Length: 24\r\nConnection: close\r\n\r\n503 admin listener busy\n")


class _Server(ThreadingHTTPServer):
    """At most ``MAX_ADMIN_CONNECTIONS`` connections served at once."""

    daemon_threads = True

    def server_activate(self) -> None:
        self.slots = threading.BoundedSemaphore(MAX_ADMIN_CONNECTIONS)
        super().server_activate()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            try:
                request.settimeout(1.0)
                request.sendall(_BUSY)  # a fresh socket's buffer takes it at once
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()  # no thread started: the slot is free again
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class _Server6(_Server):
    address_family = socket.AF_INET6


class HostAdmin:
    """The supervisor's admin listener and the workers' socket directory."""

    def __init__(self, host: str, port: int) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="gateway-admin-"))
        # The supervisor's own process series (it serves no requests).
        self._own = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self._own)
        GCCollector(registry=self._own)
        PlatformCollector(registry=self._own)
        self._workers: dict[int, str] = {}
        self._lock = threading.Lock()
        admin = self

        class Handler(BaseHTTPRequestHandler):
            # On each read: a connection silent this long is closed (socket timeout).
            timeout = ADMIN_IDLE_TIMEOUT

            def do_GET(self) -> None:
                admin._answer(self)

            def do_POST(self) -> None:
                admin._answer(self)

            def log_message(self, format: str, *args: object) -> None:
                pass  # probes and scrapes are not worth a log line each

        try:
            self._server = (_Server6 if ":" in host else _Server)((host, port), Handler)
        except OSError:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        addr = self._server.server_address
        bound = addr[0].decode() if isinstance(addr[0], bytes) else str(addr[0])
        shown = f"[{bound}]" if ":" in bound else bound
        self.url = f"http://{shown}:{addr[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="gateway-admin", daemon=True)

    def socket_for(self, index: int) -> str:
        path = str(self.dir / f"worker-{index}.sock")
        with self._lock:
            self._workers[index] = path
        return path

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _ask_all(self, target: str, *, method: str = "GET", body: bytes | None = None,
                 headers: dict[str, str] | None = None
                 ) -> dict[int, tuple[int, bytes] | None]:
        with self._lock:
            workers = dict(self._workers)
        answers: dict[int, tuple[int, bytes] | None] = {}
        for index, path in sorted(workers.items()):
            try:
                answers[index] = ask_worker(path, target, method=method, body=body,
                                            headers=headers)
            except (OSError, http.client.HTTPException):
                answers[index] = None
        return answers

    def metrics(self) -> bytes:
        answers = self._ask_all("/metrics")
        texts = {"supervisor": generate_latest(self._own).decode()}
        up = ["# HELP gateway_worker_up Whether the worker answered this scrape (1) or not (0)",
              "# TYPE gateway_worker_up gauge"]
        for index, answer in answers.items():
            ok = answer is not None and answer[0] == 200
            up.append(f'gateway_worker_up{{worker="{index}"}} {1 if ok else 0}')
            if ok and answer is not None:
                texts[str(index)] = answer[1].decode()
        texts["up"] = "\n".join(up) + "\n"
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Families(aggregate(texts)))
        return generate_latest(registry)

    def _unlock(self, req: BaseHTTPRequestHandler) -> tuple[int, bytes, str]:
        try:
            length = int(req.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= _MAX_UNLOCK_BODY:
            return 400, b"400 Bad Request\n", "text/plain"
        body = req.rfile.read(length)
        headers = {"Content-Type": req.headers.get("Content-Type") or "application/json"}
        auth = req.headers.get("Authorization")
        if auth is not None:
            headers["Authorization"] = auth
        answers = self._ask_all("/unlock", method="POST", body=body, headers=headers)
        codes = {a[0] if a is not None else 502 for a in answers.values()} or {502}
        report = {f"worker {index}": (a[0] if a is not None else "not answering")
                  for index, a in answers.items()}
        # One answer for all: the workers' own (401, 404, 400) when they agree, else 502.
        status = codes.pop() if len(codes) == 1 else 502
        return status, json.dumps(report).encode(), "application/json"

    def _status(self) -> tuple[int, bytes, str]:
        answers = self._ask_all("/status")
        report: dict[str, object] = {}
        for index, answer in answers.items():
            try:
                report[f"worker {index}"] = (json.loads(answer[1]) if answer is not None
                                             else "not answering")
            except ValueError:
                report[f"worker {index}"] = "invalid answer"
        return 200, (json.dumps(report, indent=2) + "\n").encode(), "application/json"

    def _answer(self, req: BaseHTTPRequestHandler) -> None:
        path = req.path.partition("?")[0]
        try:
            if req.command == "POST":
                if path == "/unlock":
                    status, body, ctype = self._unlock(req)
                else:
                    status, body, ctype = 405, b"405 Method Not Allowed\n", "text/plain"
            elif path == "/status":
                status, body, ctype = self._status()
            elif path == "/metrics":
                status, body, ctype = 200, self.metrics(), "text/plain; version=0.0.4"
            elif path == "/healthz":
                answers = self._ask_all("/healthz")
                alive = any(a is not None and a[0] == 200 for a in answers.values())
                status, body, ctype = (200 if alive else 503), (
                    b"ok\n" if alive else b"no worker answers\n"), "text/plain"
            elif path == "/readyz":
                answers = self._ask_all("/readyz")
                report: dict[str, object] = {}
                ready = bool(answers)
                for index, answer in answers.items():
                    if answer is None:
                        ready = False
                        report[f"worker {index}"] = "not answering"
                        continue
                    ready = ready and answer[0] == 200
                    try:
                        report[f"worker {index}"] = json.loads(answer[1])
                    except ValueError:
                        report[f"worker {index}"] = answer[1].decode(errors="replace")
                report["status"] = "ready" if ready else "not ready"
                status, body, ctype = (200 if ready else 503), json.dumps(report).encode(), \
                    "application/json"
            else:
                status, body, ctype = 404, b"404 Not Found\n", "text/plain"
        except Exception:  # a scrape must never take the supervisor down
            log.exception("admin request %s failed", path)
            status, body, ctype = 500, b"500 Internal Server Error\n", "text/plain"
        req.send_response(status)
        req.send_header("Content-Type", ctype + ("; charset=utf-8" if "text" in ctype else ""))
        req.send_header("Content-Length", str(len(body)))
        req.send_header("X-Content-Type-Options", "nosniff")
        req.end_headers()
        req.wfile.write(body)
