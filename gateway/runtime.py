"""Putting a Config to work: build the Gateway, listen, serve until told to stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from gateway.app import Gateway
from gateway.config import Config
from gateway.fastpath import FastRequestHandler
from gateway.features import install_features
from gateway.server import Listener, bind_socket, make_server, server_ssl_context

log = logging.getLogger("gateway.runtime")


@dataclass
class Running:
    gateway: Gateway
    listener: Listener

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




@contextlib.asynccontextmanager
async def serving(config: Config, *, reuse_port: bool = False) -> AsyncIterator[Running]:
    """Serve ``config`` in the running loop; on exit, shut down gracefully."""
    async with contextlib.AsyncExitStack() as stack:
        gateway = Gateway(config)
        stack.push_async_callback(gateway.close)
        gateway.ext = await install_features(config, gateway, stack)
        server = make_server(config, gateway.handle, protocol=FastRequestHandler, gateway=gateway)
        sock = bind_socket(config.listen.host, config.listen.port, reuse_port=reuse_port,
                           backlog=config.listen.backlog)
        listener = Listener(server, sock, server_ssl_context(config))
        await listener.start()
        try:
            yield Running(gateway, listener)
        finally:
            await listener.stop(config.timeouts.shutdown_grace)


async def serve_forever(config: Config, *, reuse_port: bool = False) -> None:
    from gateway.server import install_signal_handlers

    stop = asyncio.Event()
    async with serving(config, reuse_port=reuse_port) as running:
        install_signal_handlers(stop)
        log.info("listening on %s", running.url)
        await stop.wait()
        log.info("shutting down: draining for up to %gs", config.timeouts.shutdown_grace)
    log.info("stopped")
