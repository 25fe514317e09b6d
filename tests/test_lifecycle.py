"""Live changes and shutdown, on gateway subprocesses driven by signals.

Reload (``gateway reload`` and a raw SIGHUP): new requests, also on kept-alive connections,
follow the new config; requests in flight finish; an invalid config is refused and the old
one keeps serving; secret files are re-read. SIGTERM: /readyz fails first, then the port
closes, requests in flight all finish, WebSockets get 1001, exit 0. Workers: a killed worker
is replaced, SIGTERM to the master stops them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.gwhelpers import Echo, RawResponse, free_port, run_echo
from tests.lifecycle_helpers import (
    GatewayProc,
    KeepAlive,
    alive,
    children,
    gateway_cli,
    metric,
    readyz,
    scrape,
    start_gateway_proc,
    wait_for,
)


@pytest.fixture
async def echo_b() -> AsyncIterator[Echo]:
    async with run_echo() as e:
        yield e


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


def routes_to(echo: Echo, tmp_path: Path, *, extra: str = "",
              timeouts: str = "{shutdown_grace: 3s}") -> str:
    return f"""
listen: {{host: 127.0.0.1, port: 0}}
admin: {{host: 127.0.0.1, port: 0}}
pid_file: {tmp_path / "gateway.pid"}
timeouts: {timeouts}
routes:
  - prefix: /app/
    upstream: {echo.url}/up/
{extra}
"""


async def accepts(port: int) -> bool:
    """Does the port accept a TCP connection right now (without blocking the loop)?"""
    try:
        async with asyncio.timeout(1):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    return True


async def refuses(port: int) -> bool:
    return not await accepts(port)


async def one_shot(port: int, method: str, path: str, body: bytes = b"") -> RawResponse:
    conn = await KeepAlive.open(port)
    try:
        return await conn.request(method, path, body=body, within=10)
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def gateway_proc(text: str, tmp_path: Path, *args: str) -> AsyncIterator[GatewayProc]:
    gw = await start_gateway_proc(text, tmp_path, *args)
    try:
        yield gw
    finally:
        await gw.kill()  # a no-op when the test already stopped it


# ------------------------------------------------------------------ reload


async def test_reload_switches_upstream_for_new_and_kept_alive_connections(
        tmp_path: Path, echo: Echo, echo_b: Echo, http: aiohttp.ClientSession) -> None:
    async with gateway_proc(routes_to(echo, tmp_path), tmp_path) as gw:
        pid_file = tmp_path / "gateway.pid"
        await wait_for(lambda: pid_file.exists(), what="the pid file")
        assert int(pid_file.read_text()) == gw.pid

        kept = await KeepAlive.open(gw.port)
        for i in range(2):  # the second one rides the fast path (pooled upstream)
            assert (await kept.request("GET", f"/app/before{i}")).status == 200
        assert [s.path for s in echo.seen] == ["/up/before0", "/up/before1"]

        # Two slow requests in flight on the old config (a GET and a POST with a body).
        slow = [asyncio.ensure_future(one_shot(gw.port, "GET", "/app/do/slow?delay=1.5")),
                asyncio.ensure_future(one_shot(gw.port, "POST", "/app/do/slow?delay=1.5",
                                               body=b"in flight"))]
        await wait_for(lambda: len(echo.seen) == 4, what="the slow requests upstream")

        gw.config.write_text(routes_to(echo_b, tmp_path), encoding="utf-8")
        code, out, err = await gateway_cli("reload", "-c", str(gw.config))
        assert code == 0, err
        assert f"sent SIGHUP to {gw.pid}" in out
        await gw.wait_log("config reloaded")

        # The same kept-alive connection now reaches the new upstream, twice.
        for i in range(2):
            assert (await kept.request("GET", f"/app/after{i}")).status == 200
        fresh = await one_shot(gw.port, "GET", "/app/fresh")
        assert fresh.status == 200
        assert [s.path for s in echo_b.seen] == ["/up/after0", "/up/after1", "/up/fresh"]

        done = await asyncio.gather(*slow)
        assert [r.status for r in done] == [200, 200]
        assert [json.loads(r.body)["method"] for r in done] == ["GET", "POST"]
        assert json.loads(done[1].body)["body_len"] == len(b"in flight")
        assert len(echo.seen) == 4  # nothing else went to the old upstream
        await kept.close()

        assert gw.admin_url is not None
        text = await scrape(http, gw.admin_url)
        assert metric(text, "gateway_config_reloads_total", result="ok") == 1
        assert metric(text, "gateway_config_reloads_total", result="refused") == 0
        assert await gw.stop() == 0
    assert not pid_file.exists()
    assert "Traceback" not in gw.log_text()


async def test_reload_refuses_an_invalid_config(tmp_path: Path, echo: Echo, echo_b: Echo,
                                                http: aiohttp.ClientSession) -> None:
    async with gateway_proc(routes_to(echo, tmp_path), tmp_path) as gw:
        await wait_for(lambda: (tmp_path / "gateway.pid").exists(), what="the pid file")
        good = gw.config.read_text()
        bad = good.replace(echo.url + "/up/", "ftp://nowhere/up/") + "bogus_key: 1\n"
        gw.config.write_text(bad, encoding="utf-8")

        # `gateway reload` checks first and does not signal.
        code, out, err = await gateway_cli("reload", "-c", str(gw.config))
        assert code != 0
        assert "routes[0].upstream" in err and "bogus_key" in err
        assert "SIGHUP" not in out
        await asyncio.sleep(0.5)
        assert "reload refused" not in gw.log_text()  # no SIGHUP arrived
        assert "config reloaded" not in gw.log_text()
        assert gw.proc.returncode is None

        # A raw SIGHUP with the bad file: refused, with the problems, in the log.
        os.kill(gw.pid, signal.SIGHUP)
        await gw.wait_log("reload refused")
        log = gw.log_text()
        assert "routes[0].upstream" in log and "bogus_key" in log
        assert "config reloaded" not in log
        assert gw.proc.returncode is None
        resp = await one_shot(gw.port, "GET", "/app/still-old")
        assert resp.status == 200
        assert echo.seen[-1].path == "/up/still-old" and not echo_b.seen

        assert gw.admin_url is not None
        status, report = await readyz(http, gw.admin_url)
        assert status == 200, report
        text = await scrape(http, gw.admin_url)
        assert metric(text, "gateway_config_reloads_total", result="refused") == 1
        assert metric(text, "gateway_config_reloads_total", result="ok") == 0

        # Fixed file, reload again: accepted.
        gw.config.write_text(routes_to(echo_b, tmp_path), encoding="utf-8")
        code, _, err = await gateway_cli("reload", "-c", str(gw.config))
        assert code == 0, err
        await gw.wait_log("config reloaded")
        assert (await one_shot(gw.port, "GET", "/app/new")).status == 200
        assert [s.path for s in echo_b.seen] == ["/up/new"]
        assert await gw.stop() == 0


async def test_reload_without_a_running_gateway_fails(tmp_path: Path, echo: Echo) -> None:
    conf = tmp_path / "gateway.yaml"
    conf.write_text(routes_to(echo, tmp_path), encoding="utf-8")
    code, _, err = await gateway_cli("reload", "-c", str(conf))
    assert code != 0
    assert "pid" in err


TENANT = "202007159031"
VALIDATE = "/rest/cc-messaging/v1/thirdparty/chatThirdPartyValidate"


async def test_reload_rereads_secret_files(tmp_path: Path, echo: Echo,
                                           http: aiohttp.ClientSession) -> None:
    key_file = tmp_path / "api.key"
    old_key, new_key = "old-api-key-0123456789abcdef", "new-api-key-fedcba9876543210"
    key_file.write_text(old_key + "\n")
    extra = f"""
cec:
  tenant_space_id: "{TENANT}"
  channel_config_id: "202011230001"
  auth: {{mode: token}}
  guest: {{cookie_key: "guest-cookie-key-0123456789abcdef"}}
token:
  signing_key: reload-signing-key-0123456789abcdef
  api_key_file: {key_file.name}
  validate_path: {VALIDATE}
  guard: {{max_failures: 50, window: 1m, lockout: 30s}}
"""
    async with gateway_proc(routes_to(echo, tmp_path, extra=extra), tmp_path) as gw:
        async def issue(key: str) -> int:
            async with http.post(gw.url + "/gateway/token",
                                 json={"userId": "u1", "userName": "Ann"},
                                 headers={"Authorization": f"Bearer {key}"}) as resp:
                await resp.read()
                return resp.status

        assert await issue(old_key) == 200
        assert await issue(new_key) == 401
        key_file.write_text(new_key + "\n")
        code, _, err = await gateway_cli("reload", "-c", str(gw.config))
        assert code == 0, err
        await gw.wait_log("config reloaded")
        assert await issue(new_key) == 200
        assert await issue(old_key) == 401
        assert await gw.stop() == 0
    log = gw.log_text()
    assert old_key not in log and new_key not in log


# ------------------------------------------------------------------ SIGTERM


async def test_sigterm_lets_every_request_in_flight_finish(tmp_path: Path, echo: Echo,
                                                           http: aiohttp.ClientSession) -> None:
    text = routes_to(echo, tmp_path, timeouts="{shutdown_grace: 6s}")
    async with gateway_proc(text, tmp_path) as gw:
        # Warm the upstream pool so that slow GETs are served by the fast path too.
        warm = await asyncio.gather(*(one_shot(gw.port, "GET", f"/app/warm{i}")
                                      for i in range(4)))
        assert [r.status for r in warm] == [200] * 4
        idle = await KeepAlive.open(gw.port)
        assert (await idle.request("GET", "/app/idle")).status == 200
        before = len(echo.seen)

        slow = [asyncio.ensure_future(one_shot(gw.port, "GET", f"/app/do/slow?delay=1.5&n={i}"))
                for i in range(3)]
        slow += [asyncio.ensure_future(one_shot(gw.port, "POST", f"/app/do/slow?delay=1.5&n={i}",
                                                body=b"x" * (1000 * (i + 1))))
                 for i in range(3, 5)]
        await wait_for(lambda: len(echo.seen) == before + 5, what="5 slow requests upstream")
        loop = asyncio.get_running_loop()
        start = loop.time()
        gw.proc.send_signal(signal.SIGTERM)

        # The port closes for new connections while the slow ones are still running...
        await wait_for(lambda: refuses(gw.port), within=1.5, what="the port to close")
        assert not all(task.done() for task in slow)
        # ...an idle kept-alive connection is closed...
        async with asyncio.timeout(2):
            assert await idle.reader.read() == b""
        # ...and every request that had started completes in full.
        done = await asyncio.gather(*slow)
        assert [r.status for r in done] == [200] * 5
        bodies = [json.loads(r.body) for r in done]
        assert [b["method"] for b in bodies] == ["GET"] * 3 + ["POST"] * 2
        assert [b["body_len"] for b in bodies[3:]] == [4000, 5000]
        async with asyncio.timeout(10):
            code = await gw.proc.wait()
        assert code == 0
        assert loop.time() - start < 5  # it did not wait out the whole grace period
    statuses = [line["http.response.status_code"] for line in gw.access()
                if "/do/slow" in line["url.path"]]
    assert statuses == [200] * 5
    assert "Traceback" not in gw.log_text()


async def test_sigterm_closes_websockets_with_1001(tmp_path: Path, echo: Echo,
                                                  http: aiohttp.ClientSession) -> None:
    text = routes_to(echo, tmp_path, timeouts="{shutdown_grace: 5s}")
    async with gateway_proc(text, tmp_path) as gw:
        async with http.ws_connect(gw.url + "/app/do/ws") as ws:
            await ws.send_str("hello")
            assert await ws.receive_str(timeout=3) == "echo:hello"
            loop = asyncio.get_running_loop()
            start = loop.time()
            gw.proc.send_signal(signal.SIGTERM)
            msg = await ws.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.CLOSE, msg
            assert msg.data == 1001
        assert ws.close_code == 1001
        async with asyncio.timeout(10):
            assert await gw.proc.wait() == 0
        assert loop.time() - start < 4  # no waiting out the grace for an idle chat
        # The upstream side is told the same.
        await wait_for(lambda: bool(echo.ws_closed), what="the upstream WebSocket to close")
        assert echo.ws_closed == [1001]


async def test_readyz_turns_503_before_the_port_closes(tmp_path: Path, echo: Echo,
                                                       http: aiohttp.ClientSession) -> None:
    text = routes_to(echo, tmp_path, timeouts="{shutdown_grace: 2s, shutdown_delay: 2s}")
    async with gateway_proc(text, tmp_path) as gw:
        assert gw.admin_url is not None
        admin = gw.admin_url
        assert (await readyz(http, admin))[0] == 200
        loop = asyncio.get_running_loop()
        start = loop.time()
        gw.proc.send_signal(signal.SIGTERM)

        async def draining() -> bool:
            status, report = await readyz(http, admin)
            return status == 503 and report.get("status") == "draining"

        await wait_for(draining, within=1, what="/readyz to report draining")
        not_ready_at = loop.time() - start
        # Not ready, but still serving: load balancers get time to notice.
        assert await accepts(gw.port)
        resp = await one_shot(gw.port, "GET", "/app/during-delay")
        assert resp.status == 200
        await wait_for(lambda: refuses(gw.port), within=4, interval=0.05,
                       what="the port to close")
        closed_at = loop.time() - start
        assert not_ready_at < 1.0
        assert closed_at >= 1.8, "the port closed before shutdown_delay was over"
        async with asyncio.timeout(10):
            assert await gw.proc.wait() == 0


# ------------------------------------------------------------------ workers


async def test_workers_replace_a_killed_worker_and_stop_cleanly(tmp_path: Path, echo: Echo,
                                                                http: aiohttp.ClientSession
                                                                ) -> None:
    admin_port = free_port()
    admin = f"http://127.0.0.1:{admin_port}"
    text = routes_to(echo, tmp_path).replace("admin: {host: 127.0.0.1, port: 0}",
                                             f"admin: {{host: 127.0.0.1, port: {admin_port}}}")

    async def both_ready() -> bool:
        status, report = await readyz(http, admin)
        return status == 200 and {"worker 0", "worker 1"} <= set(report)

    async with gateway_proc(text, tmp_path, "--workers", "2") as gw:
        await wait_for(both_ready, within=10, what="both workers ready on the admin port")
        workers = children(gw.pid)
        assert len(workers) == 2, workers
        pid_file = tmp_path / "gateway.pid"
        assert int(pid_file.read_text()) == gw.pid  # the master: SIGHUP goes to it

        victim = workers[0]
        os.kill(victim, signal.SIGKILL)
        await wait_for(lambda: len(children(gw.pid)) == 2 and victim not in children(gw.pid),
                       within=10, what="a replacement worker")
        await gw.wait_log(f"(pid {victim}) exited", within=5)
        # The supervisor's admin port reports both again once the new worker is up.
        await wait_for(both_ready, within=10, what="the replacement worker ready")

        # Both workers answer on the port.
        async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True)) as fresh:
            for i in range(10):
                async with fresh.get(f"{gw.url}/app/w{i}") as resp:
                    assert resp.status == 200
        async with http.get(f"{admin}/healthz") as resp:
            assert resp.status == 200

        final = children(gw.pid)
        gw.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            code = await gw.proc.wait()
        assert code == 0
        await wait_for(lambda: not any(alive(pid) for pid in final), within=5,
                       what="every worker to exit")
        assert not pid_file.exists()
    assert "Traceback" not in gw.log_text()
