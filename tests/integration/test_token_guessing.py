"""Issue 14: the validation callback cannot be turned into an off switch.

The attack as an anonymous internet user would run it: POST ``newThirdPartyClient.js`` to the
CEC (the sandbox, public) with made-up tokens, so that the CEC calls the gateway's callback
with them, from the CEC's own (allow-listed) address. Real users' chat must keep working.
Then the bounds: two gateway processes on one real redis-server, 100 concurrent guesses, and
lifting a lock early with ``gateway unlock`` and the admin ``/unlock`` endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr

from gateway.sandbox.app import runner_url, start_sandbox
from gateway.sandbox.settings import SandboxSettings
from tests.integration.conftest import (
    API_KEY,
    NEW_CLIENT,
    VALIDATE,
    BrowserFactory,
    Site,
    third_user_data,
    token_config,
)
from tests.integration.test_token_chat import gateway_url, issue, login, validate
from tests.redis_server import RedisServer
from tests.support.admin import metric
from tests.support.gateway import GatewayStarter
from tests.support.ports import free_port
from tests.support.process import clean_env, gateway_cli
from tests.support.upstreams import RawRecorder

SUCCESS = {"retCode": 0, "message": "validate success"}
# The defaults of token.guard and token.rate_limit: the attack is run against them.
DEFAULT_GUARD = "{max_failures: 5, window: 5m, lockout: 15m}"
UNAUTHORIZED_JS = "/* unauthorized */"


@contextlib.asynccontextmanager
async def sandbox_cec(validate_url: str) -> AsyncIterator[str]:
    """The CEC sandbox, calling ``validate_url`` back for tokens; yields its context URL."""
    settings = SandboxSettings(port=0, secret_key=SecretStr("x" * 43), validate_url=validate_url,
                               validate_timeout=10.0)
    runner = await start_sandbox(settings, host="127.0.0.1", port=0)
    try:
        yield runner_url(runner, settings)
    finally:
        await runner.cleanup()


async def bogus_validation(http: aiohttp.ClientSession, cec: str, user_id: str, n: int) -> int:
    """One made-up token for ``user_id``, posted straight to the (public) CEC."""
    body = third_user_data(thirdUserId=user_id, thirdUserName="Alice Zhang",
                           thirdUserToken=f"made-up-token-{n:030d}")
    async with http.post(cec + "/webclient/chat_client/js/newThirdPartyClient.js",
                         json=body) as resp:
        await resp.read()
        return resp.status


async def chat_starts(session: aiohttp.ClientSession, base: str) -> bool:
    """The real page's request through the gateway: the CEC accepts the user (bootstrap JS)."""
    async with session.post(f"{base}{NEW_CLIENT}?&t=1", json=third_user_data()) as resp:
        text = await resp.text()
        return resp.status == 200 and UNAUTHORIZED_JS not in text


@pytest.mark.parametrize("bogus", [5, 500])
async def test_bogus_validations_through_the_cec_leave_real_users_chat_working(
        bogus: int, start_gateway: GatewayStarter, site: Site, browser: BrowserFactory,
        caplog: pytest.LogCaptureFixture) -> None:
    site.sessions.update({"sess-a": ("u-1001", "Alice Zhang"), "sess-b": ("u-1002", "Bob Li")})
    port = free_port()
    async with sandbox_cec(f"http://127.0.0.1:{port}{VALIDATE}") as cec_url:
        cec = cec_url.removesuffix("/service-cloud")
        gw = await start_gateway(token_config(cec, site, guard=DEFAULT_GUARD, port=port)
                                 .replace("rate_limit: 1000/second", "rate_limit: 50/second"))
        alice, bob, attacker = browser(), browser(), browser()
        login(alice, gw.url, "sess-a")
        login(bob, gw.url, "sess-b")
        assert await chat_starts(alice, gw.url) and await chat_starts(bob, gw.url)

        # The attack: made-up tokens naming the victim (and others), relayed by the CEC, in
        # waves of 50 at once.
        statuses: Counter[int] = Counter()
        for start in range(0, bogus, 50):
            wave = await asyncio.gather(*(
                bogus_validation(attacker, cec_url, "u-1001" if n % 2 else f"u-{n}", n)
                for n in range(start, min(bogus, start + 50))))
            statuses.update(wave)
        assert statuses == {401: bogus}  # the CEC refused every made-up token
        # Every real user's chat still starts, the victim's included, and repeatedly.
        for _ in range(3):
            assert await chat_starts(alice, gw.url)
            assert await chat_starts(bob, gw.url)
        # The guessing was counted and is visible (no token in the logs).
        text = caplog.text
        assert "made-up-token" not in text
        metrics = gw.runtime.metrics.render().decode()
        guesses = {result: metric(metrics, "gateway_token_guesses_total", result=result)
                   for result in ("counted", "limited")}
        busy = metric(metrics, "gateway_token_events_total", endpoint="validate",
                      outcome="busy")  # over max_concurrency: refused before the body is read
        assert sum(guesses.values()) + busy == bogus
        if bogus > 10:
            # Past the victim's allowance: answered 429 (or 503 past the rate), counted as
            # limited, and the start of the block is logged (an alarm can follow either).
            assert guesses["limited"] > 0
            assert metric(metrics, "gateway_lockouts_total") >= 1
            assert "token guessing against userId 'u-1001'" in text


async def test_two_processes_on_one_redis_keep_the_bounds_under_100_concurrent_guesses(
        cec: RawRecorder, site: Site, redis: RedisServer, tmp_path: Path) -> None:
    config = token_config(cec, site, store=redis.url, guard=DEFAULT_GUARD, workers=True)
    config = config.replace("rate_limit: 1000/second",
                            "rate_limit: 1000/second\n  max_concurrency: 500")
    port_a, port_b = free_port(), free_port()
    async with contextlib.AsyncExitStack() as stack:
        a, b = await asyncio.gather(*(
            stack.enter_async_context(gateway_url(
                config.replace("port: 0", f"port: {port}"), tmp_path / name))
            for name, port in (("a", port_a), ("b", port_b))))
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as http:
            token = (await issue(http, a, "u-9", "Val"))["token"]

            # 100 wrong tokens for one userId at once, half on each process: exactly the
            # allowance (5) is answered "validate failed", the rest 429.
            results = await asyncio.gather(*(
                validate(http, (a, b)[n % 2], f"guess-{n:020d}", "u-9", "Val")
                for n in range(100)))
            assert Counter(status for status, _, _ in results) == {200: 5, 429: 95}
            assert all(answer["retCode"] != 0 for _, answer, _ in results)
            for base in (a, b):  # the user's own token validates on both, all the same
                assert (await validate(http, base, token, "u-9", "Val"))[1] == SUCCESS

            # 100 wrong API keys from one address at once, half on each: exactly 5 are
            # answered 401, the rest 429; the locked address is refused even with the key.
            async def wrong_key(base: str) -> int:
                async with http.post(base + "/gateway/token", json={},
                                     headers={"Authorization": "Bearer not-the-key-0000000"}
                                     ) as resp:
                    return resp.status

            keys = await asyncio.gather(*(wrong_key((a, b)[n % 2]) for n in range(100)))
            assert Counter(keys) == {401: 5, 429: 95}
            async with http.post(b + "/gateway/token", json={"userId": "u", "userName": "n"},
                                 headers={"Authorization": f"Bearer {API_KEY}"}) as resp:
                assert resp.status == 429

            # `gateway unlock --address` lifts it in Redis, for both processes at once.
            conf = tmp_path / "a" / "gateway.yaml"
            code, out, err = await gateway_cli("unlock", "-c", str(conf),
                                               "--address", "127.0.0.1", env=clean_env())
            assert code == 0, err
            assert "unlocked address 127.0.0.1" in out
            for base in (a, b):
                assert (await issue(http, base, "u-10", "Wu"))["token"]
            # And `--user`: wrong tokens for u-9 get the ordinary answer again.
            code, _, err = await gateway_cli("unlock", "-c", str(conf), "--user", "u-9",
                                             env=clean_env())
            assert code == 0, err
            status, answer, _ = await validate(http, b, "guess-again-0000000000", "u-9", "Val")
            assert (status, answer["retCode"]) == (200, 1)



async def test_unlock_through_the_admin_listener_with_a_memory_store(
        start_gateway: GatewayStarter, cec: RawRecorder, site: Site, tmp_path: Path) -> None:
    admin_port = free_port()
    admin_key = "admin-key-0123456789abcdef-test"
    config = token_config(cec, site, guard="{max_failures: 2, window: 1m, lockout: 10m}") + (
        f"admin: {{host: 127.0.0.1, port: {admin_port}, api_key: {admin_key}}}\n")
    gw = await start_gateway(config)
    async with aiohttp.ClientSession() as http:
        for _ in range(3):
            await validate(http, gw.url, "guess-00000000000000000", "u-7", "Ann")
        status, _, _ = await validate(http, gw.url, "guess-00000000000000000", "u-7", "Ann")
        assert status == 429

        admin = f"http://127.0.0.1:{admin_port}/unlock"
        # Without the key, with a wrong one, or with a bad body: refused, nothing lifted.
        refusals: list[tuple[dict[str, str], Any, int]] = [
            ({}, {"user": "u-7"}, 401),
            ({"Authorization": "Bearer wrong-key-0123456789abcdef"}, {"user": "u-7"}, 401),
            ({"Authorization": f"Bearer {admin_key}"}, {"user": "u-7", "address": "1.2.3.4"},
             400),
            ({"Authorization": f"Bearer {admin_key}"}, {"address": "not-an-ip"}, 400),
        ]
        for headers, body, expected in refusals:
            async with http.post(admin, json=body, headers=headers) as resp:
                assert resp.status == expected, (body, await resp.text())
                assert admin_key not in await resp.text()
        assert (await validate(http, gw.url, "guess-00000000000000000", "u-7", "Ann"))[0] == 429

        # `gateway unlock` finds the admin listener from the same config file.
        conf = tmp_path / "gateway.yaml"
        conf.write_text(config, encoding="utf-8")
        code, out, err = await gateway_cli("unlock", "-c", str(conf), "--user", "u-7",
                                         env=clean_env())
        assert code == 0, err
        assert "unlocked user u-7" in out
        status, answer, _ = await validate(http, gw.url, "guess-00000000000000000", "u-7", "Ann")
        assert (status, answer["retCode"]) == (200, 1)


async def test_unlock_endpoint_is_off_without_an_admin_key(
        start_gateway: GatewayStarter, cec: RawRecorder, site: Site) -> None:
    admin_port = free_port()
    gw = await start_gateway(token_config(cec, site)
                             + f"admin: {{host: 127.0.0.1, port: {admin_port}}}\n")
    assert gw.admin_url is not None
    async with aiohttp.ClientSession() as http, http.post(
            gw.admin_url + "/unlock", json={"user": "u"},
            headers={"Authorization": "Bearer anything-at-all-000000"}) as resp:
        assert resp.status == 404



def test_admin_key_comes_from_a_file_and_is_never_shown(tmp_path: Path) -> None:
    from gateway.config import load_config_text
    from gateway.errors import ConfigError

    key = tmp_path / "admin_key"
    key.write_text("admin-key-from-a-file-0123456789\n", encoding="utf-8")
    routes = "routes: [{prefix: /, upstream: 'http://127.0.0.1:1/'}]\n"
    cfg = load_config_text(routes + f"admin: {{port: 0, api_key_file: {key}}}\n")
    assert cfg.admin is not None and cfg.admin.api_key is not None
    assert cfg.admin.api_key.get_secret_value() == "admin-key-from-a-file-0123456789"
    assert "admin-key" not in repr(cfg)
    with pytest.raises(ConfigError) as info:
        load_config_text(routes + "admin: {port: 0, api_key: short-secret}\n")
    assert "admin.api_key" in str(info.value) and "short-secret" not in str(info.value)
