"""``gateway sign``: print an auth-v2 Authorization string for a payload.

The secret comes from the environment (``CEC_SECRET_KEY``) or a file, never from the command
line, where it would land in shell history and in every process listing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from gateway.signing import DEFAULT_URI, Signer, SigningError, authorization

__all__ = ["SECRET_ENV", "add_sign_parser", "parse_header", "run_sign"]

SECRET_ENV = "CEC_SECRET_KEY"  # noqa: S105 - the variable's name, not a secret


def parse_header(text: str) -> tuple[str, str]:
    """``'Name: value'`` → ``("Name", "value")``; argparse type for ``--header``."""
    name, sep, value = text.partition(":")
    name = name.strip()
    if not sep or not name or any(c.isspace() for c in name):
        raise argparse.ArgumentTypeError(f"expected 'Name: value', got {text!r}")
    return name, value.strip()


def add_sign_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``sign`` subcommand (its handler is ``run_sign``)."""
    p = subparsers.add_parser(
        "sign",
        help="print an auth-v2 Authorization string for a payload",
        description=(
            f"Print the auth-v2 Authorization string for PAYLOAD. The secret key is read "
            f"from the environment variable {SECRET_ENV} or from --secret-key-file; it is "
            f"never accepted on the command line."
        ),
    )
    p.add_argument("--access-key", required=True, help="the accessKey (the channel config id)")
    p.add_argument(
        "--timestamp",
        help="timestamp text to sign, e.g. 2026-11-24T08:30:15.123Z (default: now, UTC)",
    )
    p.add_argument("--payload", required=True, help="the JSON payload text, signed verbatim")
    p.add_argument("--method", default="POST", help="HTTP method (default: POST)")
    p.add_argument("--uri", default=DEFAULT_URI, help=f"request path (default: {DEFAULT_URI})")
    p.add_argument(
        "--header",
        action="append",
        type=parse_header,
        default=[],
        metavar="'NAME: VALUE'",
        help=(
            "a header to sign (repeatable); when given, exactly these headers are signed. "
            "Default: Content-Length of the payload and Content-Type application/json;charset=UTF-8"
        ),
    )
    p.add_argument(
        "--secret-key-file",
        type=Path,
        help=f"file holding the secret key (default: the {SECRET_ENV} environment variable)",
    )
    p.set_defaults(handler=run_sign)


def _read_secret(path: Path | None) -> str | None:
    if path is not None:
        # Only the path goes into the message: the content might be (part of) the secret.
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise SigningError(f"cannot read --secret-key-file {path}: {reason}") from None
        return text.strip() or None
    return os.environ.get(SECRET_ENV, "").strip() or None


def run_sign(args: argparse.Namespace) -> int:
    """Print the Authorization string; 0 on success, 2 on a usage problem."""
    try:
        secret = _read_secret(args.secret_key_file)
    except SigningError as exc:
        print(f"gateway sign: {exc}", file=sys.stderr)
        return 2
    if secret is None:
        print(
            f"gateway sign: no secret key: set the environment variable {SECRET_ENV} "
            f"or pass --secret-key-file PATH",
            file=sys.stderr,
        )
        return 2
    payload: str = args.payload
    try:
        json.loads(payload)
    except ValueError as exc:
        print(f"gateway sign: --payload is not valid JSON: {exc}", file=sys.stderr)
        return 2
    headers: list[tuple[str, str]] = args.header
    if len({name.lower() for name, _ in headers}) != len(headers):
        print("gateway sign: a --header name is repeated", file=sys.stderr)
        return 2
    try:
        signer = Signer(args.access_key, secret)
        if headers:
            result = authorization(
                secret,
                args.access_key,
                args.timestamp if args.timestamp is not None else signer.timestamp(),
                args.method,
                args.uri,
                dict(headers),
                payload,
            )
        else:
            result = signer.sign_payload(
                payload, timestamp=args.timestamp, method=args.method, uri=args.uri
            )
    except SigningError as exc:
        print(f"gateway sign: {exc}", file=sys.stderr)
        return 2
    print(result)
    return 0
