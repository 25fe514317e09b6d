"""The CEC secretKey never leaves the gateway: not in what it serves, forwards, logs or prints.

The secret is set to a known 43-character value; every kind of answer the gateway gives
(loader, page, signature, the CEC's answer to the injection, error pages 400/404/405/413/502,
callback answers, headers) is collected as raw bytes and searched for it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integration.conftest import (
    CONTEXT,
    NEW_CLIENT,
    SECRET,
    TOKEN_KEY,
    VALIDATE,
    BrowserFactory,
    Site,
    guest_config,
    third_user_data,
    token_config,
)
from tests.support.gateway import GatewayStarter
from tests.support.ports import free_port
from tests.support.process import clean_env, gateway_cli
from tests.support.upstreams import RawRecorder

NEEDLES = (SECRET.encode(), SECRET.lower().encode(), SECRET[:20].encode(), SECRET[-20:].encode())


def leaks(data: bytes) -> list[bytes]:
    return [n for n in NEEDLES if n in data]


def _config(cec: RawRecorder, site: Site) -> str:
    # No catch-all route (so 404 exists), a dead route (502), a small body limit (413), and
    # a token section so the callback's own error answers are part of the search too.
    dead = free_port()
    return guest_config(cec, site, extra=f"""
limits: {{client_max_body_size: 2k}}
token:
  signing_key: {TOKEN_KEY}
  store: memory
""").replace(f"""  - prefix: /
    upstream: {site.url}/
""", f"""  - prefix: /site/
    upstream: {site.url}/
  - prefix: /dead/
    upstream: http://127.0.0.1:{dead}/
""")


async def _raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(5):
            return await reader.read()
    finally:
        writer.close()


async def test_no_answer_carries_the_secret(
        start_gateway: GatewayStarter, cec: RawRecorder, site: Site, browser: BrowserFactory,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    gw = await start_gateway(_config(cec, site))
    b = browser()
    served: dict[str, bytes] = {}
    statuses: dict[str, int] = {}

    async def fetch(name: str, method: str, path: str, **kwargs: Any) -> None:
        async with b.request(method, gw.url + path, **kwargs) as resp:
            body = await resp.read()
            head = b"".join(k + b": " + v + b"\r\n" for k, v in resp.raw_headers)
            served[name] = f"{resp.status} {resp.reason}\r\n".encode() + head + b"\r\n" + body
            statuses[name] = resp.status

    page_data = third_user_data(secretKey=SECRET, nested={"secretKey": SECRET})
    await fetch("loader", "GET", "/gateway/chat.js")
    await fetch("loader-head", "HEAD", "/gateway/chat.js")
    await fetch("loader-cross-site", "GET", "/gateway/chat.js",
                headers={"Sec-Fetch-Site": "cross-site"})
    await fetch("page", "GET", "/chat/")
    await fetch("authorization", "POST", "/gateway/authorization", json=page_data)
    await fetch("authorization-405", "GET", "/gateway/authorization")
    await fetch("injection", "POST", NEW_CLIENT + "?&t=1", json=page_data)
    await fetch("injection-400", "POST", NEW_CLIENT,
                data=f'{{"secretKey": "{SECRET}", broken'.encode())
    await fetch("injection-too-big", "POST", NEW_CLIENT,
                data=json.dumps(third_user_data(secretKey=SECRET, pad="p" * 17000)).encode())
    await fetch("cec-plain", "GET", CONTEXT + "/webclient/chat_client/js/cobrowseCommon.js")
    await fetch("site", "GET", "/site/index.html")
    await fetch("404", "GET", "/nowhere")
    await fetch("413", "POST", "/site/upload", data=b"x" * 4096)
    await fetch("502", "GET", "/dead/page")
    await fetch("callback-403-or-result", "POST", VALIDATE,
                json={"Token": "x" * 30, "userId": "u", "userName": "n",
                      "tenantSpaceId": "1"})
    await fetch("callback-413", "POST", VALIDATE, json={"pad": "p" * 5000})
    await fetch("callback-405", "GET", VALIDATE)
    await fetch("issue-off", "POST", "/gateway/token", json={"userId": "u", "userName": "n"})
    served["raw-400"] = await _raw(gw.port, b"NOT-HTTP\r\n\r\n")
    served["raw-absolute"] = await _raw(
        gw.port, b"GET http://example.com/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")

    # The answers were what this test means them to be (else it would prove nothing).
    assert statuses["loader"] == statuses["page"] == statuses["injection"] == 200
    assert statuses["authorization"] == 200
    assert b"\r\n\r\nauth-v2/" in served["authorization"]
    assert statuses["injection-400"] == statuses["injection-too-big"] == 400
    assert statuses["404"] == 404 and statuses["413"] == 413 and statuses["502"] == 502
    assert statuses["authorization-405"] == statuses["callback-405"] == 405
    assert statuses["callback-413"] == 413
    assert served["raw-400"].startswith(b"HTTP/1.") and b" 400 " in served["raw-400"][:20]

    for name, data in served.items():
        assert leaks(data) == [], name
    # Nor did the gateway forward it: the CEC was sent no secret, in no header, in no body.
    assert cec.requests
    for got in cec.requests:
        wire = "".join(f"{k}: {v}\n" for k, v in got.headers).encode() + got.body
        assert leaks(wire) == [], got.path
    # The logs: the stripped secretKey is reported, its value is not.
    assert "secretKey" in caplog.text
    assert leaks(caplog.text.encode()) == []
    # Nor in any repr a debugger or a crash report would show.
    for obj in (gw.gateway.config, gw.gateway.ext, *gw.gateway.ext.endpoints.values(),
                *gw.gateway.ext.rewriters.values()):
        assert leaks(repr(obj).encode()) == [], type(obj)


async def _check_all(runs: list[tuple[Path, str | None]]) -> list[tuple[int, str]]:
    """``gateway check -c CONF`` for each (config, CEC_SECRET_KEY), run side by side:
    (exit code, stdout + stderr) for each."""
    def env(secret: str | None) -> dict[str, str]:
        return clean_env() if secret is None else {**clean_env(), "CEC_SECRET_KEY": secret}

    results = await asyncio.gather(*(gateway_cli("check", "-c", str(config), env=env(secret))
                                     for config, secret in runs))
    return [(code, out + err) for code, out, err in results]


async def test_gateway_check_never_prints_the_secret(cec: RawRecorder, site: Site,
                                               tmp_path: Path) -> None:
    conf = tmp_path / "gateway.yaml"
    conf.write_text(guest_config(cec, site), encoding="utf-8")
    # The same from a secret file, next to another mistake in the file.
    (tmp_path / "cec.secret").write_text(SECRET + "9\n", encoding="utf-8")
    conf_file = tmp_path / "from-file.yaml"
    conf_file.write_text(guest_config(cec, site).replace(
        "secret_key: ${CEC_SECRET_KEY}", "secret_key_file: cec.secret").replace(
        "locale: en", "locale: fr"), encoding="utf-8")
    bad = [SECRET + "9", SECRET[:-1] + "!"]
    good, *refused = await _check_all([(conf, SECRET), *((conf, b) for b in bad),
                                 (conf_file, None)])

    assert good[0] == 0, good[1]
    assert "OK" in good[1]
    assert leaks(good[1].encode()) == []
    # A secret of the wrong shape is refused, and not echoed back either.
    for (code, out), wrong in zip(refused, [*bad, SECRET + "9"], strict=True):
        assert code != 0
        assert "secret_key" in out and "43" in out
        assert leaks(out.encode()) == [] and wrong not in out
    assert "locale" in refused[-1][1]


async def test_secret_not_served_in_token_mode_pages(
        start_gateway: GatewayStarter, cec: RawRecorder, site: Site,
        browser: BrowserFactory) -> None:
    # A deployment may keep the CEC secret configured while running token mode.
    text = token_config(cec, site, fallback=True).replace(
        "auth: {mode: token}", "auth: {mode: token, secret_key: '${CEC_SECRET_KEY}'}")
    gw = await start_gateway(text)
    b: aiohttp.ClientSession = browser()
    for method, path in (("GET", "/gateway/chat.js"), ("GET", "/chat/"),
                         ("POST", "/gateway/authorization")):
        async with b.request(method, gw.url + path, json=third_user_data()) as resp:
            raw = b"".join(k + v for k, v in resp.raw_headers) + await resp.read()
            assert leaks(raw) == [], path
    async with b.post(gw.url + NEW_CLIENT, json=third_user_data(secretKey=SECRET)) as resp:
        assert resp.status == 200
        assert leaks(await resp.read()) == []
    assert leaks(cec.requests[-1].body) == []
