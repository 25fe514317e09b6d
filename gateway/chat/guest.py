"""The guest identity: a random id kept in a signed, HttpOnly, SameSite=Lax cookie.

The id is the ``thirdUserId`` the gateway signs for anonymous visitors, so the browser must
not be able to choose it: the cookie value is signed with itsdangerous and anything that
does not verify is treated as absent (a new id is issued).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from functools import lru_cache
from typing import Any

import itsdangerous
from aiohttp import web

__all__ = ["GUEST_ID_RE", "GuestCookies"]

GUEST_ID_RE = re.compile(r"^guest-[0-9a-f]{20}$")
# RFC 6265 cookie-name token characters.
_COOKIE_NAME_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_SALT = b"gateway.chat.guest"
# A signed value is ``guest-`` + 20 hex + "." + 43 base64 characters; anything much longer
# cannot verify, and must not fill the cache of verified values with large strings.
_MAX_VALUE_LENGTH = 128


class GuestCookies:
    """Reads, mints and formats the signed guest-id cookie."""

    __slots__ = ("_cookie_re", "_signer", "_verified", "cookie_name", "max_age", "secure")

    def __init__(
        self,
        key: bytes,
        cookie_name: str = "cec_guest",
        *,
        secure: bool = False,
        max_age: int = 31536000,
    ) -> None:
        if len(key) < 16:
            raise ValueError("the guest cookie key must be at least 16 bytes")
        if not _COOKIE_NAME_RE.match(cookie_name):
            raise ValueError(f"{cookie_name!r} is not a valid cookie name")
        if max_age <= 0:
            raise ValueError("max_age must be positive")
        self._signer = itsdangerous.Signer(key, salt=_SALT, digest_method=hashlib.sha256)
        self.cookie_name = cookie_name
        # One "name=value" pair of a Cookie header whose name is ours (blanks around the name
        # and the value as str.strip() sees them: \s is the same Unicode whitespace).
        self._cookie_re = re.compile(r"(?:^|;)\s*" + re.escape(cookie_name) + r"\s*=([^;]*)")
        # A browser sends the same cookie on every request: each distinct value is verified
        # once (an entry is only reachable by presenting that signed value again).
        self._verified = lru_cache(maxsize=4096)(self._verify)
        self.secure = secure
        self.max_age = max_age

    def __repr__(self) -> str:
        return (
            f"GuestCookies(cookie_name={self.cookie_name!r}, secure={self.secure!r},"
            f" max_age={self.max_age!r}, key='**********')"
        )

    def __reduce__(self) -> str | tuple[Any, ...]:
        raise TypeError("GuestCookies cannot be pickled (it holds a key)")

    @staticmethod
    def new_id() -> str:
        """A fresh guest id: ``guest-`` and 80 random bits in hex."""
        return "guest-" + secrets.token_hex(10)

    def value_for(self, guest_id: str) -> str:
        """The signed cookie value for ``guest_id``."""
        return self._signer.sign(guest_id.encode("ascii")).decode("ascii")

    def read_value(self, value: str | None) -> str | None:
        """The guest id inside a cookie value, or None when absent, malformed or tampered."""
        if not value or len(value) > _MAX_VALUE_LENGTH:
            return None
        return self._verified(value)

    def _verify(self, value: str) -> str | None:
        try:
            raw = self._signer.unsign(value.encode("ascii"))
        except (itsdangerous.BadSignature, UnicodeEncodeError):
            return None
        guest_id = raw.decode("ascii", "replace")
        return guest_id if GUEST_ID_RE.match(guest_id) else None

    def read_cookie_header(self, header: str | None) -> str | None:
        """The guest id from a raw ``Cookie`` header: the first of our cookies that verifies.

        A browser may send the name twice (a stale cookie from another path or domain next to
        the current one); both are ours to check, and only a signed value counts. The header
        is not parsed as a whole: this one name is all the gateway reads, and a malformed
        cookie of the site's elsewhere in the header must not hide it.
        """
        if not header or self.cookie_name not in header:
            return None
        match = self._cookie_re.search(header)
        while match is not None:
            value = match.group(1).strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            guest_id = self.read_value(value)
            if guest_id is not None:
                return guest_id
            match = self._cookie_re.search(header, match.end())
        return None

    def read(self, request: web.BaseRequest) -> str | None:
        """The valid guest id from the request's cookie, or None."""
        return self.read_cookie_header(request.headers.get("Cookie"))

    def cookie_header(self, guest_id: str) -> str:
        """A full ``Set-Cookie`` value carrying ``guest_id``."""
        parts = [
            f"{self.cookie_name}={self.value_for(guest_id)}",
            "Path=/",
            f"Max-Age={self.max_age}",
            "HttpOnly",
            "SameSite=Lax",
        ]
        if self.secure:
            parts.append("Secure")
        return "; ".join(parts)
