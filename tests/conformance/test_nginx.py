"""The cases where nginx is the reference, through the real Debian nginx and the gateway.

nginx runs with upstream keep-alive (``keepalive`` in an ``upstream`` block, HTTP/1.1,
``Connection ""``), the configuration in which its upstream leg is comparable to the
gateway's pooled one. Each case goes once through nginx and once through the gateway
(each on both request paths); status, body and the headers the case says must be absent
are the same. Where the gateway deliberately differs from nginx 1.22 (it is stricter about
bare LF, conflicting lengths, Content-Length with Transfer-Encoding, codings other than
chunked, bad chunk lines, HTTP/2.0 status lines; 1.22 waits for more after a 1xx or a 204
followed by a response, and takes a 16k header nginx's 4k buffer refuses), the case is not
marked ``nginx`` and ``test_upstream_responses.py`` says what the gateway does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.runtime import Running
from tests.conformance.harness import MARK, PathSwitch, ScriptedUpstream, fetch
from tests.conformance.test_upstream_responses import CASES
from tests.gwhelpers import free_port

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

pytestmark = pytest.mark.skipif(not os.path.exists(NGINX), reason="nginx is not installed")

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
    upstream up {{
        server 127.0.0.1:{up};
        keepalive 4;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_next_upstream off;
        }}
    }}
}}
"""


@contextlib.asynccontextmanager
async def run_nginx(upstream_port: int, tmp: Path) -> AsyncIterator[int]:
    port = free_port()
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi", "logs"):
        (tmp / sub).mkdir()
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(user="user root;" if os.geteuid() == 0 else "",
                                      tmp=tmp, up=upstream_port, port=port))
    log = (tmp / "nginx.stderr").open("wb")
    proc = await asyncio.create_subprocess_exec(
        NGINX, "-e", "stderr", "-p", str(tmp), "-c", str(conf),
        "-g", f"daemon off; pid {tmp}/nginx.pid; error_log stderr;",
        stdout=log, stderr=subprocess.STDOUT)
    try:
        async with asyncio.timeout(5):
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    if proc.returncode is not None:
                        raise AssertionError("nginx exited:\n" + (tmp / "nginx.stderr")
                                             .read_text()) from None
                    await asyncio.sleep(0.05)
                    continue
                writer.close()
                break
        yield port
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()
        log.close()


NGINX_CASES = [c for c in CASES if c.nginx]


async def test_same_answer_as_nginx(gw: Running, up: ScriptedUpstream, path: PathSwitch,
                                    tmp_path: Path) -> None:
    assert len(NGINX_CASES) >= 20
    async with run_nginx(up.port, tmp_path) as nginx_port:
        for case in NGINX_CASES:
            up.case = case
            answers = []
            for run, port in ((1, nginx_port), (2, gw.port)):
                data = case.request.replace(MARK, b"RUN%d" % run)
                answers.append(await fetch(port, data, head=case.head))
            n, g = answers
            assert n.status == g.status == case.status, (case.id, n.raw, g.raw)
            if case.status < 400:  # (error pages are each server's own)
                assert n.body.replace(b"RUN1", MARK) == g.body.replace(b"RUN2", MARK), case.id
            for name in case.absent:
                assert not g.all(name), (case.id, name)
                # nginx keeps the Trailer announcement (of fields it then drops); the
                # gateway drops both. The fields themselves reach neither client.
                if name != "Trailer":
                    assert not n.all(name), (case.id, name)
