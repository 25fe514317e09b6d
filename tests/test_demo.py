"""``gateway demo`` and ``gateway sandbox`` as real processes, and the sample site's pieces.

The demo runs the sample configuration shipped in the package (``gateway/demo/gateway.yaml``,
what ``gateway init`` writes) with free ports substituted, so a change to it that breaks the
README's first command fails here; and as it is, with its default ports taken and no secret in
the environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import string
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestClient, TestServer

from gateway.config import load_config_text
from gateway.demo.cli import sample_config
from gateway.demo.run import demo_urls, move_ports
from gateway.demo.site import create_site_app

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0
XSS_SAFE_PROBE = '"</script><img src=x onerror=alert(1)>'


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def demo_env(gw: int, site: int, sandbox: int) -> dict[str, str]:
    alphabet = string.ascii_letters + string.digits
    return {
        **os.environ,
        "CEC_SECRET_KEY": "".join(secrets.choice(alphabet) for _ in range(43)),
        "GATEWAY_TOKEN_KEY": secrets.token_hex(32),
        "GATEWAY_API_KEY": secrets.token_hex(32),
        "GATEWAY_PORT": str(gw),
        "SITE_UPSTREAM": f"http://127.0.0.1:{site}/",
        "CEC_UPSTREAM": f"http://127.0.0.1:{sandbox}/service-cloud/",
        "CEC_AUTH_MODE": "authorization",
        "PYTHONUNBUFFERED": "1",
    }


def demo_config(tmp_path: Path, sandbox: int, admin: int) -> Path:
    text = sample_config()
    text, n = re.subn(r"(?m)^(\s+port: )8090\b", rf"\g<1>{sandbox}", text)
    assert n == 1, "gateway.yaml's sandbox section no longer has port: 8090"
    text = re.sub(r"(?m)^(\s+port: )9090\b", rf"\g<1>{admin}", text)
    path = tmp_path / "gateway.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@contextlib.asynccontextmanager
async def process(*args: str, env: dict[str, str], stderr: Path
                  ) -> AsyncIterator[asyncio.subprocess.Process]:
    with stderr.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", *args, cwd=ROOT, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=err)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


async def read_line(proc: asyncio.subprocess.Process, stderr: Path) -> str:
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), STARTUP_TIMEOUT)
    except TimeoutError:
        raise AssertionError("no output; stderr:\n" + _text(stderr)) from None
    assert line, "exited early; stderr:\n" + _text(stderr)
    return line.decode().rstrip("\n")


async def read_announcement(proc: asyncio.subprocess.Process, stderr: Path) -> list[str]:
    """The demo's lines up to and including ``Agent console: ...``."""
    lines = [await read_line(proc, stderr)]
    while not lines[-1].startswith("Agent console: "):
        lines.append(await read_line(proc, stderr))
    return lines


async def stop(proc: asyncio.subprocess.Process) -> int:
    proc.send_signal(signal.SIGINT)
    return await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)


async def test_demo_prints_urls_serves_everything_and_stops_on_sigint(tmp_path: Path) -> None:
    gw, site, sandbox, admin = free_port(), free_port(), free_port(), free_port()
    env = demo_env(gw, site, sandbox)
    config = demo_config(tmp_path, sandbox, admin)
    err = tmp_path / "stderr.txt"
    async with process("demo", "-c", str(config), env=env, stderr=err) as proc:
        lines = await read_announcement(proc, err)
        first, second = lines[-2:]
        assert not any("throw-away" in line or "is taken" in line for line in lines), lines
        assert f"  CEC sandbox  http://127.0.0.1:{sandbox}/service-cloud/" in "\n".join(lines)
        assert first == f"Site: http://127.0.0.1:{gw}/"
        assert second == f"Agent console: http://127.0.0.1:{gw}/service-cloud/agent/"
        site_url = first.removeprefix("Site: ")
        console_url = second.removeprefix("Agent console: ")

        # unsafe=True: keep cookies set by an IP-address host (the default jar drops them).
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            async with http.get(site_url) as r:
                assert r.status == 200
                page = await r.text()
                assert '<script src="/gateway/chat.js" defer></script>' in page
            async with http.get(console_url) as r:
                assert r.status == 200
                assert 'id="agent-login-submit"' in await r.text()
            # The identity source: the gateway asks the site's /api/me with our cookie.
            async with http.post(site_url + "login", data={"name": "Bob"}) as r:
                assert r.status == 200 and "Signed in as Bob" in await r.text()
            async with http.get(site_url + "gateway/chat.js") as r:
                assert r.status == 200
                assert '"userName":"Bob"' in await r.text()
            # Signed by the gateway with CEC_SECRET_KEY, verified by the sandbox with the same.
            body = {"thirdUserName": "x", "thirdUserId": "x", "tenantSpaceId": "x",
                    "channelConfigId": "x", "locale": "en"}
            async with http.post(
                    site_url + "service-cloud/webclient/chat_client/js/newThirdPartyClient.js",
                    data=json.dumps(body)) as r:
                assert r.status == 200, await r.text()
                cookie = r.headers.get("Set-Cookie", "")
                assert cookie.startswith("ccmessaging-token=")
                assert "Domain" not in cookie and "Path=/service-cloud" in cookie

        assert await stop(proc) == 0
    assert env["CEC_SECRET_KEY"] not in err.read_text()


DEFAULT_PORTS = {"gateway": 8080, "sample site": 3000, "CEC sandbox": 8090, "admin": 9090}


def hold_ports(ports: list[int]) -> list[socket.socket]:
    """Listen on each port that is free (one already taken by someone else is taken too)."""
    held = []
    for port in ports:
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            s.close()
            continue
        s.listen(1)
        held.append(s)
    return held


async def test_demo_from_the_package_with_its_ports_taken_and_no_secrets(tmp_path: Path
                                                                          ) -> None:
    """No config file, no secret in the environment, every default port busy: it still runs,
    says what it generated and where each component went, and the chat's signing works."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("CEC_SECRET_KEY", "GATEWAY_TOKEN_KEY", "GATEWAY_API_KEY", "GATEWAY_PORT",
                        "SITE_UPSTREAM", "CEC_UPSTREAM", "CEC_AUTH_MODE", "GATEWAY_HOST")}
    env["PYTHONUNBUFFERED"] = "1"
    held = hold_ports(list(DEFAULT_PORTS.values()))
    err = tmp_path / "stderr.txt"
    try:
        with err.open("wb") as sink:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway", "demo", cwd=tmp_path, env=env,
                stdout=asyncio.subprocess.PIPE, stderr=sink)
        try:
            lines = await read_announcement(proc, err)
            text = "\n".join(lines)
            assert "configuration: the sample shipped with the package" in lines[0]
            assert ("Generated throw-away secrets for this run: CEC_SECRET_KEY, "
                    "GATEWAY_TOKEN_KEY, GATEWAY_API_KEY") in text
            where = {}
            for name, port in DEFAULT_PORTS.items():
                assert f"Port {port} ({name}) is taken: using " in text, text
                m = re.search(rf"^  {re.escape(name)} +http://127\.0\.0\.1:(\d+)/", text, re.M)
                assert m, text
                where[name] = int(m.group(1))
                assert where[name] != port
            site_url = lines[-2].removeprefix("Site: ")
            assert site_url == f"http://127.0.0.1:{where['gateway']}/"
            async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
                async with http.get(site_url) as r:
                    assert r.status == 200 and "Example Corp" in await r.text()
                async with http.get(f"http://127.0.0.1:{where['admin']}/healthz") as r:
                    assert r.status == 200
                body = {"thirdUserName": "x", "thirdUserId": "x", "tenantSpaceId": "x",
                        "channelConfigId": "x", "locale": "en"}
                # Signed with the generated secret, verified by the sandbox with the same one.
                async with http.post(site_url + "service-cloud/webclient/chat_client/js/"
                                     "newThirdPartyClient.js", data=json.dumps(body)) as r:
                    assert r.status == 200, await r.text()
            assert await stop(proc) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    finally:
        for s in held:
            s.close()


async def test_demo_on_a_taken_explicit_port_says_which_and_how(tmp_path: Path) -> None:
    held = hold_ports([free_port()])
    port = held[0].getsockname()[1]
    err = tmp_path / "stderr.txt"
    try:
        async with process("demo", "--port", str(port), env=dict(os.environ),
                           stderr=err) as proc:
            assert await asyncio.wait_for(proc.wait(), STARTUP_TIMEOUT) == 1
    finally:
        held[0].close()
    text = err.read_text()
    assert f"cannot listen for the gateway on 127.0.0.1:{port}: the port is taken; " \
           "set listen.port or --port to another port" in text
    assert "Traceback" not in text and "Unclosed" not in text


def test_moved_ports_are_followed_by_every_url() -> None:
    config = load_config_text(sample_config(), env={
        "CEC_SECRET_KEY": "a" * 43, "GATEWAY_TOKEN_KEY": "b" * 64, "GATEWAY_API_KEY": "c" * 64})
    moved = move_ports(config, {8080: 18080, 3000: 13000, 8090: 18090, 9090: 19090})
    assert moved.listen.port == 18080
    assert moved.admin is not None and moved.admin.port == 19090
    assert moved.sandbox is not None and moved.sandbox.port == 18090
    assert moved.sandbox.validate_url is not None
    assert moved.sandbox.validate_url.startswith("http://127.0.0.1:18080/rest/")
    assert sorted(r.upstream for r in moved.routes) == [
        "http://127.0.0.1:13000/", "http://127.0.0.1:18090/service-cloud/"]
    assert moved.cors.allow_origins == ["http://localhost:18080"]
    assert moved.cec is not None and moved.cec.identity.url is not None
    assert moved.cec.identity.url.url == "http://127.0.0.1:13000/api/me"
    # The secrets survive the round trip (and stay hidden).
    assert moved.cec.auth.secret_key is not None
    assert moved.cec.auth.secret_key.get_secret_value() == "a" * 43
    assert move_ports(config, {}) is config


async def test_demo_reports_a_bad_config(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("routes: []\n", encoding="utf-8")
    err = tmp_path / "stderr.txt"
    async with process("demo", "-c", str(path), env=dict(os.environ), stderr=err) as proc:
        assert await asyncio.wait_for(proc.wait(), STARTUP_TIMEOUT) == 2
    assert "problem" in err.read_text()


async def test_sandbox_alone_from_its_own_file(tmp_path: Path) -> None:
    port = free_port()
    path = tmp_path / "sandbox.yaml"
    path.write_text(f"port: {port}\nvalidate_url: null\n", encoding="utf-8")
    err = tmp_path / "stderr.txt"
    env = {k: v for k, v in os.environ.items() if k != "CEC_SECRET_KEY"}
    async with process("sandbox", "-c", str(path), env=env, stderr=err) as proc:
        first = await read_line(proc, err)
        assert first == f"CEC sandbox: http://127.0.0.1:{port}/service-cloud/"
        async with aiohttp.ClientSession() as http, http.get(
                f"http://127.0.0.1:{port}/service-cloud/health") as r:
            assert r.status == 200
        assert await stop(proc) == 0


# ---------------------------------------------------------------- in-process pieces


def test_demo_urls_follow_the_config() -> None:
    text = """
listen: {host: 0.0.0.0, port: 9000}
routes:
  - {prefix: /cec/, upstream: "http://127.0.0.1:7000/service-cloud/"}
  - {prefix: /, upstream: "http://127.0.0.1:3000/"}
cec: {tenant_space_id: t, channel_config_id: c, auth: {mode: authorization,
      secret_key: aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5bC7dE9f}}
sandbox: {port: 7000}
"""
    config = load_config_text(text, env={})
    assert demo_urls(config) == ("http://127.0.0.1:9000/", "http://127.0.0.1:9000/cec/agent/")


async def test_site_login_me_logout_and_escaping() -> None:
    async with TestClient(TestServer(create_site_app())) as client:
        r = await client.get("/api/me")
        assert r.status == 401
        r = await client.post("/login", data={"name": XSS_SAFE_PROBE})
        assert r.status == 200
        page = await r.text()
        assert XSS_SAFE_PROBE not in page  # escaped, never raw markup
        assert "&lt;img src=x onerror=alert(1)&gt;" in page
        r = await client.get("/api/me")
        assert r.status == 200
        me = await r.json()
        assert me["userName"] == XSS_SAFE_PROBE and me["userId"].startswith("user-")
        r = await client.post("/logout")
        assert r.status == 200
        assert (await client.get("/api/me")).status == 401
        r = await client.get("/guide-demo.html")
        text = await r.text()
        assert "newThirdPartyClient.js" in text and "secretKey'] =" not in text
