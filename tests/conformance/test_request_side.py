"""The client-facing request side, as RFC 9110/9112 say and nginx does, on both request paths.

Each case runs twice: with the fast path on (after a warm-up request, so that a pooled
upstream connection is idle and the fast path can take GETs) and with it off (the
``request_path`` fixture's switch: ``_try_inline`` declines everything). The client is a raw
socket; the upstream is the strict recording upstream of the hardening tests, so anything
the gateway forwards is framed and checked byte by byte.

Choices where the RFCs leave room (each as nginx does, unless said):
- A request line with a major version other than 1 gets 505; ``HTTP/1.10`` stays 400.
- HTTP/0.9 (``GET /`` without a version) is not served: the answer is a bare body (no status
  line, no headers, as nginx answers 0.9 clients) saying so, then the connection closes.
- ``Transfer-Encoding`` with codings before a final ``chunked`` gets 501 (RFC 9112 6.1; nginx
  answers 501 for any value but ``chunked``); without a final ``chunked`` it stays 400, as
  RFC 9112 6.3 requires.
- The gateway's own refusals start with ``HTTP/1.1`` whatever the client sent: RFC 9112 2.5
  asks for the highest version the server conforms to, and nginx does the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from yarl import URL

from gateway.fastpath import FastRequestHandler
from gateway.runtime import Running, serving
from tests.gwhelpers import free_port
from tests.hardening.conftest import hardening_config
from tests.hardening.rawhttp import ClientResponse, RawRecorder, exchange, run_recorder

HOST = b"Host: gw.test\r\n"


@dataclass
class Paths:
    """Which request path serves requests, and what the fast path was offered."""

    mode: str
    offered: list[tuple[str, bool]] = field(default_factory=list)

    def took(self, path: str) -> bool:
        return (path, True) in self.offered


@pytest.fixture(params=["fast", "full"])
def request_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Paths:
    paths = Paths(request.param)
    original = FastRequestHandler._try_inline

    def switch(self: FastRequestHandler, msg: Any, payload: Any) -> bool:
        taken = paths.mode == "fast" and original(self, msg, payload)
        paths.offered.append((getattr(msg, "path", "?"), taken))
        return taken

    monkeypatch.setattr(FastRequestHandler, "_try_inline", switch)
    return paths


@dataclass
class Setup:
    gw: Running
    up: RawRecorder
    paths: Paths


ROUTES: list[dict[str, Any]] = [
    {"prefix": "/service-cloud/", "upstream": "{up}/cec/"},
    {"prefix": "/", "upstream": "{up}/", "preserve_host": True}]


@pytest.fixture
async def setup(request_path: Paths) -> AsyncIterator[Setup]:
    async with run_recorder() as up:
        routes = [{k: v.format(up=up.url) if isinstance(v, str) else v for k, v in r.items()}
                  for r in ROUTES]
        cfg = hardening_config(up.url, routes=routes, limits={"max_header_size": "8k"})
        async with serving(cfg) as gw:
            # Warm the pool: from now on one idle upstream connection lets the fast path
            # take a GET (when it is on).
            answers, _ = await exchange(gw.port, b"GET /warm HTTP/1.1\r\n" + HOST + b"\r\n")
            assert [a.status for a in answers] == [200]
            await up.wait_requests(1)
            yield Setup(gw, up, request_path)


def assert_refusal(resp: ClientResponse, status: int) -> None:
    """The gateway's own refusal: HTTP/1.1, closes, a short plain body naming the status."""
    assert resp.version == "HTTP/1.1", resp
    assert resp.status == status, resp
    assert (resp.header("Connection") or "").lower() == "close"
    assert resp.body.startswith(b"%d " % status) and len(resp.body) < 80, resp.body
    assert resp.header("X-Request-ID")


async def refused(s: Setup, data: bytes, status: int) -> ClientResponse:
    before = len(s.up.requests)
    answers, closed = await exchange(s.gw.port, data, responses=2)
    assert [a.status for a in answers] == [status], [(a.status, a.body) for a in answers]
    assert closed, "the connection must close after a refusal"
    assert_refusal(answers[0], status)
    assert len(s.up.requests) == before, "nothing of a refused request goes upstream"
    return answers[0]


# ------------------------------------------------------------------ request line


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/3.0", b"HTTP/9.9"])
async def test_major_version_other_than_1_gets_505(setup: Setup, version: bytes) -> None:
    await refused(setup, b"GET /g " + version + b"\r\n" + HOST + b"\r\n", 505)


async def test_http_1_10_is_a_bad_request_not_505(setup: Setup) -> None:
    await refused(setup, b"GET /g HTTP/1.10\r\n" + HOST + b"\r\n", 400)


@pytest.mark.parametrize("data", [b"GET /g\r\n", b"GET /g?q=1\r\n\r\n", b"\r\nPOST /p\n"])
async def test_http09_gets_a_bare_body_and_a_close(setup: Setup, data: bytes) -> None:
    """No status line, no headers: an HTTP/0.9 client reads the body, as from nginx."""
    reader, writer = await asyncio.open_connection("127.0.0.1", setup.gw.port)
    try:
        writer.write(data)
        async with asyncio.timeout(3):
            got = await reader.read()  # until the gateway closes
    finally:
        writer.close()
    assert got == b"400 Bad Request: HTTP/0.9 is not served\n"
    assert len(setup.up.requests) == 1  # the warm-up only


async def test_long_target_gets_414_and_long_header_431(setup: Setup) -> None:
    await refused(setup, b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\n" + HOST + b"\r\n", 414)
    await refused(setup, b"GET /?q=" + b"a" * 10_000 + b" HTTP/1.1\r\n" + HOST + b"\r\n", 414)
    await refused(setup, b"GET http://gw.test/" + b"a" * 10_000 + b" HTTP/1.1\r\n" + HOST
                  + b"\r\n", 414)
    # A header value that starts like a path is still a header.
    await refused(setup, b"GET /g HTTP/1.1\r\n" + HOST + b"X-Path: /" + b"a" * 10_000
                  + b"\r\n\r\n", 431)
    await refused(setup, b"GET /g HTTP/1.1\r\n" + HOST + b"X-" + b"n" * 10_000
                  + b": 1\r\n\r\n", 431)


async def test_refusals_to_http10_clients_are_http11_and_close(setup: Setup) -> None:
    resp = await refused(setup, b"GET /g HTTP/1.0\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n",
                         431)
    assert resp.version == "HTTP/1.1"
    await refused(setup, b"G@T /g HTTP/1.0\r\n\r\n", 400)


# ------------------------------------------------------------------ framing


@pytest.mark.parametrize("te", [b"gzip, chunked", b"deflate,chunked", b"identity, chunked",
                                b"GZIP , Chunked"])
async def test_coding_before_chunked_gets_501(setup: Setup, te: bytes) -> None:
    data = (b"POST /p HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: " + te
            + b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    await refused(setup, data, 501)


async def test_chunked_alone_is_still_forwarded(setup: Setup) -> None:
    data = (b"POST /p HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked"
            + b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    answers, _ = await exchange(setup.gw.port, data)
    assert [a.status for a in answers] == [200]
    assert setup.up.requests[-1].body == b"hello"


# ------------------------------------------------------------------ absolute form


async def test_absolute_form_authority_replaces_host(setup: Setup) -> None:
    """RFC 9112 3.2.2: accepted; routed by its path to the configured upstream."""
    data = (b"GET http://Site.Example:8080/g/x?q=1 HTTP/1.1\r\nHost: other.example\r\n"
            b"\r\n")
    answers, _ = await exchange(setup.gw.port, data)
    assert [a.status for a in answers] == [200]
    req = setup.up.assert_clean(at_most=2)[-1]
    assert (req.method, req.target) == ("GET", "/g/x?q=1")
    assert req.header("Host") == "Site.Example:8080"  # the `/` route preserves Host
    answers, _ = await exchange(setup.gw.port,
                                b"GET https://cec.example/service-cloud/a HTTP/1.1\r\n"
                                + HOST + b"\r\n")
    assert [a.status for a in answers] == [200]
    req = setup.up.assert_clean(at_most=3)[-1]
    assert req.target == "/cec/a"
    assert req.header("Host") == f"127.0.0.1:{setup.up.port}"


@pytest.mark.parametrize("target", [b"http://u:p@gw.test/g", b"ftp://gw.test/g",
                                    b"http://gw.test:99999/g", b"http://gw test/g"])
async def test_unusable_absolute_form_is_refused(setup: Setup, target: bytes) -> None:
    answers, _ = await exchange(setup.gw.port, b"GET " + target + b" HTTP/1.1\r\n" + HOST
                                + b"\r\n")
    assert [a.status for a in answers] == [400]
    assert len(setup.up.requests) == 1  # the warm-up only


# ------------------------------------------------------------------ valid, then garbage


@pytest.mark.parametrize("garbage", [b"\x01\x02GARBAGE\r\n\r\n",
                                     b"GET /h HTTP/1.1\r\nX: \x00\r\n\r\n",
                                     b"G@T / HTTP/1.1\r\n\r\n"])
async def test_valid_request_then_garbage_in_one_packet(setup: Setup, garbage: bytes) -> None:
    """The valid request is answered; the garbage gets its own 400, then the close."""
    data = b"GET /g HTTP/1.1\r\n" + HOST + b"\r\n" + garbage
    answers, closed = await exchange(setup.gw.port, data, responses=3)
    assert [a.status for a in answers] == [200, 400], [(a.status, a.body) for a in answers]
    assert closed
    assert answers[0].body.endswith(b"GET /g\n")
    assert_refusal(answers[1], 400)
    reqs = setup.up.assert_clean(at_most=2)
    assert [r.target for r in reqs] == ["/warm", "/g"]
    if setup.paths.mode == "fast":
        assert setup.paths.took("/g"), setup.paths.offered


@pytest.mark.parametrize(("second", "status"), [
    (b"GET /h HTTP/2.0\r\n" + HOST + b"\r\n", 505),
    (b"POST /p HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
     501),
    (b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\n" + HOST + b"\r\n", 414),
])
async def test_valid_request_then_a_refused_one(setup: Setup, second: bytes,
                                                status: int) -> None:
    data = b"GET /g HTTP/1.1\r\n" + HOST + b"\r\n" + second
    answers, closed = await exchange(setup.gw.port, data, responses=3)
    assert [a.status for a in answers] == [200, status]
    assert closed
    assert_refusal(answers[1], status)
    assert [r.target for r in setup.up.assert_clean(at_most=2)] == ["/warm", "/g"]


async def test_pipelined_requests_then_garbage(setup: Setup) -> None:
    data = (b"GET /a HTTP/1.1\r\n" + HOST + b"\r\n" + b"GET /b HTTP/1.1\r\n" + HOST
            + b"\r\n" + b"\x7fjunk\r\n\r\n")
    answers, closed = await exchange(setup.gw.port, data, responses=4)
    assert [a.status for a in answers] == [200, 200, 400]
    assert closed
    assert [r.target for r in setup.up.requests] == ["/warm", "/a", "/b"]


async def test_pipelined_requests_up_to_connection_close_are_answered(setup: Setup) -> None:
    """aiohttp refuses the whole read when data follows ``Connection: close``; the requests
    before it are still answered, the one that asked for the close last, and then the close
    (nginx ignores what follows too)."""
    data = (b"GET /a HTTP/1.1\r\n" + HOST + b"\r\n" + b"GET /b HTTP/1.1\r\n" + HOST
            + b"Connection: close\r\n\r\n" + b"GET /c HTTP/1.1\r\n" + HOST + b"\r\n")
    answers, closed = await exchange(setup.gw.port, data, responses=3)
    assert [a.status for a in answers] == [200, 200]
    assert closed
    assert [r.target for r in setup.up.requests] == ["/warm", "/a", "/b"]


# ------------------------------------------------------------------ the prefix redirect


@pytest.mark.parametrize(("target", "location"), [
    (b"/service-cloud", "/service-cloud/"),
    (b"/service-cloud?a=1&b", "/service-cloud/?a=1&b"),
])
async def test_prefix_redirect_wins_over_catch_all(setup: Setup, target: bytes,
                                                   location: str) -> None:
    for method in (b"GET", b"HEAD"):
        answers, _ = await exchange(setup.gw.port, method + b" " + target + b" HTTP/1.1\r\n"
                                    + HOST + b"\r\n", head_at=(0,) if method == b"HEAD" else ())
        assert [a.status for a in answers] == [301]
        assert answers[0].header("Location") == location
    assert len(setup.up.requests) == 1  # the warm-up only: nothing reached the site route


async def test_neighbours_of_the_prefix_are_still_proxied(setup: Setup) -> None:
    for target, up_target in ((b"/service-cloud/", "/cec/"),
                              (b"/service-cloudX", "/service-cloudX"),
                              (b"/service-cloud/x", "/cec/x")):
        answers, _ = await exchange(setup.gw.port, b"GET " + target + b" HTTP/1.1\r\n"
                                    + HOST + b"\r\n")
        assert [a.status for a in answers] == [200]
        assert setup.up.requests[-1].target == up_target


async def test_a_route_for_the_slashless_form_wins_over_the_redirect() -> None:
    async with run_recorder() as up, contextlib.AsyncExitStack() as stack:
        cfg = hardening_config(up.url, routes=[
            {"prefix": "/docs/", "upstream": up.url + "/d/"},
            {"prefix": "/docs", "upstream": up.url + "/exact"},
            {"prefix": "/", "upstream": up.url + "/"}])
        gw = await stack.enter_async_context(serving(cfg))
        answers, _ = await exchange(gw.port, b"GET /docs HTTP/1.1\r\n" + HOST + b"\r\n")
        assert [a.status for a in answers] == [200]
        assert up.requests[-1].target == "/exact"


# ------------------------------------------------------------------ nginx as the reference

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
NGINX_CONF = """
worker_processes 1;
{user}
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    large_client_header_buffers 4 8k;
    server {{
        listen 127.0.0.1:{port};
        location /service-cloud/ {{ proxy_pass http://127.0.0.1:{up}/cec/; }}
        location / {{ proxy_set_header Host $host; proxy_pass http://127.0.0.1:{up}/; }}
    }}
}}
"""


@contextlib.asynccontextmanager
async def run_nginx(up_port: int, tmp: Path) -> AsyncIterator[int]:
    """The same two routes as ``ROUTES`` in the real nginx (8 KiB header buffers)."""
    port = free_port()
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi", "logs"):
        (tmp / sub).mkdir()
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(user="user root;" if os.geteuid() == 0 else "",
                                      tmp=tmp, port=port, up=up_port))
    with (tmp / "nginx.stderr").open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            NGINX, "-e", "stderr", "-p", str(tmp), "-c", str(conf),
            "-g", f"daemon off; pid {tmp}/nginx.pid; error_log stderr;",
            stdout=log, stderr=subprocess.STDOUT)
        try:
            async with asyncio.timeout(5):
                while True:
                    try:
                        _, w = await asyncio.open_connection("127.0.0.1", port)
                    except OSError:
                        if proc.returncode is not None:
                            raise AssertionError("nginx exited: "
                                                 + (tmp / "nginx.stderr").read_text()) from None
                        await asyncio.sleep(0.05)
                        continue
                    w.close()
                    break
            yield port
        finally:
            if proc.returncode is None:
                proc.terminate()
                await proc.wait()


# name -> (raw request, statuses both answer, upstream target both forward or None)
SAME_AS_NGINX: dict[str, tuple[bytes, list[int], str | None]] = {
    "http_2_0": (b"GET /g HTTP/2.0\r\n" + HOST + b"\r\n", [505], None),
    "http_3_0": (b"GET /g HTTP/3.0\r\n" + HOST + b"\r\n", [505], None),
    "gzip_chunked": (b"POST /p HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: gzip, chunked\r\n"
                     b"\r\n5\r\nhello\r\n0\r\n\r\n", [501], None),
    "long_target": (b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\n" + HOST + b"\r\n", [414], None),
    "absolute_form": (b"GET http://site.example/x?q=1 HTTP/1.1\r\nHost: other\r\n\r\n", [200],
                      "/x?q=1"),
    "absolute_form_userinfo": (b"GET http://u:p@site.example/x HTTP/1.1\r\nHost: other\r\n"
                               b"\r\n", [400], None),
    "valid_then_garbage": (b"GET /g HTTP/1.1\r\n" + HOST + b"\r\n\x01\x02GARBAGE\r\n\r\n",
                           [200, 400], "/g"),
    "bad_method_http10": (b"G@T /g HTTP/1.0\r\n\r\n", [400], None),
    "prefix_redirect": (b"GET /service-cloud?a=1 HTTP/1.1\r\n" + HOST + b"\r\n", [301], None),
}


@pytest.mark.skipif(not os.path.exists(NGINX), reason="nginx is not installed")
@pytest.mark.parametrize("case", SAME_AS_NGINX.values(), ids=SAME_AS_NGINX.keys())
async def test_same_answer_as_nginx(setup: Setup, tmp_path: Path,
                                    case: tuple[bytes, list[int], str | None]) -> None:
    data, statuses, target = case
    async with run_nginx(setup.up.port, tmp_path) as nginx_port:
        for port in (nginx_port, setup.gw.port):
            before = len(setup.up.requests)
            answers, _ = await exchange(port, data, responses=len(statuses))
            who = "nginx" if port == nginx_port else "gateway"
            assert [a.status for a in answers] == statuses, (who, answers)
            assert all(a.version == "HTTP/1.1" for a in answers), (who, answers)
            if statuses[-1] in (414, 501, 505) or len(statuses) > 1:
                assert (answers[-1].header("Connection") or "").lower() == "close", who
            if statuses == [301]:
                assert URL(answers[0].header("Location") or "").path_qs == "/service-cloud/?a=1"
            got = [(r.target, r.header("Host")) for r in setup.up.requests[before:]]
            if target is None:
                assert got == [], (who, got)
            elif data.startswith(b"GET http://"):
                assert got == [(target, "site.example")], (who, got)
            else:
                assert [t for t, _ in got] == [target], (who, got)
