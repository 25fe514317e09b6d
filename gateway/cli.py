"""Command line: a thin layer over the typed Config (``gateway run|check|sign|...``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway.config import Config, load_config
from gateway.errors import ConfigError
from gateway.logs import json_logging, setup_logging

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
        out.write(f"token    store {cfg.token.store.split('@')[-1]}, ttl {cfg.token.ttl:g}s,"
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


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    uvloop.install()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument("--log-level", default=os.environ.get("GATEWAY_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="serve")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes sharing the port (default: listen.workers, "
                        "else one per core)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("reload", help="check the config, then make the running gateway load it")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    p.add_argument("--pid", type=int, default=None, help="default: read pid_file from config")
    p.set_defaults(func=cmd_reload)

    p = sub.add_parser("check", help="validate the config and print a summary of routes")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    p.set_defaults(func=cmd_check)

    try:
        from gateway.signcli import add_sign_parser
    except ImportError:  # pragma: no cover - during development only
        pass
    else:
        add_sign_parser(sub)
    from gateway.demo.cli import add_demo_parsers

    add_demo_parsers(sub)
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
    setup_logging(args.log_format, args.log_level.upper())
    func = getattr(args, "func", None) or args.handler
    code: int = func(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
