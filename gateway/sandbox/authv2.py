"""The sandbox's own auth-v2 verifier: checks ``thirdPartAuthorization`` the way the CEC would.

Deliberately independent of ``gateway.signing``: if both shared code, a mistake in the
signature recipe would be invisible. The recipe (docs/PROTOCOL.md, "The auth-v2 signature"):

    prefix    = auth-v2/{accessKey}/{timestamp}/{signedHeaders}
    key       = hex(HMAC-SHA256(secretKey, prefix))
    canonical = METHOD \\n URI \\n signedHeaders \\n canonicalHeaders \\n normalize(payload)
    result    = prefix + "/" + hex(HMAC-SHA256(key-as-hex-text, canonical))

where the payload is the compact JSON of the four identity fields of the request body.
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from pydantic import SecretStr

from gateway.errors import GatewayError

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_TIMESTAMP_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
_MAX_AUTH_LENGTH = 512


class AuthV2Error(GatewayError):
    """An authorization was refused; ``reason`` is a short machine-readable code.

    Messages name what was wrong, never the secret or the expected signature.
    """

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


def normalize(value: str) -> str:
    """Percent-encode every UTF-8 byte outside ``A-Z a-z 0-9 - . _ ~`` (upper-case hex)."""
    return "".join(chr(b) if b in _UNRESERVED else f"%{b:02X}" for b in value.encode("utf-8"))


def canonical_payload(body: Mapping[str, object], fields: Sequence[str]) -> str:
    """The compact JSON of exactly ``fields`` in order; non-ASCII is kept as is."""
    picked: dict[str, object] = {}
    for name in fields:
        value = body.get(name)
        if not isinstance(value, str):
            raise AuthV2Error("payload", f"the body field {name} is missing or not a string")
        picked[name] = value
    return json.dumps(picked, ensure_ascii=False, separators=(",", ":"))


def _hmac_hex(key: str, message: str) -> str:
    return hmac.new(key.encode("utf-8"), message.encode("utf-8"), hashlib.sha256).hexdigest()


def sign(*, secret_key: str, access_key: str, timestamp: str, method: str, uri: str,
         headers: Mapping[str, str], payload: str) -> str:
    """The full ``auth-v2/…/signature`` string for the given inputs."""
    lowered = {name.lower(): value.strip() for name, value in headers.items()}
    signed_headers = ";".join(sorted(lowered))
    prefix = f"auth-v2/{access_key}/{timestamp}/{signed_headers}"
    signing_key = _hmac_hex(secret_key, prefix)
    canonical_headers = "\n".join(
        sorted(f"{normalize(name)}:{normalize(value)}" for name, value in lowered.items()))
    if not uri.startswith("/"):
        uri = "/" + uri
    canonical = f"{method.upper()}\n{uri}\n{signed_headers}\n{canonical_headers}\n"
    if payload:
        canonical += normalize(payload)
    return f"{prefix}/{_hmac_hex(signing_key, canonical)}"


@dataclass(frozen=True)
class ParsedAuthorization:
    access_key: str
    timestamp: str
    signed_headers: tuple[str, ...]
    signature: str


def parse_authorization(value: str) -> ParsedAuthorization:
    """Split ``auth-v2/{accessKey}/{timestamp}/{signedHeaders}/{signature}``."""
    if not isinstance(value, str) or len(value) > _MAX_AUTH_LENGTH:
        raise AuthV2Error("malformed", "the authorization is not an auth-v2 string")
    parts = value.split("/")
    if len(parts) != 5 or parts[0] != "auth-v2":
        raise AuthV2Error("malformed", "the authorization is not an auth-v2 string")
    _, access_key, timestamp, signed_headers, signature = parts
    if not access_key or not signed_headers:
        raise AuthV2Error("malformed", "the authorization lacks an access key or signed headers")
    if not _TIMESTAMP_RE.match(timestamp):
        raise AuthV2Error("malformed", "the timestamp is not yyyy-MM-ddTHH:mm:ss.SSSZ")
    if not _HEX64_RE.match(signature):
        raise AuthV2Error("malformed", "the signature is not 64 lower-case hex digits")
    return ParsedAuthorization(access_key, timestamp, tuple(signed_headers.split(";")), signature)


def parse_timestamp(text: str) -> float:
    """``2026-11-24T08:30:15.123Z`` -> POSIX seconds."""
    try:
        moment = dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)
    except ValueError:
        raise AuthV2Error("malformed", "the timestamp is not a valid date") from None
    return moment.timestamp()


class ReplayGuard:
    """Remembers accepted signatures for ``window`` seconds; a second use is a replay."""

    def __init__(self, window: float, *, max_entries: int = 100_000) -> None:
        self._window = window
        self._max = max_entries
        self._seen: collections.OrderedDict[str, float] = collections.OrderedDict()

    def _prune(self, now: float) -> None:
        while self._seen:
            sig, expires = next(iter(self._seen.items()))
            if expires > now and len(self._seen) <= self._max:
                break
            del self._seen[sig]

    def seen(self, signature: str, now: float) -> bool:
        self._prune(now)
        return signature in self._seen

    def remember(self, signature: str, now: float) -> None:
        # Insertion order equals expiry order because the window is constant.
        self._seen[signature] = now + self._window
        self._prune(now)

    def __len__(self) -> int:
        return len(self._seen)


class AuthV2Verifier:
    """Verifies authorization-mode requests for one channel.

    ``clock`` returns POSIX seconds (``time.time`` by default; tests freeze it).
    """

    def __init__(self, *, access_key: str, secret_key: SecretStr, clock_skew: float = 300.0,
                 replay_window: float = 300.0,
                 signed_headers: Sequence[str] = ("Content-Length", "Content-Type"),
                 content_type: str = "application/json;charset=UTF-8",
                 payload_fields: Sequence[str] = ("thirdUserName", "thirdUserId",
                                                  "tenantSpaceId", "channelConfigId"),
                 clock: Callable[[], float] = time.time) -> None:
        self._access_key = access_key
        self._secret = secret_key
        self._skew = clock_skew
        self._signed = tuple(sorted(h.lower() for h in signed_headers))
        self._content_type = content_type
        self._fields = tuple(payload_fields)
        self._clock = clock
        self._replays = ReplayGuard(replay_window)
        unknown = set(self._signed) - {"content-length", "content-type"}
        if unknown:
            raise ValueError(f"cannot sign headers {sorted(unknown)}; "
                             "only Content-Length and Content-Type are known")

    def __repr__(self) -> str:
        return f"AuthV2Verifier(access_key={self._access_key!r}, secret_key=<redacted>)"

    def expected(self, parsed: ParsedAuthorization, *, method: str, uri: str,
                 payload: str) -> str:
        values = {"content-length": str(len(payload.encode("utf-8"))),
                  "content-type": self._content_type}
        return sign(secret_key=self._secret.get_secret_value(), access_key=parsed.access_key,
                    timestamp=parsed.timestamp, method=method, uri=uri,
                    headers={name: values[name] for name in self._signed}, payload=payload)

    def verify(self, authorization: str, *, method: str, uri: str,
               body: Mapping[str, object]) -> ParsedAuthorization:
        """Accept or raise :class:`AuthV2Error`; an accepted signature cannot be used again."""
        parsed = parse_authorization(authorization)
        if not hmac.compare_digest(parsed.access_key.encode(), self._access_key.encode()):
            raise AuthV2Error("access_key", "unknown access key")
        if tuple(sorted(parsed.signed_headers)) != self._signed or \
                list(parsed.signed_headers) != sorted(parsed.signed_headers):
            raise AuthV2Error("signed_headers", "the signed headers are not "
                              + ";".join(self._signed))
        now = self._clock()
        if abs(now - parse_timestamp(parsed.timestamp)) > self._skew:
            raise AuthV2Error("stale", "the timestamp is outside the allowed clock skew")
        payload = canonical_payload(body, self._fields)
        want = self.expected(parsed, method=method, uri=uri, payload=payload)
        if not hmac.compare_digest(want.encode("ascii"), authorization.encode("utf-8")):
            raise AuthV2Error("signature", "the signature does not match")
        if self._replays.seen(parsed.signature, now):
            raise AuthV2Error("replay", "this signature was already used")
        self._replays.remember(parsed.signature, now)
        return parsed
