"""Rewrite the widget's ``thirdUserData`` so that only the gateway decides who is signed for.

Pure: bytes in, bytes out. The page may send anything; what leaves the gateway carries the
configured tenant and channel, the gateway-owned user id, a cleaned display name, no
``secretKey``, only the credential the gateway itself sets in this mode (the signature in
authorization mode, the token in token mode), and a signature computed here over exactly
those values. Keys that merely look like an identity field are dropped so that no lenient
parser downstream can pick them up instead of ours: the gateway must never become a signing
oracle for another tenant, channel or user.
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

from gateway.errors import BadRequest
from gateway.signing import DEFAULT_URI, Signer, SigningError, epoch_ms

__all__ = [
    "MANAGED_FIELDS",
    "InjectionError",
    "RewriteResult",
    "clean_user_name",
    "effective_user_name",
    "fold_key",
    "force_identity",
    "parse_body",
    "rewrite_data",
    "rewrite_third_user_data",
    "serialize",
]

TENANT = "tenantSpaceId"
CHANNEL = "channelConfigId"
USER_ID = "thirdUserId"
USER_NAME = "thirdUserName"
AUTHORIZATION = "thirdPartAuthorization"
TOKEN = "thirdUserToken"  # noqa: S105 - a field name
TIMESTAMP = "timestamp"
SECRET = "secretKey"  # noqa: S105 - a field name
MANAGED_FIELDS: tuple[str, ...] = (TENANT, CHANNEL, USER_ID, USER_NAME, AUTHORIZATION, TOKEN)

# Invisible formatting characters that only serve to disguise a name (bidi overrides,
# zero-width spaces, BOM); they are removed outright.
_INVISIBLE = frozenset(
    "\u061c\u180e\u200b\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
    "\u2060\u2061\u2062\u2063\u2064\u2066\u2067\u2068\u2069\ufeff"
)
# Categories turned into a single space: controls, line/paragraph separators, lone surrogates.
_SEPARATOR_CATEGORIES = frozenset({"Cc", "Zl", "Zp", "Cs"})


class InjectionError(BadRequest):
    """The page's ``thirdUserData`` cannot be used (answered 400 with this short reason)."""


@dataclass(frozen=True)
class RewriteResult:
    """The body to forward, and whether a ``secretKey`` had to be removed from it."""

    body: bytes
    stripped_secret: bool


def fold_key(key: str) -> str:
    """``key`` as the most lenient parser downstream could compare it (look-alike detection).

    Compatibility decomposition (full-width forms, ligatures, the Kelvin sign, long s),
    then upper case and full case folding, so that letters which only an upper-casing maps
    onto ASCII (dotless i U+0131, as Java's ``equalsIgnoreCase`` and JavaScript's
    ``toUpperCase`` do) fold like their ASCII twins; then only letters and digits are kept
    (accents, zero-width and separator characters dropped, as accent-insensitive
    collations and "normalising" parsers do).
    """
    # A widget sends the same few short keys on every page view; long (page-chosen) keys
    # are folded each time rather than kept.
    return _fold_short(key) if len(key) <= 64 else _fold(key)


def _fold(key: str) -> str:
    text = unicodedata.normalize("NFKD", unicodedata.normalize("NFKD", key).upper().casefold())
    return "".join(c for c in text if c.isalnum())


_fold_short = lru_cache(maxsize=1024)(_fold)


_FOLDED_MANAGED = {fold_key(name): name for name in MANAGED_FIELDS}
_FOLDED_SECRET = fold_key(SECRET)


def clean_user_name(value: object, max_length: int) -> str:
    """A display name fit to sign: trimmed, control runs collapsed, at most ``max_length``.

    Non-strings give ``""``. Idempotent, so cleaning an already clean name changes nothing.
    """
    if not isinstance(value, str):
        return ""
    if value.isascii() and value.isprintable() and "  " not in value:
        # Plain ASCII with no control characters and no space runs: nothing to collapse.
        return value.strip()[: max(max_length, 0)].strip()
    out: list[str] = []
    pending_space = False
    for ch in value:
        if ch in _INVISIBLE:
            continue
        if unicodedata.category(ch) in _SEPARATOR_CATEGORIES:
            pending_space = True
            continue
        if pending_space:
            out.append(" ")
            pending_space = False
        out.append(ch)
    return "".join(out).strip()[: max(max_length, 0)].strip()


def effective_user_name(
    data: Mapping[str, object],
    user_name: str | None,
    default_user_name: str,
    max_name_length: int,
) -> str:
    """The ``thirdUserName`` that will be signed.

    A logged-in identity's name wins; otherwise the page's value, cleaned; otherwise the
    default (cleaned too).
    """
    if user_name is not None:
        name = clean_user_name(user_name, max_name_length)
        if name:
            return name
    name = clean_user_name(data.get(USER_NAME), max_name_length)
    return name or clean_user_name(default_user_name, max_name_length)


def _reject_constant(name: str) -> object:
    raise InjectionError(f"JSON constant {name} is not allowed")


_decoder = json.JSONDecoder(parse_constant=_reject_constant)
# A parsed document has no reference cycles to look for.
_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False,
                            check_circular=False)


def parse_body(body: bytes, max_size: int) -> dict[str, object]:
    """The JSON object in ``body``; InjectionError when too big, not UTF-8 JSON or no object."""
    if len(body) > max_size:
        raise InjectionError(f"thirdUserData is larger than {max_size} bytes")
    if not body.strip():
        raise InjectionError("thirdUserData is empty")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InjectionError("thirdUserData is not UTF-8") from None
    try:
        data = _decoder.decode(text)
    except (ValueError, RecursionError):
        # ValueError covers JSONDecodeError and Python's limit on huge integer literals.
        raise InjectionError("thirdUserData is not valid JSON") from None
    if not isinstance(data, dict):
        raise InjectionError("thirdUserData must be a JSON object")
    return data


def serialize(data: Mapping[str, object]) -> bytes:
    """Compact UTF-8 JSON; InjectionError when a value cannot be written back."""
    try:
        return _encoder.encode(data).encode("utf-8")
    except UnicodeEncodeError:
        raise InjectionError("thirdUserData holds invalid Unicode") from None
    except ValueError:
        raise InjectionError("thirdUserData holds a number out of range") from None
    except RecursionError:
        raise InjectionError("thirdUserData is nested too deeply") from None


def _strip_secrets(value: object) -> tuple[object, bool]:
    """``value`` without any key that folds to ``secretkey``, at any depth."""
    if isinstance(value, dict):
        out: dict[str, object] = {}
        stripped = False
        for key, item in value.items():
            if fold_key(key) == _FOLDED_SECRET:
                stripped = True
                continue
            out[key], inner = _strip_secrets(item)
            stripped = stripped or inner
        return out, stripped
    if isinstance(value, list):
        items = []
        stripped = False
        for item in value:
            clean, inner = _strip_secrets(item)
            items.append(clean)
            stripped = stripped or inner
        return items, stripped
    return value, False


def _unmanaged(data: Mapping[str, object]) -> tuple[dict[str, object], bool]:
    """The page's keys that are neither a secret nor a look-alike, secrets removed inside."""
    out: dict[str, object] = {}
    stripped = False
    try:
        for key, value in data.items():
            folded = fold_key(key)
            if folded == _FOLDED_SECRET:
                stripped = True
            elif _FOLDED_MANAGED.get(folded, key) != key:
                pass  # a look-alike of an identity field: never forwarded
            elif isinstance(value, (dict, list)):
                out[key], inner = _strip_secrets(value)
                stripped = stripped or inner
            else:
                out[key] = value
    except RecursionError:
        raise InjectionError("thirdUserData is nested too deeply") from None
    return out, stripped


def force_identity(
    data: Mapping[str, object],
    *,
    tenant_space_id: str,
    channel_config_id: str,
    user_id: str,
    user_name: str,
    signer: Signer | None,
    token: str | None,
    now_ms: int,
    uri: str = DEFAULT_URI,
) -> tuple[dict[str, object], bool]:
    """``rewrite_data`` with the final ``thirdUserName`` already chosen, time in epoch ms."""
    out, stripped = _unmanaged(data)
    # Assignment keeps the position of keys the page already sent.
    out[USER_NAME] = user_name
    out[USER_ID] = user_id
    out[TENANT] = tenant_space_id
    out[CHANNEL] = channel_config_id
    stamp = out.get(TIMESTAMP)
    if not isinstance(stamp, (int, float)) or isinstance(stamp, bool) or not math.isfinite(stamp):
        out[TIMESTAMP] = now_ms
    # Only the credential the gateway sets in this mode reaches the CEC: a page's own
    # signature next to an injected token (or its token next to our signature) would let
    # the CEC pick the page's.
    if token is None:
        out.pop(TOKEN, None)
    else:
        out[TOKEN] = token
    if signer is None:
        out.pop(AUTHORIZATION, None)
    else:
        try:
            out[AUTHORIZATION] = signer.sign_fields(
                out, timestamp=signer.timestamp_at(now_ms), uri=uri)
        except SigningError as exc:
            raise InjectionError(str(exc)) from None
        except UnicodeEncodeError:
            raise InjectionError("thirdUserData holds invalid Unicode") from None
    return out, stripped


def rewrite_data(
    data: Mapping[str, object],
    *,
    tenant_space_id: str,
    channel_config_id: str,
    user_id: str,
    user_name: str | None,
    default_user_name: str,
    max_name_length: int,
    signer: Signer | None,
    token: str | None,
    now: datetime,
    uri: str = DEFAULT_URI,
) -> tuple[dict[str, object], bool]:
    """The rewritten object and whether a secret was stripped (see ``rewrite_third_user_data``)."""
    return force_identity(
        data,
        tenant_space_id=tenant_space_id,
        channel_config_id=channel_config_id,
        user_id=user_id,
        user_name=effective_user_name(data, user_name, default_user_name, max_name_length),
        signer=signer,
        token=token,
        now_ms=epoch_ms(now),
        uri=uri,
    )


def rewrite_third_user_data(
    body: bytes,
    *,
    tenant_space_id: str,
    channel_config_id: str,
    user_id: str,
    user_name: str | None,
    default_user_name: str,
    max_name_length: int,
    max_size: int,
    signer: Signer | None,
    token: str | None,
    now: datetime,
    uri: str = DEFAULT_URI,
) -> RewriteResult:
    """Force the identity in a ``thirdUserData`` body and sign it.

    - ``tenantSpaceId``, ``channelConfigId`` and ``thirdUserId`` are forced;
    - ``thirdUserName``: ``user_name`` (logged-in) wins, else the page's value cleaned,
      else ``default_user_name``;
    - ``secretKey`` (any spelling, any depth) is removed; look-alike identity keys too;
    - ``timestamp`` is kept when numeric, else set to ``now`` in epoch milliseconds;
    - with ``signer``: ``thirdPartAuthorization`` = a signature at ``now`` for ``uri``;
      without: the page's ``thirdPartAuthorization`` is removed;
    - with ``token``: ``thirdUserToken`` = ``token``; without: the page's is removed.
    """
    data = parse_body(body, max_size)
    out, stripped = rewrite_data(
        data,
        tenant_space_id=tenant_space_id,
        channel_config_id=channel_config_id,
        user_id=user_id,
        user_name=user_name,
        default_user_name=default_user_name,
        max_name_length=max_name_length,
        signer=signer,
        token=token,
        now=now,
        uri=uri,
    )
    return RewriteResult(body=serialize(out), stripped_secret=stripped)
