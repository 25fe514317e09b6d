"""The yardstick: the reverse proxy the aiohttp documentation and most tutorials lead to.

One shared ``ClientSession`` (``auto_decompress=False``, ``DummyCookieJar``, no connection
limit), request and response bodies streamed both ways, hop-by-hop headers dropped, uvloop.
Nothing more and nothing less; it is what the gateway is measured against.

    python bench/textbook_proxy.py --port 8081 --route /upload=http://127.0.0.1:9001/upload \
        --route /=http://127.0.0.1:9000/
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys

import aiohttp
from aiohttp import web
from aiohttp.log import access_logger
from yarl import URL

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host",
})
SESSION = web.AppKey("session", aiohttp.ClientSession)
ROUTES = web.AppKey("routes", list[tuple[str, str]])


async def proxy(request: web.Request) -> web.StreamResponse:
    raw = request.raw_path
    for prefix, base in request.app[ROUTES]:
        if raw.startswith(prefix):
            url = URL(base + raw[len(prefix):], encoded=True)
            break
    else:
        raise web.HTTPNotFound()
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
    forwarded = request.headers.get("X-Forwarded-For")
    peer = request.remote or ""
    headers.append(("X-Forwarded-For", f"{forwarded}, {peer}" if forwarded else peer))
    data = request.content if request.body_exists else None
    session = request.app[SESSION]
    async with session.request(request.method, url, headers=headers, data=data,
                               allow_redirects=False) as upstream:
        resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for name, value in upstream.headers.items():
            if name.lower() not in HOP_BY_HOP:
                resp.headers.add(name, value)
        await resp.prepare(request)
        async for chunk in upstream.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp


def make_app(routes: list[tuple[str, str]]) -> web.Application:
    app = web.Application(client_max_size=0)
    # longest prefix first, as a proxy's location matching would
    app[ROUTES] = sorted(routes, key=lambda r: len(r[0]), reverse=True)
    app.cleanup_ctx.append(_client_session)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app


async def _client_session(app: web.Application):  # type: ignore[no-untyped-def]
    app[SESSION] = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    yield
    await app[SESSION].close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--route", action="append", default=[],
                        help="PREFIX=UPSTREAM_BASE, e.g. /=http://127.0.0.1:9000/")
    parser.add_argument("--access-log", action="store_true",
                        help="aiohttp's access log to stderr (its default format)")
    args = parser.parse_args()
    routes = []
    for spec in args.route or ["/=http://127.0.0.1:9000/"]:
        prefix, _, base = spec.partition("=")
        routes.append((prefix, base))  # the prefix is replaced by the base, verbatim
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    if args.access_log:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    web.run_app(make_app(routes), host=args.host, port=args.port,
                access_log=access_logger if args.access_log else None,
                print=None, handle_signals=True)


if __name__ == "__main__":
    main()
