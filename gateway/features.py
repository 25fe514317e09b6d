"""Optional features plugged into the request path: chat injection, tokens, identity.

Kept apart from ``app`` so the proxy core does not depend on them. Everything here is built
once per configuration; ``install_features`` returns the endpoints and body rewriters the
dispatcher consults, plus the resources to close on shutdown.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

from aiohttp import web

from gateway.config import Config

if TYPE_CHECKING:
    from gateway.app import Extensions, Gateway

log = logging.getLogger("gateway.features")


def guest_cookie_key(config: Config) -> bytes:
    """The key that signs guest cookies: configured, else derived from a configured secret.

    Deriving keeps every worker and replica agreeing on the key without another secret to
    manage; a random key would make guests lose their id on restart or on another worker.
    """
    cec = config.cec
    assert cec is not None
    if cec.guest.cookie_key is not None:
        return cec.guest.cookie_key.get_secret_value().encode()
    base = None
    if cec.auth.secret_key is not None:
        base = cec.auth.secret_key.get_secret_value()
    elif config.token is not None:
        base = config.token.signing_key.get_secret_value()
    if base is None:
        log.warning("no cec.guest.cookie_key and no secret to derive it from: guest ids "
                    "will change when the gateway restarts")
        return secrets.token_bytes(32)
    return hmac.new(base.encode(), b"gateway guest cookie v1", hashlib.sha256).digest()


async def install_features(config: Config, gateway: Gateway, stack: AsyncExitStack
                           ) -> Extensions:
    from gateway.app import Extensions, Rewriter

    ext = Extensions()
    if config.cec is None:
        return ext
    from gateway.boundary import ClientScripts
    from gateway.chat.endpoints import (
        CLIENT_SUFFIX,
        NEW_CLIENT_SUFFIX,
        ChatEndpoints,
        signer_from_config,
    )
    from gateway.chat.guest import GuestCookies

    cec = config.cec
    ext.scripts = ClientScripts((cec.context_path + NEW_CLIENT_SUFFIX,
                                 cec.context_path + CLIENT_SUFFIX))
    signer = signer_from_config(cec) if cec.auth.mode == "authorization" else None
    # Secure when visitors use https, also when TLS ends at a load balancer before us.
    public_https = (config.public_url or "").startswith("https://")
    guest = GuestCookies(guest_cookie_key(config), cec.guest.cookie_name,
                         secure=gateway.scheme == "https" or public_https)
    identify = None
    if cec.identity.source == "url":
        import aiohttp

        from gateway.identity import make_identity

        session = await stack.enter_async_context(aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=True))
        url_identity = make_identity(cec.identity, session)
        if url_identity is not None:
            identify = url_identity.identify

    token_for: Callable[[str, str], Awaitable[str]] | None = None
    if config.token is not None:
        from gateway.redisconn import RedisAuth
        from gateway.tokens.guard import guard_from_config
        from gateway.tokens.handlers import TokenEndpoints
        from gateway.tokens.store import open_store

        tcfg = config.token
        store = open_store(tcfg.store, tcfg.signing_key.get_secret_value().encode(), tcfg.ttl,
                           auth=RedisAuth.from_config(tcfg.redis), max_tokens=tcfg.max_tokens,
                           on_full=lambda: gateway.metrics_hook("store", "store_full"))
        stack.push_async_callback(store.close)
        guard = guard_from_config(tcfg)
        stack.push_async_callback(guard.close)
        tokens = TokenEndpoints(tcfg, cec.tenant_space_id, store, guard,
                                metrics_hook=gateway.metrics_hook)
        ext.endpoints.update(tokens.routes())
        gateway.store_checks.extend((store.ping, guard.ping))
        gateway.unlock = guard.unlock
        if cec.auth.mode == "token":
            tenant = cec.tenant_space_id

            async def token_for_user(user_id: str, user_name: str) -> str:
                return (await store.token_for(user_id, user_name, tenant)).token

            token_for = token_for_user

    chat = ChatEndpoints(cec, signer, guest, identify=identify, token_for=token_for)
    metrics = gateway.metrics

    ext.endpoints.update(chat.endpoints())
    if signer is not None and cec.authorization_path in ext.endpoints:
        sign_endpoint = ext.endpoints[cec.authorization_path]

        async def authorization_and_count(request: web.BaseRequest) -> web.StreamResponse:
            resp = await sign_endpoint(request)
            if resp.status == 200:
                metrics.signatures += 1
            return resp

        ext.endpoints[cec.authorization_path] = authorization_and_count
    for path in chat.rewrite_paths():
        ext.rewriters[path] = Rewriter(cec.max_json_size, chat.rewrite, cec.signing.content_type,
                                       signs=signer is not None,
                                       now=chat.rewrite_guest if chat.synchronous else None)
    return ext
