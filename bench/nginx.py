"""nginx configs for the benchmark: the origin (static files) and the guide's recipe as a proxy.

Both run as unprivileged-style instances under a temp prefix (``nginx -p DIR -e stderr``),
in the foreground, with every temp path inside DIR. ``keepalive_requests`` is raised on both
so that wrk's and the proxies' connections are never recycled mid-run (aiohttp has no such
limit; nginx's default of 1000 would make nginx alone pay reconnects).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

NGINX = "/usr/sbin/nginx"

_COMMON = """\
{user}worker_processes {workers};
pid {prefix}/nginx.pid;
events {{ worker_connections 16384; multi_accept on; }}
http {{
    access_log off;
    server_tokens off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
{body}
}}
"""


def _user() -> str:
    # As root nginx would switch its workers to an unprivileged user that cannot read the
    # temp dir; as anybody else the directive is unnecessary.
    return "user root root;\n" if os.geteuid() == 0 else ""


def origin_conf(prefix: Path, port: int, docroot: Path) -> str:
    """The origin: static files with sendfile, and a tiny answer for the chat script POST.

    ``add_header X-Seen-Length`` echoes the length of the body the origin received, so the
    signing scenario can tell whether the gateway really rewrote (injected into) the body.
    """
    body = f"""\
    include /etc/nginx/mime.types;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {docroot};
        location / {{ }}
        location /service-cloud/ {{
            default_type application/javascript;
            add_header X-Seen-Length $content_length always;
            return 200 "/* chat client */\\n";
        }}
        location = /post {{ return 200 "ok\\n"; }}
    }}"""
    return _COMMON.format(user=_user(), workers=1, prefix=prefix, body=body)


def recipe_conf(prefix: Path, port: int, origin_port: int, sink_port: int,
                access_log: bool = False) -> str:
    """The vendor guide's ``location /service-cloud/`` recipe, made fair for a benchmark.

    Kept from the guide: X-Real-IP / X-Forwarded-For, ``proxy_request_buffering off``.
    Added: HTTP/1.1 keep-alive to the upstream (the guide's default would open a new upstream
    connection per request), and ``proxy_max_temp_file_size 0`` so a 1 GiB download streams
    through memory buffers instead of spooling to disk, the same job the gateway does.
    ``access_log``: nginx's default access log (``combined``, a file, unbuffered).
    """
    log = f"access_log {prefix}/access.log combined;" if access_log else "access_log off;"
    body = f"""\
    upstream origin {{ server 127.0.0.1:{origin_port}; keepalive 128; }}
    upstream sink {{ server 127.0.0.1:{sink_port}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        {log}
        client_max_body_size 0;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header X-Real-IP $remote_addr;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_request_buffering off;
        proxy_max_temp_file_size 0;
        location / {{ proxy_pass http://origin; }}
        location /upload {{ proxy_pass http://sink; }}
    }}"""
    return _COMMON.format(user=_user(), workers=1, prefix=prefix, body=body)


def prepare(prefix: Path, conf: str) -> list[str]:
    """Write ``conf`` under ``prefix`` and return the argv that runs it in the foreground."""
    prefix.mkdir(parents=True, exist_ok=True)
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / sub).mkdir(exist_ok=True)
    path = prefix / "nginx.conf"
    path.write_text(conf)
    return [NGINX, "-p", str(prefix), "-c", str(path), "-e", "stderr", "-g", "daemon off;"]


def version() -> str:
    try:
        out = subprocess.run([NGINX, "-v"], capture_output=True, text=True, timeout=10)
    except OSError:
        return "missing"
    return out.stderr.strip().split("/")[-1]
