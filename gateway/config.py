"""Configuration: YAML in, a validated, typed ``Config`` out, or a ConfigError naming every mistake.

Loading happens in three steps, each reporting problems by YAML key path:
1. parse the YAML;
2. interpolate ``${NAME}`` / ``${NAME:-default}`` from the environment and read secret files;
3. validate with pydantic, whose messages are rewritten to ``key.path: what (got value) / fix``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from yarl import URL

from gateway.errors import ConfigError, Problem
from gateway.redisconn import parse_store_url
from gateway.sandbox.settings import SandboxSettings
from gateway.tls import check_ca_file, server_context
from gateway.yamlconf import (
    Duration,
    Size,
    check_cec_secret,
    interpolate,
    problems_from,
    read_secret_files,
    read_yaml,
)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_COOKIE_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CSP_SOURCE = re.compile(r"[^\s;,]+")

POOL_KEYS = ("max_connections", "max_idle", "idle_timeout", "queue_timeout")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSFiles(_Model):
    cert_file: Path
    key_file: Path

    @model_validator(mode="after")
    def _pair_loads(self) -> TLSFiles:
        # Loaded exactly as `run` (and a reload) will load them, so `check` agrees.
        server_context(self.cert_file, self.key_file)
        return self


def _resolvable(host: str) -> str:
    # `run` binds with getaddrinfo; an unknown name must not pass `check` (nginx -t agrees).
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError):
        raise ValueError("cannot resolve this host name; fix: use an address such as "
                         "0.0.0.0, 127.0.0.1 or ::, or a name this machine resolves") from None
    return host


class Listen(_Model):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    tls: TLSFiles | None = None
    workers: int | None = Field(None, ge=1, le=256)
    backlog: int = Field(1024, ge=1)

    _host = field_validator("host")(_resolvable)


class Limits(_Model):
    client_max_body_size: Size = 1024**2
    max_header_size: Size = 8 * 1024
    max_headers: int = Field(100, ge=1)
    # An upstream response head (status line and fields) over this is answered 502.
    max_upstream_header_size: Size = Field(16 * 1024, ge=1024)


class Timeouts(_Model):
    connect: Duration = 5.0
    read: Duration = 60.0
    client_header: Duration = 10.0
    client_body: Duration = 60.0
    send: Duration = 60.0  # a client that takes nothing of a response for this long is cut
    keepalive: Duration = 75.0
    websocket_idle: Duration = 3600.0
    shutdown_grace: Duration = 10.0
    shutdown_delay: Duration = 0.0  # /readyz fails this long before the port closes


class Route(_Model):
    prefix: str
    upstream: str
    preserve_host: bool = False
    ca_file: Path | None = None
    websocket: bool = True
    # The trust boundary (gateway/boundary.py): None = a third party when the route serves
    # cec.context_path.
    third_party: bool | None = None
    forward_cookies: list[str] = []  # to a third party, besides ccmessaging-token
    forward_credentials: bool = False  # Authorization / Proxy-Authorization to a third party
    forward_referer: bool = False  # a Referer from the site's pages in full to a third party
    # The upstream's connection pool (gateway/upstream.py PoolLimits), per upstream like
    # nginx's `upstream { keepalive }`: routes to the same host:port share these. None: not
    # set on this route (another route to the upstream may set it, else the default).
    max_connections: int | None = Field(None, ge=1)
    max_idle: int | None = Field(None, ge=0)
    idle_timeout: Duration | None = None
    queue_timeout: Duration | None = None

    @field_validator("forward_cookies")
    @classmethod
    def _cookie_names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not _COOKIE_NAME.fullmatch(name):
                raise ValueError("cookie names are tokens: letters, digits and !#$%&'*+-.^_`|~")
        return v

    @field_validator("prefix")
    @classmethod
    def _prefix_absolute(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("a prefix must start with '/', e.g. /service-cloud/")
        return v

    @field_validator("upstream")
    @classmethod
    def _upstream_url(cls, v: str) -> str:
        url = URL(v)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("the upstream must be an absolute http:// or https:// URL")
        if url.query_string or url.fragment:
            raise ValueError("the upstream URL cannot carry a query string or fragment")
        return v

    @field_validator("ca_file")
    @classmethod
    def _ca_loads(cls, v: Path | None) -> Path | None:
        if v is not None:
            check_ca_file(v)
        return v

    @field_validator("upstream")
    @classmethod
    def _slash_bug(cls, v: str, info: ValidationInfo) -> str:
        # The vendor guide's recipe: `location /service-cloud/` with
        # `proxy_pass https://cec/service-cloud;` glues the rest onto the prefix.
        prefix = info.data.get("prefix")
        path = URL(v).raw_path
        if prefix and prefix.endswith("/") and not path.endswith("/"):
            example = path + "webclient/chat_client/js/thirdPartyClient.js"
            raise ValueError(
                f"the prefix {prefix!r} ends in '/' but the upstream path {path!r} does not, so "
                f"{prefix}webclient/chat_client/js/thirdPartyClient.js would be sent "
                f"upstream as {example}; fix: end the upstream with '/' ({v}/)"
            )
        return v

    @field_validator("max_idle")
    @classmethod
    def _idle_within_cap(cls, v: int | None, info: ValidationInfo) -> int | None:
        cap = info.data.get("max_connections")
        if v is not None and cap is not None and v > cap:
            raise ValueError(f"max_idle ({v}) is over max_connections ({cap}): idle "
                             "connections count as open ones; fix: lower max_idle to at "
                             f"most {cap}, or raise max_connections")
        return v

    @property
    def url(self) -> URL:
        return URL(self.upstream)

    @property
    def upstream_key(self) -> tuple[str, int, bool]:
        """The pool key of the upstream (gateway/routing.py ``Upstream.key``)."""
        url = self.url
        assert url.host is not None and url.port is not None
        return url.host, url.port, url.scheme == "https"


class Cors(_Model):
    allow_origins: list[str] = []
    allow_credentials: bool = False
    allow_methods: list[str] = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    allow_headers: list[str] = []  # empty: echo what the preflight asks for
    expose_headers: list[str] = []
    max_age: int = Field(600, ge=0)

    @field_validator("allow_origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        for origin in v:
            if origin == "*":
                continue
            url = URL(origin)
            if url.scheme not in ("http", "https") or not url.host or url.raw_path not in ("", "/"):
                raise ValueError(
                    f"{origin!r} is not an origin; write scheme://host[:port] "
                    "with no path, e.g. https://www.example.com"
                )
        return [o.rstrip("/") for o in v]

    @field_validator("allow_credentials")
    @classmethod
    def _no_wildcard_credentials(cls, v: bool, info: ValidationInfo) -> bool:
        if v and "*" in info.data.get("allow_origins", ()):
            raise ValueError(
                "allow_origins '*' together with allow_credentials: true lets any site "
                "act as the visitor; fix: list the trusted origins explicitly"
            )
        return v


class CecSigning(_Model):
    signed_headers: list[str] = ["Content-Length", "Content-Type"]
    content_type: str = "application/json;charset=UTF-8"
    payload_fields: list[str] = ["thirdUserName", "thirdUserId", "tenantSpaceId", "channelConfigId"]
    timestamp_format: str = "%Y-%m-%dT%H:%M:%S.{ms}Z"

    @model_validator(mode="before")
    @classmethod
    def _removed_native(cls, data: Any) -> Any:
        # An upgrade must not meet a generic "extra field" message for a key it once needed.
        if isinstance(data, dict) and "native" in data:
            raise ValueError("'native' was removed (the chat rewrite always runs in Python "
                             "now); fix: delete cec.signing.native")
        return data


class CecAuth(_Model):
    mode: Literal["authorization", "token"] = "authorization"
    secret_key: SecretStr | None = None
    access_key: str | None = None

    @field_validator("secret_key")
    @classmethod
    def _secret_shape(cls, v: SecretStr | None) -> SecretStr | None:
        return check_cec_secret(v)


class IdentityUrl(_Model):
    url: str
    user_id_field: str = "userId"
    user_name_field: str = "userName"
    cache_ttl: Duration = 30.0
    timeout: Duration = 5.0


class CecIdentity(_Model):
    source: Literal["guest", "url"] = "guest"
    url: IdentityUrl | None = None
    fallback: Literal["guest"] | None = None

    @model_validator(mode="after")
    def _url_needed(self) -> CecIdentity:
        if self.source == "url" and self.url is None:
            raise ValueError("source 'url' needs url: {url: http://site/api/me}")
        return self


class CecGuest(_Model):
    cookie_name: str = "cec_guest"
    cookie_key: SecretStr | None = None
    max_name_length: int = Field(64, ge=1, le=256)

    @field_validator("cookie_name")
    @classmethod
    def _cookie_name(cls, v: str) -> str:
        from gateway.chat.guest import GuestCookies

        try:
            GuestCookies(b"k" * 16, v)  # the check `run` makes when it builds the cookies
        except ValueError:
            raise ValueError("not a valid cookie name; fix: use letters, digits and "
                             "!#$%&'*+-.^_`|~ only, e.g. cec_guest") from None
        return v

    @field_validator("cookie_key")
    @classmethod
    def _cookie_key(cls, v: SecretStr | None) -> SecretStr | None:
        from gateway.chat.guest import GuestCookies

        if v is not None:
            try:
                GuestCookies(v.get_secret_value().encode("utf-8"))
            except ValueError:
                raise ValueError("too short; fix: at least 16 bytes, e.g. "
                                 "`openssl rand -hex 32`") from None
        return v


class CecConfig(_Model):
    tenant_space_id: str
    channel_config_id: str
    locale: Literal["zh", "en"] = "zh"
    map_service: Literal["tencent", "google"] = "tencent"
    context_path: str = "/service-cloud"
    cobrowse: bool = False
    auth: CecAuth = CecAuth()
    identity: CecIdentity = CecIdentity()
    guest: CecGuest = CecGuest()
    signing: CecSigning = CecSigning()
    authorization_path: str = "/gateway/authorization"
    loader_path: str = "/gateway/chat.js"
    page_path: str | None = "/chat/"
    max_json_size: Size = 16 * 1024

    @field_validator("context_path")
    @classmethod
    def _ctx(cls, v: str) -> str:
        if not v.startswith("/") or v.endswith("/"):
            raise ValueError(
                "context_path starts with '/' and has no trailing '/', e.g. /service-cloud")
        return v

    @model_validator(mode="after")
    def _secret_for_mode(self) -> CecConfig:
        if self.auth.mode == "authorization" and self.auth.secret_key is None:
            raise ValueError(
                "auth.mode 'authorization' needs auth.secret_key (e.g. ${CEC_SECRET_KEY}) "
                "or auth.secret_key_file"
            )
        return self

    @property
    def access_key(self) -> str:
        return self.auth.access_key or self.channel_config_id


class TokenGuard(_Model):
    max_failures: int = Field(5, ge=1)
    window: Duration = 300.0
    lockout: Duration = 900.0


class TokenRedis(_Model):
    """Connection details for a Redis ``token.store`` that do not belong in its URL."""

    username: str | None = None
    password: SecretStr | None = None  # usually password_file: /run/secrets/redis
    ca_file: Path | None = None  # a private CA for rediss:// (else the system's CAs)
    timeout: Duration = 2.0

    @field_validator("ca_file")
    @classmethod
    def _ca_loads(cls, v: Path | None) -> Path | None:
        if v is not None:
            check_ca_file(v)
        return v


class TokenConfig(_Model):
    signing_key: SecretStr
    api_key: SecretStr | None = None
    ttl: Duration = 600.0
    store: str = "memory"
    redis: TokenRedis | None = None
    validate_path: str = "/rest/cc-messaging/v1/thirdparty/chatThirdPartyValidate"
    validate_allow_from: list[IPNetwork] = [
        ipaddress.ip_network("127.0.0.1/32"),
        ipaddress.ip_network("::1/128"),
    ]
    issue_path: str = "/gateway/token"
    guard: TokenGuard = TokenGuard()
    rate_limit: str = "50/second"
    max_concurrency: int = Field(16, ge=1)
    max_body: Size = 4096
    body_timeout: Duration = 5.0
    # Live tokens the store may hold; past it no token is minted (503, counted).
    max_tokens: int = Field(100_000, ge=1)

    @field_validator("signing_key", "api_key")
    @classmethod
    def _long_enough(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value()) < 16:
            raise ValueError(
                "must be at least 16 characters; fix: generate one with `openssl rand -hex 32`")
        return v

    @field_validator("store")
    @classmethod
    def _store(cls, v: str) -> str:
        if v != "memory":
            parse_store_url(v)  # the parser `run` connects with
        return v

    @field_validator("rate_limit")
    @classmethod
    def _rate(cls, v: str) -> str:
        from limits import parse_many

        try:
            items = parse_many(v)  # the guard's parser (limits.parse takes the first of these)
        except ValueError:
            items = []
        if len(items) != 1 or items[0].amount < 1:
            raise ValueError("not a rate; fix: write one COUNT/UNIT with COUNT at least 1, "
                             "e.g. 50/second, 600/minute or 10 per second")
        return v

    @model_validator(mode="after")
    def _redis_fits_store(self) -> TokenConfig:
        if self.redis is None:
            return self
        if self.store == "memory":
            raise ValueError("token.redis applies to a Redis store only; fix: set token.store "
                             "to a redis:// URL, or remove token.redis")
        target = parse_store_url(self.store)
        if self.redis.password is not None and target.password is not None:
            raise ValueError("the store URL carries a password and token.redis sets one too; "
                             "fix: keep only token.redis.password_file")
        if self.redis.username is not None and target.username is not None:
            raise ValueError("the store URL names a user and token.redis.username does too; "
                             "fix: keep only one")
        if self.redis.ca_file is not None and not target.tls:
            raise ValueError("token.redis.ca_file needs TLS; fix: use rediss:// (or "
                             "rediss+cluster://), or remove ca_file")
        return self


class Trust(_Model):
    """Site-wide rules of the trust boundary (README "Trust boundary")."""

    cookie_namespace: str = "__cec_"  # a third party's cookies are renamed into it
    protected_cookies: list[str] = []  # the site's cookie names no third party may set
    frame_ancestors: list[str] = ["'self'"]  # who may frame the gateway's own page
    page_csp: str | None = None  # replaces the own page's default CSP (frame-ancestors added)

    @field_validator("cookie_namespace")
    @classmethod
    def _namespace(cls, v: str) -> str:
        if not _COOKIE_NAME.fullmatch(v):
            raise ValueError("the namespace is a cookie-name prefix such as __cec_")
        return v

    @field_validator("protected_cookies")
    @classmethod
    def _protected(cls, v: list[str]) -> list[str]:
        for name in v:
            if not _COOKIE_NAME.fullmatch(name):
                raise ValueError("cookie names are tokens: letters, digits and !#$%&'*+-.^_`|~")
        return v

    @field_validator("frame_ancestors")
    @classmethod
    def _ancestors(cls, v: list[str]) -> list[str]:
        for source in v:
            if not _CSP_SOURCE.fullmatch(source):
                raise ValueError("one CSP source per entry, e.g. 'self' or https://portal.example")
        return v

    @field_validator("page_csp")
    @classmethod
    def _csp(cls, v: str | None) -> str | None:
        if v is not None and ("\r" in v or "\n" in v or "frame-ancestors" in v):
            raise ValueError("one line, without frame-ancestors (set trust.frame_ancestors)")
        return v


class Admin(_Model):
    host: str = "127.0.0.1"
    port: int = Field(9090, ge=0, le=65535)
    # Bearer key for POST /unlock (lifting token-guard locks); unset: /unlock is off.
    api_key: SecretStr | None = None

    @field_validator("api_key")
    @classmethod
    def _key_long_enough(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value()) < 16:
            raise ValueError(
                "must be at least 16 characters; fix: generate one with `openssl rand -hex 32`")
        return v

    _host = field_validator("host")(_resolvable)


class Tracing(_Model):
    """OpenTelemetry traces, exported over OTLP/HTTP (gateway/tracing.py); off without it."""

    endpoint: str  # the collector's OTLP/HTTP base URL; spans go to <endpoint>/v1/traces
    sampler_ratio: float | None = Field(None, ge=0.0, le=1.0)  # None: OTEL_TRACES_SAMPLER
    service_name: str | None = None  # None: OTEL_SERVICE_NAME, else "cec-gateway"

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        url = URL(v)
        if url.scheme not in ("http", "https") or not url.host or url.query_string:
            raise ValueError("is the collector's OTLP/HTTP base URL; "
                             "fix: e.g. http://otel-collector:4318")
        return v


class Config(_Model):
    listen: Listen = Listen()
    trusted_proxies: list[IPNetwork] = []
    limits: Limits = Limits()
    timeouts: Timeouts = Timeouts()
    routes: list[Route] = Field(min_length=1)
    cors: Cors = Cors()
    trust: Trust = Trust()
    cec: CecConfig | None = None
    token: TokenConfig | None = None
    admin: Admin | None = None
    sandbox: SandboxSettings | None = None
    tracing: Tracing | None = None
    access_log: bool = True
    pid_file: Path | None = None  # written by `gateway run`, read by `gateway reload`
    public_url: str | None = None  # scheme://host the visitors use, when TLS ends before us

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _cidrs(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [v]
        return v

    @field_validator("routes")
    @classmethod
    def _unique_prefixes(cls, v: list[Route]) -> list[Route]:
        seen: set[str] = set()
        for route in v:
            if route.prefix in seen:
                raise ValueError(
                    f"prefix {route.prefix!r} appears twice; fix: keep one route per prefix")
            seen.add(route.prefix)
        return v

    @field_validator("routes")
    @classmethod
    def _one_pool_per_upstream(cls, v: list[Route]) -> list[Route]:
        # One pool per upstream host:port (nginx: one `keepalive` per upstream block), so
        # its limits are set once: on one route, or alike on every route to it.
        first: dict[tuple[tuple[str, int, bool], str], tuple[int, Any]] = {}
        for i, route in enumerate(v):
            for key in POOL_KEYS:
                value = getattr(route, key)
                if value is None:
                    continue
                j, earlier = first.setdefault((route.upstream_key, key), (i, value))
                if earlier != value:
                    raise ValueError(
                        f"routes[{i}].{key} and routes[{j}].{key} differ, but both routes "
                        "go to the same upstream host and port, which has one connection "
                        f"pool; fix: set {key} on one of them only, or the same on both")
        for (upstream, key), (i, value) in first.items():
            j, cap = first.get((upstream, "max_connections"), (i, None))
            if key == "queue_timeout" and cap is None:
                raise ValueError(
                    f"routes[{i}].queue_timeout applies only when requests queue, at "
                    "max_connections, which no route to that upstream sets; fix: set "
                    "max_connections, or remove queue_timeout")
            if key == "max_idle" and cap is not None and value > cap:
                raise ValueError(
                    f"routes[{i}].max_idle is over routes[{j}].max_connections, for the same "
                    "upstream; fix: lower max_idle to at most max_connections")
        return v

    @field_validator("pid_file")
    @classmethod
    def _pid_dir(cls, v: Path | None) -> Path | None:
        # `run` writes it before it listens; a missing directory must not pass `check`.
        if v is not None and not (v.parent.is_dir() and os.access(v.parent, os.W_OK)):
            raise ValueError(f"the directory {str(v.parent)!r} does not exist or is not "
                             "writable; fix: create it for the gateway's user (systemd: "
                             "RuntimeDirectory=) or point pid_file elsewhere")
        return v

    @model_validator(mode="after")
    def _token_for_mode(self) -> Config:
        if self.cec is not None and self.cec.auth.mode == "token" and self.token is None:
            raise ValueError("cec.auth.mode 'token' needs a token: section (signing_key at least)")
        return self


# ---------------------------------------------------------------- loading


def load_config_text(text: str, *, env: Mapping[str, str] | None = None,
                     base_dir: Path | None = None, source: str = "<config>") -> Config:
    env = os.environ if env is None else env
    tree = read_yaml(text, source)
    problems: list[Problem] = []
    tree = interpolate(tree, (), env, problems)
    tree = read_secret_files(tree, (), base_dir or Path.cwd(), problems)
    if problems:
        raise ConfigError(problems)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError([_redact_store(p) for p in problems_from(exc, tree)]) from None


def _redact_store(problem: Problem) -> Problem:
    # A Redis URL may carry a password (also a mistyped one): never echo it back.
    if problem.value and (problem.path == "token" or problem.path.startswith(
            ("token.store", "token.redis"))):
        return Problem(problem.path, "<redacted>", problem.message, problem.fix)
    return problem


def load_config(path: str | Path, *, env: Mapping[str, str] | None = None) -> Config:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Problem("", str(p), f"cannot read the config file: {exc.strerror}",
                                   "pass an existing file with -c PATH")]) from None
    return load_config_text(text, env=env, base_dir=p.parent, source=str(p))
