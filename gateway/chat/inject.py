"""Rewrite the widget's ``thirdUserData`` so that only the gateway decides who is signed for.

Pure: bytes in, bytes out. The page may send anything; what leaves the gateway carries the
configured tenant and channel, the gateway-owned user id, a cleaned display name, no
``secretKey``, and a signature computed here over exactly those values. Keys that merely look
like an identity field (other case, full-width letters, zero-width characters, separators)
are dropped so that no lenient parser downstream can pick them up instead of ours: the gateway
must never become a signing oracle for another tenant, channel or user.

This module is the reference. ``_native.c`` rewrites the usual body (flat,
plain keys, no secret) in one native call and hands everything else back to it.
"""

from __future__ import annotations

import json
import json.encoder
import json.scanner
import math
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

import orjson

from gateway.errors import BadRequest
from gateway.signing import DEFAULT_URI, Signer, SigningError, epoch_ms

__all__ = [
    "MANAGED_FIELDS",
    "IdentityForcer",
    "InjectionError",
    "RewriteResult",
    "clean_user_name",
    "effective_user_name",
    "force_identity",
    "parse_body",
    "read_body",
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


@lru_cache(maxsize=1024)
def _fold(key: str) -> str:
    """The letters and digits of ``key`` after NFKC and case folding (look-alike detection)."""
    folded = unicodedata.normalize("NFKC", key).casefold()
    return "".join(c for c in folded if c.isalnum())


_FOLDED_MANAGED = {_fold(name): name for name in MANAGED_FIELDS}
_FOLDED_SECRET = _fold(SECRET)


_KEEP, _SECRET, _LOOKALIKE = "keep", "secret", "look-alike"
_KEEP_ALL = frozenset({_KEEP})


@lru_cache(maxsize=1024)
def _verdict(key: str) -> str:
    """What happens to a top-level key: kept, dropped as a secret, dropped as a look-alike."""
    folded = _fold(key)
    if folded == _FOLDED_SECRET:
        return _SECRET
    canonical = _FOLDED_MANAGED.get(folded)
    return _LOOKALIKE if canonical is not None and key != canonical else _KEEP


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


# The reference codec is the standard library's; orjson does the usual body in a fifth of
# the instructions, and is only trusted where it provably gives the same answer (below).
# Built once: json.loads and json.dumps with options construct a new decoder or encoder
# on every call.
_decoder = json.JSONDecoder(parse_constant=_reject_constant)
_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
_decode: Callable[[str], object] = _decoder.decode
_encode: Callable[[object], str] = _encoder.encode
_scanner = getattr(json.scanner, "c_make_scanner", None)
_c_encoder = getattr(json.encoder, "c_make_encoder", None)
if _scanner is not None and _c_encoder is not None:
    # The C scanner and encoder called directly, without the Python layers of
    # JSONDecoder.decode and JSONEncoder.encode around them.
    # The encoder skips the cycle check (markers=None): a parsed document has no cycles.
    _scan = _scanner(_decoder)
    _c_encode = _c_encoder(None, _encoder.default, json.encoder.encode_basestring, None,
                           ":", ",", False, False, False)
    _TRAILING = re.compile(r"[ \t\n\r]*")

    def _decode(text: str) -> object:
        start = _TRAILING.match(text).end()  # type: ignore[union-attr]
        try:
            value, end = _scan(text, start)
        except StopIteration as exc:
            raise json.JSONDecodeError("Expecting value", text, exc.value) from None
        if _TRAILING.match(text, end).end() != len(text):  # type: ignore[union-attr]
            raise json.JSONDecodeError("Extra data", text, end)
        return value

    def _encode(value: object) -> str:
        return "".join(_c_encode(value, 0))

# Types that orjson reads and writes exactly as the json module does. Floats are not among
# them: orjson reads an integer beyond 64 bits as a float (json keeps it exact), writes
# infinity as null (json refuses it) and spells some exponents differently (1e-7, 1e-07).
_EXACT = frozenset({str, int, bool, type(None)})
_SCALARS = frozenset({str, int, float, bool, type(None)})
# Deeper documents go to the json module, which decides alone whether they are too deep
# (orjson reads 1,024 levels, json fewer, and orjson writes only 254).
_EXACT_DEPTH = 64


def _exact(value: object, depth: int = 0) -> bool:
    """True when orjson reads and writes ``value`` as the json module does (see _EXACT)."""
    cls = value.__class__
    if cls is dict:
        items: Iterable[object] = value.values()  # type: ignore[attr-defined]
    elif cls is list:
        items = value  # type: ignore[assignment]
    else:
        return cls in _EXACT
    if _EXACT.issuperset(map(type, items)):
        return True
    return depth < _EXACT_DEPTH and all(_exact(item, depth + 1) for item in items)


# What read_body knows about a document, so that the rewrite and serialize need not look
# again: every value a plain scalar orjson handles exactly; exact with objects or arrays
# inside; or anything else (read by the json module, written by it too).
FLAT, NESTED, OTHER = 0, 1, 2


def _parse_reference(body: bytes) -> dict[str, object]:
    """``parse_body`` with the json module alone: the reference for every decision."""
    if not body.strip():
        raise InjectionError("thirdUserData is empty")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InjectionError("thirdUserData is not UTF-8") from None
    try:
        data = _decode(text)
    except InjectionError:
        raise
    except (ValueError, RecursionError):
        # ValueError covers JSONDecodeError and Python's limit on huge integer literals.
        raise InjectionError("thirdUserData is not valid JSON") from None
    if not isinstance(data, dict):
        raise InjectionError("thirdUserData must be a JSON object")
    return data


def read_body(body: bytes, max_size: int) -> tuple[dict[str, object], int]:
    """``parse_body``, and the document's shape (FLAT, NESTED or OTHER)."""
    if len(body) > max_size:
        raise InjectionError(f"thirdUserData is larger than {max_size} bytes")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _parse_reference(body), OTHER  # rejected, or something orjson does not read
    if data.__class__ is dict:
        if _EXACT.issuperset(map(type, data.values())):
            return data, FLAT
        if _exact(data):
            return data, NESTED
    return _parse_reference(body), OTHER


def parse_body(body: bytes, max_size: int) -> dict[str, object]:
    """The JSON object in ``body``; InjectionError when too big, not UTF-8 JSON or no object.

    The answer is the json module's; orjson gives it faster whenever it cannot differ.
    """
    return read_body(body, max_size)[0]


def _serialize_reference(data: Mapping[str, object]) -> bytes:
    try:
        return _encode(data).encode("utf-8")
    except (UnicodeEncodeError, ValueError):
        raise InjectionError("thirdUserData holds invalid Unicode") from None


def serialize(data: Mapping[str, object], shape: int | None = None) -> bytes:
    """Compact UTF-8 JSON; InjectionError when a string cannot be encoded (lone surrogate).

    The json module's bytes; orjson writes them faster whenever they cannot differ. ``shape``
    is read_body's for a document that has only gained strings and integers since.
    """
    if shape is None:
        shape = NESTED if _exact(data) else OTHER
    if shape != OTHER:
        try:
            return orjson.dumps(data)
        except orjson.JSONEncodeError:
            pass  # an integer beyond 64 bits, a lone surrogate, a key that is not a string
    return _serialize_reference(data)


def _strip_secrets(value: object) -> tuple[object, bool]:
    """``value`` without any key that folds to ``secretkey``, at any depth."""
    if isinstance(value, dict):
        out: dict[str, object] = {}
        stripped = False
        for key, item in value.items():
            if _fold(key) == _FOLDED_SECRET:
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


@lru_cache(maxsize=256)
def _all_kept(keys: tuple[str, ...]) -> bool:
    # The same widget sends the same keys on every page view: one lookup for all of them.
    return all(_verdict(key) is _KEEP for key in keys)


def _unmanaged(data: Mapping[str, object], shape: int) -> tuple[dict[str, object], bool]:
    """The page's keys that are neither a secret nor a look-alike, secrets removed inside."""
    if _all_kept(tuple(data)):
        out = dict(data)  # the usual body: nothing to drop
        stripped = False
    else:
        out = {}
        stripped = False
        for key, value in data.items():
            verdict = _verdict(key)
            if verdict is _KEEP:
                out[key] = value
            elif verdict is _SECRET:
                stripped = True
            # a look-alike of an identity field: never forwarded
    if shape != FLAT and not _SCALARS.issuperset(map(type, out.values())):
        try:
            for key, value in out.items():
                if value.__class__ not in _SCALARS:
                    out[key], inner = _strip_secrets(value)
                    stripped = stripped or inner
        except RecursionError:
            raise InjectionError("thirdUserData is nested too deeply") from None
    return out, stripped


class IdentityForcer:
    """``force_identity`` bound to one channel: what the injection path calls per request."""

    __slots__ = ("channel_config_id", "signer", "tenant_space_id", "uri")

    def __init__(self, tenant_space_id: str, channel_config_id: str, signer: Signer | None,
                 uri: str = DEFAULT_URI) -> None:
        self.tenant_space_id = tenant_space_id
        self.channel_config_id = channel_config_id
        self.signer = signer
        self.uri = uri

    def __repr__(self) -> str:
        return (f"IdentityForcer(tenant={self.tenant_space_id!r},"
                f" channel={self.channel_config_id!r}, signing={self.signer is not None})")

    def force(self, data: Mapping[str, object], shape: int, user_id: str, user_name: str,
              token: str | None, now_ms: int) -> tuple[dict[str, object], bool]:
        """``force_identity``, positional (see there)."""
        out, stripped = _unmanaged(data, shape)
        # Assignment keeps the position of keys the page already sent.
        out[USER_NAME] = user_name
        out[USER_ID] = user_id
        out[TENANT] = self.tenant_space_id
        out[CHANNEL] = self.channel_config_id
        stamp = out.get(TIMESTAMP)
        if stamp.__class__ is not int and (
            not isinstance(stamp, (int, float))  # a tuple: no union object built per call
            or isinstance(stamp, bool)
            or not math.isfinite(stamp)
        ):
            out[TIMESTAMP] = now_ms
        if token is not None:
            out[TOKEN] = token
        signer = self.signer
        if signer is not None:
            try:
                out[AUTHORIZATION] = signer.sign_at(out, now_ms, self.uri)
            except SigningError as exc:
                raise InjectionError(str(exc)) from None
            except UnicodeEncodeError:
                raise InjectionError("thirdUserData holds invalid Unicode") from None
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
    shape: int = OTHER,
) -> tuple[dict[str, object], bool]:
    """``rewrite_data`` with the final ``thirdUserName`` already chosen, time in epoch ms.

    ``shape`` is read_body's for ``data`` (OTHER when unknown).
    """
    forcer = IdentityForcer(tenant_space_id, channel_config_id, signer, uri)
    return forcer.force(data, shape, user_id, user_name, token, now_ms)


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
    - with ``token``: ``thirdUserToken`` = ``token``.
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
