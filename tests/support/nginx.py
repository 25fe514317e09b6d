"""nginx as the reference proxy: one launcher for every test that compares against it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
needs_nginx = pytest.mark.skipif(not os.path.exists(NGINX),
                                 reason="nginx is not installed (apt-get install nginx-light)")
_TEMPS = ("body", "proxy", "fastcgi", "uwsgi", "scgi")


def nginx_conf(http_block: str, tmp: Path) -> str:
    """A whole nginx.conf: one worker, no access log, temp files under ``tmp``, and
    ``http_block`` (upstreams and servers) inside ``http { }``."""
    user = "user root;\n" if os.geteuid() == 0 else ""
    temps = "".join(f"    {t}_temp_path {tmp}/{t};\n" for t in _TEMPS).replace(
        "body_temp_path", "client_body_temp_path")
    return (f"worker_processes 1;\n{user}events {{ worker_connections 64; }}\n"
            f"http {{\n    access_log off;\n{temps}{http_block}\n}}\n")


@contextlib.asynccontextmanager
async def run_nginx(http_block: str, tmp: Path, listen_port: int) -> AsyncIterator[None]:
    """nginx in the foreground with ``http_block`` until the context ends; waits until
    ``listen_port`` accepts (fails the test with nginx's stderr if it exits first)."""
    for sub in (*_TEMPS, "logs"):
        (tmp / sub).mkdir(exist_ok=True)
    conf = tmp / "nginx.conf"
    conf.write_text(nginx_conf(http_block, tmp))
    with (tmp / "nginx.stderr").open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            NGINX, "-e", "stderr", "-p", str(tmp), "-c", str(conf),
            "-g", f"daemon off; pid {tmp}/nginx.pid; error_log stderr;",
            stdout=log, stderr=subprocess.STDOUT)
        try:
            async with asyncio.timeout(5):
                while True:
                    try:
                        _, writer = await asyncio.open_connection("127.0.0.1", listen_port)
                    except OSError:
                        if proc.returncode is not None:
                            raise AssertionError("nginx exited:\n" + (tmp / "nginx.stderr")
                                                 .read_text()) from None
                        await asyncio.sleep(0.05)
                        continue
                    writer.close()
                    break
            yield
        finally:
            if proc.returncode is None:
                proc.terminate()
                await proc.wait()
