"""The chat's HTTP side: loader, integration page, the authorization endpoint, the rewrite.

Handlers are plain aiohttp handlers (``web.BaseRequest`` in, response out) because the core
runs aiohttp's low-level server. Everything they need comes in as plain values: the ``cec``
configuration, a Signer (or None when not signing), the guest cookies, and optional callables
for the logged-in identity and for tokens.

Identity: a logged-in identity (``identify``) wins; otherwise the visitor is a guest whose
random id lives in the signed guest cookie (issued here when missing or invalid). An anonymous
visitor in token mode without ``identity.fallback: guest`` is refused with NotLoggedIn (401).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import NamedTuple, Protocol

from aiohttp import hdrs, web

from gateway.chat.guest import GuestCookies
from gateway.chat.inject import (
    AUTHORIZATION,
    InjectionError,
    effective_user_name,
    force_identity,
    parse_body,
    serialize,
)
from gateway.chat.loader import render_loader, render_page
from gateway.config import CecConfig
from gateway.errors import RetryWithCookie, Unauthorized
from gateway.signing import Signer, epoch_ms

__all__ = [
    "CLIENT_SUFFIX",
    "NEW_CLIENT_SUFFIX",
    "ChatEndpoints",
    "ChatIdentity",
    "IdentifyFunc",
    "NotLoggedIn",
    "TokenForFunc",
    "read_limited",
    "signer_from_config",
]

log = logging.getLogger("gateway.chat")

NEW_CLIENT_SUFFIX = "/webclient/chat_client/js/newThirdPartyClient.js"
CLIENT_SUFFIX = "/webclient/chat_client/js/thirdPartyClient.js"

_NO_STORE = "no-store"
_COMMON_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}
# Sec-Fetch-Site values for which the loader may carry the visitor's identity: another
# site including the loader with <script src> must not read who the visitor is.
_SAME_SITE_FETCH = frozenset({"same-origin", "same-site", "none"})


class NotLoggedIn(Unauthorized):
    """Token mode and nobody is logged in (answered 401)."""


class _NamedIdentity(Protocol):
    @property
    def user_id(self) -> str: ...

    @property
    def user_name(self) -> str | None: ...


IdentityAnswer = tuple[str, str | None] | _NamedIdentity
# (request) -> (user_id, user_name) or an object with .user_id/.user_name; None: anonymous.
IdentifyFunc = Callable[[web.BaseRequest], Awaitable[IdentityAnswer | None]]
# (user_id, user_name) -> a token bound to them.
TokenForFunc = Callable[[str, str], Awaitable[str]]


class ChatIdentity(NamedTuple):
    """Who the gateway signs for, and the guest cookie to set when one was just issued."""

    user_id: str
    user_name: str | None
    guest: bool
    set_cookie: str | None = None


def _wall_ms() -> int:
    """Now in epoch milliseconds: the default clock, without building a datetime."""
    return time.time_ns() // 1_000_000


def _cookie_headers(identity: ChatIdentity) -> list[tuple[str, str]]:
    """``Set-Cookie`` for a guest id issued by this request, else nothing."""
    return [("Set-Cookie", identity.set_cookie)] if identity.set_cookie else []


def signer_from_config(cec: CecConfig) -> Signer | None:
    """A Signer for ``cec`` (None when no secret key is configured)."""
    if cec.auth.secret_key is None:
        return None
    s = cec.signing
    return Signer(
        cec.access_key,
        cec.auth.secret_key.get_secret_value(),
        signed_headers=s.signed_headers,
        content_type=s.content_type,
        payload_fields=s.payload_fields,
        timestamp_format=s.timestamp_format,
    )


async def read_limited(request: web.BaseRequest, limit: int) -> bytes:
    """The request body, or InjectionError as soon as it is known to exceed ``limit``."""
    length = request.content_length
    if length is not None and length > limit:
        raise InjectionError(f"thirdUserData is larger than {limit} bytes")
    data = bytearray()
    while True:
        chunk = await request.content.readany()
        if not chunk:
            return bytes(data)
        data += chunk
        if len(data) > limit:
            raise InjectionError(f"thirdUserData is larger than {limit} bytes")


def _text(status: int, text: str, **headers: str) -> web.Response:
    resp = web.Response(
        status=status, text=text, content_type="text/plain", charset="utf-8"
    )
    resp.headers.update(_COMMON_HEADERS)
    resp.headers[hdrs.CACHE_CONTROL] = _NO_STORE
    resp.headers.update(headers)
    return resp


def _method_not_allowed(*allowed: str) -> web.Response:
    return _text(405, "405 Method Not Allowed\n", Allow=", ".join(allowed))


class ChatEndpoints:
    """The chat's handlers, bound to one configuration."""

    def __init__(
        self,
        cec: CecConfig,
        signer: Signer | None,
        guest: GuestCookies,
        *,
        identify: IdentifyFunc | None = None,
        token_for: TokenForFunc | None = None,
        sign_uri: str | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.cec = cec
        self.signer = signer
        self.guest = guest
        self._identify = identify
        self._token_for = token_for
        self.sign_uri = sign_uri or cec.context_path + NEW_CLIENT_SUFFIX
        # Epoch milliseconds: the body's timestamp and the signature's are both made from it.
        self._now_ms: Callable[[], int] = (
            (lambda: epoch_ms(clock())) if clock is not None else _wall_ms)
        self._warned_secret = False

    def __repr__(self) -> str:
        return (
            f"ChatEndpoints(tenant={self.cec.tenant_space_id!r},"
            f" channel={self.cec.channel_config_id!r}, mode={self.cec.auth.mode!r},"
            f" signing={self.signer is not None})"
        )

    # ---------------------------------------------------------------- wiring helpers

    def endpoints(self) -> dict[str, Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]]:
        """Gateway-owned paths and their handlers (the page only when configured)."""
        out: dict[str, Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]] = {
            self.cec.loader_path: self.loader,
        }
        if self.signer is not None:
            out[self.cec.authorization_path] = self.authorization
        if self.cec.page_path:
            out[self.cec.page_path] = self.page
        return out

    def rewrite_paths(self) -> list[str]:
        """Proxy paths whose POST bodies go through ``rewrite``."""
        paths = [self.cec.context_path + NEW_CLIENT_SUFFIX]
        if self._token_for is not None:
            paths.append(self.cec.context_path + CLIENT_SUFFIX)
        return paths

    # ---------------------------------------------------------------- identity

    async def resolve_identity(self, request: web.BaseRequest, *, issue: bool = True
                               ) -> ChatIdentity | None:
        """The identity to sign for; a guest id (new cookie when ``issue``) for anonymous.

        Raises NotLoggedIn in token mode without the guest fallback. With ``issue`` False
        and no valid guest cookie, answers None.
        """
        if self._identify is not None:
            found = await self._identify(request)
            if found is not None:
                if isinstance(found, tuple):
                    user_id, user_name = found
                else:
                    user_id, user_name = found.user_id, found.user_name
                return ChatIdentity(user_id, user_name, guest=False)
            if self.cec.auth.mode == "token" and self.cec.identity.fallback != "guest":
                raise NotLoggedIn("log in to chat")
        return self.guest_identity(request.headers.get(hdrs.COOKIE), issue=issue)

    def guest_identity(self, cookie_header: str | None, *, issue: bool = True
                       ) -> ChatIdentity | None:
        """The guest from the ``Cookie`` header; a new one (with its cookie) when ``issue``."""
        guest_id = self.guest.read_cookie_header(cookie_header)
        if guest_id is not None:
            return ChatIdentity(guest_id, None, guest=True)
        if not issue:
            return None
        guest_id = self.guest.new_id()
        cookie = self.guest.cookie_header(guest_id)
        return ChatIdentity(guest_id, None, guest=True, set_cookie=cookie)

    @staticmethod
    def default_user_name(identity: ChatIdentity) -> str:
        """``Guest-<6 hex>`` for guests; the user id for a logged-in user without a name."""
        if identity.guest:
            return "Guest-" + identity.user_id.removeprefix("guest-")[:6]
        return identity.user_id

    def _warn_secret_once(self, path: str) -> None:
        if not self._warned_secret:
            self._warned_secret = True
            log.warning(
                "a page sent a secretKey field to %s; it was removed and not forwarded "
                "(remove the secret from the page: the gateway signs server-side)",
                path,
            )

    # ---------------------------------------------------------------- rewrite

    @property
    def synchronous(self) -> bool:
        """The rewrite needs no I/O: no identity hook to ask and no token to mint (the
        visitor is a guest from the signed cookie), so ``rewrite_guest`` is the rewrite."""
        return self._identify is None and self._token_for is None

    async def _rewrite_object(self, request: web.BaseRequest, body: bytes, *, with_token: bool
                              ) -> tuple[dict[str, object], ChatIdentity]:
        data = parse_body(body, self.cec.max_json_size)
        identity = await self.resolve_identity(request)
        assert identity is not None  # issue=True always gives one
        token = None
        if with_token and self._token_for is not None:
            if identity.set_cookie is not None:
                # A guest id minted by this very request (no valid guest cookie): no token
                # for it, so cookie-less floods store nothing. A browser follows the 307 with
                # the cookie (and the body) and gets its one token then.
                raise RetryWithCookie(identity.set_cookie)
            token = await self._token_for(identity.user_id, self._name_for(data, identity))
        return self._forced(data, identity, token, request.path), identity

    def _forced(self, data: dict[str, object], identity: ChatIdentity, token: str | None,
                path: str) -> dict[str, object]:
        """``data`` with the identity forced and signed (or the token set)."""
        out, stripped = force_identity(
            data,
            tenant_space_id=self.cec.tenant_space_id,
            channel_config_id=self.cec.channel_config_id,
            user_id=identity.user_id,
            user_name=self._name_for(data, identity),
            signer=self.signer,
            token=token,
            now_ms=self._now_ms(),
            uri=self.sign_uri,
        )
        if stripped:
            self._warn_secret_once(path)
        return out

    def _name_for(self, data: Mapping[str, object], identity: ChatIdentity) -> str:
        """The ``thirdUserName`` to sign: the login's name, the page's, or the default."""
        return effective_user_name(data, identity.user_name, self.default_user_name(identity),
                                   self.cec.guest.max_name_length)

    async def rewrite(self, request: web.BaseRequest, body: bytes
                      ) -> tuple[bytes, list[tuple[str, str]]]:
        """The forwarded body for a ``thirdUserData`` POST, and extra response headers.

        The extra headers are ``("Set-Cookie", guest cookie)`` when a guest id was issued.
        Raises InjectionError (400) on bad input, NotLoggedIn (401) in token mode without a
        login.
        """
        if self.synchronous:
            return self.rewrite_guest(request.headers, body)
        out, identity = await self._rewrite_object(request, body, with_token=True)
        return serialize(out), _cookie_headers(identity)

    def rewrite_guest(self, headers: Mapping[str, str], body: bytes
                      ) -> tuple[bytes, list[tuple[str, str]]]:
        """``rewrite`` for a guest from the ``Cookie`` header (``synchronous`` configs): one
        function for both request paths, the lean one calling it without a request object.
        """
        data = parse_body(body, self.cec.max_json_size)
        identity = self.guest_identity(headers.get(hdrs.COOKIE))
        assert identity is not None  # issue=True always gives one
        out = self._forced(data, identity, None, self.sign_uri)
        return serialize(out), _cookie_headers(identity)

    # ---------------------------------------------------------------- handlers

    async def authorization(self, request: web.BaseRequest) -> web.StreamResponse:
        """POST thirdUserData → the signature over the forced identity, as text/plain."""
        if request.method != hdrs.METH_POST:
            return _method_not_allowed(hdrs.METH_POST)
        if self.signer is None:
            return _text(404, "404 Not Found: this gateway does not sign (auth.mode token)\n")
        try:
            body = await read_limited(request, self.cec.max_json_size)
            out, identity = await self._rewrite_object(request, body, with_token=False)
        except InjectionError as exc:
            return _text(400, f"400 Bad Request: {exc}\n")
        except NotLoggedIn as exc:
            return _text(401, f"401 Unauthorized: {exc}\n")
        resp = _text(200, str(out[AUTHORIZATION]))
        if identity.set_cookie:
            resp.headers.add(hdrs.SET_COOKIE, identity.set_cookie)
        return resp

    async def settings_for(self, request: web.BaseRequest
                           ) -> tuple[dict[str, object], str | None]:
        """The loader/page settings for this visitor, and a guest cookie to set (or None)."""
        identity: ChatIdentity | None = None
        fetch_site = request.headers.get("Sec-Fetch-Site")
        if fetch_site is None or fetch_site in _SAME_SITE_FETCH:
            try:
                identity = await self.resolve_identity(request)
            except NotLoggedIn:
                identity = None
        name = None
        if identity is not None:
            name = self._name_for({}, identity)
        settings: dict[str, object] = {
            "contextPath": self.cec.context_path,
            "mode": self.cec.auth.mode,
            "configId": self.cec.channel_config_id,
            "tenantSpaceId": self.cec.tenant_space_id,
            "locale": self.cec.locale,
            "mapService": self.cec.map_service,
            "userId": identity.user_id if identity else None,
            "userName": name,
            # Tokens are injected on the proxy path; a token in script text could be read by
            # any site that includes this script.
            "token": None,
            "cobrowse": self.cec.cobrowse,
        }
        return settings, identity.set_cookie if identity else None

    async def loader(self, request: web.BaseRequest) -> web.StreamResponse:
        """GET the loader script with this visitor's settings."""
        if request.method not in (hdrs.METH_GET, hdrs.METH_HEAD):
            return _method_not_allowed(hdrs.METH_GET, hdrs.METH_HEAD)
        settings, cookie = await self.settings_for(request)
        resp = web.Response(
            body=render_loader(settings), content_type="application/javascript", charset="utf-8"
        )
        resp.headers.update(_COMMON_HEADERS)
        resp.headers[hdrs.CACHE_CONTROL] = _NO_STORE
        if cookie:
            resp.headers.add(hdrs.SET_COOKIE, cookie)
        return resp

    async def page(self, request: web.BaseRequest) -> web.StreamResponse:
        """GET the integration page."""
        if request.method not in (hdrs.METH_GET, hdrs.METH_HEAD):
            return _method_not_allowed(hdrs.METH_GET, hdrs.METH_HEAD)
        settings, cookie = await self.settings_for(request)
        resp = web.Response(
            body=render_page(settings, loader_path=self.cec.loader_path),
            content_type="text/html",
            charset="utf-8",
        )
        resp.headers.update(_COMMON_HEADERS)
        resp.headers[hdrs.CACHE_CONTROL] = _NO_STORE
        if cookie:
            resp.headers.add(hdrs.SET_COOKIE, cookie)
        return resp
