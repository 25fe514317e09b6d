"""``gateway demo``: the sandbox, the sample site and the gateway, in one process.

Everything comes from one gateway configuration (by default the sample shipped in the
package, ``gateway/demo/gateway.yaml``, the file ``gateway init`` writes):

- the sandbox from its ``sandbox:`` section (listening on ``sandbox.port``);
- the sample site on the host and port of the ``/`` route's upstream;
- the gateway itself (``gateway.runtime.serving``), started last because its identity look-ups
  (``cec.identity.source: url``) go to the site, and its ``/service-cloud/`` route to the sandbox.

The demo must start wherever someone tries it: secrets the configuration reads from the
environment (``CEC_SECRET_KEY``, ``GATEWAY_TOKEN_KEY``, ``GATEWAY_API_KEY``) are generated for
the run when unset, and a component whose port is taken moves to a free one; every URL of the
configuration that pointed at the old port (routes, the identity look-up, the sandbox's
validation callback, CORS origins) follows it. Then where each component listens and the URLs
to open are written to stdout, the site and the agent console last; SIGINT or SIGTERM stops all
three (the sandbox first, so that its WebSockets close and the gateway's drain does not wait for
them).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import secrets
import socket
import string
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from aiohttp import web
from yarl import URL

from gateway.config import Config, load_config, load_config_text
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


# Secrets the sample configuration reads from the environment, and how to make a throw-away one.
def _cec_secret() -> str:
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(43))


def _hex_key() -> str:
    return secrets.token_hex(32)


_DEMO_SECRETS: dict[str, Callable[[], str]] = {
    "CEC_SECRET_KEY": _cec_secret,
    "GATEWAY_TOKEN_KEY": _hex_key,
    "GATEWAY_API_KEY": _hex_key,
}
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1", "0.0.0.0", "::", ""})


def demo_environment(env: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """``env`` plus a throw-away value for each demo secret it lacks; the names generated."""
    out = dict(env)
    generated = []
    for name, make in _DEMO_SECRETS.items():
        if not out.get(name):
            out[name] = make()
            generated.append(name)
    return out, generated


@dataclass
class Component:
    """One listener of the demo: what it is, where, and the setting that moves it."""

    name: str
    host: str
    port: int
    setting: str
    moved_from: int | None = None


def port_is_free(host: str, port: int) -> bool:
    """Whether a listener could bind ``host:port`` now (SO_REUSEADDR, as the servers bind)."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except OSError:
        return False
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError:
            return False
    return True


def free_port(host: str) -> int:
    infos = socket.getaddrinfo(host or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.bind(addr)
        port: int = sock.getsockname()[1]
        return port


def demo_components(config: Config) -> list[Component]:
    """The gateway, the sample site, the sandbox and (if configured) the admin listener."""
    sandbox = sandbox_settings(config)
    site_host, site_port = site_address(config)
    found = [
        Component("gateway", config.listen.host, config.listen.port, "listen.port or --port"),
        Component("sample site", site_host, site_port, "the upstream of the / route"),
        Component("CEC sandbox", sandbox.host, sandbox.port, "sandbox.port"),
    ]
    if config.admin is not None and config.admin.port:
        found.append(Component("admin", config.admin.host, config.admin.port, "admin.port"))
    return found


def _move_url(text: str, moves: Mapping[int, int]) -> str:
    if "://" not in text:
        return text
    try:
        url = URL(text)
    except ValueError:
        return text
    port = url.explicit_port
    if url.host in _LOOPBACK and port is not None and port in moves:
        return str(url.with_port(moves[port]))
    return text


def _move_tree(node: Any, moves: Mapping[int, int]) -> Any:
    if isinstance(node, dict):
        return {k: _move_tree(v, moves) for k, v in node.items()}
    if isinstance(node, list):
        return [_move_tree(v, moves) for v in node]
    if isinstance(node, str):
        return _move_url(node, moves)
    return node


def move_ports(config: Config, moves: Mapping[int, int]) -> Config:
    """``config`` with each local port in ``moves`` replaced, in listeners and in URLs."""
    if not moves:
        return config
    tree = _move_tree(config.model_dump(), moves)
    for section in ("listen", "sandbox", "admin"):
        if tree.get(section) is not None and tree[section]["port"] in moves:
            tree[section]["port"] = moves[tree[section]["port"]]
    if tree.get("sandbox") is None:
        # The sandbox's defaults follow the moves too: make them explicit.
        sandbox = sandbox_settings(config)
        tree["sandbox"] = _move_tree(sandbox.model_dump(), moves)
        tree["sandbox"]["port"] = moves.get(sandbox.port, sandbox.port)
    return Config.model_validate(tree)


def plan_ports(config: Config, port: int | None) -> tuple[Config, list[Component]]:
    """Free ports for taken ones (``port``: the gateway's, as asked, never moved)."""
    components = demo_components(config)
    moves: dict[int, int] = {}
    if port is not None and port != config.listen.port:
        moves[config.listen.port] = port
    for comp in components:
        wanted = moves.get(comp.port, comp.port)
        explicit = comp.name == "gateway" and port is not None
        if wanted == 0 or explicit or port_is_free(comp.host, wanted):
            continue
        moves[comp.port] = free_port(comp.host)
        comp.moved_from = comp.port
    for comp in components:
        comp.port = moves.get(comp.port, comp.port)
    return move_ports(config, moves), components


def _load(config_path: str | Path | None, env: Mapping[str, str]) -> Config:
    if config_path is None:
        from gateway.demo.cli import sample_config

        return load_config_text(sample_config(), env=env, source="the packaged sample")
    return load_config(config_path, env=env)


def _announce(out: TextIO, config: Config, running_url: str, admin_url: str | None,
              components: list[Component], source: str, generated: list[str]) -> None:
    sandbox = sandbox_settings(config)
    site_host, site_port = site_address(config)
    lines = [f"CEC chat gateway demo, configuration: {source}"]
    if generated:
        lines.append(f"Generated throw-away secrets for this run: {', '.join(generated)} "
                     "(unset in the environment; export them to use your own).")
    for comp in components:
        if comp.moved_from is not None:
            lines.append(f"Port {comp.moved_from} ({comp.name}) is taken: using {comp.port} "
                         f"instead (set {comp.setting} to choose).")
    where = {
        "gateway": f"{running_url}/  (what visitors open)",
        "sample site": f"http://{site_host}:{site_port}/  (the gateway's / route)",
        "CEC sandbox": f"http://{sandbox.host}:{sandbox.port}{sandbox.context_path}/  "
                       "(the gateway's /service-cloud/ route)",
        "admin": f"{admin_url}/  (/healthz, /readyz, /metrics)",
    }
    for comp in components:
        lines.append(f"  {comp.name:<12} {where[comp.name]}")
    site_url, console_url = demo_urls(config)
    if any(a.id == "agent1" for a in sandbox.agents):
        lines.append("Sign in to the agent console as agent1 / agent1 and click Go idle, then "
                     "chat on the site. Ctrl-C stops the demo.")
    lines += [f"Site: {site_url}", f"Agent console: {console_url}"]
    out.write("\n".join(lines) + "\n")
    out.flush()


def _listen_error(comp: Component, exc: OSError) -> str:
    why = "the port is taken" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
    return (f"cannot listen for the {comp.name} on {comp.host}:{comp.port}: {why}; "
            f"set {comp.setting} to another port")


async def run_demo(config_path: str | Path | None, *, port: int | None = None,
                   out: TextIO | None = None, stop: asyncio.Event | None = None,
                   env: Mapping[str, str] | None = None) -> int:
    """Run the demo until SIGINT/SIGTERM (or ``stop`` is set); the process exit code.

    ``config_path`` None: the sample shipped in the package.
    """
    from gateway.runtime import serving
    from gateway.server import install_signal_handlers

    out = out or sys.stdout
    source = str(config_path) if config_path is not None else \
        "the sample shipped with the package (`gateway init` writes a copy to edit)"
    environment, generated = demo_environment(os.environ if env is None else env)
    try:
        config, components = plan_ports(_load(config_path, environment), port)
        sandbox = sandbox_settings(config)
        site_host, site_port = site_address(config)
        site = site_settings(config)
    except ConfigError as exc:
        sys.stderr.write(f"{source}: {len(exc.problems)} problem(s) in the configuration:\n")
        for problem in exc.problems:
            sys.stderr.write(f"  - {problem}\n")
        return 2
    except DemoConfigError as exc:
        sys.stderr.write(f"{source}: {exc}\n")
        return 2
    by_name = {c.name: c for c in components}

    if stop is None:
        stop = asyncio.Event()
        install_signal_handlers(stop)
    runners: list[web.AppRunner] = []
    starting = by_name["CEC sandbox"]
    try:
        try:
            runners.append(await start_sandbox(sandbox))
            starting = by_name["sample site"]
            runners.append(await start_site(site, host=site_host, port=site_port))
            starting = by_name["gateway"]
            async with serving(config) as running:
                _announce(out, config, running.url, running.admin_url, components, source,
                          generated)
                await stop.wait()
                log.info("stopping the demo")
                # The sandbox first: it closes its WebSockets, which ends the gateway's
                # spliced connections, so the gateway's drain below is quick.
                while runners:
                    await runners.pop(0).cleanup()
        except OSError as exc:
            # serving() opens the gateway's port, then the admin's: if the gateway's is free
            # again now, the admin's was the one that failed.
            gateway = by_name["gateway"]
            if starting is gateway and "admin" in by_name and \
                    port_is_free(gateway.host, gateway.port):
                starting = by_name["admin"]
            log.error("%s", _listen_error(starting, exc))
            return 1
    finally:
        while runners:
            await runners.pop().cleanup()
    return 0
