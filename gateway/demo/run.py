"""``gateway demo``: the sandbox, the sample site and the gateway, in one process.

Everything comes from one gateway configuration (the project's ``gateway.yaml``):

- the sandbox from its ``sandbox:`` section (listening on ``sandbox.port``);
- the sample site on the host and port of the ``/`` route's upstream;
- the gateway itself (``gateway.runtime.serving``), started last because its identity look-ups
  (``cec.identity.source: url``) go to the site, and its ``/service-cloud/`` route to the sandbox.

Then the URLs to open are written to stdout, one per line, the site first and the agent console
second; SIGINT or SIGTERM stops all three (the sandbox first, so that its WebSockets close and
the gateway's drain does not wait for them).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import sys
from pathlib import Path
from typing import TextIO

from aiohttp import web
from yarl import URL

from gateway.config import Config, load_config
from gateway.demo.site import SiteSettings, start_site
from gateway.errors import ConfigError, GatewayError
from gateway.sandbox.app import start_sandbox
from gateway.sandbox.settings import SandboxSettings

log = logging.getLogger("gateway.demo")

_WILDCARDS = frozenset({"", "0.0.0.0", "::"})


class DemoConfigError(GatewayError):
    """The configuration cannot run the demo (no ``/`` route, no ``cec:`` section...)."""


def sandbox_settings(config: Config) -> SandboxSettings:
    """The ``sandbox:`` section, or defaults that match the ``cec:`` section."""
    if config.sandbox is not None:
        return config.sandbox
    cec = config.cec
    if cec is None:
        return SandboxSettings()
    return SandboxSettings(tenant_space_id=cec.tenant_space_id,
                           channel_config_id=cec.channel_config_id,
                           secret_key=cec.auth.secret_key)


def site_address(config: Config) -> tuple[str, int]:
    """Host and port of the ``/`` route's upstream: where the sample site listens."""
    for route in config.routes:
        if route.prefix == "/":
            url = URL(route.upstream)
            if url.host is None or url.port is None:
                break
            return url.host, url.port
    raise DemoConfigError("the demo needs a route with prefix / (the sample site's upstream)")


def site_settings(config: Config) -> SiteSettings:
    cec = config.cec
    if cec is None:
        raise DemoConfigError("the demo needs a cec: section (the chat's settings)")
    return SiteSettings(loader_path=cec.loader_path, context_path=cec.context_path,
                        tenant_space_id=cec.tenant_space_id,
                        channel_config_id=cec.channel_config_id, locale=cec.locale)


def public_base(config: Config) -> str:
    """``scheme://host:port`` a browser on this machine uses to reach the gateway."""
    if config.public_url:
        return config.public_url.rstrip("/")
    scheme = "https" if config.listen.tls else "http"
    host = config.listen.host
    if host in _WILDCARDS:
        host = "127.0.0.1"
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    return f"{scheme}://{host}:{config.listen.port}"


def agent_console_path(config: Config, sandbox: SandboxSettings) -> str:
    """The gateway path that reaches the sandbox's agent console.

    The route whose upstream is the sandbox maps ``<upstream path>rest`` to ``<prefix>rest``;
    without one, the console is assumed under the chat's context path.
    """
    target = f"{sandbox.context_path}/agent/"
    for route in config.routes:
        url = URL(route.upstream)
        if url.port == sandbox.port and target.startswith(url.path):
            return route.prefix + target[len(url.path):]
    cec = config.cec
    return f"{cec.context_path if cec else sandbox.context_path}/agent/"


def demo_urls(config: Config) -> tuple[str, str]:
    """(site URL, agent console URL), both through the gateway."""
    base = public_base(config)
    return f"{base}/", base + agent_console_path(config, sandbox_settings(config))


async def run_demo(config_path: str | Path, *, out: TextIO | None = None,
                   stop: asyncio.Event | None = None) -> int:
    """Run the demo until SIGINT/SIGTERM (or ``stop`` is set); the process exit code."""
    from gateway.runtime import serving
    from gateway.server import install_signal_handlers

    out = out or sys.stdout
    try:
        config = load_config(config_path)
        sandbox = sandbox_settings(config)
        site_host, site_port = site_address(config)
        site = site_settings(config)
    except ConfigError as exc:
        sys.stderr.write(f"{config_path}: {len(exc.problems)} problem(s) in the configuration:\n")
        for problem in exc.problems:
            sys.stderr.write(f"  - {problem}\n")
        return 2
    except DemoConfigError as exc:
        sys.stderr.write(f"{config_path}: {exc}\n")
        return 2

    if stop is None:
        stop = asyncio.Event()
        install_signal_handlers(stop)
    runners: list[web.AppRunner] = []
    try:
        try:
            runners.append(await start_sandbox(sandbox))
            runners.append(await start_site(site, host=site_host, port=site_port))
        except OSError as exc:
            log.error("cannot start the demo's servers: %s", exc.strerror or exc)
            return 1
        try:
            async with serving(config) as running:
                site_url, console_url = demo_urls(config)
                log.info("gateway listening on %s", running.url)
                out.write(f"Site: {site_url}\nAgent console: {console_url}\n")
                out.flush()
                await stop.wait()
                log.info("stopping the demo")
                # The sandbox first: it closes its WebSockets, which ends the gateway's
                # spliced connections, so the gateway's drain below is quick.
                while runners:
                    await runners.pop(0).cleanup()
        except OSError as exc:
            log.error("cannot listen on %s:%s: %s", config.listen.host, config.listen.port,
                      exc.strerror or exc)
            return 1
    finally:
        while runners:
            await runners.pop().cleanup()
    return 0
