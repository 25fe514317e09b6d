"""TLS on both sides, with certificates made in the test by trustme.

Listener: the gateway serves HTTPS from cert/key files. Upstream: HTTPS verified against the
route's ca_file; a certificate that does not verify gives a 502 and a log line saying why.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import trustme

from gateway.config import load_config_text
from gateway.runtime import serving
from tests.support.gateway import ROUTES, build_config
from tests.support.upstreams import Echo, run_echo


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def pems(ca: trustme.CA, tmp_path: Path) -> Iterator[dict[str, Path]]:
    leaf = ca.issue_cert("127.0.0.1", "localhost", "::1")
    paths = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "cert.pem",
             "key": tmp_path / "key.pem"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    leaf.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    for extra in leaf.cert_chain_pems[1:]:
        extra.write_to_path(str(paths["cert"]), append=True)
    leaf.private_key_pem.write_to_path(str(paths["key"]))
    yield paths


@pytest.fixture
async def tls_echo(ca: trustme.CA) -> AsyncIterator[Echo]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    async with run_echo(ssl_context=ctx) as echo:
        yield echo


def client_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


async def test_listener_tls(echo: Echo, pems: dict[str, Path], ca: trustme.CA) -> None:
    cfg = build_config(ROUTES + f"""
listen:
  tls: {{cert_file: "{pems['cert']}", key_file: "{pems['key']}"}}
""", echo)
    async with serving(cfg) as gw:
        assert gw.url.startswith("https://")
        async with aiohttp.ClientSession() as http:
            async with http.get(gw.url + "/app/secure?x=1", ssl=client_ctx(ca)) as resp:
                assert resp.status == 200
                data = await resp.json()
            # a client that does not trust our CA cannot talk to it
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await http.get(gw.url + "/app/secure")
            # and plain HTTP on the TLS port gets nowhere
            with pytest.raises(aiohttp.ClientError):
                async with http.get(gw.url.replace("https://", "http://") + "/app/x") as r:
                    await r.read()
    assert data["target"] == "/up/secure?x=1"
    assert echo.seen[0].header("X-Forwarded-Proto") == "https"


async def test_upstream_https_with_ca_file(tls_echo: Echo, pems: dict[str, Path]) -> None:
    text = f"""
listen: {{host: 127.0.0.1, port: 0}}
routes:
  - prefix: /service-cloud/
    upstream: {tls_echo.url}/service-cloud/
    ca_file: "{pems['ca']}"
"""
    async with serving(load_config_text(text, env={})) as gw:
        async with aiohttp.ClientSession() as http:
            async with http.get(gw.url + "/service-cloud/webclient/a.js?t=1") as resp:
                assert resp.status == 200
                data = await resp.json()
            async with http.get(gw.url + "/service-cloud/do/redirect?to=/service-cloud/in",
                                allow_redirects=False) as resp:
                # the https upstream origin (default-port or not) maps back to our path
                assert resp.headers["Location"] == "/service-cloud/in"
            async with http.ws_connect(gw.url + "/service-cloud/do/ws") as ws:
                await ws.send_str("wss")
                assert await ws.receive_str(timeout=3) == "echo:wss"
    assert data["target"] == "/service-cloud/webclient/a.js?t=1"
    assert dict(data["headers"])["Host"] == f"127.0.0.1:{tls_echo.port}"
    # pooled: both plain requests used one TLS connection
    assert tls_echo.seen[0].peer_port == tls_echo.seen[1].peer_port


async def test_upstream_certificate_not_trusted_is_502(tls_echo: Echo,
                                                       caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    text = f"""
listen: {{host: 127.0.0.1, port: 0}}
routes:
  - prefix: /
    upstream: {tls_echo.url}/
"""
    with caplog.at_level(logging.WARNING, logger="gateway"):
        async with serving(load_config_text(text, env={})) as gw:
            async with aiohttp.ClientSession() as http:
                async with http.get(gw.url + "/x") as resp:
                    assert resp.status == 502
                    body = await resp.text()
    assert "certificate" in body.lower()
    assert len(body) < 200 and "Traceback" not in body
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    line = next(m for m in lines if "TLS" in m)
    assert f"127.0.0.1:{tls_echo.port}" in line
    assert "verif" in line.lower()
    assert "ca_file" in line  # tells the operator the fix
    assert tls_echo.seen == []


async def test_upstream_certificate_for_another_name_is_502(ca: trustme.CA, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture
                                                            ) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("cec.example.com").configure_cert(ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    async with run_echo(ssl_context=ctx) as other:
        text = f"""
listen: {{host: 127.0.0.1, port: 0}}
routes:
  - {{prefix: /, upstream: "{other.url}/", ca_file: "{ca_file}"}}
"""
        with caplog.at_level(logging.WARNING, logger="gateway"):
            async with serving(load_config_text(text, env={})) as gw:
                async with aiohttp.ClientSession() as http:
                    async with http.get(gw.url + "/x") as resp:
                        assert resp.status == 502
        assert other.seen == []
    assert any("TLS" in r.getMessage() and "mismatch" in r.getMessage().lower()
               for r in caplog.records)
