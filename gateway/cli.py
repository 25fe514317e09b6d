"""Command line: a thin layer over the typed Config (``gateway run|check|sign|...``).

One parser; each command is a subparser with a ``func``. Global options are added to every
subparser at the end of :func:`build_parser`, so a command registered by another module gets
them too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import logging
import os
import signal
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from gateway.config import Config, load_config
from gateway.errors import ConfigError
from gateway.logs import json_logging, setup_logging
from gateway.memory import tune_collector

log = logging.getLogger("gateway.cli")

DEFAULT_CONFIG = "gateway.yaml"


def _early_log_format(argv: Sequence[str]) -> str:
    """``--log-format`` looked up before parsing, so that even a usage error is JSON."""
    for i, arg in enumerate(argv):
        if arg == "--log-format" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--log-format="):
            return arg.partition("=")[2]
    return "text"


def _load(path: str) -> Config:
    return load_config(path)


def _report(exc: ConfigError, path: str) -> int:
    if json_logging():
        log.error("%s: %d problem(s) in the configuration: %s", path, len(exc.problems),
                  "; ".join(str(p) for p in exc.problems),
                  extra={"gateway.config.problems": [str(p) for p in exc.problems]})
        return 2
    sys.stderr.write(f"{path}: {len(exc.problems)} problem(s) in the configuration:\n")
    for problem in exc.problems:
        sys.stderr.write(f"  - {problem}\n")
    return 2


def cmd_check(args: argparse.Namespace) -> int:
    try:
        cfg = _load(args.config)
    except ConfigError as exc:
        return _report(exc, args.config)
    out = sys.stdout
    scheme = "https" if cfg.listen.tls else "http"
    out.write(f"{args.config}: OK\n")
    out.write(f"listen   {scheme}://{cfg.listen.host}:{cfg.listen.port}\n")
    for route in sorted(cfg.routes, key=lambda r: len(r.prefix), reverse=True):
        host = "client Host" if route.preserve_host else "upstream Host"
        extra = f", ca_file={route.ca_file}" if route.ca_file else ""
        out.write(f"route    {route.prefix:<24} -> {route.upstream} ({host}{extra})\n")
    if cfg.cors.allow_origins:
        out.write(f"cors     {', '.join(cfg.cors.allow_origins)}"
                  f"{' (credentials)' if cfg.cors.allow_credentials else ''}\n")
    if cfg.cec is not None:
        out.write(f"cec      tenant {cfg.cec.tenant_space_id}, channel {cfg.cec.channel_config_id},"
                  f" auth {cfg.cec.auth.mode}, identity {cfg.cec.identity.source}\n")
    if cfg.token is not None:
        from gateway.redisconn import parse_store_url

        store = cfg.token.store
        shown = store if store == "memory" else parse_store_url(store).where  # no password
        out.write(f"token    store {shown}, ttl {cfg.token.ttl:g}s,"
                  f" callback {cfg.token.validate_path}\n")
    if cfg.sandbox is not None:
        out.write("sandbox  configured\n")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    try:
        cfg = _load(args.config)
    except ConfigError as exc:
        return _report(exc, args.config)
    from gateway.hostmetrics import ADMIN_SOCKET_ENV
    from gateway.runtime import serve_forever
    from gateway.workers import INDEX_ENV, PORT_ENV, Supervisor, default_workers

    worker_port = os.environ.get(PORT_ENV)
    worker_index = int(os.environ.get(INDEX_ENV, "0"))
    if worker_port is not None:
        # A worker started by the supervisor: same config, the port the master reserved.
        cfg = cfg.model_copy(update={"listen": cfg.listen.model_copy(
            update={"port": int(worker_port)})})
    elif args.workers != 1:
        n, why = (args.workers, "--workers") if args.workers else default_workers(cfg)
        if n > 1:
            extra = ["--log-format", args.log_format, "--log-level", args.log_level]
            try:
                return Supervisor(args.config, cfg, n, extra).run()
            except OSError as exc:  # the master could not reserve the port
                log.error("cannot listen on %s:%s: %s", cfg.listen.host, cfg.listen.port,
                          exc.strerror)
                return 1
        log.info("running %s", why)
    _use_uvloop()
    tune_collector()
    pid_file = cfg.pid_file if worker_port is None else None
    if pid_file is not None:
        pid_file.write_text(f"{os.getpid()}\n")
    try:
        asyncio.run(serve_forever(cfg, config_path=args.config,
                                  reuse_port=worker_port is not None, worker_index=worker_index,
                                  announce=worker_port is None,
                                  admin_socket=os.environ.get(ADMIN_SOCKET_ENV)))
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", cfg.listen.host, cfg.listen.port, exc.strerror)
        return 1
    finally:
        if pid_file is not None:
            pid_file.unlink(missing_ok=True)
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    """Check the config first, then SIGHUP the running gateway (its master, with workers)."""
    try:
        cfg = _load(args.config)
    except ConfigError as exc:
        _report(exc, args.config)
        sys.stderr.write("not reloading: the running gateway keeps its config\n")
        return 2
    pid = args.pid
    if pid is None:
        if cfg.pid_file is None:
            sys.stderr.write("no pid: pass --pid PID or set pid_file in the config\n")
            return 2
        try:
            pid = int(Path(cfg.pid_file).read_text().strip())
        except (OSError, ValueError) as exc:
            sys.stderr.write(f"cannot read pid_file {cfg.pid_file}: {exc}\n")
            return 2
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        sys.stderr.write(f"no process {pid}: is the gateway running?\n")
        return 1
    sys.stdout.write(f"sent SIGHUP to {pid}\n")
    return 0


def _local(host: str) -> str:
    """Where to reach a listener bound to ``host`` from this machine."""
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 if the gateway of this configuration answers (a container HEALTHCHECK)."""
    try:
        cfg = _load(args.config)
    except ConfigError as exc:
        return _report(exc, args.config)
    if cfg.admin is not None:
        # The admin listener is the health endpoint when there is one (worker 0's).
        host = _local(cfg.admin.host)
        url = f"http://{f'[{host}]' if ':' in host else host}:{cfg.admin.port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=args.timeout) as resp:
                status = resp.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except OSError as exc:
            sys.stderr.write(f"unhealthy: {url}: {exc}\n")
            return 1
        if status != 200:
            sys.stderr.write(f"unhealthy: {url} answered {status}\n")
            return 1
        sys.stdout.write(f"healthy: {url} answered 200\n")
        return 0
    # Without one, the listener itself: accepting connections is what can be checked without
    # sending a request through to the site.
    host = _local(cfg.listen.host)
    try:
        socket.create_connection((host, cfg.listen.port), timeout=args.timeout).close()
    except OSError as exc:
        sys.stderr.write(f"unhealthy: nothing accepts on {host}:{cfg.listen.port}: {exc}\n")
        return 1
    sys.stdout.write(f"healthy: {host}:{cfg.listen.port} accepts connections "
                     "(no admin: section, so no /healthz to ask)\n")
    return 0


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    uvloop.install()


_DESCRIPTION = """\
The CEC chat gateway: one reverse proxy in front of a website that serves the cloud
customer-service chat (paths under /service-cloud/) from the site's own origin, signs
the chat's requests server-side and issues its tokens.

Start with `gateway init` (writes a commented gateway.yaml), then `gateway check`, then
`gateway run`. `gateway demo` runs everything on one machine, without a cloud account."""

_EPILOG = """\
global options (--log-format, --log-level, -c) may come before or after the command:
  gateway --log-format json run -c /etc/gateway/gateway.yaml
  gateway run -c /etc/gateway/gateway.yaml --log-format json

exit status:
  0  success (run: stopped by SIGTERM/SIGINT after draining)
  1  a runtime failure: a port cannot be opened, no gateway process to signal
  2  the configuration or the command line is wrong (every problem is listed on stderr;
     nothing was started)

environment:
  GATEWAY_LOG_LEVEL   default for --log-level
  CEC_SECRET_KEY, GATEWAY_TOKEN_KEY, GATEWAY_API_KEY and any ${NAME} the configuration
  file names are read when the configuration is loaded.

Run `gateway COMMAND --help` for a command's own options."""

_NO_CONFIG = frozenset({"sign"})  # commands that read no configuration file


def _add_global_options(parser: argparse.ArgumentParser, *, top: bool,
                        config: bool) -> None:
    """``--log-format``, ``--log-level`` and (for commands reading one) ``-c``.

    Every command understands them before or after its name. In a subcommand their default
    is SUPPRESS, so that a value given before the command is not overwritten by the
    subcommand's default (argparse copies every attribute of the sub-namespace back).
    """
    have = parser._option_string_actions  # argparse has no public lookup

    def default(value: str) -> str:
        return value if top else argparse.SUPPRESS

    if "--log-format" not in have:
        parser.add_argument("--log-format", choices=("text", "json"), default=default("text"),
                            help="text (default) or json: one JSON object per line on stderr")
    if "--log-level" not in have:
        parser.add_argument("--log-level", default=default(
            os.environ.get("GATEWAY_LOG_LEVEL", "INFO")), metavar="LEVEL", type=str.upper,
            choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
            help="DEBUG, INFO (default, or $GATEWAY_LOG_LEVEL), WARNING or ERROR")
    if not config:
        return
    if "-c" in have:
        # Declared by the command itself: keep its help, let a value given before the
        # command stand.
        have["-c"].default = argparse.SUPPRESS
        return
    # None at the top: main() fills in DEFAULT_CONFIG unless the command looks for its own
    # default (``gateway demo`` falls back to the packaged sample).
    parser.add_argument("-c", "--config", default=None if top else argparse.SUPPRESS,
                        metavar="FILE",
                        help=f"the configuration file (default: ./{DEFAULT_CONFIG}; "
                             "`gateway init` writes one)")


def _command(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, *,
             summary: str, description: str, func: object) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=summary, description=description)
    p.set_defaults(func=func)
    return p


def _version() -> str:
    from gateway import __version__

    return f"gateway (cec-gateway) {__version__}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=_DESCRIPTION, epilog=_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=_version(),
                        help="print the version and exit")
    _add_global_options(parser, top=True, config=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                title="commands")

    p = _command(sub, "run", summary="serve: check the configuration, then listen until SIGTERM",
                 description="Load and check the configuration (exit 2 with every problem if "
                 "it is wrong, before opening any port), then serve until SIGTERM or SIGINT, "
                 "draining in-flight requests first. SIGHUP reloads the configuration.",
                 func=cmd_run)
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="worker processes sharing the port (default: listen.workers, "
                        "else one per core; one when token state is process-local)")

    p = _command(sub, "reload", summary="check the configuration, then make the running gateway "
                 "load it", description="Check the configuration; if it is valid, send SIGHUP "
                 "to the running gateway (the pid from --pid or the configuration's "
                 "pid_file). A wrong configuration is reported and not sent (exit 2): the "
                 "running gateway keeps its configuration.", func=cmd_reload)
    p.add_argument("--pid", type=int, default=None,
                   help="the gateway's process id (default: read the config's pid_file)")

    _command(sub, "check", summary="validate the configuration and print a summary",
             description="Load the configuration exactly as `gateway run` does and print "
             "where it listens and where each route goes. Exit 0 if it is valid, 2 with "
             "every problem (its key, and the fix) if not. Opens no port.", func=cmd_check)

    p = _command(sub, "health", summary="exit 0 if the gateway of this configuration answers",
                 description="For container health checks: load the configuration, then ask "
                 "the admin listener's /healthz (when there is an admin: section) or else "
                 "connect to the listen port. Exit 0 if it answers, 1 if not, 2 if the "
                 "configuration is wrong.", func=cmd_health)
    p.add_argument("--timeout", type=float, default=2.0, metavar="SECONDS",
                   help="how long to wait for the answer (default: 2)")

    from gateway.demo.cli import add_init_parser

    add_init_parser(sub)
    try:
        from gateway.signcli import add_sign_parser
    except ImportError:  # pragma: no cover - during development only
        pass
    else:
        add_sign_parser(sub)
    from gateway.demo.cli import add_demo_parsers
    from gateway.unlockcli import add_unlock_parser

    add_unlock_parser(sub)

    add_demo_parsers(sub)
    # Every command accepts the global options after its name too (also commands other
    # modules register above); -c only where the command reads a configuration file.
    for name, command in sub.choices.items():
        _add_global_options(command, top=False, config=name not in _NO_CONFIG)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    early = _early_log_format(sys.argv[1:] if argv is None else argv)
    if early == "json":
        setup_logging("json")
        usage = io.StringIO()
        try:
            with contextlib.redirect_stderr(usage):
                args = parser.parse_args(argv)
        except SystemExit:
            if usage.getvalue():
                log.error("%s", usage.getvalue().strip())
            raise
    else:
        args = parser.parse_args(argv)
    if args.config is None and not getattr(args, "config_optional", False):
        args.config = DEFAULT_CONFIG
    setup_logging(args.log_format, args.log_level.upper())
    func = getattr(args, "func", None) or args.handler
    code: int = func(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
