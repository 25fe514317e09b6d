"""The ``gateway demo`` and ``gateway sandbox`` subcommands."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from gateway.errors import ConfigError

__all__ = ["add_demo_parsers", "cmd_demo", "cmd_sandbox"]

log = logging.getLogger("gateway.demo.cli")

DEFAULT_CONFIG = "gateway.yaml"


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    uvloop.install()


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo.run import run_demo

    _use_uvloop()
    return asyncio.run(run_demo(args.config))


async def _serve_sandbox(config_path: str) -> int:
    from gateway.sandbox.app import runner_url, start_sandbox
    from gateway.sandbox.settings import load_sandbox_settings
    from gateway.server import install_signal_handlers

    try:
        settings = load_sandbox_settings(config_path)
    except ConfigError as exc:
        sys.stderr.write(f"{config_path}: {len(exc.problems)} problem(s) in the sandbox "
                         "settings:\n")
        for problem in exc.problems:
            sys.stderr.write(f"  - {problem}\n")
        return 2
    stop = asyncio.Event()
    install_signal_handlers(stop)
    try:
        runner = await start_sandbox(settings)
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", settings.host, settings.port,
                  exc.strerror or exc)
        return 1
    try:
        url = runner_url(runner, settings)
        sys.stdout.write(f"CEC sandbox: {url}/\nAgent console: {url}/agent/\n")
        sys.stdout.flush()
        await stop.wait()
    finally:
        await runner.cleanup()
    return 0


def cmd_sandbox(args: argparse.Namespace) -> int:
    _use_uvloop()
    return asyncio.run(_serve_sandbox(args.config))


def add_demo_parsers(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``demo`` and ``sandbox``."""
    p = subparsers.add_parser(
        "demo",
        help="run the CEC sandbox, a sample site and the gateway together",
        description="Start the CEC sandbox, a small sample enterprise site and the gateway in "
                    "front of both, print the URLs to open (site first, agent console second) "
                    "and run until Ctrl-C.",
    )
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    p.set_defaults(func=cmd_demo)

    p = subparsers.add_parser(
        "sandbox",
        help="run the CEC sandbox alone",
        description="Run the CEC stand-in alone, with the settings of the file's sandbox: "
                    "section or of a file holding only sandbox settings.",
    )
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    p.set_defaults(func=cmd_sandbox)
