"""Observability: the access log, X-Request-ID, Prometheus metrics, /healthz and /readyz.

Everything on real sockets: an echo upstream in the test's loop, the gateway either in the
same loop (``serving``) or as a ``python -m gateway`` subprocess whose stderr is inspected.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.redis_server import redis_or_fail
from tests.support.admin import has_metric, metric, readyz, scrape, wait_healthy
from tests.support.gateway import ROUTES, GatewayFactory
from tests.support.ports import free_port
from tests.support.process import port_accepts, start_gateway_process, wait_for
from tests.support.rawhttp import KeepAlive
from tests.support.upstreams import Echo

TENANT = "202007159031"
CHANNEL = "202011230001"
CEC_SECRET = "ObservabilityTestSecret0123456789abcdefXYZ1"  # 43 of [A-Za-z0-9]
TOKEN_KEY = "obs-signing-key-0123456789abcdef"
API_KEY = "obs-api-key-0123456789abcdef-SECRET"
VALIDATE = "/rest/cc-messaging/v1/thirdparty/chatThirdPartyValidate"
NEW_CLIENT = "/service-cloud/webclient/chat_client/js/newThirdPartyClient.js"
# ECS names (gateway/accesslog.py), flattened by ``flat``.
ACCESS_FIELDS = {"@timestamp", "log.level", "message", "ecs.version", "event.dataset",
                 "http.request.id", "client.ip", "http.request.method", "url.path",
                 "http.response.status_code", "http.request.body.bytes",
                 "http.response.body.bytes", "event.duration", "http.version", "url.domain",
                 "user_agent.original"}
TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")



# ------------------------------------------------------------------ access log (subprocess)


def token_mode_config(echo: Echo, extra: str = "") -> str:
    return f"""
listen: {{host: 127.0.0.1, port: 0}}
admin: {{host: 127.0.0.1, port: 0}}
timeouts: {{shutdown_grace: 2s}}
routes:
  - prefix: /app/
    upstream: {echo.url}/up/
  - prefix: /
    upstream: {echo.url}/root/
cec:
  tenant_space_id: "{TENANT}"
  channel_config_id: "{CHANNEL}"
  auth: {{mode: token}}
  guest: {{cookie_key: "guest-cookie-key-0123456789abcdef"}}
token:
  signing_key: {TOKEN_KEY}
  api_key: {API_KEY}
  validate_path: {VALIDATE}
  validate_allow_from: [127.0.0.1/32]
  rate_limit: 1000/second
{extra}
"""


async def test_json_access_log_one_line_per_request_and_no_secrets(tmp_path: Path,
                                                                  echo: Echo) -> None:
    gw = await start_gateway_process(token_mode_config(echo), tmp_path, log_format="json")
    secrets = ["QUERYSECRET1", "COOKIESECRET1", "SESSIONSECRET1", "AUTHSECRET1",
               "QUERYSECRET2", API_KEY, TOKEN_KEY]
    sent: list[tuple[str, str, int, int, str]] = []  # method, path, status, body len, rid
    client_headers = {"Cookie": "ccmessaging-token=COOKIESECRET1; sid=SESSIONSECRET1",
                      "Authorization": "Bearer AUTHSECRET1"}
    try:
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector,
                                         cookie_jar=aiohttp.DummyCookieJar()) as http:
            # GETs on one kept-alive connection: after the first, the pool has an idle
            # upstream connection and the fast path serves them.
            for _ in range(3):
                async with http.get(gw.url + "/app/a?token=QUERYSECRET1",
                                    headers=client_headers) as resp:
                    body = await resp.read()
                    sent.append(("GET", "/app/a", resp.status, len(body),
                                 resp.headers["X-Request-ID"]))
            async with http.post(gw.url + "/app/p?sig=QUERYSECRET2", data=b"x" * 100,
                                 headers=client_headers) as resp:
                body = await resp.read()
                sent.append(("POST", "/app/p", resp.status, len(body),
                             resp.headers["X-Request-ID"]))
            async with http.post(gw.url + "/gateway/token",
                                 json={"userId": "u1", "userName": "Ann"},
                                 headers={"Authorization": f"Bearer {API_KEY}"}) as resp:
                body = await resp.read()
                token = json.loads(body)["token"]
                secrets.append(token)
                sent.append(("POST", "/gateway/token", resp.status, len(body),
                             resp.headers["X-Request-ID"]))
            async with http.post(gw.url + VALIDATE, json={
                    "Token": token, "userId": "u1", "userName": "Ann",
                    "tenantSpaceId": TENANT}) as resp:
                body = await resp.read()
                assert json.loads(body)["retCode"] == 0
                sent.append(("POST", VALIDATE, resp.status, len(body),
                             resp.headers["X-Request-ID"]))
            async with http.delete(gw.url + f"/gateway/token?token={token}",
                                   headers={"Authorization": f"Bearer {API_KEY}"}) as resp:
                body = await resp.read()
                sent.append(("DELETE", "/gateway/token", resp.status, len(body),
                             resp.headers["X-Request-ID"]))
    finally:
        code = await gw.stop()
    assert code == 0
    assert [s[2] for s in sent] == [200, 200, 200, 200, 200, 200, 204]

    text = gw.log_text()
    for secret in secrets:
        assert secret not in text, f"{secret[:6]}... leaked into the log"
    assert "Bearer" not in text and "Cookie" not in text

    lines = gw.access()
    assert len(lines) == len(sent), lines
    assert "?" not in "".join(str(line["url.path"]) for line in lines)
    for line, (method, path, status, size, rid) in zip(lines, sent, strict=True):
        assert ACCESS_FIELDS <= set(line), line
        assert TIME_RE.match(line["@timestamp"]), line
        assert line["http.request.id"] == rid
        assert line["client.ip"] == "127.0.0.1"
        assert (line["http.request.method"], line["url.path"],
                line["http.response.status_code"]) == (method, path, status)
        assert line["http.response.body.bytes"] == size
        assert isinstance(line["event.duration"], int) and line["event.duration"] >= 0
        assert line["http.version"] == "1.1" and "tls.version" not in line
        assert line["url.domain"] == "127.0.0.1" and line["url.port"] == gw.port
        assert line["user_agent.original"].startswith("Python/")
        assert "trace.id" not in line  # tracing is off
    proxied, own = lines[:4], lines[4:]
    for line in proxied:
        assert line["gateway.route"] == "/app/"
        assert line["destination.address"] == "127.0.0.1"
        assert line["destination.port"] == echo.port
        assert line["gateway.upstream.status_code"] == 200
        assert isinstance(line["gateway.upstream.duration"], int)
        assert 0 <= line["gateway.upstream.duration"] <= line["event.duration"]
    assert [line["http.request.body.bytes"] for line in proxied] == [0, 0, 0, 100]
    # The process runs on uvloop, whose loop clock ticks in whole milliseconds: durations (ns)
    # measured with it would all be multiples of 1 ms, with perf_counter they are not.
    ms = 1_000_000
    assert any(x["event.duration"] % ms for x in lines), [x["event.duration"] for x in lines]
    assert any(x["gateway.upstream.duration"] % ms for x in proxied), [
        x["gateway.upstream.duration"] for x in proxied]
    for line in own:  # the gateway's own endpoints: no route, no upstream
        assert not {"gateway.route", "gateway.upstream.status_code", "destination.address"
                    } & set(line), line
    # Bytes in count for the gateway's own endpoints too (the issuing request's JSON body).
    assert own[0]["http.request.body.bytes"] == len(
        json.dumps({"userId": "u1", "userName": "Ann"}))


async def test_text_log_format_has_the_access_line(tmp_path: Path, echo: Echo) -> None:
    gw = await start_gateway_process(token_mode_config(echo), tmp_path, log_format="text")
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(gw.url + "/app/t?secret=QSECRET") as resp:
                rid = resp.headers["X-Request-ID"]
                assert resp.status == 200
    finally:
        assert await gw.stop() == 0
    lines = [line for line in gw.log_text().splitlines() if "gateway.access" in line]
    assert len(lines) == 1
    assert "GET /app/t " in lines[0] and rid in lines[0] and " 200 " in lines[0]
    assert "QSECRET" not in gw.log_text()


async def test_access_log_fields_on_the_fast_and_the_full_path(
        gateway: GatewayFactory, echo: Echo, fast_path_spy: list[tuple[str, bool]],
        access_records: Callable[[], list[dict[str, Any]]]) -> None:
    gw = await gateway(ROUTES)
    conn = await KeepAlive.open(gw.port)
    try:
        gets = [await conn.request("GET", f"/app/f{i}?q=secret{i}") for i in range(3)]
        head = await conn.request("HEAD", "/app/h?q=secret")
        post = await conn.request("POST", "/app/p?q=secret", body=b"z" * 321)
    finally:
        await conn.close()
    fast = [path for path, taken in fast_path_spy if taken]
    assert "/app/f2?q=secret2" in fast and "/app/h?q=secret" in fast, fast_path_spy
    records = access_records()
    assert [r["url.path"] for r in records] == [
        "/app/f0", "/app/f1", "/app/f2", "/app/h", "/app/p"]
    answers = [*gets, head, post]
    for record, answer in zip(records, answers, strict=True):
        assert record["http.response.status_code"] == 200
        assert record["gateway.upstream.status_code"] == 200
        assert record["gateway.route"] == "/app/"
        assert record["http.request.id"] == answer.header("X-Request-ID")
        assert record["client.ip"] == "127.0.0.1"
        assert record["http.response.body.bytes"] == len(answer.body)
        assert 0 <= record["gateway.upstream.duration"] <= record["event.duration"]
        # KeepAlive sends "Host: gw.test" and no User-Agent.
        assert record["url.domain"] == "gw.test" and "user_agent.original" not in record
    assert [r["http.request.method"] for r in records] == ["GET"] * 3 + ["HEAD", "POST"]
    assert [r["http.request.body.bytes"] for r in records] == [0, 0, 0, 0, 321]
    assert "secret" not in json.dumps(records)


# ------------------------------------------------------------------ X-Request-ID


async def test_request_id_generated_when_absent(
        gateway: GatewayFactory, echo: Echo, fast_path_spy: list[tuple[str, bool]],
        access_records: Callable[[], list[dict[str, Any]]],
        caplog: pytest.LogCaptureFixture) -> None:
    dead = free_port()
    gw = await gateway(ROUTES + f"""
  - prefix: /dead/
    upstream: http://127.0.0.1:{dead}/
""")
    conn = await KeepAlive.open(gw.port)
    try:
        answers = [await conn.request("GET", f"/app/g{i}") for i in range(3)]
        answers.append(await conn.request("POST", "/app/p", body=b"hello"))
        failed = await conn.request("GET", "/dead/x")
    finally:
        await conn.close()
    assert any(taken for _, taken in fast_path_spy), "the fast path never served a GET"
    rids = [a.header("X-Request-ID") for a in answers]
    assert all(rid and rid.isascii() and rid.isprintable() for rid in rids)
    assert len(set(rids)) == 4
    assert [s.all("X-Request-ID") for s in echo.seen] == [[rid] for rid in rids]
    assert [json.loads(a.body)["headers"] for a in answers]  # the echo answered each
    failed_rid = failed.header("X-Request-ID")
    assert failed.status == 502 and failed_rid and failed_rid not in rids
    records = access_records()
    assert [r["http.request.id"] for r in records] == [*rids, failed_rid]
    # The error line about the failed request carries its id as well.
    errors = [r.getMessage() for r in caplog.records
              if r.name != "gateway.access" and r.levelno >= logging.WARNING]
    assert any(failed_rid in message for message in errors), errors


@pytest.mark.parametrize("trusted", ["127.0.0.1/32", "10.0.0.0/8"])
async def test_request_id_kept_only_from_a_trusted_proxy(
        trusted: str, gateway: GatewayFactory, echo: Echo,
        fast_path_spy: list[tuple[str, bool]],
        access_records: Callable[[], list[dict[str, Any]]]) -> None:
    gw = await gateway(ROUTES + f"trusted_proxies: [{trusted}]\n")
    is_trusted = trusted.startswith("127.")
    sent = [f"edge-{i}-abc" for i in range(4)]
    xff = "X-Forwarded-For: 203.0.113.7"
    conn = await KeepAlive.open(gw.port)
    try:
        answers = [await conn.request("GET", f"/app/k{i}", f"X-Request-ID: {sent[i]}", xff)
                   for i in range(3)]
        answers.append(await conn.request("POST", "/app/p", f"X-Request-ID: {sent[3]}", xff,
                                          body=b"data"))
        # Too long or not ASCII: never used, even from a trusted proxy.
        odd = [await conn.request("GET", "/app/long", "X-Request-ID: " + "a" * 300),
               await conn.request("GET", "/app/utf8", "X-Request-ID: bad-\xe9-id")]
    finally:
        await conn.close()
    assert any(taken for _, taken in fast_path_spy), "the fast path never served a GET"
    got = [a.header("X-Request-ID") for a in answers]
    upstream = [s.all("X-Request-ID") for s in echo.seen[:4]]
    logged = [r["http.request.id"] for r in access_records()[:4]]
    clients = {r["client.ip"] for r in access_records()[:4]}
    assert clients == {"203.0.113.7" if is_trusted else "127.0.0.1"}
    assert all(a.all("X-Request-ID") == [a.header("X-Request-ID")] for a in answers)
    if is_trusted:
        assert got == sent
    else:
        assert not set(got) & set(sent)
        assert all(got)
    # Exactly one id goes upstream (never the client's next to ours), the one returned.
    assert upstream == [[rid] for rid in got]
    assert logged == got
    for answer, seen in zip(odd, echo.seen[4:], strict=True):
        rid = answer.header("X-Request-ID")
        # (Generated ids are hex, in which "bad" can occur; "bad-" cannot.)
        assert rid and len(rid) <= 128 and rid.isprintable() and "bad-" not in rid
        assert seen.all("X-Request-ID") == [rid]


# ------------------------------------------------------------------ metrics


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


async def test_metrics_after_mixed_traffic(gateway: GatewayFactory, echo: Echo,
                                           http: aiohttp.ClientSession) -> None:
    dead = free_port()
    gw = await gateway(f"""
admin: {{host: 127.0.0.1, port: 0}}
timeouts: {{read: 400ms, shutdown_grace: 1s}}
routes:
  - prefix: /app/
    upstream: ${{ECHO}}/up/
  - prefix: /dead/
    upstream: http://127.0.0.1:{dead}/
""")
    assert gw.admin_url is not None
    admin = gw.admin_url
    for i in range(3):
        async with http.get(f"{gw.url}/app/ok{i}") as resp:
            assert resp.status == 200
    async with http.post(f"{gw.url}/app/post", data=b"12345") as resp:
        assert resp.status == 200
    async with http.get(f"{gw.url}/dead/x") as resp:
        assert resp.status == 502
    async with http.get(f"{gw.url}/app/do/slow?delay=3") as resp:
        assert resp.status == 504

    async with http.ws_connect(gw.url + "/app/do/ws") as ws:
        await ws.send_str("hi")
        assert await ws.receive_str(timeout=3) == "echo:hi"
        text = await scrape(http, admin)
        assert metric(text, "gateway_websockets_open") == 1

    async def ws_closed() -> bool:
        return metric(await scrape(http, admin), "gateway_websockets_open") == 0

    await wait_for(ws_closed, what="the WebSocket gauge to drop")
    text = await scrape(http, admin)

    def requests(route: str, method: str, status: str) -> float:
        return metric(text, "gateway_requests_total", route=route, method=method, status=status)

    assert requests("/app/", "GET", "200") == 3
    assert requests("/app/", "POST", "200") == 1
    assert requests("/dead/", "GET", "502") == 1
    assert requests("/app/", "GET", "504") == 1
    assert requests("/app/", "GET", "101") == 1
    # Nothing else was counted (the scrapes go to the admin listener, not through here).
    assert metric(text, "gateway_requests_total") == 7
    assert metric(text, "gateway_upstream_errors_total", route="/dead/", kind="error") == 1
    assert metric(text, "gateway_upstream_errors_total", route="/app/", kind="timeout") == 1
    assert metric(text, "gateway_upstream_errors_total") == 2
    assert metric(text, "gateway_websockets_open") == 0

    hist = "gateway_request_duration_seconds"
    # The WebSocket session is counted as a request but not timed: how long a chat stays
    # open says nothing about the gateway's latency.
    assert metric(text, hist + "_count", route="/app/") == 5
    assert metric(text, hist + "_count", route="/dead/") == 1
    assert metric(text, hist + "_bucket", route="/app/", le="+Inf") == 5
    # The 504 waited for the 400 ms read timeout; the rest were quick.
    assert metric(text, hist + "_bucket", route="/app/", le="0.25") == 4
    assert metric(text, hist + "_sum", route="/app/") >= 0.4
    assert metric(text, hist + "_bucket", route="/dead/", le="0.25") == 1


def chat_config(extra: str = "") -> str:
    return f"""
admin: {{host: 127.0.0.1, port: 0}}
routes:
  - prefix: /service-cloud/
    upstream: ${{ECHO}}/service-cloud/
  - prefix: /
    upstream: ${{ECHO}}/root/
cec:
  tenant_space_id: "{TENANT}"
  channel_config_id: "{CHANNEL}"
  auth: {{mode: authorization, secret_key: {CEC_SECRET}}}
  guest: {{cookie_key: "guest-cookie-key-0123456789abcdef"}}
token:
  signing_key: {TOKEN_KEY}
  api_key: {API_KEY}
  validate_path: {VALIDATE}
  validate_allow_from: [127.0.0.1/32]
  guard: {{max_failures: 2, window: 1m, lockout: 30s}}
  rate_limit: 1000/second
{extra}
"""


def third_user_data() -> dict[str, Any]:
    return {"thirdUserName": "Tom", "thirdUserId": "10010001", "tenantSpaceId": TENANT,
            "channelConfigId": CHANNEL, "locale": "en", "timestamp": 1700000000000,
            "mapService": "tencent"}


async def test_metrics_count_signatures(gateway: GatewayFactory, echo: Echo,
                                        http: aiohttp.ClientSession) -> None:
    gw = await gateway(chat_config())
    assert gw.admin_url is not None
    async with http.post(gw.url + "/gateway/authorization", json=third_user_data()) as resp:
        assert resp.status == 200
        assert (await resp.text()).startswith(f"auth-v2/{CHANNEL}/")
    async with http.post(gw.url + NEW_CLIENT + "?&t=1", json=third_user_data()) as resp:
        assert resp.status == 200
    forwarded = [s for s in echo.seen if s.path.endswith("newThirdPartyClient.js")]
    assert len(forwarded) == 1
    text = await scrape(http, gw.admin_url)
    assert metric(text, "gateway_signatures_total") == 2


async def test_metrics_count_token_events_and_lockouts(gateway: GatewayFactory,
                                                       http: aiohttp.ClientSession) -> None:
    gw = await gateway(chat_config())
    assert gw.admin_url is not None
    bearer = {"Authorization": f"Bearer {API_KEY}"}
    async with http.post(gw.url + "/gateway/token", json={"userId": "u1", "userName": "Ann"},
                         headers=bearer) as resp:
        assert resp.status == 200
        token = (await resp.json())["token"]
    good = {"Token": token, "userId": "u1", "userName": "Ann", "tenantSpaceId": TENANT}
    bad = {**good, "Token": "not-the-token"}
    results = []
    for body in (good, bad, bad, bad):
        async with http.post(gw.url + VALIDATE, json=body) as resp:
            results.append((resp.status, (await resp.json())["retCode"]))
    assert results == [(200, 0), (200, 1), (200, 1), (429, 1)]

    text = await scrape(http, gw.admin_url)

    def events(endpoint: str, outcome: str) -> float:
        return metric(text, "gateway_token_events_total", endpoint=endpoint, outcome=outcome)

    assert events("issue", "issued") == 1
    assert events("validate", "ok") == 1
    assert events("validate", "failed") == 2
    assert events("validate", "lockout_started") == 1
    assert metric(text, "gateway_token_events_total", endpoint="validate") == 5
    assert metric(text, "gateway_lockouts_total") == 1
    # The requests themselves are counted under the gateway's own pseudo-route.
    assert metric(text, "gateway_requests_total", method="POST") == 5


def promtool_check(text: str) -> None:
    """``promtool check metrics``: the exposition is valid and lint-clean."""
    assert shutil.which("promtool"), "promtool is missing: ./dev installs Debian's prometheus"
    done = subprocess.run(["promtool", "check", "metrics"], input=text.encode(),
                          capture_output=True, timeout=30, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr).decode()


async def test_one_process_metrics_collectors_build_info_in_flight(
        gateway: GatewayFactory, echo: Echo, http: aiohttp.ClientSession) -> None:
    gw = await gateway(ROUTES + "admin: {host: 127.0.0.1, port: 0}\n")
    assert gw.admin_url is not None
    admin = gw.admin_url
    assert metric(await scrape(http, admin), "gateway_requests_in_flight") == 0
    slow = asyncio.ensure_future(http.get(gw.url + "/app/do/slow?delay=0.8"))
    try:
        async def one_in_flight() -> bool:
            return metric(await scrape(http, admin), "gateway_requests_in_flight") == 1

        await wait_for(one_in_flight, within=5, what="the slow request in flight")
    finally:
        async with await slow as resp:
            assert resp.status == 200
    text = await scrape(http, admin)
    assert metric(text, "gateway_requests_in_flight") == 0
    from gateway import __version__

    assert metric(text, "gateway_build_info", version=__version__) == 1
    assert metric(text, "process_resident_memory_bytes") > 0
    assert metric(text, "process_open_fds") > 0
    assert has_metric(text, "python_gc_collections_total", generation="0")
    assert has_metric(text, "python_info")
    promtool_check(text)


async def test_workers_one_scrape_gives_the_host_totals(tmp_path: Path, echo: Echo) -> None:
    admin_port = free_port()
    text = f"""
listen: {{host: 127.0.0.1, port: 0}}
admin: {{host: 127.0.0.1, port: {admin_port}}}
timeouts: {{shutdown_grace: 2s}}
routes:
  - prefix: /app/
    upstream: {echo.url}/up/
"""
    gw = await start_gateway_process(text, tmp_path, "--workers", "2", log_format="json")
    admin = f"http://127.0.0.1:{admin_port}"
    try:
        assert gw.admin_url == admin  # the supervisor says where the host's admin is
        await wait_healthy(admin)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)
                                         ) as http:
            async def both_up() -> bool:
                body = await scrape(http, admin)
                return [metric(body, "gateway_worker_up", worker=str(i)) for i in (0, 1)
                        ] == [1, 1]

            await wait_for(both_up, within=10, what="both workers in the scrape")
            sent = 24
            # A new connection per request so that SO_REUSEPORT spreads them over the workers.
            for i in range(sent):
                async with http.get(f"{gw.url}/app/w{i}") as resp:
                    assert resp.status == 200
            body = await scrape(http, admin)
            status, report = await readyz(http, admin)
    finally:
        code = await gw.stop()
    assert code == 0
    assert metric(body, "gateway_requests_total", route="/app/", status="200") == sent
    assert metric(body, "gateway_request_duration_seconds_count", route="/app/") == sent
    # Each process's own series keep a worker label, the supervisor's too.
    pids = {metric(body, "process_start_time_seconds", worker=w) > 0
            for w in ("0", "1", "supervisor")}
    assert pids == {True}, body
    assert has_metric(body, "python_gc_collections_total", worker="1", generation="0")
    assert metric(body, "gateway_requests_in_flight") == 0
    from gateway import __version__

    assert metric(body, "gateway_build_info", version=__version__) == 1
    promtool_check(body)
    assert status == 200 and report["status"] == "ready", report
    assert set(report) == {"worker 0", "worker 1", "status"}
    # No worker listens on a TCP admin port of its own any more.
    assert not port_accepts(admin_port + 1)


# ------------------------------------------------------------------ /healthz and /readyz


async def test_healthz_and_readyz_when_all_is_well(gateway: GatewayFactory, echo: Echo,
                                                   http: aiohttp.ClientSession) -> None:
    gw = await gateway(ROUTES + "admin: {host: 127.0.0.1, port: 0}\n")
    assert gw.admin_url is not None and gw.admin_url.startswith("http://127.0.0.1:")
    async with http.get(gw.admin_url + "/healthz") as resp:
        assert resp.status == 200
    status, report = await readyz(http, gw.admin_url)
    assert (status, report) == (200, {"status": "ready"})
    state = await status_of(http, gw.admin_url)
    assert state["ready"] is True and state["draining"] is False and state["store"] is None
    echo_url = f"http://127.0.0.1:{echo.port}"
    assert [(r["route"], r["upstream"], r["up"]) for r in state["routes"]] == [
        ("/app/", echo_url, True), ("/", echo_url, True)]
    # The admin endpoints are not served on the public listener.
    for path in ("/metrics", "/status"):
        async with http.get(gw.url + path) as resp:
            text = await resp.text()
            assert "gateway_requests" not in text and '"routes"' not in text


async def status_of(http: aiohttp.ClientSession, admin_url: str) -> dict[str, Any]:
    async with http.get(admin_url + "/status") as resp:
        assert resp.status == 200
        data: dict[str, Any] = await resp.json()
        return data


async def test_cec_and_redis_down_the_site_and_readyz_stay_up(
        gateway: GatewayFactory, http: aiohttp.ClientSession) -> None:
    """Issue 14: a CEC or Redis outage is not a website outage (nor a readiness failure)."""
    cec = web.ServerRunner(web.Server(_ok))
    await cec.setup()
    cec_site = web.TCPSite(cec, "127.0.0.1", 0)
    await cec_site.start()
    cec_port = cec.addresses[0][1]
    with redis_or_fail() as redis:
        gw = await gateway(chat_config().replace(
            "upstream: ${ECHO}/service-cloud/", f"upstream: http://127.0.0.1:{cec_port}/sc/"
        ).replace("  rate_limit: 1000/second", f"  rate_limit: 1000/second\n"
                                              f"  store: {redis.url}"))
        admin = gw.admin_url
        assert admin is not None
        state = await status_of(http, admin)
        assert {r["route"]: r["up"] for r in state["routes"]} == {"/service-cloud/": True,
                                                                 "/": True}
        assert state["store"]["backend"] == "redis" and state["store"]["up"] is True
        text = await scrape(http, admin)
        assert metric(text, "gateway_upstream_up", route="/service-cloud/") == 1
        assert metric(text, "gateway_store_up") == 1

        await cec.cleanup()
        redis.stop()
        # Readiness is about this process: still ready, so no replica leaves the Service.
        status, report = await readyz(http, admin)
        assert (status, report) == (200, {"status": "ready"})
        async with http.get(gw.url + "/some/page") as resp:
            assert resp.status == 200  # the site route keeps serving
        async with http.get(gw.url + "/service-cloud/x.js") as resp:
            assert resp.status == 502  # the CEC route answers for itself
        # /status and the metrics say what is down (and why, without the Redis URL).
        state = await status_of(http, admin)
        routes = {r["route"]: r for r in state["routes"]}
        assert routes["/"]["up"] is True and routes["/service-cloud/"]["up"] is False
        assert routes["/service-cloud/"]["error"] and routes["/service-cloud/"]["since"]
        assert state["store"]["up"] is False and state["store"]["error"]
        assert state["ready"] is True and state["status"] == "ready"
        assert redis.url.split("//")[1] not in json.dumps(state)
        text = await scrape(http, admin)
        assert metric(text, "gateway_upstream_up", route="/service-cloud/") == 0
        assert metric(text, "gateway_upstream_up", route="/") == 1
        assert metric(text, "gateway_store_up") == 0


async def test_admin_listener_defaults_to_loopback(gateway: GatewayFactory) -> None:
    gw = await gateway(ROUTES + "admin: {port: 0}\n")
    assert gw.admin_url is not None and gw.admin_url.startswith("http://127.0.0.1:")


async def _ok(request: web.BaseRequest) -> web.Response:
    return web.Response(text="ok")
