"""The access line's ECS fields: cleaned client header values, TLS facts, both paths."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from gateway.accesslog import clean_host, clean_user_agent, split_host
from gateway.runtime import serving
from tests.gwhelpers import ROUTES, Echo, build_config, parse_response
from tests.lifecycle_helpers import flat


def test_user_agent_is_printable_ascii_without_quotes_and_bounded() -> None:
    assert clean_user_agent("Mozilla/5.0 (X11; Linux x86_64)") == "Mozilla/5.0 (X11; Linux x86_64)"
    assert clean_user_agent('a"b\\c\x01d\u00e9\n') == "a?b?c?d??"
    assert clean_user_agent("x" * 1000) == "x" * 256
    assert clean_user_agent(None) is None and clean_user_agent("") is None


@pytest.mark.parametrize(("raw", "logged"), [
    ("Example.COM", "example.com"),
    ("example.com:8443", "example.com:8443"),
    ("[2001:db8::1]:443", "[2001:db8::1]:443"),
    ("127.0.0.1", "127.0.0.1"),
    ("evil.com/<script>", None),
    ("a b", None),
    ("host:port", None),
    ("x" * 300, None),
    ("", None),
])
def test_host_only_when_well_formed(raw: str, logged: str | None) -> None:
    assert clean_host(raw) == logged


def test_split_host() -> None:
    assert split_host("example.com:8443") == ("example.com", 8443)
    assert split_host("example.com") == ("example.com", None)
    assert split_host("[::1]:80") == ("::1", 80)
    assert split_host("[::1]") == ("::1", None)


@pytest.fixture
def pems(tmp_path: Path) -> Iterator[dict[str, Path]]:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    paths = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "cert.pem",
             "key": tmp_path / "key.pem"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    leaf.private_key_and_cert_chain_pem.write_to_path(str(paths["cert"]))
    leaf.private_key_pem.write_to_path(str(paths["key"]))
    yield paths


@pytest.fixture
def access_records(caplog: pytest.LogCaptureFixture) -> Callable[[], list[dict[str, Any]]]:
    caplog.set_level(logging.INFO, logger="gateway.access")

    def get() -> list[dict[str, Any]]:
        return [flat(r.access) for r in caplog.records  # type: ignore[attr-defined]
                if r.name == "gateway.access"]

    return get


async def test_tls_version_and_cleaned_headers_on_both_paths(
        echo: Echo, pems: dict[str, Path],
        access_records: Callable[[], list[dict[str, Any]]]) -> None:
    cfg = build_config(ROUTES + f"""
listen:
  tls: {{cert_file: "{pems['cert']}", key_file: "{pems['key']}"}}
""", echo)
    ctx = ssl.create_default_context(cafile=str(pems["ca"]))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # the line must say what was negotiated
    odd_agent = b'curl/8 "quoted" \\ \xc3\xa9' + b"z" * 400
    async with serving(cfg) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port, ssl=ctx)
        try:
            answers = []
            for method, host in (("GET", b"Shop.Example:8443"), ("GET", b"bad<host>"),
                                 ("POST", b"shop.example")):
                body = b"abc" if method == "POST" else b""
                writer.write(b"%s /app/t?token=SECRET HTTP/1.1\r\nHost: %s\r\n"
                             b"User-Agent: %s\r\nCookie: sid=COOKIESECRET\r\n"
                             b"Content-Length: %d\r\n\r\n%s"
                             % (method.encode(), host, odd_agent, len(body), body))
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(parse_response(head).header("Content-Length") or 0)
                answers.append(parse_response(head + await reader.readexactly(length)))
        finally:
            writer.close()
    # An invalid Host is refused (gateway/boundary.py) and still logged, without the host.
    assert [a.status for a in answers] == [200, 400, 200]
    records = access_records()
    assert len(records) == 3
    for record in records:
        assert record["tls.version"] == "1.2" and record["tls.version_protocol"] == "tls"
        assert record["http.version"] == "1.1"
        agent = record["user_agent.original"]
        assert agent.startswith('curl/8 ?quoted? ? ?zz') and len(agent) == 256
    assert (records[0]["url.domain"], records[0]["url.port"]) == ("shop.example", 8443)
    assert "url.domain" not in records[1]  # not a host name: left out
    assert records[2]["url.domain"] == "shop.example" and "url.port" not in records[2]
    text = repr(records)
    assert "SECRET" not in text and "sid=" not in text
