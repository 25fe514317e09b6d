"""The token.store URL parser and the Redis failure explanations (pure logic, no server)."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import pytest
from redis.exceptions import (
    AuthenticationError,
    ReadOnlyError,
    ResponseError,
)
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)

from gateway.redisconn import explain, parse_store_url
from tests.support.process import PROJECT, PYTHON

SECRET = "Zq9/xW#v?k"


@pytest.mark.parametrize(("url", "kind", "tls", "nodes", "service", "db"), [
    ("redis://127.0.0.1:6379/2", "single", False, (), None, 2),
    ("rediss://u:p%2Fw@redis.internal:6380/0", "single", True, (), None, 0),
    ("unix:///run/redis.sock?db=3", "single", False, (), None, 3),
    ("redis+sentinel://s1:26379,s2/mymaster/1", "sentinel", False,
     (("s1", 26379), ("s2", 26379)), "mymaster", 1),
    ("redis+cluster://n1:7000,[::1]:7001", "cluster", False, (("n1", 7000), ("::1", 7001)),
     None, 0),
    ("rediss+cluster://n1:7000", "cluster", True, (("n1", 7000),), None, 0),
])
def test_forms(url: str, kind: str, tls: bool, nodes: tuple[tuple[str, int], ...],
               service: str | None, db: int) -> None:
    target = parse_store_url(url)
    assert (target.kind, target.tls, target.nodes, target.service, target.db) == (
        kind, tls, nodes, service, db)


def test_credentials_are_decoded_and_never_shown() -> None:
    target = parse_store_url("rediss://gw:p%2Fw@h:6380/0")
    assert (target.username, target.password) == ("gw", "p/w")
    assert "p/w" not in repr(target) and "p%2Fw" not in target.where
    assert target.where == "rediss://h:6380/0"
    sentinel = parse_store_url("redis+sentinel://gw:p%40w@s1:26379/mymaster")
    assert sentinel.password == "p@w" and "p@w" not in sentinel.where + repr(sentinel)


@pytest.mark.parametrize("url", [
    f"redis://:{SECRET}@h:6379/0",  # unencoded: redis-py would read 'Zq9' as the port
    f"redis+sentinel://:{SECRET}@s1:26379/mymaster",
    f"redis+cluster://:{SECRET}@n1:7000",
    "redis://h:port/0",
    "redis://h:6379/zero",
    "redis+sentinel://s1:26379",
    "redis+cluster://n1:7000/3",
    "http://h:6379/0",
    "h:6379",
])
def test_broken_urls_are_refused_without_quoting_them(url: str) -> None:
    with pytest.raises(ValueError, match="fix: ") as raised:
        parse_store_url(url)
    message = str(raised.value)
    for piece in ("Zq9", "xW", "v?k"):
        assert piece not in message, message


@pytest.mark.parametrize(("exc", "words"), [
    (ResponseError("MOVED 3999 127.0.0.1:7001"), ["MOVED", "redis+cluster://"]),
    (ReadOnlyError("READONLY You can't write against a read only replica."),
     ["READONLY", "redis+sentinel://"]),
    (AuthenticationError("invalid username-password pair or user is disabled."),
     ["authentication refused", "password_file"]),
    (RedisConnectionError("Error 1 connecting to h:6380. [SSL: CERTIFICATE_VERIFY_FAILED] "
                          "certificate verify failed: unable to get local issuer certificate "
                          "(_ssl.c:1006)."), ["certificate not trusted", "ca_file"]),
    (ssl.SSLError("wrong version number"), ["TLS failed"]),
    (RedisConnectionError("Error 111 connecting to h:6379. Connection refused."),
     ["cannot reach Redis", "Connection refused"]),
])
def test_explain_names_the_cause_and_the_fix(exc: BaseException, words: list[str]) -> None:
    text = explain(exc)
    for word in words:
        assert word in text, text


def test_explain_scrubs_the_password() -> None:
    assert "hunter2" not in explain(ResponseError("ERR weird hunter2"), "hunter2")


def test_a_gateway_without_a_redis_store_does_not_import_redis(tmp_path: Path) -> None:
    """redis-py (and the OpenTelemetry metrics SDK it brings) costs a worker about 6 MiB and
    0.15 s of start-up: a gateway whose config names no Redis store loads neither, from
    ``gateway check`` to serving; the store's own tests show it loads when named."""
    conf = tmp_path / "gateway.yaml"
    conf.write_text("listen: {host: 127.0.0.1, port: 0}\n"
                    "routes:\n  - prefix: /\n    upstream: http://127.0.0.1:9/\n")
    script = (
        "import sys\n"
        "from gateway.cli import main\n"
        "from gateway import app, server, fastpath, metrics, memory\n"
        f"code = main(['check', '-c', {str(conf)!r}])\n"
        "loaded = sorted(m for m in sys.modules if m == 'redis' or m.startswith('redis.')\n"
        "                or m.startswith('opentelemetry.sdk'))\n"
        "print(code, loaded)\n")
    done = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, cwd=PROJECT,
                          timeout=60)
    assert done.stdout.splitlines()[-1] == "0 []", done.stdout + done.stderr
