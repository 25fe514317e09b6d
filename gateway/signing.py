"""The CEC's auth-v2 signature, as fixed by the vectors in SPEC.md.

Pure functions, no I/O: the gateway signs ``thirdUserData`` server-side so that the channel's
``secretKey`` never reaches a browser. The signed header set, the payload fields and the
timestamp format are parameters (with SPEC.md's defaults) because the real CEC may differ and
an operator must be able to adjust them without a code change.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

from gateway.errors import GatewayError

__all__ = [
    "AUTH_VERSION",
    "DEFAULT_CONTENT_TYPE",
    "DEFAULT_PAYLOAD_FIELDS",
    "DEFAULT_SIGNED_HEADERS",
    "DEFAULT_TIMESTAMP_FORMAT",
    "DEFAULT_URI",
    "ParsedAuthorization",
    "Signer",
    "SigningError",
    "auth_string_prefix",
    "authorization",
    "canonical_headers",
    "canonical_request",
    "default_headers",
    "epoch_ms",
    "format_epoch_ms",
    "format_timestamp",
    "normalize",
    "parse_authorization",
    "signature",
    "signed_headers_line",
    "signed_payload",
    "signing_key",
    "verify",
]

AUTH_VERSION = "auth-v2"
DEFAULT_SIGNED_HEADERS: tuple[str, ...] = ("Content-Length", "Content-Type")
DEFAULT_CONTENT_TYPE = "application/json;charset=UTF-8"
DEFAULT_PAYLOAD_FIELDS: tuple[str, ...] = (
    "thirdUserName",
    "thirdUserId",
    "tenantSpaceId",
    "channelConfigId",
)
DEFAULT_TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%S.{ms}Z"
DEFAULT_URI = "/service-cloud/webclient/chat_client/js/newThirdPartyClient.js"

# RFC 3986 unreserved characters; every other UTF-8 byte is percent-encoded.
_UNRESERVED = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
)
# Any character normalize() encodes: everything but the unreserved ones (any non-ASCII too).
_RESERVED = re.compile(r"[^A-Za-z0-9\-._~]")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)
_compact_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
# Byte value -> its text in a normalised string (str.translate over the bytes as Latin-1).
_ENCODED = {b: chr(b) if b in _UNRESERVED else f"%{b:02X}" for b in range(256)}


class SigningError(GatewayError):
    """A signature cannot be computed from what was given (missing field or header)."""


def normalize(s: str) -> str:
    """Percent-encode ``s`` byte by byte (UTF-8), keeping only ``A-Z a-z 0-9 - . _ ~``."""
    if _RESERVED.search(s) is None:
        return s  # nothing to encode (ids, digits): the scan is far cheaper than translate
    return s.encode("utf-8").decode("latin-1").translate(_ENCODED)


def signed_headers_line(names: Sequence[str] | Mapping[str, str]) -> str:
    """``SignedHeaders``: the lower-cased header names, sorted, joined by ``;``."""
    return ";".join(sorted({name.strip().lower() for name in names}))


def auth_string_prefix(access_key: str, timestamp: str, names: Sequence[str]) -> str:
    """``auth-v2/{accessKey}/{timestamp}/{SignedHeaders}``."""
    return f"{AUTH_VERSION}/{access_key}/{timestamp}/{signed_headers_line(names)}"


def _hmac_hex(key: str, msg: str) -> str:
    """Lower-case hex of HMAC-SHA256 over UTF-8 ``key`` and ``msg``."""
    return hmac.digest(key.encode("utf-8"), msg.encode("utf-8"), "sha256").hex()


def signing_key(secret: str, prefix: str) -> str:
    """Lower-case hex of HMAC-SHA256(key=secret, msg=authStringPrefix)."""
    return _hmac_hex(secret, prefix)


def canonical_headers(headers: Mapping[str, str]) -> str:
    """``normalize(lower(name)) + ":" + normalize(trim(value))`` per header, sorted, ``\\n``."""
    return "\n".join(sorted(_header_line(name, value) for name, value in headers.items()))


@lru_cache(maxsize=256)  # the configured names with a handful of values (mostly lengths)
def _header_line(name: str, value: str) -> str:
    return f"{normalize(name.strip().lower())}:{normalize(value.strip())}"


def canonical_request(method: str, uri: str, headers: Mapping[str, str], payload: str) -> str:
    """``METHOD\\nURI\\nSignedHeaders\\nCanonicalHeaders[\\nnormalize(payload)]``.

    ``headers`` must hold exactly the signed headers. The payload part is present only when
    the payload is non-empty (SPEC.md).
    """
    parts = [method.upper(), uri, signed_headers_line(list(headers)), canonical_headers(headers)]
    if payload:
        parts.append(normalize(payload))
    return "\n".join(parts)


def signature(key: str, request: str) -> str:
    """Lower-case hex of HMAC-SHA256(key=signingKey as hex text, msg=CanonicalRequest)."""
    return _hmac_hex(key, request)


def authorization(
    secret: str,
    access_key: str,
    timestamp: str,
    method: str,
    uri: str,
    headers: Mapping[str, str],
    payload: str,
) -> str:
    """The full Authorization string ``authStringPrefix/signature`` for the signed headers."""
    prefix = auth_string_prefix(access_key, timestamp, list(headers))
    key = signing_key(secret, prefix)
    return f"{prefix}/{signature(key, canonical_request(method, uri, headers, payload))}"


def epoch_ms(dt: datetime) -> int:
    """``dt`` as whole milliseconds since the epoch (floor; a naive ``dt`` is taken as UTC)."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - _EPOCH) // _MILLISECOND


def format_timestamp(dt: datetime, fmt: str = DEFAULT_TIMESTAMP_FORMAT) -> str:
    """Format ``dt`` in UTC with ``strftime`` plus ``{ms}`` (3-digit milliseconds).

    A naive ``dt`` is taken to be UTC already.
    """
    return format_epoch_ms(epoch_ms(dt), fmt)


def format_epoch_ms(ms: int, fmt: str = DEFAULT_TIMESTAMP_FORMAT) -> str:
    """``format_timestamp`` of the instant ``ms`` milliseconds after the epoch."""
    seconds, millis = divmod(ms, 1000)
    # {ms} is substituted after strftime; digits are inert to it.
    return _strftime(seconds, fmt).replace("{ms}", f"{millis:03d}")


@lru_cache(maxsize=64)
def _strftime(epoch_seconds: int, fmt: str) -> str:
    # Every signature of the same second has the same text up to {ms}; strftime is slow.
    return (_EPOCH + timedelta(seconds=epoch_seconds)).strftime(fmt)


def signed_payload(
    data: Mapping[str, object], fields: Sequence[str] = DEFAULT_PAYLOAD_FIELDS
) -> str:
    """Compact JSON of exactly ``fields`` of ``data``, in that order, non-ASCII kept as is."""
    missing = [f for f in fields if f not in data]
    if missing:
        raise SigningError(f"payload field missing: {', '.join(missing)}")
    return _compact_json({f: data[f] for f in fields})


def default_headers(payload: str, content_type: str = DEFAULT_CONTENT_TYPE) -> dict[str, str]:
    """The headers SPEC.md signs: Content-Length (UTF-8 bytes of the payload), Content-Type."""
    return {
        "Content-Length": str(len(payload.encode("utf-8"))),
        "Content-Type": content_type,
    }


class ParsedAuthorization:
    """The parts of an ``auth-v2/{ak}/{ts}/{SignedHeaders}/{signature}`` string."""

    __slots__ = ("access_key", "signature", "signed_headers", "timestamp")

    def __init__(
        self, access_key: str, timestamp: str, signed_headers: tuple[str, ...], signature: str
    ) -> None:
        self.access_key = access_key
        self.timestamp = timestamp
        self.signed_headers = signed_headers
        self.signature = signature

    def __repr__(self) -> str:
        return (
            f"ParsedAuthorization(access_key={self.access_key!r}, timestamp={self.timestamp!r},"
            f" signed_headers={self.signed_headers!r})"
        )


def parse_authorization(value: str) -> ParsedAuthorization | None:
    """Split an Authorization string; None when it is not auth-v2 shaped."""
    head, sep, rest = value.partition("/")
    if head != AUTH_VERSION or not sep:
        return None
    access_key, sep, rest = rest.partition("/")
    if not sep or not access_key:
        return None
    # The timestamp is whatever lies between the access key and the last two parts, so a
    # timestamp format containing "/" still parses.
    pieces = rest.rsplit("/", 2)
    if len(pieces) != 3 or not all(pieces):
        return None
    timestamp, names, sig = pieces
    return ParsedAuthorization(access_key, timestamp, tuple(names.split(";")), sig)


def verify(
    value: str,
    *,
    secret: str,
    payload: str,
    access_key: str | None = None,
    method: str = "POST",
    uri: str = DEFAULT_URI,
    headers: Mapping[str, str] | None = None,
    content_type: str = DEFAULT_CONTENT_TYPE,
) -> bool:
    """True when ``value`` is a valid signature of ``payload`` (constant-time comparison).

    The header values come from ``headers`` (case-insensitive), falling back to the default
    Content-Length/Content-Type of ``payload``; the names come from the string itself.
    When ``access_key`` is given, the string must name that key.
    """
    parsed = parse_authorization(value)
    if parsed is None:
        return False
    if access_key is not None and not hmac.compare_digest(
        parsed.access_key.encode(), access_key.encode()
    ):
        return False
    available = {k.lower(): v for k, v in default_headers(payload, content_type).items()}
    available.update({k.strip().lower(): v for k, v in (headers or {}).items()})
    if any(name not in available for name in parsed.signed_headers):
        return False
    signed = {name: available[name] for name in parsed.signed_headers}
    expected = authorization(
        secret, parsed.access_key, parsed.timestamp, method, uri, signed, payload
    )
    return hmac.compare_digest(expected.encode("utf-8"), value.encode("utf-8"))


class Signer:
    """Signs payloads for one channel; holds the secret and never shows it."""

    __slots__ = (
        "_canonical_head",
        "_last_key",
        "_payload_end",
        "_payload_keys",
        "_prefix_head",
        "_prefix_tail",
        "_secret",
        "_secret_bytes",
        "access_key",
        "content_type",
        "payload_fields",
        "signed_headers",
        "timestamp_format",
    )

    def __init__(
        self,
        access_key: str,
        secret_key: str,
        *,
        signed_headers: Sequence[str] = DEFAULT_SIGNED_HEADERS,
        content_type: str = DEFAULT_CONTENT_TYPE,
        payload_fields: Sequence[str] = DEFAULT_PAYLOAD_FIELDS,
        timestamp_format: str = DEFAULT_TIMESTAMP_FORMAT,
    ) -> None:
        if not secret_key:
            raise SigningError("the secret key is empty")
        if not signed_headers:
            raise SigningError("at least one signed header is needed")
        if len({n.strip().lower() for n in signed_headers}) != len(signed_headers):
            raise SigningError("signed header names repeat (names are case-insensitive)")
        self.access_key = access_key
        self._secret = secret_key
        self.signed_headers: tuple[str, ...] = tuple(signed_headers)
        self.content_type = content_type
        self.payload_fields: tuple[str, ...] = tuple(payload_fields)
        self.timestamp_format = timestamp_format
        # The signing key of the last authStringPrefix, which depends on the prefix alone
        # (access key, timestamp, header names): signatures of the same millisecond share it.
        self._secret_bytes = secret_key.encode("utf-8")
        self._last_key: tuple[str, bytes] | None = None
        # The constant parts of authStringPrefix, of the payload (each field's JSON name with
        # the separator before it, as is and normalised) and of the canonical request (per
        # method, URI and payload length: the content lengths of a widget's bodies are few).
        self._prefix_head = f"{AUTH_VERSION}/{access_key}/"
        self._prefix_tail = "/" + signed_headers_line(self.signed_headers)
        keys = []
        for i, field in enumerate(dict.fromkeys(self.payload_fields)):
            key_text = ("," if i else "{") + _compact_json(field) + ":"
            keys.append((field, key_text, normalize(key_text)))
        self._payload_keys: tuple[tuple[str, str, str], ...] = tuple(keys)
        self._payload_end = ("}", "%7D") if keys else ("{}", "%7B%7D")
        self._canonical_head = lru_cache(maxsize=256)(self._head)

    def __repr__(self) -> str:
        return (
            f"Signer(access_key={self.access_key!r}, secret_key='**********',"
            f" signed_headers={list(self.signed_headers)!r},"
            f" payload_fields={list(self.payload_fields)!r})"
        )

    __str__ = __repr__

    def __reduce__(self) -> str | tuple[Any, ...]:
        # Pickling would copy the secret into wherever the pickle goes.
        raise TypeError("Signer cannot be pickled")

    def timestamp(self, now: datetime | None = None) -> str:
        """``now`` (default: the current time) in the configured timestamp format."""
        return format_timestamp(now or datetime.now(UTC), self.timestamp_format)

    def timestamp_at(self, ms: int) -> str:
        """The instant ``ms`` milliseconds after the epoch in the configured format."""
        return format_epoch_ms(ms, self.timestamp_format)

    def headers_for(self, payload: str, headers: Mapping[str, str] | None = None) -> dict[str, str]:
        """The configured signed headers with their values for ``payload``.

        Values come from ``headers`` (case-insensitive) over the defaults; a configured header
        that has no value raises SigningError.
        """
        return self._chosen(len(payload.encode("utf-8")), headers)

    def _chosen(self, length: int, headers: Mapping[str, str] | None) -> dict[str, str]:
        """``headers_for`` a payload of ``length`` UTF-8 bytes."""
        available = {"content-length": str(length), "content-type": self.content_type}
        if headers:
            available.update({k.strip().lower(): v for k, v in headers.items()})
        chosen: dict[str, str] = {}
        for name in self.signed_headers:
            value = available.get(name.strip().lower())
            if value is None:
                raise SigningError(f"no value for signed header {name}")
            chosen[name] = value
        return chosen

    def sign_payload(
        self,
        payload: str,
        *,
        timestamp: str | None = None,
        method: str = "POST",
        uri: str = DEFAULT_URI,
        headers: Mapping[str, str] | None = None,
    ) -> str:
        """The Authorization string for ``payload`` (timestamp defaults to now)."""
        return self._sign(payload, normalize(payload), timestamp, method, uri, headers)

    def payload_for(self, data: Mapping[str, object]) -> str:
        """The payload text of the configured fields of ``data``."""
        return signed_payload(data, self.payload_fields)

    def sign_fields(
        self,
        data: Mapping[str, object],
        *,
        timestamp: str | None = None,
        method: str = "POST",
        uri: str = DEFAULT_URI,
        headers: Mapping[str, str] | None = None,
    ) -> str:
        """Build the payload from the configured fields of ``data`` and sign it."""
        missing = [f for f, _, _ in self._payload_keys if f not in data]
        if missing:
            raise SigningError(f"payload field missing: {', '.join(missing)}")
        # The payload is compact JSON of a flat object, and normalize() works byte by byte:
        # the payload's normalised text is the concatenation of its pieces' normalised texts,
        # and only the values' pieces are new on each call.
        text: list[str] = []
        normalized: list[str] = []
        for field, key_text, key_normalized in self._payload_keys:
            value = data[field]
            if type(value) is str and _RESERVED.search(value) is None:
                # JSON escapes none of these characters: only the quotes need encoding.
                text += (key_text, '"', value, '"')
                normalized += (key_normalized, "%22", value, "%22")
            else:
                value_text = _compact_json(value)
                text += (key_text, value_text)
                normalized += (key_normalized, normalize(value_text))
        text.append(self._payload_end[0])
        normalized.append(self._payload_end[1])
        return self._sign("".join(text), "".join(normalized), timestamp, method, uri, headers)

    def _sign(
        self,
        payload: str,
        normalized: str,
        timestamp: str | None,
        method: str,
        uri: str,
        headers: Mapping[str, str] | None,
    ) -> str:
        """``prefix/signature`` over ``payload``, whose normalised text is ``normalized``."""
        ts = self.timestamp() if timestamp is None else timestamp
        length = len(payload.encode("utf-8"))
        if headers:
            head = canonical_request(method, uri, self._chosen(length, headers), "")
        else:
            head = self._canonical_head(method, uri, length)
        prefix = f"{self._prefix_head}{ts}{self._prefix_tail}"
        last = self._last_key
        if last is None or last[0] != prefix:
            key = hmac.digest(self._secret_bytes, prefix.encode("utf-8"), "sha256").hex()
            last = self._last_key = (prefix, key.encode("ascii"))  # signing_key(secret, prefix)
        canonical = f"{head}\n{normalized}" if payload else head
        return f"{prefix}/{hmac.digest(last[1], canonical.encode('utf-8'), 'sha256').hex()}"

    def _head(self, method: str, uri: str, length: int) -> str:
        # The canonical request up to the payload, for the default header values.
        return canonical_request(method, uri, self._chosen(length, None), "")

    def verify(
        self,
        value: str,
        payload: str,
        *,
        method: str = "POST",
        uri: str = DEFAULT_URI,
        headers: Mapping[str, str] | None = None,
    ) -> bool:
        """True when ``value`` is this signer's valid signature of ``payload``."""
        return verify(
            value,
            secret=self._secret,
            payload=payload,
            access_key=self.access_key,
            method=method,
            uri=uri,
            headers=headers,
            content_type=self.content_type,
        )
