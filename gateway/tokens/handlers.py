"""aiohttp handlers for token mode: the CEC validation callback and server-to-server issuing.

``validate`` is the endpoint the CEC calls back (``token.validate_path``). It answers
``{"retCode":0,"message":"validate success"}`` only for an existing, unexpired, unrevoked token
bound to exactly the posted userId, userName and tenantSpaceId, and the same
``{"retCode":1,"message":"validate failed"}`` whatever else went wrong with the token. Before
the token is looked at, the request must pass, in order: the address allow-list (403), POST only
(405), the concurrency limit (503 + Retry-After), JSON content type (415), the size limit (413)
and the body deadline (408). A correct token then always validates; a wrong one takes an
attempt from the userId's allowance (429 + Retry-After beyond it) and from the callback's rate
of wrong tokens (503 + Retry-After beyond it); see ``guard``. A backend (Redis) failure answers
503 with a non-zero retCode: the callback fails closed.

``issue`` serves ``token.issue_path``: ``POST`` mints a token for ``{"userId","userName"}``,
``DELETE`` revokes one; both need ``Authorization: Bearer <token.api_key>``.

Every refusal is logged on ``gateway.tokens`` with the client address and the reason, never
with the token.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway.config import TokenConfig
from gateway.keys import CLIENT_IP
from gateway.tokens.guard import Guard
from gateway.tokens.store import TokenBackendUnavailable, TokenStore, TokenStoreFull

log = logging.getLogger("gateway.tokens")

CLIENT_IP_KEY = CLIENT_IP
SUCCESS = {"retCode": 0, "message": "validate success"}
FAILED = {"retCode": 1, "message": "validate failed"}
MAX_FIELD_LENGTH = 256

MetricsHook = Callable[[str, str], None]
"""Called as ``hook(endpoint, outcome)``; endpoint is "validate" or "issue"."""


class _BodyError(Exception):
    """Why a request body was refused: HTTP status, public message, log reason."""

    def __init__(self, status: int, message: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.message = message
        self.reason = reason
        # Slow or oversized: the rest of the body must not be read at all.
        self.drop = status in (408, 413)


async def read_json_body(request: web.BaseRequest, max_body: int, deadline: float) -> Any:
    """Parse a JSON body of at most ``max_body`` bytes that must arrive within ``deadline`` s.

    Raises _BodyError (415, 413, 408 or 400). The deadline covers the whole body, so a client
    trickling one byte at a time cannot hold the handler longer than ``deadline``.
    """
    if request.content_type != "application/json":
        raise _BodyError(415, "content type must be application/json", "not JSON content type")
    if request.content_length is not None and request.content_length > max_body:
        raise _BodyError(413, "body too large", f"declared body of {request.content_length} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(deadline):
            while True:
                chunk = await request.content.readany()
                if not chunk:
                    break
                size += len(chunk)
                if size > max_body:
                    raise _BodyError(413, "body too large", f"body over {max_body} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise _BodyError(408, "body too slow", f"body not complete after {deadline}s") from None
    try:
        return json.loads(b"".join(chunks))
    except ValueError:
        raise _BodyError(400, "body is not valid JSON", "invalid JSON") from None


def _field(body: dict[str, Any], name: str) -> str | None:
    """A string field (an integer is accepted and turned into text); None when unusable."""
    value = body.get(name)
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value or len(value) > MAX_FIELD_LENGTH:
        return None
    return value


async def _send_and_drop(request: web.BaseRequest, resp: web.Response) -> web.Response:
    """Send ``resp`` now, then close the connection without reading the rest of the body.

    Used for slow (408) and oversized (413) bodies: aiohttp would otherwise keep reading and
    discarding the unread body for its lingering time, which is what the limits are against.
    The transport flushes the answer before it closes.
    """
    await resp.prepare(request)
    await resp.write_eof()
    protocol = request.protocol
    if protocol is not None:
        protocol.force_close()
    return resp


def _retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


class TokenEndpoints:
    """The validation callback and the issuing endpoint, sharing one store and one guard."""

    def __init__(
        self,
        cfg: TokenConfig,
        tenant_space_id: str,
        store: TokenStore,
        guard: Guard,
        metrics_hook: MetricsHook | None = None,
    ) -> None:
        self._cfg = cfg
        self._tenant = tenant_space_id
        self._store = store
        self._guard = guard
        self._hook = metrics_hook
        self._allow = list(cfg.validate_allow_from)
        self._api_key = (
            cfg.api_key.get_secret_value().encode("utf-8") if cfg.api_key is not None else None
        )

    def __repr__(self) -> str:
        cfg = self._cfg
        return f"TokenEndpoints(validate={cfg.validate_path!r}, issue={cfg.issue_path!r})"

    def routes(self) -> dict[str, Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]]:
        """Exact paths → handlers, for the core's gateway-owned endpoint table."""
        return {self._cfg.validate_path: self.validate, self._cfg.issue_path: self.issue}

    @property
    def validate_path(self) -> str:
        return self._cfg.validate_path

    @property
    def issue_path(self) -> str:
        return self._cfg.issue_path

    # Helpers --------------------------------------------------------------------------------
    def _count(self, endpoint: str, outcome: str) -> None:
        if self._hook is not None:
            try:
                self._hook(endpoint, outcome)
            except Exception:  # a broken metrics hook must not break the callback
                log.exception("token metrics hook failed")

    def _allowed(self, client_ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(client_ip)
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self._allow)

    @staticmethod
    def _client_ip(request: web.BaseRequest) -> str:
        # Set by the core from the socket and trusted_proxies; never from a header here.
        value = request.get(CLIENT_IP_KEY)
        return value if isinstance(value, str) else ""

    def _refuse(
        self,
        endpoint: str,
        outcome: str,
        client_ip: str,
        reason: str,
        status: int,
        body: dict[str, Any],
        *,
        retry_after: float | None = None,
        close: bool = False,
        level: int = logging.WARNING,
    ) -> web.Response:
        log.log(
            level, "token %s refused for %s: %s (%d)", endpoint, client_ip or "?", reason, status
        )
        self._count(endpoint, outcome)
        resp = web.json_response(body, status=status)
        resp.headers["Cache-Control"] = "no-store"
        if retry_after is not None:
            resp.headers["Retry-After"] = _retry_after(retry_after)
        if close:
            # The rest of the body was not read: do not let aiohttp drain it, drop the connection.
            resp.force_close()
        return resp

    # The CEC callback -----------------------------------------------------------------------
    async def validate(self, request: web.BaseRequest) -> web.StreamResponse:
        """The CEC's ``chatThirdPartyValidate`` callback."""
        ip = self._client_ip(request)
        if not self._allowed(ip):
            return self._refuse(
                "validate",
                "forbidden",
                ip,
                "address not in validate_allow_from",
                403,
                {"retCode": 1, "message": "forbidden"},
            )
        if request.method != "POST":
            resp = self._refuse(
                "validate",
                "method",
                ip,
                f"method {request.method}",
                405,
                {"retCode": 1, "message": "method not allowed"},
            )
            resp.headers["Allow"] = "POST"
            return resp
        with self._guard.slot() as admitted:
            if not admitted:
                return self._refuse(
                    "validate",
                    "busy",
                    ip,
                    "concurrency limit reached",
                    503,
                    {"retCode": 1, "message": "busy"},
                    retry_after=1,
                    close=True,
                )
            try:
                return await self._validate(request, ip)
            except TokenBackendUnavailable as exc:
                return self._refuse(
                    "validate",
                    "unavailable",
                    ip,
                    f"backend unavailable ({exc}); failing closed",
                    503,
                    {"retCode": 1, "message": "service unavailable"},
                    retry_after=5,
                    close=True,
                    level=logging.ERROR,
                )

    async def _validate(self, request: web.BaseRequest, ip: str) -> web.StreamResponse:
        # Only allow-listed addresses (the CEC) get here, and the CEC relays whatever anyone on
        # the internet posts to it: nothing is counted or locked per address, and a correct
        # token is looked at before any counter, so it always validates.
        try:
            body = await read_json_body(request, self._cfg.max_body, self._cfg.body_timeout)
        except _BodyError as exc:
            resp = self._refuse(
                "validate",
                "bad_body",
                ip,
                exc.reason,
                exc.status,
                {"retCode": 1, "message": exc.message},
                close=exc.status != 400,
            )
            return await _send_and_drop(request, resp) if exc.drop else resp

        fields: dict[str, str | None] = {}
        if isinstance(body, dict):
            fields = {k: _field(body, k) for k in ("Token", "userId", "userName", "tenantSpaceId")}
            # The guide spells it "Token"; tolerate "token" in case the real CEC differs.
            fields["Token"] = fields["Token"] or _field(body, "token")
        token, user_id = fields.get("Token"), fields.get("userId")
        user_name, tenant = fields.get("userName"), fields.get("tenantSpaceId")
        if token is None or user_id is None or user_name is None or tenant is None:
            reason = "missing or malformed fields"
            ok = False
        else:
            # The tenant must be ours and the binding must match; both evaluated, constant-time.
            ours = hmac.compare_digest(tenant.encode("utf-8"), self._tenant.encode("utf-8"))
            ok = await self._store.check(token, user_id, user_name, tenant) and ours
            reason = "token unknown, expired, revoked or bound to other values"
        if ok:
            log.info("token validated for %s (userId %r)", ip, user_id)
            self._count("validate", "ok")
            return web.json_response(SUCCESS, headers={"Cache-Control": "no-store"})

        # A wrong guess: it takes one attempt from the userId's allowance (atomically, shared
        # through Redis), and one unit of the callback's rate of wrong tokens.
        if user_id is not None:
            attempt = await self._guard.user_failed(user_id)
            if attempt.started:
                self._count("validate", "lockout_started")
                log.warning(
                    "token guessing against userId %r: %d wrong tokens within %gs; further "
                    "wrong tokens for it are answered 429 for %gs (its valid token still "
                    "validates; `gateway unlock --user` lifts this)",
                    user_id, self._guard.max_failures, self._guard.window, self._guard.lockout)
            if not attempt.allowed:
                return self._refuse(
                    "validate",
                    "limited",
                    ip,
                    f"userId {user_id!r}: {reason}; over its allowance of wrong tokens",
                    429,
                    {"retCode": 1, "message": "too many failed attempts"},
                    retry_after=attempt.retry_after,
                    level=logging.INFO,
                )
        wait = await self._guard.failure_rate()
        if wait:
            return self._refuse(
                "validate",
                "rate_limited",
                ip,
                f"userId {user_id!r}: {reason}; over the rate of wrong tokens",
                503,
                {"retCode": 1, "message": "busy"},
                retry_after=wait,
                level=logging.INFO,
            )
        # 200 with a non-zero retCode: the CEC reads the body, and the message is the same
        # whichever part of the binding was wrong.
        return self._refuse(
            "validate", "failed", ip, f"userId {user_id!r}: {reason}", 200, dict(FAILED)
        )

    # Server-to-server issuing -----------------------------------------------------------------
    async def issue(self, request: web.BaseRequest) -> web.StreamResponse:
        """``POST`` {"userId","userName"} → {"token","expiresAt"}; ``DELETE`` {"token"} → 204."""
        ip = self._client_ip(request)
        if self._api_key is None:
            # Issuing is off: look exactly like a path that does not exist.
            self._count("issue", "disabled")
            return web.Response(status=404, text="404: Not Found")
        try:
            return await self._issue(request, ip, self._api_key)
        except TokenStoreFull:
            # Counted by the store (on_full); a 503 like any store trouble, said plainly.
            resp = web.json_response({"error": "token store full"}, status=503,
                                     headers={"Cache-Control": "no-store", "Retry-After": "60"})
            return resp
        except TokenBackendUnavailable as exc:
            return self._refuse(
                "issue",
                "unavailable",
                ip,
                f"backend unavailable ({exc})",
                503,
                {"error": "token store unavailable"},
                retry_after=5,
                close=True,
                level=logging.ERROR,
            )

    async def _issue(self, request: web.BaseRequest, ip: str, api_key: bytes) -> web.StreamResponse:
        if request.method not in ("POST", "DELETE"):
            resp = self._refuse(
                "issue",
                "method",
                ip,
                f"method {request.method}",
                405,
                {"error": "method not allowed"},
            )
            resp.headers["Allow"] = "POST, DELETE"
            return resp
        # The API key is guessable only at the guard's pace: each wrong key takes an attempt
        # from the address's allowance (atomically); a locked address is refused even with
        # the right key, so guesses past the allowance learn nothing.
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        right = scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode("utf-8"), api_key)
        wait = await self._guard.address_locked(ip) if right else 0.0
        if not right:
            attempt = await self._guard.address_failed(ip)
            if attempt.started:
                self._count("issue", "lockout_started")
            wait = 0.0 if attempt.allowed else attempt.retry_after
        if wait:
            return self._refuse(
                "issue",
                "locked",
                ip,
                "address locked out",
                429,
                {"error": "too many failed attempts"},
                retry_after=wait,
                close=True,
            )
        if not right:
            resp = self._refuse(
                "issue",
                "unauthorized",
                ip,
                "missing or wrong API key",
                401,
                {"error": "unauthorized"},
            )
            resp.headers["WWW-Authenticate"] = 'Bearer realm="gateway"'
            return resp

        if request.method == "DELETE" and "token" in request.query:
            token: str | None = request.query["token"]
        else:
            try:
                body = await read_json_body(request, self._cfg.max_body, self._cfg.body_timeout)
            except _BodyError as exc:
                resp = self._refuse(
                    "issue",
                    "bad_body",
                    ip,
                    exc.reason,
                    exc.status,
                    {"error": exc.message},
                    close=exc.status != 400,
                )
                return await _send_and_drop(request, resp) if exc.drop else resp
            if not isinstance(body, dict):
                return self._refuse(
                    "issue",
                    "bad_body",
                    ip,
                    "body is not an object",
                    400,
                    {"error": "expected a JSON object"},
                )
            if request.method == "POST":
                user_id, user_name = _field(body, "userId"), _field(body, "userName")
                if user_id is None or user_name is None:
                    return self._refuse(
                        "issue",
                        "bad_body",
                        ip,
                        "userId/userName missing or malformed",
                        400,
                        {"error": "userId and userName are required strings"},
                    )
                issued = await self._store.issue(user_id, user_name, self._tenant)
                log.info("token issued for userId %r by %s", user_id, ip)
                self._count("issue", "issued")
                return web.json_response(
                    {"token": issued.token, "expiresAt": issued.expires_at_iso},
                    headers={"Cache-Control": "no-store"},
                )
            token = body.get("token") if isinstance(body.get("token"), str) else None

        if not token:
            return self._refuse(
                "issue", "bad_body", ip, "no token to revoke", 400, {"error": "token is required"}
            )
        existed = await self._store.revoke(token)
        log.info("token revoke by %s: %s", ip, "revoked" if existed else "unknown or expired")
        self._count("issue", "revoked")
        # 204 either way: revocation is idempotent and says nothing about which tokens exist.
        return web.Response(status=204)
