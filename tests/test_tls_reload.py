"""Certificates reload with the config (SIGHUP / `gateway reload`), checked with two CAs.

A renewed pair copied over the files: new handshakes get it, a connection opened before
keeps the certificate it was made with, and a pair that does not load is refused (the
running one stays). Each CA's clients trust only their own CA, so which certificate a
handshake got is visible as which client can connect.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from gateway.runtime import serving
from tests.support.gateway import build_config
from tests.support.process import gateway_cli, start_gateway_process
from tests.support.rawhttp import read_response
from tests.support.upstreams import Echo


def write_pair(ca: trustme.CA, cert: Path, key: Path) -> None:
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert.write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())


def tls_config(echo: Echo, ca: trustme.CA, cert: Path, key: Path) -> str:
    """A TLS listener serving a pair ``ca`` issued, written to cert and key, in front of echo."""
    write_pair(ca, cert, key)
    return f"""
routes: [{{prefix: /, upstream: "{echo.url}/"}}]
listen: {{host: 127.0.0.1, port: 0, tls: {{cert_file: "{cert}", key_file: "{key}"}}}}
timeouts: {{shutdown_grace: 1s}}
"""


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


async def handshake(port: int, ca: trustme.CA
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, ssl=trusting(ca),
                                         server_hostname="127.0.0.1")


async def fetch_on(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    writer.write(b"GET /x HTTP/1.1\r\nHost: gw.test\r\n\r\n")
    await writer.drain()
    resp = await read_response(reader)
    assert resp is not None and resp.complete
    return resp.status


def served_by(writer: asyncio.StreamWriter, ca: trustme.CA) -> bool:
    """The connection's server certificate was issued by ``ca``."""
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    leaf = x509.load_der_x509_certificate(der)
    return leaf.issuer == x509.load_pem_x509_certificate(ca.cert_pem.bytes()).subject


@pytest.fixture
def pair_paths(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "cert.pem", tmp_path / "key.pem"


async def test_reload_serves_the_new_pair_and_keeps_open_connections(
        echo: Echo, tmp_path: Path, pair_paths: tuple[Path, Path]) -> None:
    old_ca, new_ca = trustme.CA(), trustme.CA()
    cert, key = pair_paths
    text = tls_config(echo, old_ca, cert, key)
    conf = tmp_path / "gateway.yaml"
    conf.write_text(text)
    cfg = build_config(text, echo)
    async with serving(cfg, config_path=str(conf)) as gw:
        reader, writer = await handshake(gw.port, old_ca)
        assert await fetch_on(reader, writer) == 200

        write_pair(new_ca, cert, key)  # the renewal copied over the files
        assert await gw.runtime.reload() is True

        # New handshakes get the new pair: only a client trusting the new CA gets in.
        r2, w2 = await handshake(gw.port, new_ca)
        assert await fetch_on(r2, w2) == 200
        assert served_by(w2, new_ca)
        with pytest.raises(ssl.SSLCertVerificationError):
            await handshake(gw.port, old_ca)
        # The connection made before the reload keeps its certificate and keeps working.
        assert served_by(writer, old_ca)
        assert await fetch_on(reader, writer) == 200

        # A broken pair (the old CA's certificate with the new key) is refused; the
        # running pair stays.
        good_cert = cert.read_bytes()
        write_pair(old_ca, cert, tmp_path / "unused.pem")
        assert await gw.runtime.reload() is False
        r3, w3 = await handshake(gw.port, new_ca)
        assert await fetch_on(r3, w3) == 200 and served_by(w3, new_ca)
        cert.write_bytes(good_cert)
        for w in (writer, w2, w3):
            w.close()


async def reload_command(workdir: Path, pid: int) -> tuple[int, str]:
    """`gateway reload -c FILE --pid PID`: its exit status and stderr."""
    code, _, err = await gateway_cli("reload", "-c", str(workdir / "gateway.yaml"),
                                     "--pid", str(pid))
    return code, err


async def test_gateway_reload_command_reloads_the_certificate(
        echo: Echo, tmp_path: Path, pair_paths: tuple[Path, Path]) -> None:
    old_ca, new_ca = trustme.CA(), trustme.CA()
    cert, key = pair_paths
    text = tls_config(echo, old_ca, cert, key)
    gw = await start_gateway_process(text, tmp_path)
    try:
        r1, w1 = await handshake(gw.port, old_ca)
        assert await fetch_on(r1, w1) == 200
        # A broken pair: `gateway reload` refuses it before signalling anything.
        write_pair(new_ca, cert, tmp_path / "unused.pem")
        code, err = await reload_command(tmp_path, gw.pid)
        assert code == 2 and "listen.tls" in err and "not reloading" in err, err

        write_pair(new_ca, cert, key)
        code, err = await reload_command(tmp_path, gw.pid)
        assert code == 0, err
        deadline = asyncio.get_running_loop().time() + 10
        while "TLS certificate reloaded" not in gw.log_text():
            assert asyncio.get_running_loop().time() < deadline, gw.log_text()
            await asyncio.sleep(0.05)
        r2, w2 = await handshake(gw.port, new_ca)
        assert await fetch_on(r2, w2) == 200
        assert await fetch_on(r1, w1) == 200  # the old connection is still served
        for w in (w1, w2):
            w.close()
    finally:
        assert await gw.stop() == 0
