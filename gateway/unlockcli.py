"""``gateway unlock --user ID | --address IP``: lift a token-guard lock early.

Where the counters live decides how: with ``token.store: redis://…`` the counter is deleted in
Redis (every process sharing it sees that at once, no running gateway needed); with ``memory``
the counters are inside the running gateway, so its admin listener is asked (``POST /unlock``
with ``admin.api_key``; with workers the supervisor passes it to every worker).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import sys
import urllib.error
import urllib.request

from gateway.config import Config, load_config
from gateway.errors import ConfigError

__all__ = ["add_unlock_parser", "cmd_unlock"]


def add_unlock_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``unlock`` subcommand."""
    p = subparsers.add_parser(
        "unlock", help="lift a token-guard lock on a userId or a client address early")
    p.add_argument("-c", "--config", default="gateway.yaml")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--user", metavar="ID", help="the userId whose wrong tokens are blocked")
    which.add_argument("--address", metavar="IP", help="the client address that is locked")
    p.set_defaults(func=cmd_unlock)


def cmd_unlock(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        from gateway.cli import _report

        return _report(exc, args.config)
    kind, value = ("user", args.user) if args.user is not None else ("address", args.address)
    if kind == "address":
        try:
            ipaddress.ip_address(value)
        except ValueError:
            sys.stderr.write(f"--address wants an IP address, e.g. 203.0.113.7; got {value!r}\n")
            return 2
    if cfg.token is None:
        sys.stderr.write(f"{args.config}: no token: section, so there is nothing to unlock\n")
        return 2
    if cfg.token.store != "memory":
        return _unlock_in_store(cfg, kind, value)
    return _unlock_via_admin(cfg, kind, value)


def _unlock_in_store(cfg: Config, kind: str, value: str) -> int:
    from gateway.tokens.guard import guard_from_config
    from gateway.tokens.store import TokenBackendUnavailable

    assert cfg.token is not None

    async def run() -> None:
        guard = guard_from_config(cfg.token)  # type: ignore[arg-type]
        try:
            await guard.unlock(kind, value)
        finally:
            await guard.close()

    try:
        asyncio.run(run())
    except TokenBackendUnavailable as exc:
        sys.stderr.write(f"cannot reach token.store: {exc}\n")
        return 1
    sys.stdout.write(f"unlocked {kind} {value} in token.store (shared by every process)\n")
    return 0


def _unlock_via_admin(cfg: Config, kind: str, value: str) -> int:
    admin = cfg.admin
    if admin is None or admin.api_key is None:
        sys.stderr.write(
            "with token.store: memory the counters live in the running gateway; configure "
            "admin: {port: …, api_key_file: …} so that `gateway unlock` can reach them "
            "(POST /unlock), or use token.store: redis://…\n")
        return 2
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(admin.host, admin.host)
    host = f"[{host}]" if ":" in host else host
    body = json.dumps({kind: value}).encode()
    headers = {"Authorization": f"Bearer {admin.api_key.get_secret_value()}",
               "Content-Type": "application/json"}
    # One listener: a single process's own, or the supervisor's, which passes the request to
    # every worker (gateway/hostmetrics.py).
    url = f"http://{host}:{admin.port}/unlock"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310
            resp.read()
    except urllib.error.HTTPError as exc:
        sys.stderr.write(f"{url}: answered {exc.code}\n")
        return 1
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        sys.stderr.write(f"{url}: not reachable ({reason})\n")
        return 1
    sys.stdout.write(f"unlocked {kind} {value}\n")
    return 0
