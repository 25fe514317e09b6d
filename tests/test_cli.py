"""The command line: ``gateway check`` and ``gateway run`` as real processes."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import pytest

from tests.support.gateway import ROUTES
from tests.support.ports import busy_port, free_port
from tests.support.process import (
    port_accepts,
    run_cli,
    start_gateway_process,
    wait_for,
)
from tests.support.upstreams import Echo


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_check_ok_prints_routes(tmp_path: Path) -> None:
    conf = write(tmp_path, """
listen: {host: 127.0.0.1, port: 8080}
routes:
  - prefix: /
    upstream: http://127.0.0.1:3000/
    preserve_host: true
  - prefix: /service-cloud/
    upstream: https://cec.example.com/service-cloud/
cors: {allow_origins: [https://www.example.com], allow_credentials: true}
""")
    out = run_cli("check", "-c", str(conf))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "OK" in text
    assert "http://127.0.0.1:8080" in text
    # longest prefix first, as they are matched
    assert text.index("/service-cloud/") < text.index("http://127.0.0.1:3000/")
    assert "https://cec.example.com/service-cloud/" in text
    assert "https://www.example.com" in text


def test_check_reports_every_problem_with_path_value_and_fix(tmp_path: Path) -> None:
    conf = write(tmp_path, """
listen: {port: 99999}
limits: {client_max_body_size: 1mb}
trusted_proxies: [10.0.0.0/33]
routes:
  - prefix: /service-cloud/
    upstream: https://servicestage.besclouds.com/service-cloud
cors: {allow_origins: ["*"], allow_credentials: true}
""")
    out = run_cli("check", "-c", str(conf))
    assert out.returncode != 0
    assert out.stdout == ""
    err = out.stderr
    assert "5 problem" in err
    for path, value in [("listen.port", "99999"), ("limits.client_max_body_size", "1mb"),
                        ("trusted_proxies[0]", "10.0.0.0/33")]:
        line = next(ln for ln in err.splitlines() if ln.strip().startswith(f"- {path}:"))
        assert value in line, line
    assert "routes[0]" in err
    assert "/service-cloudwebclient/chat_client/js/thirdPartyClient.js" in err
    assert "https://servicestage.besclouds.com/service-cloud/" in err  # the fix
    assert "- cors" in err
    assert err.count("fix:") >= 4
    assert "Traceback" not in err


def test_check_missing_env_variable(tmp_path: Path) -> None:
    conf = write(tmp_path, "routes:\n  - {prefix: /, upstream: '${UPSTREAM_URL}'}\n")
    out = run_cli("check", "-c", str(conf), env={"PATH": "/usr/bin:/bin"})
    assert out.returncode != 0
    assert "routes[0].upstream" in out.stderr and "UPSTREAM_URL" in out.stderr
    out = run_cli("check", "-c", str(conf),
                      env={"PATH": "/usr/bin:/bin", "UPSTREAM_URL": "http://127.0.0.1:1/"})
    assert out.returncode == 0, out.stderr


def test_check_missing_file(tmp_path: Path) -> None:
    out = run_cli("check", "-c", str(tmp_path / "absent.yaml"))
    assert out.returncode != 0
    assert "absent.yaml" in out.stderr
    assert "Traceback" not in out.stderr


def test_run_with_bad_config_does_not_start(tmp_path: Path) -> None:
    conf = write(tmp_path, "routes: []\n")
    out = run_cli("run", "-c", str(conf))
    assert out.returncode != 0
    assert "routes" in out.stderr
    assert "listening" not in out.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_run_on_a_busy_port_fails_cleanly(tmp_path: Path, workers: str) -> None:
    with busy_port() as port:
        conf = write(tmp_path, f"listen: {{host: 127.0.0.1, port: {port}}}\n"
                               "routes:\n  - {prefix: /, upstream: 'http://127.0.0.1:1/'}\n")
        out = run_cli("run", "-c", str(conf), "--workers", workers)
    assert out.returncode != 0
    assert str(port) in out.stderr
    assert "Traceback" not in out.stderr


async def test_run_logs_where_it_listens_and_serves(tmp_path: Path, echo: Echo) -> None:
    port = free_port()
    text = ROUTES.replace("${ECHO}", echo.url) + f"listen: {{host: 127.0.0.1, port: {port}}}\n"
    gw = await start_gateway_process(text, tmp_path)
    try:
        assert gw.url == f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            async with http.get(gw.url + "/app/hello?q=1") as resp:
                assert resp.status == 200
                assert (await resp.json())["target"] == "/up/hello?q=1"
    finally:
        code = await gw.stop()
    assert code == 0
    log = gw.log_text()
    assert sum("listening on" in line for line in log.splitlines()) == 1
    assert "/app/hello" in log  # the access log line
    assert "q=1" not in log
    assert "Traceback" not in log


async def test_sigterm_is_graceful(tmp_path: Path, echo: Echo) -> None:
    text = ROUTES.replace("${ECHO}", echo.url) + """
listen: {host: 127.0.0.1, port: 0}
timeouts: {shutdown_grace: 10s}
"""
    gw = await start_gateway_process(text, tmp_path)
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as http:
        slow = asyncio.ensure_future(http.get(gw.url + "/app/do/slow?delay=1.5"))
        await wait_for(lambda: bool(echo.seen), what="the slow request upstream")
        start = loop.time()
        gw.proc.send_signal(signal.SIGTERM)
        await wait_for(lambda: not port_accepts(gw.port), what="the listener to close")
        # no new connections once shutting down
        refused = False
        try:
            async with http.get(gw.url + "/app/late") as late:
                await late.read()
        except aiohttp.ClientConnectionError:
            refused = True
        assert refused
        resp = await slow
        assert resp.status == 200
        assert (await resp.json())["path"] == "/up/do/slow"
        resp.release()
    async with asyncio.timeout(10):
        code = await gw.proc.wait()
    assert code == 0
    assert loop.time() - start < 8
    assert [s.path for s in echo.seen] == ["/up/do/slow"]
    log = gw.log_text()
    assert "shutting down" in log
    assert "Traceback" not in log


async def test_sigint_stops_too(tmp_path: Path, echo: Echo) -> None:
    text = ROUTES.replace("${ECHO}", echo.url) + "listen: {host: 127.0.0.1, port: 0}\n"
    gw = await start_gateway_process(text, tmp_path)
    gw.proc.send_signal(signal.SIGINT)
    async with asyncio.timeout(10):
        assert await gw.proc.wait() == 0


async def test_several_workers_serve_and_stop(tmp_path: Path, echo: Echo) -> None:
    text = ROUTES.replace("${ECHO}", echo.url) + "listen: {host: 127.0.0.1, port: 0}\n"
    gw = await start_gateway_process(text, tmp_path, "--workers", "2")
    try:
        async with aiohttp.ClientSession() as http:
            for i in range(4):
                async with http.get(f"{gw.url}/app/w{i}") as resp:
                    assert resp.status == 200
    finally:
        code = await gw.stop()
    assert code == 0
    assert [s.path for s in echo.seen] == [f"/up/w{i}" for i in range(4)]
    assert "Traceback" not in gw.log_text()


# ---------------------------------------------------------------- options, help, version


@pytest.mark.parametrize("argv", [
    ["--log-format", "json", "--log-level", "debug", "-c", "a.yaml", "check"],
    ["check", "--log-format", "json", "--log-level", "debug", "-c", "a.yaml"],
    ["--log-format", "json", "check", "--log-level", "debug", "-c", "a.yaml"],
    ["-c", "a.yaml", "--log-level", "debug", "check", "--log-format", "json"],
])
def test_global_options_before_or_after_the_command(argv: list[str]) -> None:
    from gateway.cli import build_parser

    args = build_parser().parse_args(argv)
    assert (args.command, args.log_format, args.log_level, args.config) == \
        ("check", "json", "DEBUG", "a.yaml")


@pytest.mark.parametrize("command", ["run", "check", "reload", "demo", "sandbox", "init"])
def test_config_given_before_a_command_is_not_replaced_by_its_default(command: str) -> None:
    from gateway.cli import build_parser

    args = build_parser().parse_args(["-c", "mine.yaml", command])
    assert args.config == "mine.yaml"
    args = build_parser().parse_args([command])
    assert args.config is None  # main() fills in the default (demo: its own fallback)


def test_version_and_operator_help(tmp_path: Path) -> None:
    from gateway import __version__

    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"gateway (cec-gateway) {__version__}"
    top = run_cli("--help").stdout
    for command in ("run", "check", "reload", "init", "demo", "sandbox", "sign"):
        assert f"\n    {command} " in top, command
    assert "exit status:" in top and "\n  2  the configuration" in top
    assert "before or after the command" in top
    check = " ".join(run_cli("check", "--help").stdout.split())  # however it is wrapped
    assert "-c FILE, --config FILE the configuration file (default:" in check
    assert "--log-format" in check and "Exit 0 if it is valid, 2" in check


def test_log_format_after_the_command_is_honoured(tmp_path: Path) -> None:
    conf = write(tmp_path, "routes: []\n")
    before = run_cli("--log-format", "json", "run", "-c", str(conf))
    after = run_cli("run", "-c", str(conf), "--log-format", "json")
    assert before.returncode == after.returncode == 2
    assert "invalid choice" not in after.stderr and "unrecognized" not in after.stderr
    assert before.stderr.count("routes") == after.stderr.count("routes") > 0


def test_init_writes_the_sample_that_check_accepts(tmp_path: Path) -> None:
    from gateway.demo.cli import sample_config

    target = tmp_path / "new.yaml"
    out = run_cli("init", "-c", str(target))
    assert out.returncode == 0, out.stderr
    assert target.read_text(encoding="utf-8") == sample_config()
    assert "gateway check -c" in out.stdout
    again = run_cli("init", "-c", str(target))
    assert again.returncode == 1 and "--force" in again.stderr
    env = {"PATH": "/usr/bin:/bin", "CEC_SECRET_KEY": "a" * 43,
           "GATEWAY_TOKEN_KEY": "b" * 64, "GATEWAY_API_KEY": "c" * 64}
    checked = run_cli("check", "-c", str(target), env=env)
    assert checked.returncode == 0, checked.stderr
    unset = run_cli("check", "-c", str(target), env={"PATH": "/usr/bin:/bin"})
    assert unset.returncode == 2 and "CEC_SECRET_KEY is not set" in unset.stderr


def test_check_and_run_refuse_disagreeing_pool_keys_alike(tmp_path: Path) -> None:
    """Two routes to one upstream share its pool: different limits for it are refused by
    `check` and by `run` (before it listens), with the same words."""
    conf = write(tmp_path, """
listen: {host: 127.0.0.1, port: 0}
routes:
  - prefix: /a/
    upstream: http://127.0.0.1:3000/a/
    max_connections: 8
  - prefix: /b/
    upstream: http://127.0.0.1:3000/b/
    max_connections: 16
""")
    checked = run_cli("check", "-c", str(conf))
    ran = run_cli("run", "-c", str(conf))
    for out in (checked, ran):
        assert out.returncode != 0
        assert "routes[1].max_connections and routes[0].max_connections differ" in out.stderr
        assert "fix: set max_connections on one of them only, or the same on both" in out.stderr
        assert "Traceback" not in out.stderr
