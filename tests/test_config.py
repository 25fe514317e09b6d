"""Config loading: defaults, units, ${ENV} interpolation, and errors that name the key path."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme

from gateway.config import Config, load_config, load_config_text
from gateway.errors import ConfigError, GatewayError, Problem
from gateway.yamlconf import parse_duration, parse_size

MINIMAL = """
routes:
  - prefix: /
    upstream: http://127.0.0.1:3000/
"""


def problems(text: str, **env: str) -> list[Problem]:
    with pytest.raises(ConfigError) as info:
        load_config_text(text, env=env)
    assert info.value.problems, "a ConfigError must carry at least one problem"
    return info.value.problems


def one(text: str, **env: str) -> Problem:
    found = problems(text, **env)
    assert len(found) == 1, found
    return found[0]


def test_minimal_config_defaults() -> None:
    cfg = load_config_text(MINIMAL, env={})
    assert isinstance(cfg, Config)
    assert cfg.listen.host == "127.0.0.1" and cfg.listen.port == 8080
    assert cfg.limits.client_max_body_size == 1024**2
    assert cfg.limits.max_header_size == 8 * 1024
    assert cfg.timeouts.read == 60.0 and cfg.timeouts.connect == 5.0
    assert cfg.timeouts.client_header == 10.0
    assert cfg.routes[0].preserve_host is False
    assert cfg.trusted_proxies == []


def test_full_issue_example_loads(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca))  # loaded as `run` loads it
    text = f"""
listen: {{host: 127.0.0.1, port: 8080}}
trusted_proxies: [10.0.0.0/8, "2001:db8::/32"]
limits: {{client_max_body_size: 1m, max_header_size: 8k}}
timeouts: {{connect: 5s, read: 60s, client_header: 10s}}
routes:
  - prefix: /service-cloud/
    upstream: https://cec.example.com/service-cloud/
    preserve_host: false
    ca_file: {ca}
  - prefix: /
    upstream: http://127.0.0.1:3000/
    preserve_host: true
cors:
  allow_origins: [https://www.example.com]
  allow_credentials: true
  max_age: 600
"""
    cfg = load_config_text(text, env={})
    assert [str(n) for n in cfg.trusted_proxies] == ["10.0.0.0/8", "2001:db8::/32"]
    assert cfg.routes[0].ca_file == ca
    assert cfg.routes[1].preserve_host is True
    assert cfg.cors.allow_origins == ["https://www.example.com"]
    assert cfg.cors.allow_credentials is True and cfg.cors.max_age == 600


@pytest.mark.parametrize(("text", "expected"), [
    ("1024", 1024), ("8k", 8192), ("8K", 8192), ("1m", 1024**2), ("2g", 2 * 1024**3),
    (0, 0), (512, 512),
])
def test_sizes(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["1mb", "-1", "k", "1.5m", True])
def test_bad_sizes(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


@pytest.mark.parametrize(("text", "expected"), [
    ("500ms", 0.5), ("10s", 10.0), ("5m", 300.0), ("1h", 3600.0), ("2", 2.0), (3, 3.0),
    (0.25, 0.25), ("1h30m", 5400.0), ("1m30s", 90.0), ("1m 30s", 90.0), ("2d1h", 176400.0),
    ("1s500ms", 1.5), (" 1h 0m 5s ", 3605.0),
])
def test_durations(text: object, expected: float) -> None:
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("bad", ["10 sec", "-5s", "fast", False, "", "30s1m", "1m1m", "1h30",
                                 "h30m", "1h-30m", "1.5.5s"])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_env_interpolation_and_default() -> None:
    text = """
listen: {host: "${HOST:-0.0.0.0}", port: "${PORT}"}
routes:
  - prefix: /
    upstream: "http://${UP_HOST}:3000/"
"""
    cfg = load_config_text(text, env={"PORT": "9000", "UP_HOST": "10.1.2.3"})
    assert cfg.listen.host == "0.0.0.0"
    assert cfg.listen.port == 9000
    assert cfg.routes[0].upstream == "http://10.1.2.3:3000/"


def test_missing_env_variable_is_named() -> None:
    text = MINIMAL + "listen: {port: '${GW_PORT}'}\n"
    p = one(text)
    assert p.path == "listen.port"
    assert "GW_PORT" in p.message
    assert "GW_PORT" in p.fix
    assert "${GW_PORT}" in str(p)


def test_every_missing_variable_is_reported() -> None:
    text = """
listen: {host: "${A}", port: "${B}"}
routes:
  - prefix: /
    upstream: "${C}"
"""
    found = problems(text)
    assert {p.path for p in found} == {"listen.host", "listen.port", "routes[0].upstream"}


def test_unknown_key_names_its_path() -> None:
    p = one(MINIMAL + "limits: {client_max_body_sise: 1m}\n")
    assert p.path == "limits.client_max_body_sise"
    assert "spelling" in p.fix or "remove" in p.fix


@pytest.mark.parametrize("value", ["true", "false"])
def test_removed_signing_native_names_the_fix(value: str) -> None:
    """The native rewrite is gone: an old config says so instead of "extra field"."""
    p = one(MINIMAL + "cec:\n  tenant_space_id: '1'\n  channel_config_id: '2'\n"
            f"  signing: {{native: {value}}}\n")
    assert p.path == "cec.signing"
    assert "native" in p.message and "removed" in p.message
    assert "delete cec.signing.native" in p.fix


def test_bad_size_names_key_value_and_fix() -> None:
    p = one(MINIMAL + "limits: {client_max_body_size: 1mb}\n")
    assert p.path == "limits.client_max_body_size"
    assert "1mb" in p.value
    assert "1m" in p.message  # the hint shows the right syntax


def test_bad_duration_names_key() -> None:
    p = one(MINIMAL + "timeouts: {read: soon}\n")
    assert p.path == "timeouts.read"
    assert "soon" in p.value


def test_bad_cidr_names_list_index() -> None:
    p = one(MINIMAL + "trusted_proxies: [10.0.0.0/8, 10.0.0.300/8]\n")
    assert p.path == "trusted_proxies[1]"
    assert "10.0.0.300/8" in p.value
    assert "CIDR" in p.fix


def test_single_cidr_string_is_accepted() -> None:
    cfg = load_config_text(MINIMAL + "trusted_proxies: 192.168.0.0/16\n", env={})
    assert [str(n) for n in cfg.trusted_proxies] == ["192.168.0.0/16"]


def test_port_out_of_range() -> None:
    p = one(MINIMAL + "listen: {port: 70000}\n")
    assert p.path == "listen.port"
    assert "70000" in p.value


def test_routes_required() -> None:
    p = one("listen: {port: 8080}\n")
    assert p.path == "routes"
    assert p.fix


def test_empty_routes() -> None:
    p = one("routes: []\n")
    assert p.path == "routes"


def test_prefix_must_be_absolute() -> None:
    p = one("routes:\n  - prefix: app/\n    upstream: http://127.0.0.1:3000/app/\n")
    assert p.path == "routes[0].prefix"
    assert "'/'" in p.message


def test_upstream_must_be_http_url() -> None:
    p = one("routes:\n  - prefix: /\n    upstream: ftp://files.example.com/\n")
    assert p.path == "routes[0].upstream"
    assert "ftp://files.example.com/" in p.value
    assert "http://" in p.message


def test_upstream_without_query() -> None:
    p = one("routes:\n  - prefix: /\n    upstream: http://a.example/?x=1\n")
    assert p.path == "routes[0].upstream"


def test_duplicate_prefix() -> None:
    text = """
routes:
  - {prefix: /a/, upstream: http://127.0.0.1:1/a/}
  - {prefix: /a/, upstream: http://127.0.0.1:2/a/}
"""
    p = one(text)
    assert p.path == "routes"
    assert "/a/" in p.message


def test_slash_bug_is_refused_with_the_broken_url_and_fix() -> None:
    """The guide's `proxy_pass https://cec/service-cloud;` under `location /service-cloud/`."""
    text = """
routes:
  - prefix: /service-cloud/
    upstream: https://servicestage.besclouds.com/service-cloud
"""
    p = one(text)
    assert p.path.startswith("routes[0]")
    assert "/service-cloudwebclient/chat_client/js/thirdPartyClient.js" in p.message
    assert "https://servicestage.besclouds.com/service-cloud/" in p.fix
    rendered = str(p)
    assert "routes[0]" in rendered and "fix:" in rendered
    assert "https://servicestage.besclouds.com/service-cloud" in rendered  # the value


def test_prefix_without_slash_may_map_to_path_without_slash() -> None:
    cfg = load_config_text("routes:\n  - {prefix: /api, upstream: 'http://h.example/v1'}\n",
                           env={})
    assert cfg.routes[0].prefix == "/api"


def test_missing_ca_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    text = f"routes:\n  - {{prefix: /, upstream: 'https://h.example/', ca_file: '{missing}'}}\n"
    p = one(text)
    assert p.path == "routes[0].ca_file"
    assert str(missing) in p.message


def test_missing_tls_files_named(tmp_path: Path) -> None:
    tls = f"{{cert_file: {tmp_path}/c.pem, key_file: {tmp_path}/k.pem}}"
    text = MINIMAL + f"listen: {{tls: {tls}}}\n"
    p = one(text)
    assert p.path == "listen.tls"
    assert "c.pem" in p.message


def test_cors_wildcard_with_credentials_is_an_error() -> None:
    p = one(MINIMAL + "cors: {allow_origins: ['*'], allow_credentials: true}\n")
    assert p.path.startswith("cors")
    assert "*" in p.message and "credentials" in p.message
    assert "explicit" in p.fix


def test_cors_wildcard_without_credentials_is_fine() -> None:
    cfg = load_config_text(MINIMAL + "cors: {allow_origins: ['*']}\n", env={})
    assert cfg.cors.allow_origins == ["*"]


def test_cors_origin_with_path_is_refused() -> None:
    p = one(MINIMAL + "cors: {allow_origins: [https://www.example.com/app]}\n")
    assert p.path == "cors.allow_origins"
    assert "https://www.example.com/app" in p.message


def test_cors_origin_trailing_slash_is_trimmed() -> None:
    cfg = load_config_text(MINIMAL + "cors: {allow_origins: ['https://a.example/']}\n", env={})
    assert cfg.cors.allow_origins == ["https://a.example"]


def test_several_mistakes_reported_together() -> None:
    text = """
listen: {port: -1}
limits: {max_header_size: lots}
routes:
  - prefix: /service-cloud/
    upstream: https://cec.example.com/service-cloud
"""
    paths = {p.path for p in problems(text)}
    assert {"listen.port", "limits.max_header_size"} <= paths
    assert any(p.startswith("routes[0]") for p in paths)


def test_invalid_yaml() -> None:
    p = one("routes: [\n  - prefix: /\n")
    assert "YAML" in p.message and "line" in p.message


def test_top_level_not_a_mapping() -> None:
    p = one("- a\n- b\n")
    assert "mapping" in p.message


def test_config_error_is_a_gateway_error() -> None:
    assert issubclass(ConfigError, GatewayError)


def test_load_config_from_file(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(MINIMAL)
    assert load_config(path, env={}).routes[0].prefix == "/"
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.yaml", env={})
    assert "missing.yaml" in info.value.problems[0].value


def test_config_is_frozen() -> None:
    cfg = load_config_text(MINIMAL, env={})
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen-instance error
        cfg.listen.port = 1  # type: ignore[misc]


POOL = """
routes:
  - prefix: /a/
    upstream: http://127.0.0.1:3000/a/
    {a}
  - prefix: /b/
    upstream: http://127.0.0.1:3000/b/
    {b}
"""


def test_pool_keys_per_route_load() -> None:
    cfg = load_config_text(POOL.format(a="max_connections: 8", b="idle_timeout: 2s"), env={})
    assert cfg.routes[0].max_connections == 8 and cfg.routes[0].idle_timeout is None
    assert cfg.routes[1].idle_timeout == 2.0 and cfg.routes[1].max_idle is None


def test_routes_to_one_upstream_may_not_disagree_on_its_pool() -> None:
    p = one(POOL.format(a="max_connections: 8", b="max_connections: 9"))
    assert p.path == "routes"
    assert "routes[1].max_connections and routes[0].max_connections differ" in p.message
    assert "same upstream" in p.message
    assert "set max_connections on one of them only, or the same on both" in p.fix
    # The same value twice, or different upstreams, are fine.
    load_config_text(POOL.format(a="max_connections: 8", b="max_connections: 8"), env={})
    load_config_text(POOL.format(a="max_connections: 8", b="max_connections: 9").replace(
        ":3000/b/", ":3001/b/"), env={})


def test_max_idle_over_max_connections_names_the_fix() -> None:
    p = one(POOL.format(a="max_connections: 4\n    max_idle: 5", b=""))
    assert p.path == "routes[0].max_idle"
    assert "max_idle (5) is over max_connections (4)" in p.message
    assert p.fix == "lower max_idle to at most 4, or raise max_connections"


def test_max_idle_over_the_cap_another_route_sets_is_refused() -> None:
    p = one(POOL.format(a="max_connections: 4", b="max_idle: 5"))
    assert p.path == "routes"
    assert "routes[1].max_idle is over routes[0].max_connections" in p.message
    assert p.fix == "lower max_idle to at most max_connections"


def test_queue_timeout_needs_max_connections() -> None:
    p = one(POOL.format(a="queue_timeout: 1s", b=""))
    assert p.path == "routes"
    assert "routes[0].queue_timeout applies only when requests queue" in p.message
    assert p.fix == "set max_connections, or remove queue_timeout"
    # max_connections on another route to the same upstream is enough.
    cfg = load_config_text(POOL.format(a="queue_timeout: 1s", b="max_connections: 2"), env={})
    assert cfg.routes[0].queue_timeout == 1.0


@pytest.mark.parametrize("bad", ["max_connections: 0", "max_idle: -1", "idle_timeout: soon"])
def test_bad_pool_values_name_their_key(bad: str) -> None:
    p = one(POOL.format(a=bad, b=""))
    assert p.path == f"routes[0].{bad.split(':')[0]}"
