"""Config errors never show a secret: every error path of ``gateway check``, ``gateway run``
and reload (``gateway reload`` and SIGHUP to a running gateway), with planted secrets.

Each case plants unique values where secrets hide in real configs: a misspelt key (the
vendor's ``secretKey``, ``apikey``), a mapping or list where a scalar belongs, an unknown
section, a URL with a password, a root-level error (whose "value" is the whole tree), the
sandbox's agent passwords. The output must name the key and the fix, and contain none of
the planted values.
"""

from __future__ import annotations

import logging
import os
import signal
import textwrap
from pathlib import Path

import pytest

from gateway import cli
from gateway.config import load_config, load_config_text
from gateway.errors import ConfigError
from gateway.runtime import serving
from tests.support.process import gateway_cli, start_gateway_process

GOOD_SECRET = "PLANTgoodsecretPLANTgoodsecretPLANTgood1234"  # 43 chars, valid shape
TOKEN_KEY = "PLANTtokensigningkeyPLANT0123456789"

BASE = f"""
listen: {{host: 127.0.0.1, port: 0}}
access_log: false
timeouts: {{shutdown_grace: 1s}}
routes:
  - {{prefix: /service-cloud/, upstream: "http://127.0.0.1:9/service-cloud/"}}
  - {{prefix: /, upstream: "http://127.0.0.1:9/"}}
cec:
  tenant_space_id: "202007159031"
  channel_config_id: "202011230001"
  auth: {{mode: authorization, secret_key: "{GOOD_SECRET}"}}
token:
  signing_key: "{TOKEN_KEY}"
"""

# (name, YAML, key path the output must name, planted values that must not appear)
CASES: list[tuple[str, str, str, list[str]]] = [
    ("misspelt secretKey", BASE.replace(
        "auth: {mode: authorization, secret_key:", "auth: {mode: authorization, secretKey: "
        "PLANTvendorspelling, secret_key:"), "cec.auth.secretKey", ["PLANTvendorspelling"]),
    ("apikey", BASE + "  apikey: PLANTapikeyvalue0123456789\n", "token.apikey",
     ["PLANTapikeyvalue"]),
    ("root-level error dumps nothing", BASE.replace("auth: {mode: authorization,",
                                                    "auth: {mode: token,")
     .split("token:\n")[0], "<root>", [GOOD_SECRET, "PLANT"]),
    ("secret of the wrong shape", BASE.replace(GOOD_SECRET, "PLANTshortsecret"),
     "cec.auth.secret_key", ["PLANTshortsecret"]),
    ("short signing key", BASE.replace(TOKEN_KEY, "PLANTshort"), "token.signing_key",
     ["PLANTshort"]),
    ("unknown section holding a secret", BASE + "database: {password: PLANTdbpassword}\n",
     "database", ["PLANTdbpassword"]),
    ("mapping where a port belongs", BASE.replace(
        "port: 0}", "port: {value: PLANTinmapping}}"), "listen.port", ["PLANTinmapping"]),
    ("list where a string belongs", BASE.replace(
        'tenant_space_id: "202007159031"', "tenant_space_id: [PLANTinlist]"),
     "cec.tenant_space_id", ["PLANTinlist"]),
    ("store URL with a password", BASE + "  store: mysql://admin:PLANTstorepass@db/0\n",
     "token.store", ["PLANTstorepass"]),
    ("upstream URL with a password", BASE.replace(
        '"http://127.0.0.1:9/service-cloud/"', '"http://u:PLANTupstreampass@127.0.0.1:9/sc"'),
     "routes[0].upstream", ["PLANTupstreampass"]),
    ("cookie key as a mapping", BASE.replace(
        "  auth: {mode", "  guest: {cookie_key: {k: PLANTcookiekey}}\n  auth: {mode"),
     "cec.guest.cookie_key", ["PLANTcookiekey"]),
    ("sandbox agent password of the wrong type", BASE + textwrap.dedent("""
        sandbox:
          agents:
            - {id: a1, name: A, password: [PLANTagentpass]}
        """), "sandbox.agents[0].password", ["PLANTagentpass"]),
    ("sandbox agent with a misspelt password", BASE + textwrap.dedent("""
        sandbox:
          agents:
            - {id: a1, name: A, password: ok, pasword: PLANTmisspeltpass}
        """), "sandbox.agents[0].pasword", ["PLANTmisspeltpass"]),
    ("sandbox secretkey", BASE + "sandbox: {secretkey: PLANTsandboxsecret}\n",
     "sandbox.secretkey", ["PLANTsandboxsecret"]),
    ("YAML syntax error next to a secret", BASE + "oops: [PLANTyaml: : :\n", "",
     ["PLANTyaml"]),
]
IDS = [c[0] for c in CASES]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _assert_clean(output: str, where: str, planted: list[str]) -> None:
    assert where in output, output
    for value in planted:
        assert value not in output, f"{value!r} leaked:\n{output}"


@pytest.mark.parametrize(("name", "text", "where", "planted"), CASES, ids=IDS)
@pytest.mark.parametrize("command", ["check", "run", "reload"])
def test_cli_errors_name_the_key_never_the_secret(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, name: str,
        text: str, where: str, planted: list[str]) -> None:
    conf = _write(tmp_path, text)
    code = cli.main([command, "-c", str(conf)])
    out = capsys.readouterr()
    assert code == 2
    _assert_clean(out.out + out.err, where, planted)


@pytest.mark.parametrize(("name", "text", "where", "planted"), CASES, ids=IDS)
async def test_a_refused_reload_logs_no_secret(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str, text: str, where: str,
        planted: list[str]) -> None:
    conf = _write(tmp_path, BASE)
    async with serving(load_config(conf), config_path=str(conf)) as running:
        conf.write_text(text, encoding="utf-8")
        caplog.set_level(logging.INFO)
        assert await running.runtime.reload() is False
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "reload refused" in logged
    _assert_clean(logged, where, planted)


def test_misspellings_are_named() -> None:
    text = next(c for c in CASES if c[0] == "misspelt secretKey")[1]
    conf_err = _report_of(text)
    assert "cec.auth.secretKey" in conf_err
    assert "fix: did you mean secret_key?" in conf_err


def test_useful_values_are_still_shown(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    conf = _write(tmp_path, BASE.replace("port: 0}", "port: eighty}"))
    assert cli.main(["check", "-c", str(conf)]) == 2
    assert "listen.port" in capsys.readouterr().err
    assert "'eighty'" in _report_of(conf.read_text())


def _report_of(text: str) -> str:
    try:
        load_config_text(text, env={})
    except ConfigError as exc:
        return str(exc)
    return ""


# ------------------------------------------------------------------ real processes

ALL_AT_ONCE = CASES[0][1] + "  apikey: PLANTapikeyvalue0123456789\n" + textwrap.dedent("""
    database: {password: PLANTdbpassword}
    sandbox:
      agents:
        - {id: a1, name: A, password: ok, pasword: PLANTmisspeltpass}
    """)
ALL_PLANTED = ["PLANTvendorspelling", "PLANTapikeyvalue", "PLANTdbpassword",
               "PLANTmisspeltpass", GOOD_SECRET, TOKEN_KEY]


@pytest.mark.parametrize("command", ["check", "run", "reload"])
async def test_the_commands_as_processes(tmp_path: Path, command: str) -> None:
    conf = _write(tmp_path, ALL_AT_ONCE)
    code, out, err = await gateway_cli(command, "-c", str(conf))
    assert code == 2
    text = out + err
    assert "cec.auth.secretKey" in text and "sandbox.agents[0].pasword" in text
    for value in ALL_PLANTED:
        assert value not in text, f"{value!r} leaked:\n{text}"


async def test_sighup_with_a_bad_config_logs_no_secret(tmp_path: Path) -> None:
    gw = await start_gateway_process(BASE, tmp_path)
    try:
        (tmp_path / "gateway.yaml").write_text(ALL_AT_ONCE, encoding="utf-8")
        os.kill(gw.pid, signal.SIGHUP)
        await gw.wait_log("reload refused", within=15)
    finally:
        assert await gw.stop() == 0
    text = gw.log_text()
    assert "cec.auth.secretKey" in text
    for value in ALL_PLANTED:
        assert value not in text, f"{value!r} leaked:\n{text}"
