"""`gateway check` is the same gate as `gateway run`, over one corpus of broken configs.

Each config is given to both commands as real processes. `check` must refuse exactly what
`run` refuses, and `run` must refuse it before listening, with the key path and a fix (and
never the secret: the Redis password here is the marker ``pa/ss-SECRET``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from gateway.cli import main
from tests.support.process import launch_gateway

SECRET = "pa/ss-SECRET"  # a password with a '/', pasted unencoded into the URL

BASE = """
listen: {{host: {host}, port: 0{tls}}}
routes:
  - {{prefix: /, upstream: "http://127.0.0.1:9/"{ca}}}
cec:
  tenant_space_id: "202007159031"
  channel_config_id: "202011230001"
  auth: {{mode: token}}
{guest}token:
  signing_key: "{key}"
  store: "{store}"
  rate_limit: "{rate}"
{redis}
timeouts: {{shutdown_grace: 0s}}
{pid}"""


class Files:
    def __init__(self, d: Path) -> None:
        self.d = d
        ca, other = trustme.CA(), trustme.CA()
        leaf, stranger = ca.issue_cert("127.0.0.1"), other.issue_cert("127.0.0.1")
        self.ca = self._w("ca.pem", ca.cert_pem.bytes())
        self.cert = self._w("cert.pem", leaf.cert_chain_pems[0].bytes())
        self.key = self._w("key.pem", leaf.private_key_pem.bytes())
        self.other_key = self._w("other-key.pem", stranger.private_key_pem.bytes())
        self.garbage = self._w("garbage.pem", b"this is not a certificate\n")
        key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
        self.encrypted_key = self._w("enc-key.pem", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pass phrase")))
        self.password = self._w("redis-password", b"s3cret-from-file\n")

    def _w(self, name: str, data: bytes) -> Path:
        path = self.d / name
        path.write_bytes(data)
        return path


def config(f: Files, *, tls: tuple[Path, Path] | None = None, ca: Path | None = None,
           store: str = "memory", rate: str = "50/second", redis: str = "",
           host: str = "127.0.0.1", guest: str = "", pid: str = "") -> str:
    return BASE.format(
        pid=f"pid_file: {pid}\n" if pid else "",
        host=host, guest=f"  guest: {guest}\n" if guest else "",
        tls=f", tls: {{cert_file: '{tls[0]}', key_file: '{tls[1]}'}}" if tls else "",
        ca=f", ca_file: '{ca}'" if ca else "",
        key="k" * 32, store=store, rate=rate,
        redis=f"  redis: {redis}" if redis else "")


# name -> (config maker, the key paths both commands must name). Several mistakes share a
# config (each is reported on its own) so that the corpus costs few processes.
BROKEN: dict[str, tuple[Callable[[Files], str], list[str]]] = {
    "rate in words, unencoded password, mismatched pair, route CA not PEM": (
        lambda f: config(f, rate="lots", store=f"redis://:{SECRET}@127.0.0.1:6379/0",
                         tls=(f.cert, f.other_key), ca=f.garbage),
        ["token.rate_limit", "token.store", "listen.tls", "routes[0].ca_file"]),
    "zero rate, sentinel without service, certificate not PEM": (
        lambda f: config(f, rate="0/second", store="redis+sentinel://127.0.0.1:26379",
                         tls=(f.garbage, f.key)),
        ["token.rate_limit", "token.store", "listen.tls"]),
    "cluster port not a number, encrypted key, Redis CA not PEM": (
        lambda f: config(f, store="redis+cluster://127.0.0.1:7000,127.0.0.1:x",
                         tls=(f.cert, f.encrypted_key), redis=f"{{ca_file: '{f.garbage}'}}"),
        ["token.store", "listen.tls", "token.redis.ca_file"]),
    "cookie name, short cookie key, unknown listen host, pid_file directory": (
        lambda f: config(f, host="gateway-host.invalid",
                         guest="{cookie_name: 'cec guest;', cookie_key: short}",
                         pid="/nonexistent-run-dir/gateway.pid"),
        ["cec.guest.cookie_name", "cec.guest.cookie_key", "listen.host", "pid_file"]),
    "not a store": (lambda f: config(f, store="mysql://127.0.0.1/"), ["token.store"]),
    "redis options on memory": (lambda f: config(f, redis="{username: gw}"), ["token"]),
    "ca_file without TLS": (
        lambda f: config(f, store="redis://127.0.0.1:6379/0", redis=f"{{ca_file: '{f.ca}'}}"),
        ["token"]),
    "password twice": (
        lambda f: config(f, store="redis://:x@127.0.0.1:6379/0",
                         redis=f"{{password_file: '{f.password}'}}"), ["token"]),
}

GOOD: dict[str, Callable[[Files], str]] = {
    "tls, CA files, Redis user and password file": lambda f: config(
        f, tls=(f.cert, f.key), ca=f.ca, store="redis://127.0.0.1:1/0",
        redis=f"{{username: gw, password_file: '{f.password}'}}"),
    "rediss with ca_file": lambda f: config(
        f, store="rediss://127.0.0.1:1/0", redis=f"{{ca_file: '{f.ca}'}}"),
    "encoded password in URL": lambda f: config(f, store="redis://:pa%2Fss@127.0.0.1:1/0"),
    "sentinel": lambda f: config(f, store="redis+sentinel://127.0.0.1:1,127.0.0.1:2/mymaster/0"),
    "cluster": lambda f: config(f, store="redis+cluster://127.0.0.1:1,127.0.0.1:2"),
}


def check(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """`gateway check -c PATH` through the real command line, in this process (fast)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    capsys.readouterr()
    try:
        code = main(["check", "-c", str(path)])
    finally:
        root.handlers[:], root.level = handlers, level
    captured = capsys.readouterr()
    return code, captured.out + captured.err


async def run_all(configs: dict[str, str], d: Path) -> dict[str, tuple[Path, int, str]]:
    """name -> (config path, run exit or 0 once it listened, run output): `gateway run` as
    the real process it is in production, all in parallel."""
    async def run(name: str, text: str) -> tuple[Path, int, str]:
        gw = await launch_gateway(text, d, name=name.replace(" ", "-").replace(",", ""))
        listened = await gw.listening(60)
        code = await gw.stop()
        assert gw.config is not None
        return gw.config, 0 if listened else code, gw.log_text()

    results = await asyncio.gather(*(run(name, text) for name, text in configs.items()))
    return dict(zip(configs, results, strict=True))


def verdicts(configs: dict[str, str], d: Path, capsys: pytest.CaptureFixture[str]
             ) -> dict[str, tuple[int, str, int, str]]:
    """name -> (check exit, check output, run exit or 0 once it listened, run output)."""
    runs = asyncio.run(run_all(configs, d))
    return {name: (*check(path, capsys), code, text) for name, (path, code, text) in runs.items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    return Files(tmp_path_factory.mktemp("check-gate"))


def test_check_and_run_refuse_the_same_broken_configs(
        files: Files, capsys: pytest.CaptureFixture[str]) -> None:
    results = verdicts({name: make(files) for name, (make, _) in BROKEN.items()}, files.d,
                       capsys)
    for name, (check_rc, check_out, run_rc, run_out) in results.items():
        assert check_rc != 0, f"{name}: check passed what run must refuse:\n{check_out}"
        assert run_rc != 0 and "listening on" not in run_out, f"{name}: run:\n{run_out}"
        for out in (check_out, run_out):
            for key in BROKEN[name][1]:
                assert f"  - {key}: " in out, f"{name}: {key} not named:\n{out}"
            assert out.count("fix:") >= len(BROKEN[name][1]), f"{name}:\n{out}"
            assert "Traceback" not in out, f"{name}:\n{out}"
            assert "SECRET" not in out and "s3cret" not in out, f"{name} shows a secret"


def test_check_and_run_accept_the_same_good_configs(
        files: Files, capsys: pytest.CaptureFixture[str]) -> None:
    results = verdicts({name: make(files) for name, make in GOOD.items()}, files.d, capsys)
    for name, (check_rc, check_out, run_rc, run_out) in results.items():
        assert check_rc == 0, f"{name}: check refused:\n{check_out}"
        assert run_rc == 0, f"{name}: run did not start:\n{run_out}"
        assert "s3cret" not in check_out + run_out
