"""``gateway sign`` run in a real subprocess, so environment handling is the real one."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway import signing

ROOT = Path(__file__).resolve().parents[1]
SECRET = "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5bC7dE9f"
AK = "202011230001"
TS = "2026-11-24T08:30:15.123Z"
PAYLOAD_1 = (
    '{"thirdUserName":"Tom","thirdUserId":"10010001",'
    '"tenantSpaceId":"202007159031","channelConfigId":"202011230001"}'
)
EXPECTED_1 = (
    "auth-v2/202011230001/2026-11-24T08:30:15.123Z/content-length;content-type/"
    "bb22f7612ab6d3a91f2eb4011042ba86d7dc98bb29b6c6569004093e01f75c13"
)

# A stand-in for gateway/cli.py: a parser with subcommands, `sign` registered by the module.
DRIVER = """
import argparse, sys
from gateway.signcli import add_sign_parser, run_sign
parser = argparse.ArgumentParser(prog="gateway")
sub = parser.add_subparsers(dest="command", required=True)
add_sign_parser(sub)
args = parser.parse_args(sys.argv[1:])
assert args.handler is run_sign
sys.exit(args.handler(args))
"""


def run(args: list[str], *, secret: str | None = SECRET) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CEC_SECRET_KEY"}
    env["PYTHONPATH"] = str(ROOT)
    if secret is not None:
        env["CEC_SECRET_KEY"] = secret
    return subprocess.run(
        [sys.executable, "-c", DRIVER, "sign", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_vector_1_from_env() -> None:
    out = run(["--access-key", AK, "--timestamp", TS, "--payload", PAYLOAD_1])
    assert out.returncode == 0, out.stderr
    assert out.stdout == EXPECTED_1 + "\n"
    assert SECRET not in out.stderr


def test_vector_1_explicit_method_uri_headers() -> None:
    out = run(
        [
            "--access-key", AK, "--timestamp", TS, "--payload", PAYLOAD_1,
            "--method", "POST",
            "--uri", "/service-cloud/webclient/chat_client/js/newThirdPartyClient.js",
            "--header", "Content-Type: application/json;charset=UTF-8",
            "--header", "Content-Length: 112",
        ]
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == EXPECTED_1


def test_headers_replace_the_default_set() -> None:
    out = run(
        ["--access-key", AK, "--timestamp", TS, "--payload", PAYLOAD_1,
         "--header", "Content-Type: application/json;charset=UTF-8"]
    )
    assert out.returncode == 0, out.stderr
    got = out.stdout.strip()
    assert got.split("/")[3] == "content-type"
    assert signing.verify(got, secret=SECRET, payload=PAYLOAD_1)


def test_secret_key_file_wins(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text(SECRET + "\n")
    out = run(
        ["--access-key", AK, "--timestamp", TS, "--payload", PAYLOAD_1,
         "--secret-key-file", str(path)],
        secret="wrongwrongwrong",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == EXPECTED_1


def test_unreadable_secret_file(tmp_path: Path) -> None:
    out = run(
        ["--access-key", AK, "--payload", PAYLOAD_1,
         "--secret-key-file", str(tmp_path / "missing")],
    )
    assert out.returncode == 2
    assert "secret-key-file" in out.stderr
    assert out.stdout == ""


def test_missing_secret() -> None:
    out = run(["--access-key", AK, "--timestamp", TS, "--payload", PAYLOAD_1], secret=None)
    assert out.returncode == 2
    assert "CEC_SECRET_KEY" in out.stderr
    assert "--secret-key-file" in out.stderr
    assert out.stdout == ""
    empty = run(["--access-key", AK, "--payload", PAYLOAD_1], secret="  ")
    assert empty.returncode == 2


def test_no_secret_key_option() -> None:
    out = run(["--access-key", AK, "--payload", PAYLOAD_1, "--secret-key", SECRET])
    assert out.returncode == 2
    assert out.stdout == ""
    help_text = run(["--help"]).stdout
    assert "--secret-key-file" in help_text
    assert "--secret-key " not in help_text and "--secret-key\n" not in help_text


def test_default_timestamp_is_now() -> None:
    before = datetime.now(UTC)
    out = run(["--access-key", AK, "--payload", PAYLOAD_1])
    assert out.returncode == 0, out.stderr
    parsed = signing.parse_authorization(out.stdout.strip())
    assert parsed is not None
    stamp = datetime.strptime(parsed.timestamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert before - timedelta(seconds=1) <= stamp <= datetime.now(UTC)
    assert signing.verify(out.stdout.strip(), secret=SECRET, payload=PAYLOAD_1, access_key=AK)


@pytest.mark.parametrize(
    "extra",
    [
        ["--payload", "{not json"],
        ["--payload", PAYLOAD_1, "--header", "no colon here"],
        ["--payload", PAYLOAD_1, "--header", "A: 1", "--header", "a: 2"],
    ],
)
def test_bad_input_exit_2(extra: list[str]) -> None:
    out = run(["--access-key", AK, *extra])
    assert out.returncode == 2
    assert out.stdout == ""
    assert SECRET not in out.stderr
