"""The ``gateway init``, ``gateway demo`` and ``gateway sandbox`` subcommands."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from importlib import resources
from pathlib import Path

from gateway.errors import ConfigError

__all__ = ["add_demo_parsers", "add_init_parser", "cmd_demo", "cmd_init", "cmd_sandbox",
           "sample_config"]

log = logging.getLogger("gateway.demo.cli")

DEFAULT_CONFIG = "gateway.yaml"


def sample_config() -> str:
    """The commented configuration shipped in the package (``gateway/demo/gateway.yaml``)."""
    return resources.files("gateway.demo").joinpath("gateway.yaml").read_text("utf-8")


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    uvloop.install()


def cmd_init(args: argparse.Namespace) -> int:
    path = Path(args.config)
    if path.exists() and not args.force:
        sys.stderr.write(f"{path} exists; not overwriting it (pass --force to replace it)\n")
        return 1
    try:
        text = sample_config()
    except OSError:
        sys.stderr.write("the sample configuration is missing from the installed package "
                         "(gateway/demo/gateway.yaml): reinstall cec-gateway\n")
        return 1
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        sys.stderr.write(f"cannot write {path}: {exc.strerror}\n")
        return 1
    sys.stdout.write(
        f"wrote {path}: a commented configuration to start from.\n"
        f"  try it:   gateway demo -c {path}\n"
        f"  then:     edit it (its first lines say what to change), "
        f"gateway check -c {path}, gateway run -c {path}\n")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo.run import run_demo

    config = args.config
    if config is None and Path(DEFAULT_CONFIG).exists():
        config = DEFAULT_CONFIG
    _use_uvloop()
    return asyncio.run(run_demo(config, port=args.port))


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
        log.error("cannot listen for the CEC sandbox on %s:%s: %s (change sandbox.port)",
                  settings.host, settings.port, exc.strerror or exc)
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


def add_init_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``init``."""
    p = subparsers.add_parser(
        "init",
        help="write a commented gateway.yaml to start from",
        description="Write the sample configuration shipped with the package (the one "
                    "`gateway demo` runs), with comments saying what to change for your own "
                    "site. Refuses to overwrite an existing file unless --force (exit 1).",
    )
    p.add_argument("-c", "--config", metavar="FILE",
                   help=f"the file to write (default: ./{DEFAULT_CONFIG})")
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    p.set_defaults(func=cmd_init)


def add_demo_parsers(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``demo`` and ``sandbox``."""
    p = subparsers.add_parser(
        "demo",
        help="run the CEC sandbox, a sample site and the gateway together",
        description="Start the CEC sandbox (a stand-in for the cloud chat, with an agent "
                    "console), a small sample website and the gateway in front of both; print "
                    "where each one listens and the two URLs to open (the site, then the agent "
                    "console), and run until Ctrl-C. "
                    f"The configuration is -c FILE, else ./{DEFAULT_CONFIG} if it exists, else "
                    "the sample shipped with the package (`gateway init` writes it). Secrets "
                    "the configuration reads from CEC_SECRET_KEY, GATEWAY_TOKEN_KEY and "
                    "GATEWAY_API_KEY are generated for the run when those are unset (the demo "
                    "says so). A port that is taken (by default 8080 gateway, 3000 site, 8090 "
                    "sandbox, 9090 admin) is replaced by a free one, and the output says which.",
    )
    p.add_argument("-c", "--config", metavar="FILE",
                   help=f"the configuration (default: ./{DEFAULT_CONFIG} if it exists, "
                        "else the packaged sample)")
    p.add_argument("--port", type=int, default=None,
                   help="the gateway's port (default: listen.port, or a free port when that "
                        "one is taken)")
    p.set_defaults(func=cmd_demo, config_optional=True)

    p = subparsers.add_parser(
        "sandbox",
        help="run the CEC sandbox alone",
        description="Run the CEC stand-in alone, with the settings of the file's sandbox: "
                    "section or of a file holding only sandbox settings.",
    )
    p.add_argument("-c", "--config", metavar="FILE",
                   help=f"a gateway configuration or a sandbox-only file "
                        f"(default: ./{DEFAULT_CONFIG})")
    p.set_defaults(func=cmd_sandbox)
