"""Redis as companies run it, with real servers: TLS with a private CA and an ACL user,
a replica after a failover (READONLY), redis-sentinel failing the primary over mid-run, and a
three-node Redis Cluster (and MOVED when one of its nodes is given as a plain URL).

Every failure reaches the log with its cause (certificate, authentication, READONLY) and
never a password; with sentinel, tokens issued before the failover stay valid after it and
issuing and validating keep working.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
import trustme
from pydantic import SecretStr

from gateway.config import TokenRedis, load_config_text
from gateway.tokens import TokenBackendUnavailable
from tests.redis_server import RedisServer, running_redis
from tests.support.ports import free_port
from tests.support.process import wait_for
from tests.tokens.conftest import (
    API_KEY,
    GatewayFactory,
    issue_token,
    post_validate,
    validate_body,
)

PASSWORD = "acl-pass-7d1e0c"  # the ACL user's; must never show in a log line
SENTINEL = "/usr/bin/redis-sentinel"
REDIS_CLI = "/usr/bin/redis-cli"
# What the README asks the gateway's ACL user to be allowed.
ACL = ["--user", "default", "off", "--user", "gw", "on", f">{PASSWORD}", "~gateway*",
       "+@read", "+@write", "+@scripting", "+@connection"]


async def command(client: aioredis.Redis, *args: object) -> Any:
    """One raw Redis command (redis-py leaves ``execute_command`` untyped)."""
    return await client.execute_command(*args)  # type: ignore[no-untyped-call]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("redis-tls")
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    paths = {"ca": d / "ca.pem", "cert": d / "cert.pem", "key": d / "key.pem"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    leaf.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    leaf.private_key_pem.write_to_path(str(paths["key"]))
    return paths


def redis(extra: list[str]) -> contextlib.AbstractContextManager[RedisServer]:
    return running_redis(extra=extra)


@pytest.fixture
def tls_redis(certs: dict[str, Path]) -> Iterator[tuple[RedisServer, int]]:
    """redis-server with a TLS port (trustme certificate) and only the ACL user `gw`."""
    tls_port = free_port()
    with redis(["--tls-port", str(tls_port), "--tls-cert-file", str(certs["cert"]),
                "--tls-key-file", str(certs["key"]), "--tls-ca-cert-file", str(certs["ca"]),
                "--tls-auth-clients", "no", *ACL]) as server:
        yield server, tls_port


async def test_rediss_with_a_private_ca_and_an_acl_user(
        tls_redis: tuple[RedisServer, int], certs: dict[str, Path], tmp_path: Path,
        make_gateway: GatewayFactory, http: aiohttp.ClientSession) -> None:
    _, tls_port = tls_redis
    # As an operator writes it: the password in a file next to the config.
    (tmp_path / "redis-password").write_text(PASSWORD + "\n")
    cfg = load_config_text(f"""
routes: [{{prefix: /, upstream: "http://127.0.0.1:9/"}}]
token:
  signing_key: "{"k" * 32}"
  store: rediss://127.0.0.1:{tls_port}/0
  redis: {{username: gw, password_file: redis-password, ca_file: "{certs['ca']}"}}
""", env={}, base_dir=tmp_path)
    assert cfg.token is not None and cfg.token.redis is not None
    assert PASSWORD not in repr(cfg.token)
    gw = await make_gateway(store=cfg.token.store, redis=cfg.token.redis)
    issued = await issue_token(http, gw)
    status, body, _ = await post_validate(http, gw, validate_body(issued["token"]))
    assert status == 200 and body["retCode"] == 0, body  # store and guard both on TLS + ACL
    await gw.store.ping()
    await gw.guard.ping()


async def failures(http: aiohttp.ClientSession, gw: object) -> tuple[int, int]:
    async with http.post(gw.issue_url,  # type: ignore[attr-defined]
                         json={"userId": "u1", "userName": "Tom"},
                         headers={"Authorization": f"Bearer {API_KEY}"}) as resp:
        issue_status = resp.status
    status, _, _ = await post_validate(http, gw, validate_body("x" * 43))  # type: ignore[arg-type]
    return issue_status, status


@pytest.mark.parametrize("case", ["untrusted certificate", "wrong password", "no such user"])
async def test_tls_and_auth_failures_are_logged_with_their_cause(
        case: str, tls_redis: tuple[RedisServer, int], certs: dict[str, Path],
        make_gateway: GatewayFactory, http: aiohttp.ClientSession,
        caplog: pytest.LogCaptureFixture) -> None:
    _, tls_port = tls_redis
    wrong = "wrong-pass-93ab"
    redis_cfg = {
        "untrusted certificate": TokenRedis(username="gw", password=SecretStr(PASSWORD)),
        "wrong password": TokenRedis(username="gw", password=SecretStr(wrong),
                                     ca_file=certs["ca"]),
        "no such user": TokenRedis(username="nobody", password=SecretStr(wrong),
                                   ca_file=certs["ca"]),
    }[case]
    expected = {"untrusted certificate": "certificate not trusted",
                "wrong password": "authentication refused",
                "no such user": "authentication refused"}[case]
    gw = await make_gateway(store=f"rediss://127.0.0.1:{tls_port}/0", redis=redis_cfg)
    with caplog.at_level(logging.INFO):
        assert await failures(http, gw) == (503, 503)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert logged.count(expected) >= 2, logged  # the store's and the guard's failure
    assert "fix:" in logged
    assert PASSWORD not in logged and wrong not in logged
    # The store's own error says the same (the callers log it as it is).
    with pytest.raises(TokenBackendUnavailable) as raised:
        await gw.store.issue("u1", "Tom", "t")
    assert expected in str(raised.value) and PASSWORD not in str(raised.value)


async def test_a_replica_is_named_readonly_and_fails_the_probe(
        redis_server: RedisServer, make_gateway: GatewayFactory, http: aiohttp.ClientSession,
        caplog: pytest.LogCaptureFixture) -> None:
    # What a plain redis:// URL meets right after a failover: the old primary is a replica.
    with redis(["--replicaof", "127.0.0.1", str(redis_server.port)]) as replica:
        gw = await make_gateway(store=replica.url)
        with caplog.at_level(logging.INFO):
            issue_status, _ = await failures(http, gw)
        assert issue_status == 503
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert "READONLY" in logged and "redis+sentinel://" in logged, logged
        with pytest.raises(Exception, match="READONLY"):
            await gw.store.ping()  # readiness/health sees it, not only the token calls


# ------------------------------------------------------------------ sentinel failover


async def info(port: int, section: str = "replication") -> dict[str, str]:
    client = aioredis.Redis(port=port)
    try:
        raw = await client.info(section)
    finally:
        await client.aclose()
    return {str(k): str(v) for k, v in raw.items()}


@pytest.fixture
async def sentinel_setup(tmp_path: Path) -> AsyncIterator[tuple[RedisServer, RedisServer, int]]:
    """A primary, its replica (link up) and one redis-sentinel watching `mymaster`."""
    with redis([]) as primary, redis(["--replicaof", "127.0.0.1", str(primary.port)]) as rep:
        async def linked() -> bool:
            return (await info(rep.port)).get("master_link_status") == "up"

        await wait_for(linked, 15, 0.1, "the replica to sync")
        port = free_port()
        conf = tmp_path / "sentinel.conf"
        conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                        f"sentinel monitor mymaster 127.0.0.1 {primary.port} 1\n"
                        "sentinel down-after-milliseconds mymaster 2000\n"
                        "sentinel failover-timeout mymaster 10000\n")
        log = (tmp_path / "sentinel.log").open("wb")
        proc = await asyncio.create_subprocess_exec(SENTINEL, str(conf), stdout=log, stderr=log)
        try:
            async def knows_replica() -> bool:
                client = aioredis.Redis(port=port)
                try:
                    return bool(await client.sentinel_slaves("mymaster"))
                except (OSError, aioredis.RedisError):
                    return False
                finally:
                    await client.aclose()

            await wait_for(knows_replica, 20, 0.1, "sentinel to discover the replica")
            yield primary, rep, port
        finally:
            proc.terminate()
            await proc.wait()
            log.close()


async def test_sentinel_failover_mid_run_keeps_tokens_and_service(
        sentinel_setup: tuple[RedisServer, RedisServer, int], make_gateway: GatewayFactory,
        http: aiohttp.ClientSession) -> None:
    primary, replica, sentinel_port = sentinel_setup
    gw = await make_gateway(store=f"redis+sentinel://127.0.0.1:{sentinel_port}/mymaster/0")
    before = [(f"u{i}", (await issue_token(http, gw, f"u{i}"))["token"]) for i in range(10)]
    # Nothing written before the failover may be lost: it must have reached the replica.
    client = aioredis.Redis(port=primary.port)
    try:
        assert await command(client, "WAIT", 1, 5000) == 1
    finally:
        await client.aclose()

    # Traffic keeps running through the failover.
    outcomes: list[tuple[float, int]] = []
    stop = asyncio.Event()

    async def traffic() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            async with http.post(gw.issue_url, json={"userId": f"live{n}", "userName": "L"},
                                 headers={"Authorization": f"Bearer {API_KEY}"}) as resp:
                status = resp.status
                data = await resp.json(content_type=None)
            if status == 200:
                status, _, _ = await post_validate(http, gw, validate_body(
                    data["token"], f"live{n}", "L"))
            outcomes.append((time.monotonic(), status))
            await asyncio.sleep(0.02)

    runner = asyncio.create_task(traffic())
    await wait_for(lambda: len(outcomes) >= 3, 10, 0.1, "traffic before failover")
    sentinel = aioredis.Redis(port=sentinel_port)
    try:
        await command(sentinel, "SENTINEL", "FAILOVER", "mymaster")

        async def promoted() -> bool:
            addr = await command(sentinel, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster")
            return bool(addr) and int(addr[1]) == replica.port and \
                (await info(replica.port)).get("role") == "master"

        await wait_for(promoted, 30, 0.1, "sentinel to promote the replica")
    finally:
        await sentinel.aclose()
    switched = time.monotonic()
    await wait_for(lambda: sum(1 for t, s in outcomes if t > switched and s == 200) >= 5,
                   20, 0.1, "traffic to succeed after the failover")
    stop.set()
    await runner

    # Every token issued before the failover still validates; new ones work end to end.
    for user, token in before:
        status, body, _ = await post_validate(http, gw, validate_body(token, user))
        assert status == 200 and body["retCode"] == 0, (user, body)
    issued = await issue_token(http, gw, "after")
    status, body, _ = await post_validate(http, gw, validate_body(issued["token"], "after"))
    assert status == 200 and body["retCode"] == 0
    # Only the switch itself may have cost requests (503, failing closed), never a 500.
    assert {s for _, s in outcomes} <= {200, 503}, outcomes
    assert [s for _, s in outcomes[-5:]] == [200] * 5, outcomes
    assert any(t < switched for t, _ in outcomes), "traffic ran through the failover"


# ------------------------------------------------------------------ cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[list[RedisServer]]:
    """Three redis-server cluster nodes (no replicas), slots spread by redis-cli."""
    with contextlib.ExitStack() as stack:
        nodes = [stack.enter_context(redis(
            ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             "--cluster-node-timeout", "5000"])) for _ in range(3)]
        created = subprocess.run(
            [REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=60, check=False)
        assert created.returncode == 0, created.stdout + created.stderr
        deadline = time.monotonic() + 30
        while True:
            states = [subprocess.run([REDIS_CLI, "-p", str(n.port), "cluster", "info"],
                                     capture_output=True, text=True, check=False).stdout
                      for n in nodes]
            if all("cluster_state:ok" in s for s in states):
                break
            assert time.monotonic() < deadline, states
            time.sleep(0.2)
        yield nodes


async def test_cluster_form_issues_and_validates(
        cluster: list[RedisServer], make_gateway: GatewayFactory,
        http: aiohttp.ClientSession) -> None:
    hosts = ",".join(f"127.0.0.1:{n.port}" for n in cluster[:2])  # a subset is enough
    gw = await make_gateway(store=f"redis+cluster://{hosts}")
    tokens = [(f"c{i}", (await issue_token(http, gw, f"c{i}"))["token"]) for i in range(12)]
    for user, token in tokens:
        status, body, _ = await post_validate(http, gw, validate_body(token, user))
        assert status == 200 and body["retCode"] == 0, (user, body)
    await gw.store.ping()
    await gw.guard.ping()
    # The tokens are spread over the nodes (keys hash to slots all over the cluster).
    counts = []
    for node in cluster:
        client = aioredis.Redis(port=node.port)
        try:
            counts.append(len(await client.keys("gateway:token:*")))
        finally:
            await client.aclose()
    assert sum(1 for c in counts if c) >= 2, counts


async def test_a_cluster_node_as_a_plain_url_is_named_moved(
        cluster: list[RedisServer], make_gateway: GatewayFactory) -> None:
    # The node that does not hold the probe key's slot: every probe gets MOVED.
    client = aioredis.Redis(port=cluster[0].port)
    try:
        slot = await command(client, "CLUSTER", "KEYSLOT", "gateway:token:probe")
        owner = await command(client, "CLUSTER", "NODES")
    finally:
        await client.aclose()
    text = owner.decode() if isinstance(owner, bytes) else str(owner)
    owning_port = None
    for line in text.splitlines():
        fields = line.split()
        for span in fields[8:]:
            lo, _, hi = span.partition("-")
            if lo.isdigit() and int(lo) <= int(slot) <= int(hi or lo):
                owning_port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
    other = next(n for n in cluster if n.port != owning_port)
    gw = await make_gateway(store=other.url)
    with pytest.raises(TokenBackendUnavailable) as raised:
        await gw.store.ping()
    assert "MOVED" in str(raised.value) and "redis+cluster://" in str(raised.value)
