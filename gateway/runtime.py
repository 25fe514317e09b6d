"""Putting a Config to work: build the Gateway, listen, reload, and stop in stages.

One ``Runtime`` per process. The listening socket and the aiohttp server live as long as
the process; the ``Gateway`` (routes, pools, features) is rebuilt on reload and swapped in,
so new requests — also on kept-alive connections — see the new config while requests in
flight finish on the old one, whose resources are closed after the grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway import __version__
from gateway.admin import AdminHooks, Readiness, create_admin_app
from gateway.app import Gateway
from gateway.config import Config, load_config
from gateway.errors import ConfigError
from gateway.fastpath import FastRequestHandler
from gateway.features import install_features
from gateway.health import HealthMonitor
from gateway.metrics import Metrics
from gateway.server import GatewayServer, Listener, ServerTLS, bind_socket, make_server, server_tls
from gateway.tls import TLSFilesError

log = logging.getLogger("gateway.runtime")


@dataclass
class Running:
    """What tests and the CLI get from ``serving``."""

    runtime: Runtime

    @property
    def gateway(self) -> Gateway:
        return self.runtime.gateway

    @property
    def listener(self) -> Listener:
        assert self.runtime.listener is not None
        return self.runtime.listener

    @property
    def host(self) -> str:
        return self.listener.address[0]

    @property
    def port(self) -> int:
        return self.listener.address[1]

    @property
    def url(self) -> str:
        scheme = "https" if self.listener.ssl else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    @property
    def admin_url(self) -> str | None:
        return self.runtime.admin_url


class Runtime:
    def __init__(self, config: Config, *, config_path: str | None = None,
                 reuse_port: bool = False, worker_index: int = 0,
                 admin_socket: str | None = None) -> None:
        self.config = config
        # A worker under the supervisor: admin endpoints on this private Unix socket; the
        # supervisor serves admin.port for the whole host (gateway/hostmetrics.py).
        self.admin_socket = admin_socket
        self.config_path = config_path
        self.reuse_port = reuse_port
        self.worker_index = worker_index
        self.metrics = Metrics()
        self.metrics.in_flight = self._in_flight
        self.metrics.pool_stats = lambda: self.gateway.pool.upstream_stats()
        # Counted on over reloads (each builds a new pool): what the replaced pools opened.
        self._opened_before = 0
        self.metrics.pool_opened = lambda: self._opened_before + self.gateway.pool.opened
        self.readiness = Readiness()
        self.health = HealthMonitor(
            self._upstream_targets, self._checks,
            on_upstream=lambda route, up: self.metrics.upstream_up.labels(route).set(up),
            on_store=self.metrics.store_up.set)
        self.gateway: Gateway
        self._stack: contextlib.AsyncExitStack
        self.server: GatewayServer | None = None
        self.listener: Listener | None = None
        self.tls: ServerTLS | None = None
        self._admin: web.AppRunner | None = None
        self.admin_url: str | None = None
        self._retiring: set[asyncio.Task[None]] = set()

    async def _build(self, config: Config) -> tuple[Gateway, contextlib.AsyncExitStack]:
        stack = contextlib.AsyncExitStack()
        try:
            gateway = Gateway(config, metrics=self.metrics)
            stack.push_async_callback(gateway.close)
            gateway.ext = await install_features(config, gateway, stack)
        except BaseException:
            await stack.aclose()
            raise
        return gateway, stack

    def _upstream_targets(self) -> list[tuple[str, str, int]]:
        return [(r.name, r.upstream.host, r.upstream.port) for r in self.gateway.routes.routes]

    def _in_flight(self) -> int:
        server = self.server
        if server is None:
            return 0
        return sum(1 for h in server.connections
                   if h._current_request is not None or getattr(h, "_inline", None) is not None)

    def _checks(self) -> list[Callable[[], Awaitable[None]]]:
        return list(self.gateway.store_checks)

    async def _unlock(self, kind: str, value: str) -> bool:
        unlock = self.gateway.unlock
        if unlock is None:
            return False
        return await unlock(kind, value)

    async def status(self) -> dict[str, Any]:
        """``/status``: this process, its routes' upstreams and its store, checked just now."""
        await self.health.check_now()
        code, ready = self.readiness.evaluate()
        cfg = self.config
        routes = []
        for route in self.gateway.routes.routes:
            up = route.upstream
            host = f"[{up.host}]" if ":" in up.host else up.host
            state = self.health.upstreams.get(route.name)
            routes.append({"route": route.name, "upstream": f"{up.scheme}://{host}:{up.port}",
                           **(state.as_json() if state else {"up": None})})
        store: dict[str, Any] | None = None
        if cfg.token is not None:
            backend = "memory" if cfg.token.store == "memory" else "redis"
            store = {"backend": backend, **self.health.store.as_json()}
        return {
            "status": ready["status"],
            "ready": code == 200,
            "draining": self.readiness.draining,
            "version": __version__,
            "pid": os.getpid(),
            "worker": self.worker_index,
            "workers": cfg.listen.workers,
            "routes": routes,
            "store": store,
        }

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        # A trampoline, so that a reload reaches connections that are already open.
        return await self.gateway.handle(request)

    async def start(self) -> None:
        cfg = self.config
        self.gateway, self._stack = await self._build(cfg)
        try:
            await self._listen(cfg)
        except BaseException:
            # A port that cannot be opened: close what _build opened (pools, HTTP sessions).
            if self.listener is not None:
                await self.listener.stop(0.0, before_drain=self.gateway.going_away)
            await self._stack.aclose()
            if self._admin is not None:
                await self._admin.cleanup()
            raise

    async def _listen(self, cfg: Config) -> None:
        self.server = make_server(cfg, self.handle, protocol=FastRequestHandler,
                                  gateway=self.gateway)
        sock = bind_socket(cfg.listen.host, cfg.listen.port, reuse_port=self.reuse_port,
                           backlog=cfg.listen.backlog)
        self.tls = server_tls(cfg)
        self.listener = Listener(self.server, sock, self.tls.context if self.tls else None)
        await self.listener.start()
        self.readiness.listening = True
        if cfg.admin is not None:
            key = cfg.admin.api_key
            app = create_admin_app(AdminHooks(
                self.readiness, self.metrics.render, self.status, self._unlock,
                key.get_secret_value().encode("utf-8") if key is not None else None))
            self._admin = web.AppRunner(app, access_log=None, handle_signals=False)
            await self._admin.setup()
            if self.admin_socket is not None:
                await web.UnixSite(self._admin, self.admin_socket).start()
            else:
                site = web.TCPSite(self._admin, cfg.admin.host, cfg.admin.port,
                                   reuse_address=True)
                await site.start()
                sockets = getattr(site._server, "sockets", None)
                addr = sockets[0].getsockname() if sockets else None
                if addr:
                    host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
                    self.admin_url = f"http://{host}:{addr[1]}"
            # Only read by /metrics and /status: not worth a connection per interval otherwise.
            self.health.start()

    async def reload(self) -> bool:
        """Re-read the config file (and secret files); swap it in if valid."""
        if self.config_path is None:
            log.warning("reload asked, but this gateway was not started from a config file")
            return False
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            self.metrics.reloads.labels("refused").inc()
            log.error("reload refused, the running config stays: %d problem(s)\n%s",
                      len(exc.problems), exc)
            return False
        old_listen = self.config.listen.model_copy(update={"tls": None})
        if (new.listen.model_copy(update={"tls": None}) != old_listen
                or (new.listen.tls is None) != (self.tls is None)
                or new.admin != self.config.admin):
            log.warning("listen/admin changes need a restart (except listen.tls's files); "
                        "the other changes apply now")
        try:
            gateway, stack = await self._build(new)
        except Exception as exc:
            self.metrics.reloads.labels("refused").inc()
            log.error("reload refused, the running config stays: %s", exc)
            return False
        if self.tls is not None and new.listen.tls is not None:
            # Re-read even when the paths are the same: renewals overwrite the files.
            try:
                self.tls.reload(new.listen.tls.cert_file, new.listen.tls.key_file)
            except TLSFilesError as exc:
                await stack.aclose()
                self.metrics.reloads.labels("refused").inc()
                log.error("reload refused, the running config and certificate stay: "
                          "listen.tls: %s", exc)
                return False
            log.info("TLS certificate reloaded from %s", new.listen.tls.cert_file)
        old_stack = self._stack
        self._opened_before += self.gateway.pool.opened
        self.gateway, self._stack, self.config = gateway, stack, new
        if self.server is not None:
            self.server.gateway = gateway
        self.metrics.reloads.labels("ok").inc()
        log.info("config reloaded from %s", self.config_path)
        # Requests in flight hold the old gateway; close it once they had their time.
        task = asyncio.get_running_loop().create_task(
            self._retire(old_stack, new.timeouts.shutdown_grace))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return True

    async def _retire(self, stack: contextlib.AsyncExitStack, after: float) -> None:
        await asyncio.sleep(after + 1)
        await stack.aclose()

    async def stop(self) -> None:
        """Stop in stages: not ready, stop accepting, WebSockets 1001, drain, then cancel."""
        cfg = self.config
        self.readiness.draining = True
        if cfg.timeouts.shutdown_delay:
            # Give load balancers time to see /readyz fail before the port closes.
            await asyncio.sleep(cfg.timeouts.shutdown_delay)
        try:
            if self.listener is not None:
                await self.listener.stop(cfg.timeouts.shutdown_grace,
                                         before_drain=self.gateway.going_away)
        finally:
            self.readiness.listening = False
            await self.health.stop()
            for task in list(self._retiring):
                task.cancel()
            await self._stack.aclose()
            if self._admin is not None:
                await self._admin.cleanup()


@contextlib.asynccontextmanager
async def serving(config: Config, *, reuse_port: bool = False, config_path: str | None = None,
                  worker_index: int = 0, admin_socket: str | None = None
                  ) -> AsyncIterator[Running]:
    """Serve ``config`` in the running loop; on exit, shut down gracefully."""
    runtime = Runtime(config, config_path=config_path, reuse_port=reuse_port,
                      worker_index=worker_index, admin_socket=admin_socket)
    await runtime.start()
    try:
        yield Running(runtime)
    finally:
        await runtime.stop()


async def serve_forever(config: Config, *, config_path: str | None = None,
                        reuse_port: bool = False, worker_index: int = 0,
                        announce: bool = True, admin_socket: str | None = None) -> None:
    from gateway.server import install_signal_handlers

    stop = asyncio.Event()
    async with serving(config, reuse_port=reuse_port, config_path=config_path,
                       worker_index=worker_index, admin_socket=admin_socket) as running:
        runtime = running.runtime
        reloads: set[asyncio.Task[bool]] = set()

        def on_hup() -> None:
            task = asyncio.get_running_loop().create_task(runtime.reload())
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        install_signal_handlers(stop, on_hup)
        extra = f", admin on {running.admin_url}" if running.admin_url else ""
        if announce:
            log.info("listening on %s%s", running.url, extra)
        else:  # a worker: the master says where the gateway listens, once all are ready
            from gateway.workers import tell_master_ready

            log.debug("worker %d ready on %s%s", worker_index, running.url, extra)
            tell_master_ready()
        await stop.wait()
        log.info("shutting down: draining for up to %gs", runtime.config.timeouts.shutdown_grace)
    log.info("stopped")
