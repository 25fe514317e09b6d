"""Redis as companies run it: one parser for ``token.store`` and one client builder.

Forms (``gateway check`` and ``gateway run`` use the same parser, so they agree):

* ``redis://host:6379/0``, ``unix:///run/redis.sock?db=0``: one server;
* ``rediss://host:6380/0``: TLS; ``token.redis.ca_file`` for a private CA;
* ``redis+sentinel://s1:26379,s2:26379/<service>[/db]``: ask the sentinels for the primary
  of ``<service>``, again after a failover;
* ``redis+cluster://n1:7000,n2:7000`` (``rediss+cluster://`` with TLS): a Redis Cluster.

Credentials come from ``token.redis.username`` / ``password_file`` (or inline in the URL,
percent-encoded). Nothing here puts a password in a message, a log line or a repr.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote, urlsplit

# redis-py is imported where it is used, not with this module: ``gateway.config`` parses
# store URLs with it, and importing redis-py (it brings OpenTelemetry's metrics SDK along)
# costs a worker about 20 MiB of memory and 0.15 s of start-up that a gateway without a
# Redis token store would pay for nothing.
if TYPE_CHECKING:
    import redis.asyncio as aioredis
    from redis.asyncio.cluster import RedisCluster

    from gateway.config import TokenRedis

Kind = Literal["single", "sentinel", "cluster"]
_SCHEMES: dict[str, tuple[Kind, bool]] = {
    "redis": ("single", False),
    "rediss": ("single", True),
    "unix": ("single", False),
    "redis+sentinel": ("sentinel", False),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
}
FORMS = ("memory, redis://host:6379/0, rediss://host:6380/0, "
         "redis+sentinel://s1:26379,s2:26379/SERVICE, redis+cluster://n1:7000,n2:7000")
_ENCODE_FIX = ("percent-encode the password in the URL (/ is %2F, # is %23, ? is %3F, "
               "@ is %40, : is %3A, % is %25), or better move it to token.redis.password_file")


@dataclass(frozen=True)
class RedisTarget:
    """A parsed ``token.store`` URL (never shown whole: it may carry a password)."""

    kind: Kind
    tls: bool
    url: str = field(repr=False)
    nodes: tuple[tuple[str, int], ...] = ()
    service: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def where(self) -> str:
        """Host list without credentials, for logs and `gateway check`."""
        if self.kind == "single":
            parts = urlsplit(self.url)
            if parts.scheme == "unix":
                return f"unix://{parts.path}"
            port = f":{parts.port}" if parts.port else ""
            return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}"
        hosts = ",".join(f"{h}:{p}" for h, p in self.nodes)
        service = f"/{self.service}" if self.service else ""
        return f"{urlsplit(self.url).scheme}://{hosts}{service}"


def _nodes(netloc: str, default_port: int) -> tuple[tuple[str, int], ...]:
    nodes = []
    for item in netloc.split(","):
        item = item.strip()
        if not item:
            raise ValueError("an empty host in the host list; fix: write host:port,host:port")
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port_text = rest[1:] if rest.startswith(":") else ""
        else:
            host, _, port_text = item.rpartition(":") if ":" in item else (item, "", "")
        try:
            port = int(port_text) if port_text else default_port
        except ValueError:
            raise ValueError(f"the port of a host in the list is not a number; "
                             f"fix: write host:port, and {_ENCODE_FIX}") from None
        if not host or not 0 < port < 65536:
            raise ValueError("a host in the list is empty or its port out of range; "
                             "fix: write host:port,host:port")
        nodes.append((host, port))
    return tuple(nodes)


def parse_store_url(url: str) -> RedisTarget:
    """Parse a Redis ``token.store`` URL the way the client will use it; ValueError if not.

    The messages never quote the URL: a misplaced password would show up in them.
    """
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme not in _SCHEMES:
        raise ValueError(f"not a store URL; fix: write one of {FORMS}")
    kind, tls = _SCHEMES[scheme]
    if kind == "single":
        from redis.connection import parse_url

        try:
            # redis-py's own parser, the one the connection pool uses.
            parsed = parse_url(url)  # type: ignore[no-untyped-call]
        except ValueError as exc:
            # Its messages quote pieces of the URL (a password cut at '/' reads as a port).
            text = str(exc)
            what = ("the port is not a number" if "Port" in text or "port" in text
                    else "redis-py cannot parse it")
            raise ValueError(f"not a valid Redis URL: {what}; fix: write "
                             f"{scheme}://[user:password@]host:port/db, and {_ENCODE_FIX}"
                             ) from None
        if scheme != "unix" and not parsed.get("host"):
            raise ValueError(f"the URL has no host; fix: write {scheme}://host:port/db")
        if "ssl_cert_reqs" in parsed and parsed["ssl_cert_reqs"] not in (
                "required", "optional", "none"):
            raise ValueError("ssl_cert_reqs must be required, optional or none; fix: remove it "
                             "and use token.redis.ca_file to trust a private CA")
        path_db = urlsplit(url).path.strip("/") if scheme != "unix" else ""
        if path_db and not path_db.isdigit():
            raise ValueError(f"the database is not a number; fix: write {scheme}://host:port/0, "
                             f"and {_ENCODE_FIX}")
        return RedisTarget(kind, tls, url, db=int(parsed.get("db") or 0),
                           username=parsed.get("username"), password=parsed.get("password"))

    rest = url.split("://", 1)[1]
    userinfo, at, hostpart = rest.rpartition("@")
    if not at:
        userinfo, hostpart = "", rest
    netloc, _, path = hostpart.partition("/")
    if "?" in path or "#" in path or "?" in netloc or "#" in netloc:
        raise ValueError(f"a {scheme} URL takes no query or fragment; fix: {_ENCODE_FIX}")
    if any(c in userinfo for c in "/?#@"):
        raise ValueError(f"the user or password part has a character URLs reserve; "
                         f"fix: {_ENCODE_FIX}")
    username = password = None
    if userinfo:
        user, colon, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None
    nodes = _nodes(netloc, 26379 if kind == "sentinel" else 6379)
    parts = [p for p in path.split("/") if p]
    service = None
    db = 0
    if kind == "sentinel":
        if not parts:
            raise ValueError("redis+sentinel:// needs the service name (sentinel's master "
                             "name); fix: write redis+sentinel://s1:26379,s2:26379/mymaster")
        service = unquote(parts[0])
        parts = parts[1:]
    if len(parts) > 1 or (parts and not parts[0].isdigit()):
        raise ValueError("the database is not a number; fix: end the URL with /0 (or nothing)")
    if parts:
        db = int(parts[0])
    if kind == "cluster" and db:
        raise ValueError("a Redis Cluster has only database 0; fix: drop the /db")
    return RedisTarget(kind, tls, url, nodes, service, db, username, password)


@dataclass(frozen=True)
class RedisAuth:
    """What ``token.redis`` adds to the URL: ACL user, password, private CA."""

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    timeout: float = 2.0

    @classmethod
    def from_config(cls, redis: TokenRedis | None) -> RedisAuth | None:
        if redis is None:
            return None
        return cls(redis.username,
                   redis.password.get_secret_value() if redis.password is not None else None,
                   redis.ca_file, redis.timeout)


def explain(exc: BaseException, secret: str | None = None) -> str:
    """Why a Redis operation failed, in words an operator can act on; never a password."""
    from redis.exceptions import (
        AuthenticationError,
        AuthorizationError,
        MovedError,
        NoPermissionError,
        ReadOnlyError,
        RedisError,
        ResponseError,
    )

    text = str(exc)
    if isinstance(exc, MovedError) or text.startswith("MOVED") or text.startswith("ASK "):
        cause = ("MOVED: the server is a Redis Cluster node and the key lives on another; "
                 "fix: write token.store as redis+cluster://node1:port,node2:port")
    elif isinstance(exc, ReadOnlyError) or text.startswith("READONLY"):
        cause = ("READONLY: the server is a replica (a failover moved the primary?); fix: "
                 "use redis+sentinel://sentinels/SERVICE, or point token.store at the primary")
    elif isinstance(exc, AuthenticationError | AuthorizationError) or any(
            w in text for w in ("WRONGPASS", "NOAUTH", "invalid password",
                                "invalid username-password")):
        cause = (f"authentication refused ({text}); fix: check token.redis.username and the "
                 "password in token.redis.password_file against the server's ACL")
    elif isinstance(exc, NoPermissionError) or text.startswith("NOPERM"):
        cause = (f"the ACL user may not do this ({text}); fix: grant it the commands "
                 "+@read +@write +@scripting and the keys ~gateway*")
    elif "CERTIFICATE_VERIFY_FAILED" in text or isinstance(exc, ssl.SSLCertVerificationError):
        cause = (f"TLS certificate not trusted ({_tail(text)}); fix: set token.redis.ca_file "
                 "to the CA that signed the Redis server's certificate")
    elif "SSL" in text or isinstance(exc, ssl.SSLError):
        cause = f"TLS failed ({_tail(text)}); fix: rediss:// needs a TLS port, redis:// a plain one"
    elif isinstance(exc, ResponseError):
        cause = f"Redis refused a command ({text.split(' ', 1)[0]})"
    elif isinstance(exc, RedisError | OSError):
        cause = f"cannot reach Redis: {type(exc).__name__}: {text}"
    else:
        cause = f"{type(exc).__name__}: {text}"
    if secret:
        cause = cause.replace(secret, "***")
    return cause


def _tail(text: str) -> str:
    # "Error 1 connecting to h:p. [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed:
    # unable to get local issuer certificate (_ssl.c:1006)." -> the part after the code.
    return text.split("] ", 1)[-1].split(" (_ssl.c")[0].strip(". ")


def client_options(target: RedisTarget, auth: RedisAuth | None = None) -> dict[str, Any]:
    """Keyword arguments for redis-py's clients: timeouts, credentials, TLS trust."""
    auth = auth or RedisAuth()
    kwargs: dict[str, Any] = {
        "socket_connect_timeout": auth.timeout,
        "socket_timeout": auth.timeout,
    }
    if auth.username or target.username:
        kwargs["username"] = auth.username or target.username
    password = auth.password or target.password
    if password is not None:
        kwargs["password"] = password
    if target.tls and auth.ca_file is not None:
        kwargs["ssl_ca_certs"] = str(auth.ca_file)
    if target.tls and target.kind == "cluster":
        kwargs["ssl"] = True  # (a rediss:// URL says so itself)
    return kwargs


class RedisConnection:
    """A client for one ``token.store`` target (the guard takes its pool, or for a cluster
    the same ``client_options``)."""

    def __init__(self, target: RedisTarget, auth: RedisAuth | None = None) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.cluster import ClusterNode, RedisCluster
        from redis.asyncio.retry import Retry
        from redis.asyncio.sentinel import Sentinel
        from redis.backoff import NoBackoff

        auth = auth or RedisAuth()
        self.target = target
        self.password = auth.password or target.password
        kwargs = client_options(target, auth)
        self.client: aioredis.Redis | RedisCluster
        self.pool: aioredis.ConnectionPool | None = None
        if target.kind == "single":
            # One quick retry: a stale pooled connection after a Redis restart.
            self.pool = aioredis.ConnectionPool.from_url(
                target.url, retry=Retry(NoBackoff(), 1), health_check_interval=30, **kwargs)
            self.client = aioredis.Redis(connection_pool=self.pool)
        elif target.kind == "sentinel":
            assert target.service is not None
            sentinel_kwargs = {"socket_connect_timeout": auth.timeout,
                               "socket_timeout": auth.timeout}
            self._sentinel = Sentinel(  # type: ignore[no-untyped-call]
                list(target.nodes), sentinel_kwargs=sentinel_kwargs, **kwargs)
            # After a failover the old primary answers READONLY: the sentinel-managed
            # connection drops it and the retry asks the sentinels for the new one.
            primary = self._sentinel.master_for(
                target.service, db=target.db, retry=Retry(NoBackoff(), 2),
                health_check_interval=30)
            self.client, self.pool = primary, primary.connection_pool
        else:
            self.client = RedisCluster(
                startup_nodes=[ClusterNode(h, p) for h, p in target.nodes], **kwargs)

    def __repr__(self) -> str:
        return f"RedisConnection({self.target.where})"

    def explain(self, exc: BaseException) -> str:
        return explain(exc, self.password)

    async def close(self) -> None:
        await self.client.aclose()
        if self.pool is not None:
            await self.pool.disconnect()
