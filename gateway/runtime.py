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
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from gateway.admin import Readiness, create_admin_app
from gateway.app import Gateway
from gateway.config import Config, load_config
from gateway.errors import ConfigError
from gateway.fastpath import FastRequestHandler
from gateway.features import install_features
from gateway.metrics import Metrics
from gateway.server import GatewayServer, Listener, bind_socket, make_server, server_ssl_context

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
        self.readiness = Readiness(upstreams=self._upstream_addresses, checks=self._checks)
        self.gateway: Gateway
        self._stack: contextlib.AsyncExitStack
        self.server: GatewayServer | None = None
        self.listener: Listener | None = None
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

    def _upstream_addresses(self) -> list[tuple[str, int]]:
        seen = {(r.upstream.host, r.upstream.port) for r in self.gateway.routes.routes}
        return sorted(seen)

    def _in_flight(self) -> int:
        server = self.server
        if server is None:
            return 0
        return sum(1 for h in server.connections
                   if h._current_request is not None or getattr(h, "_inline", None) is not None)

    def _checks(self) -> list[Callable[[], Awaitable[None]]]:
        return list(self.gateway.ready_checks)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        # A trampoline, so that a reload reaches connections that are already open.
        return await self.gateway.handle(request)

    async def start(self) -> None:
        cfg = self.config
        self.gateway, self._stack = await self._build(cfg)
        self.server = make_server(cfg, self.handle, protocol=FastRequestHandler,
                                  gateway=self.gateway)
        sock = bind_socket(cfg.listen.host, cfg.listen.port, reuse_port=self.reuse_port,
                           backlog=cfg.listen.backlog)
        self.listener = Listener(self.server, sock, server_ssl_context(cfg))
        await self.listener.start()
        if cfg.admin is not None:
            app = create_admin_app(self.readiness, self.metrics.render)
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
        if new.listen != self.config.listen or new.admin != self.config.admin:
            log.warning("listen/admin changes need a restart; the other changes apply now")
        try:
            gateway, stack = await self._build(new)
        except Exception as exc:
            self.metrics.reloads.labels("refused").inc()
            log.error("reload refused, the running config stays: %s", exc)
            return False
        old_stack = self._stack
        self.gateway, self._stack, self.config = gateway, stack, new
        if self.server is not None:
            self.server.gateway = gateway
        self.readiness._cached = None
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
        else:  # a worker: the master said where the gateway listens
            log.debug("worker %d ready on %s%s", worker_index, running.url, extra)
        await stop.wait()
        log.info("shutting down: draining for up to %gs", runtime.config.timeouts.shutdown_grace)
    log.info("stopped")
