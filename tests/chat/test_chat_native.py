"""The native injection rewrite (``gateway/chat/_native.c``) against its Python reference.

``FlatRewriter.rewrite`` either declines a body (None: ``inject.py`` then handles it) or must
give back exactly the bytes the Python path (``read_body``, ``IdentityForcer.force``,
``serialize``) produces for the same guest id and instant. A native path that differs by one
byte forwards a different identity or signature than the reference decided on; a native path
that declines everything is silently useless. Both are checked here: equality on arbitrary
(often invalid) bodies, coverage on the subset the C file promises to handle, the signature
itself with two verifiers, the signing-key cache across milliseconds, and the wiring through
``ChatEndpoints.rewrite_now``.

The module is skipped when the extension is not built, unless ``GATEWAY_REQUIRE_NATIVE=1``
(CI images that build it), where its absence is a failure.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from gateway.chat.endpoints import NEW_CLIENT_SUFFIX, ChatEndpoints, signer_from_config
from gateway.chat.guest import GuestCookies
from gateway.chat.inject import (
    IdentityForcer,
    InjectionError,
    clean_user_name,
    read_body,
    serialize,
)
from gateway.config import CecAuth, CecConfig, CecGuest
from gateway.sandbox.authv2 import AuthV2Verifier
from gateway.signing import DEFAULT_TIMESTAMP_FORMAT, Signer, signed_payload

if TYPE_CHECKING:
    from gateway.chat._native import FlatRewriter


# ---------------------------------------------------------------------------- the module


def load_native() -> ModuleType:
    """``gateway.chat._native``: skip the module when it is not built, unless required."""
    if os.environ.get("GATEWAY_REQUIRE_NATIVE") != "1":
        module: ModuleType = pytest.importorskip(
            "gateway.chat._native",
            reason="the native rewrite is not built (needs gcc and OpenSSL headers, libssl-dev)",
        )
        return module
    try:
        import gateway.chat._native as native
    except ImportError as exc:
        missing = exc
    else:
        return native
    pytest.fail(
        f"GATEWAY_REQUIRE_NATIVE=1 but the native rewrite was not built ({missing}): building "
        "gateway/chat/_native.c needs gcc and OpenSSL headers (libssl-dev); install them and "
        "run `./dev setup` (or `pip install -e .`) again",
        pytrace=False,
    )


_native = load_native()


# ---------------------------------------------------------------------------- constants

SECRET = "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5bC7dE9f"
TENANT = "202007159031"
CHANNEL = "202011230001"
CONTEXT = "/service-cloud"
URI = CONTEXT + NEW_CLIENT_SUFFIX
USER = "guest-0123456789abcdef0123"
NOW = datetime(2026, 11, 24, 8, 30, 15, 123000, tzinfo=UTC)
NOW_MS = 1795509015123
COOKIE_KEY = b"cookie-key-for-tests-0123456789"

IDENTITY_KEYS = (
    "thirdUserName", "thirdUserId", "tenantSpaceId", "channelConfigId",
    "thirdPartAuthorization", "thirdUserToken",
)
LOOK_ALIKES = (
    "ThirdUserId", "third_user_id", "tenantspaceid", "thirdUser\u2160d", "THIRDUSERNAME",
    "thirdUser\u200bName", "channel-config-id", "secretKey", "SECRET-KEY", "secret_key",
    "\uff53ecretKey",
)
_FOLDED_SPECIAL = {
    "".join(c for c in k.lower() if c.isalnum()) for k in (*IDENTITY_KEYS, "secretKey")
}


# ---------------------------------------------------------------------------- reference


def default_name(user_id: str) -> str:
    """ChatEndpoints.default_user_name for a guest."""
    return "Guest-" + user_id.removeprefix("guest-")[:6]


@dataclass
class Pair:
    """One signing configuration: the native rewriter and the Python reference for it."""

    label: str
    signer: Signer
    name_limit: int
    native: FlatRewriter = field(init=False)
    forcer: IdentityForcer = field(init=False)

    def __post_init__(self) -> None:
        native = self.signer.flat_rewriter(TENANT, CHANNEL, URI, self.name_limit)
        assert native is not None, f"no native rewriter for {self.label}"
        self.native = native
        self.forcer = IdentityForcer(TENANT, CHANNEL, self.signer, URI)

    def __repr__(self) -> str:
        return f"Pair({self.label})"

    def fresh(self) -> Pair:
        """The same configuration with new objects (an empty signing-key cache)."""
        s = self.signer
        return Pair(self.label, Signer(
            s.access_key, SECRET, signed_headers=s.signed_headers, content_type=s.content_type,
            payload_fields=s.payload_fields, timestamp_format=s.timestamp_format,
        ), self.name_limit)

    def reference(self, body: bytes, user_id: str, now_ms: int) -> bytes:
        """What ChatEndpoints(native=False).rewrite_now forwards for a guest (or raises).

        No size limit: rewrite_now refuses a large body before either path sees it.
        """
        data, shape = read_body(body, len(body))
        name = (clean_user_name(data.get("thirdUserName"), self.name_limit)
                or clean_user_name(default_name(user_id), self.name_limit))
        out, _ = self.forcer.force(data, shape, user_id, name, None, now_ms)
        return serialize(out, shape)


def make_pairs() -> list[Pair]:
    return [
        Pair("default", Signer(CHANNEL, SECRET), 64),
        Pair("name limit 6", Signer(CHANNEL, SECRET), 6),
        Pair("name limit 1", Signer(CHANNEL, SECRET), 1),
        Pair("name limit 256", Signer(CHANNEL, SECRET), 256),
        Pair("type only, two fields reordered", Signer(
            "ak-1", SECRET, signed_headers=("Content-Type",),
            content_type="application/json; charset=utf-8",
            payload_fields=("thirdUserId", "thirdUserName"),
        ), 64),
        Pair("length only, compact timestamp", Signer(
            "ak 2", SECRET, signed_headers=(" content-length ",),
            payload_fields=("channelConfigId", "tenantSpaceId", "thirdUserId"),
            timestamp_format="%Y/%m/%d %H:%M:%S {ms}",
        ), 64),
    ]


PAIRS = make_pairs()
DEFAULT = PAIRS[0]


def check_equal(pair: Pair, body: bytes, user_id: str, now_ms: int) -> bytes | None:
    """The native answer, asserted to be None or the reference's bytes (None on a 400)."""
    got = pair.native.rewrite(body, user_id, now_ms)
    try:
        want = pair.reference(body, user_id, now_ms)
    except InjectionError as exc:
        assert got is None, f"native rewrote a body the reference refuses ({exc}): {got!r}"
        return None
    assert got is None or got == want, (
        f"native differs from the reference for {pair!r}\nbody:      {body!r}\n"
        f"user_id:   {user_id!r}\nnow_ms:    {now_ms}\nnative:    {got!r}\n"
        f"reference: {want!r}"
    )
    return got


def unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), f"duplicate keys in output: {keys}"
    return dict(pairs)


def decode(body: bytes) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(body.decode("utf-8"), object_pairs_hook=unique_pairs)
    return out


# ---------------------------------------------------------------------------- strategies

WS = st.text(alphabet=" \t\n\r", max_size=3)
PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
PLAIN = st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters='"\\')
NOW_MSS = st.one_of(st.just(NOW_MS), st.integers(0, 4_102_444_800_000),
                    st.integers(-10**11, 0))


def literal(text: str, *, ascii_only: bool = False) -> str:
    """A JSON string literal for ``text`` (raw UTF-8 unless ``ascii_only``)."""
    return json.dumps(text, ensure_ascii=ascii_only)


ESCAPED_KEYS = (
    '"\\u0041"', '"thirdUser\\u004eame"', '"secret\\u004bey"', '"time\\u0073tamp"',
    '"\\u00e9"', '"a\\"b"', '"tab\\t"', '"\\/"',
)
raw_keys = st.one_of(
    st.sampled_from((*IDENTITY_KEYS, "timestamp")).map(literal),
    st.sampled_from(LOOK_ALIKES).map(literal),
    st.sampled_from(LOOK_ALIKES).map(lambda k: literal(k, ascii_only=True)),
    st.text(PRINTABLE, max_size=10).map(literal),
    st.text(min_size=1, max_size=6).map(literal),
    st.sampled_from(ESCAPED_KEYS),
)

NAMES = (
    "Alice", "  Alice  ", "Al  ice", "   ", "", " a ", "\u5f20\u4e09", "\U0001f600 emoji",
    "x" * 300, " " + "y" * 5 + " z", "Ann\x7f", "a\u2028b", "\u200bBob", "Bob\u202e",
    "ab cdef", "abcde f",
)
ESCAPED_STRINGS = (
    '"a\\nb"', '"\\"q\\""', '"back\\\\slash"', '"\\u00e9t\\u00e9"', '"\\ud800"',
    '"x\\ud83d\\ude00"', '"\\/"', '"\\u0000"', '"Bob\\u007f"', '"\\t Tab"', '"\\u0041lice"',
    '"a\x7fb"', '"\x7f"',
)
string_values = st.one_of(
    st.text(PRINTABLE, max_size=20).map(literal),
    st.text(max_size=12).map(literal),
    st.text(max_size=12).map(lambda s: literal(s, ascii_only=True)),
    st.sampled_from(NAMES).map(literal),
    st.sampled_from(ESCAPED_STRINGS),
    st.integers(0, 300).map(lambda n: literal("n" * n)),
)
RAW_NUMBERS = (
    "0", "-0", "01", "-01", "00", "1.5", "1e5", "-0.0", "1E+2", "0.5e-3", "1e400", "-", "+1",
    ".5", "1.", "123456789012345678", "-12345678901234567", "-123456789012345678",
    "1234567890123456789", "9223372036854775807", "-9223372036854775808",
    "18446744073709551616", "9" * 30, "0x10",
)
numbers = st.one_of(st.integers().map(str), st.integers(-(10**20), 10**20).map(str),
                    st.sampled_from(RAW_NUMBERS))
literals = st.sampled_from(
    ("true", "false", "null", "True", "nul", "NaN", "Infinity", "-Infinity", "truex"))
json_leaves = (st.none() | st.booleans() | st.integers()
               | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=5))
nested_keys = st.sampled_from(("a", "secretKey", "SECRET_KEY", "thirdUserId", "b")) | st.text(
    max_size=3)
nested = st.one_of(
    st.recursive(
        json_leaves,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(nested_keys, inner,
                                                                    max_size=3),
        max_leaves=8,
    ).filter(lambda v: isinstance(v, list | dict)).map(
        lambda v: json.dumps(v, ensure_ascii=False)),
    st.sampled_from(('{"secretKey":"s"}', '[{"secretKey":1}]', "{}", "[]", "[1, 2 ,3]",
                     '{"a" : {"b":[]}}')),
)
raw_values = st.one_of(string_values, numbers, literals, nested)

GUEST_IDS = st.text("0123456789abcdef", min_size=20, max_size=20).map(lambda h: "guest-" + h)
OTHER_IDS = st.sampled_from((
    "guest-", "guest-ab", "user-42", "", "guest-  a  b  ", "  guest-x", 'guest-a"b',
    "guest-\\x", "guest-\u00e9", "guest-\U0001f600", "guest-\x7f", "guest-a\tb",
    "guest-" + "x" * 600, "Guest-Already", "guest- ", "guest-     x",
))
user_ids = st.one_of(GUEST_IDS, OTHER_IDS, st.text(PRINTABLE, max_size=30))
plain_user_ids = st.one_of(GUEST_IDS, st.text(PLAIN, max_size=30))


@st.composite
def object_text(draw: st.DrawFn, members: list[tuple[str, str]]) -> str:
    """``members`` (raw key, raw value) as an object with random whitespace everywhere."""
    parts = []
    for i, (key, value) in enumerate(members):
        sep = f"{draw(WS)},{draw(WS)}" if i else ""
        parts.append(f"{sep}{key}{draw(WS)}:{draw(WS)}{value}")
    return f"{draw(WS)}{{{draw(WS)}{''.join(parts)}{draw(WS)}}}{draw(WS)}"


# Invalid UTF-8 (bad lead, overlong, surrogate, cut, stray continuation, past U+10FFFF) and
# raw bytes that are invalid in JSON except inside a string (DEL).
BAD_BYTES = (b"\xff", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80", b"\xe4\xb8", b"\x80",
             b"\xf4\x90\x80\x80", b"\x1f", b"\x00", b"\x7f")


@st.composite
def any_bodies(draw: st.DrawFn) -> bytes:
    """Objects of every kind of key and value, sometimes duplicated, sometimes broken."""
    members = draw(st.lists(st.tuples(raw_keys, raw_values), max_size=8))
    duplicate = draw(st.booleans())
    if members and duplicate:
        key = draw(st.sampled_from(members))[0]
        members.insert(draw(st.integers(0, len(members))), (key, draw(raw_values)))
    text = draw(object_text(members))
    mutation = draw(st.sampled_from(
        ("keep",) * 6 + ("truncate", "append", "trailing comma", "bad byte")))
    if mutation == "truncate":
        text = text[:draw(st.integers(0, len(text) - 1))]
    elif mutation == "append":
        text += draw(st.sampled_from(("x", "}", ",", "{}", "\x00", "\f", "\u00a0", " //")))
    elif mutation == "trailing comma":
        at = text.rindex("}")
        text = text[:at] + "," + text[at:]
    body = text.encode("utf-8")
    if mutation == "bad byte":
        at = draw(st.integers(0, len(body)))
        bad = draw(st.sampled_from(BAD_BYTES))
        body = body[:at] + bad + body[at:]
    return body


def _subset_key(key: str) -> bool:
    folded = "".join(c for c in key.lower() if c.isalnum())
    return folded not in _FOLDED_SPECIAL


subset_keys = st.text(PLAIN, max_size=12).filter(_subset_key)
subset_strings = st.one_of(
    st.text(PLAIN, max_size=30),
    st.text(st.characters(codec="utf-8", min_codepoint=0x20,
                          exclude_characters='"\\'), max_size=12),
    st.integers(0, 3000).map(lambda n: "v" * n),
)
subset_ints = st.integers(-(10**18) + 1, 10**18 - 1)  # at most 18 digits
subset_values = st.one_of(
    subset_strings.map(lambda s: f'"{s}"'),
    subset_ints.map(str),
    st.sampled_from(("true", "false", "null")),
)
subset_names = st.one_of(st.text(PLAIN, max_size=300), st.sampled_from(NAMES[:6]))


@st.composite
def subset_bodies(draw: st.DrawFn) -> bytes:
    """Bodies the native rewrite promises to handle (see the header of _native.c)."""
    members: dict[str, str] = {}
    for key in draw(st.lists(subset_keys, max_size=12, unique=True)):
        members[key] = draw(subset_values)
    for name in draw(st.sets(st.sampled_from((*IDENTITY_KEYS, "timestamp")))):
        if name == "thirdUserName":
            members[name] = f'"{draw(subset_names)}"'
        elif name == "timestamp":
            members[name] = draw(subset_values | subset_ints.map(str))
        else:
            members[name] = draw(subset_values)
    items = list(members.items())
    order = draw(st.permutations(range(len(items))))
    return draw(object_text([(f'"{items[i][0]}"', items[i][1]) for i in order])).encode()


EQUALITY = settings(max_examples=400, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
COVERAGE = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------- 1. equality


@EQUALITY
@given(pair=st.sampled_from(PAIRS), body=any_bodies() | subset_bodies(), user_id=user_ids,
       now_ms=NOW_MSS)
@example(pair=DEFAULT, body=b' {"thirdUserName" : "  Al  ice ", "a":1}\r\n', user_id=USER,
         now_ms=NOW_MS)
@example(pair=PAIRS[1], body=b'{"thirdUserName":"abcde f"}', user_id=USER, now_ms=NOW_MS)
@example(pair=DEFAULT, body=b'{"thirdUser\\u004eame":"x"}', user_id=USER, now_ms=NOW_MS)
@example(pair=DEFAULT, body=b'{"a":1,"a":2}', user_id=USER, now_ms=NOW_MS)
def test_native_is_none_or_the_reference(pair: Pair, body: bytes, user_id: str,
                                         now_ms: int) -> None:
    check_equal(pair, body, user_id, now_ms)


# ---------------------------------------------------------------------------- 2. coverage


@COVERAGE
@given(pair=st.sampled_from(PAIRS), body=subset_bodies(), user_id=plain_user_ids,
       now_ms=NOW_MSS)
@example(pair=DEFAULT, body=b"{}", user_id=USER, now_ms=NOW_MS)
@example(pair=DEFAULT, body=b'{"a":999999999999999999,"b":-999999999999999999}', user_id=USER,
         now_ms=NOW_MS)
def test_native_handles_its_subset(pair: Pair, body: bytes, user_id: str, now_ms: int) -> None:
    got = check_equal(pair, body, user_id, now_ms)
    assert got is not None, f"native declined a body in its subset: {body!r} for {user_id!r}"


def test_subset_boundary_64_members() -> None:
    """The C parser keeps at most 64 members; a body of that size is still native."""
    body = json.dumps({f"k{i}": i for i in range(64)}).encode()
    assert check_equal(DEFAULT, body, USER, NOW_MS) is not None
    bigger = json.dumps({f"k{i}": i for i in range(65)}).encode()
    check_equal(DEFAULT, bigger, USER, NOW_MS)  # may decline, must not differ


def test_large_bodies_use_heap_buffers() -> None:
    """Payload, canonical request and body past their stack buffers (512/1024/2048 bytes)."""
    pair = next(p for p in PAIRS if p.name_limit == 256)
    name = "!( )*" * 60  # every byte percent-encoded: the canonical request triples
    user_id = "guest-" + "z" * 700
    body = json.dumps({"thirdUserName": name, "big": "b" * 5000, "n": 7}).encode()
    got = check_equal(pair, body, user_id, NOW_MS)
    assert got is not None
    out = decode(got)
    assert out["thirdUserName"] == name[:256].strip()
    assert out["thirdUserId"] == user_id


@pytest.mark.parametrize("number", [b"-123456789012345678", b"-999999999999999999",
                                    b"999999999999999999"])
def test_18_digit_integers_are_native(number: bytes) -> None:
    """18 digits whatever the sign (the sign is not a digit)."""
    assert check_equal(DEFAULT, b'{"a":' + number + b"}", USER, NOW_MS) is not None


# ---------------------------------------------------------------------------- 3. signature


def assert_signature_verifies(pair: Pair, output: bytes, now_ms: int) -> None:
    out = decode(output)
    signer = pair.signer
    value = out["thirdPartAuthorization"]
    payload = signed_payload(out, signer.payload_fields)
    assert signer.verify(value, payload, uri=URI)
    assert not signer.verify(value, payload, uri=URI + "x")
    if signer.timestamp_format == DEFAULT_TIMESTAMP_FORMAT:
        verifier = AuthV2Verifier(
            access_key=signer.access_key, secret_key=SecretStr(SECRET),
            signed_headers=signer.signed_headers, content_type=signer.content_type,
            payload_fields=signer.payload_fields, clock=lambda: now_ms / 1000,
        )
        parsed = verifier.verify(value, method="POST", uri=URI, body=out)
        assert parsed.timestamp == signer.timestamp_at(now_ms)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(pair=st.sampled_from(PAIRS), body=subset_bodies(), user_id=plain_user_ids,
       now_ms=st.integers(946_684_800_000, 4_102_444_800_000))
def test_native_signature_verifies(pair: Pair, body: bytes, user_id: str, now_ms: int) -> None:
    got = pair.native.rewrite(body, user_id, now_ms)
    assert got is not None
    assert_signature_verifies(pair, got, now_ms)
    out = decode(got)
    assert out["tenantSpaceId"] == TENANT
    assert out["channelConfigId"] == CHANNEL
    assert out["thirdUserId"] == user_id


def test_signature_of_the_usual_body() -> None:
    body = b'{"thirdUserName":"Alice","language":"zh","source":"web"}'
    got = DEFAULT.native.rewrite(body, USER, NOW_MS)
    assert got is not None
    assert_signature_verifies(DEFAULT, got, NOW_MS)
    out = decode(got)
    assert out["thirdPartAuthorization"].startswith(
        f"auth-v2/{CHANNEL}/2026-11-24T08:30:15.123Z/content-length;content-type/")
    assert out["timestamp"] == NOW_MS


# ---------------------------------------------------------------------------- 4. key cache


CACHE_BODIES = (b"{}", b'{"thirdUserName":"Alice","a":1}', b'{"timestamp":5,"x":"y"}')


def cache_sequence(start: int) -> list[int]:
    """Same ms, next ms, across a second boundary, then back in time (twice)."""
    boundary = start - start % 1000 + 999
    return [start, start, start + 1, boundary, boundary, boundary + 1, boundary + 1,
            boundary, start - 1, start - 86_400_000, start - 86_400_000, start + 1, start]


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: p.label)
def test_signing_key_cache(pair: Pair) -> None:
    pair = pair.fresh()
    for i, ms in enumerate(cache_sequence(NOW_MS)):
        for body in CACHE_BODIES:
            # A new reference each time: nothing cached on the Python side either.
            want = pair.fresh().reference(body, USER, ms)
            got = pair.native.rewrite(body, USER, ms)
            assert got == want, f"step {i}, ms {ms}, body {body!r}"


@settings(max_examples=60, deadline=None)
@given(start=st.integers(946_684_800_000, 4_102_444_800_000),
       steps=st.lists(st.tuples(st.integers(-2500, 2500), st.sampled_from(CACHE_BODIES),
                                GUEST_IDS), min_size=1, max_size=12))
def test_signing_key_cache_random_walk(start: int,
                                       steps: list[tuple[int, bytes, str]]) -> None:
    pair = DEFAULT.fresh()
    ms = start
    for delta, body, user_id in steps:
        ms += delta
        assert pair.native.rewrite(body, user_id, ms) == pair.fresh().reference(
            body, user_id, ms)


def test_timestamp_out_of_range_raises_on_both_paths() -> None:
    pair = DEFAULT.fresh()
    with pytest.raises(OverflowError):
        pair.native.rewrite(b"{}", USER, 10**17)
    with pytest.raises(OverflowError):
        pair.reference(b"{}", USER, 10**17)
    # A failed key derivation leaves the cache usable.
    assert pair.native.rewrite(b"{}", USER, NOW_MS) == pair.reference(b"{}", USER, NOW_MS)


# ---------------------------------------------------------------------------- 5. cases

REFUSED = {
    "empty": b"",
    "whitespace only": b" \t\r\n ",
    "array": b"[]",
    "string": b'"x"',
    "number": b"1",
    "truncated value": b'{"a":"b"',
    "truncated after colon": b'{"a":',
    "truncated key": b'{"a',
    "open brace": b"{",
    "trailing garbage": b'{"a":1}x',
    "two objects": b"{}{}",
    "trailing comma": b'{"a":1,}',
    "BOM prefix": b"\xef\xbb\xbf{}",
    "invalid byte": b'{"a":"\xff"}',
    "overlong": b'{"a":"\xc0\xaf"}',
    "encoded surrogate": b'{"a":"\xed\xa0\x80"}',
    "cut sequence": b'{"a":"\xe4\xb8"}',
    "invalid byte in key": b'{"\xff":1}',
    "leading zero": b'{"a":01}',
    "raw control": b'{"a":"\x01"}',
    "raw unit separator": b'{"a":"\x1f"}',
    "raw newline in key": b'{"a\nb":1}',
    "NaN": b'{"a":NaN}',
    "lone surrogate escape": b'{"a":"\\ud800"}',
    "form feed after": b'{"a":1}\f',
    "form feed before": b"\f{}",
    "form feed inside": b'{"a"\f:1}',
    "vertical tab": b"{\v}",
    "no-break space": b"{}\xc2\xa0",
    "comment": b'{"a":1} //',
}


@pytest.mark.parametrize("body", REFUSED.values(), ids=REFUSED.keys())
def test_refused_bodies_are_declined(body: bytes) -> None:
    assert DEFAULT.native.rewrite(body, USER, NOW_MS) is None
    with pytest.raises(InjectionError):
        DEFAULT.reference(body, USER, NOW_MS)


def test_empty_object() -> None:
    got = check_equal(DEFAULT, b" {\n} ", USER, NOW_MS)
    assert got is not None
    assert list(decode(got)) == [
        "thirdUserName", "thirdUserId", "tenantSpaceId", "channelConfigId", "timestamp",
        "thirdPartAuthorization"]
    assert decode(got)["thirdUserName"] == "Guest-012345"


def test_page_authorization_and_timestamp_keep_their_position() -> None:
    body = b'{"timestamp":1,"thirdPartAuthorization":"forged","a":"b","thirdUserId":"evil"}'
    got = check_equal(DEFAULT, body, USER, NOW_MS)
    assert got is not None
    out = decode(got)
    assert list(out) == ["timestamp", "thirdPartAuthorization", "a", "thirdUserId",
                         "thirdUserName", "tenantSpaceId", "channelConfigId"]
    assert out["timestamp"] == 1
    assert out["thirdPartAuthorization"] != "forged"
    assert out["thirdUserId"] == USER
    assert_signature_verifies(DEFAULT, got, NOW_MS)


@pytest.mark.parametrize("stamp", [b"0", b"1700000000000", b"-5", b"123456789012345678"])
def test_integer_timestamp_is_kept(stamp: bytes) -> None:
    got = check_equal(DEFAULT, b'{"timestamp":' + stamp + b"}", USER, NOW_MS)
    assert got is not None
    assert decode(got)["timestamp"] == int(stamp)


@pytest.mark.parametrize("stamp", [b'"2020-01-01"', b'""', b"true", b"false", b"null"])
def test_other_timestamp_is_replaced_in_place(stamp: bytes) -> None:
    got = check_equal(DEFAULT, b'{"a":1,"timestamp":' + stamp + b',"b":2}', USER, NOW_MS)
    assert got is not None
    out = decode(got)
    assert out["timestamp"] == NOW_MS
    assert list(out)[:3] == ["a", "timestamp", "b"]


def test_page_token_is_forwarded_as_sent() -> None:
    got = check_equal(DEFAULT, b'{"thirdUserToken":"t-1"}', USER, NOW_MS)
    assert got is not None
    assert decode(got)["thirdUserToken"] == "t-1"


@pytest.mark.parametrize("key", ["secretKey", "SecretKey", "secret_key", "SECRET-KEY"])
def test_secret_is_left_to_python(key: str) -> None:
    body = json.dumps({"thirdUserName": "Al", key: "s3cr3t", "a": 1}).encode()
    assert DEFAULT.native.rewrite(body, USER, NOW_MS) is None
    out = decode(DEFAULT.reference(body, USER, NOW_MS))
    assert key not in out
    assert "s3cr3t" not in json.dumps(out)


@pytest.mark.parametrize("key", [k for k in LOOK_ALIKES if "ecret" not in k.lower()])
def test_look_alike_is_left_to_python(key: str) -> None:
    body = json.dumps({key: "other-tenant", "a": 1}, ensure_ascii=False).encode()
    assert DEFAULT.native.rewrite(body, USER, NOW_MS) is None
    assert key not in decode(DEFAULT.reference(body, USER, NOW_MS))


@pytest.mark.parametrize("body", [
    b'{"thirdUserName":"\xe5\xbc\xa0\xe4\xb8\x89"}', b'{"thirdUserName":"Ann\x7f"}',
    b'{"thirdUserName":"a\\u0041"}', b'{"\xe5\x90\x8d":"x"}', b'{"a\\u0041":1}',
    b'{"a":1,"a":1}', b'{"a":1.5}', b'{"a":-0}', b'{"a":1234567890123456789}',
    b'{"a":{}}', b'{"a":[]}',
], ids=["non-ASCII name", "DEL in name", "escaped name", "non-ASCII key", "escaped key",
        "duplicate key", "float", "minus zero", "19 digits", "object", "array"])
def test_outside_the_subset_is_declined(body: bytes) -> None:
    assert DEFAULT.native.rewrite(body, USER, NOW_MS) is None
    DEFAULT.reference(body, USER, NOW_MS)  # the Python path takes it


def test_non_ascii_value_is_copied() -> None:
    body = '{"city":"\u5317\u4eac \U0001f600","x":"\u2028\ufeff"}'.encode()
    got = check_equal(DEFAULT, body, USER, NOW_MS)
    assert got is not None
    assert decode(got)["city"] == "\u5317\u4eac \U0001f600"


@pytest.mark.parametrize("user_id", [
    'guest-a"b', "guest-a\\b", "guest-\u00e9", "guest-\U0001f600", "guest-\x7f", "guest-\t",
])
def test_user_id_outside_plain_ascii_is_declined(user_id: str) -> None:
    assert DEFAULT.native.rewrite(b'{"a":1}', user_id, NOW_MS) is None
    assert decode(DEFAULT.reference(b'{"a":1}', user_id, NOW_MS))["thirdUserId"] == user_id


def test_user_id_with_lone_surrogate_is_declined() -> None:
    """Not encodable: None (the Python path then refuses it), not UnicodeEncodeError."""
    assert DEFAULT.native.rewrite(b"{}", "guest-\ud800", NOW_MS) is None
    with pytest.raises(InjectionError):
        DEFAULT.reference(b"{}", "guest-\ud800", NOW_MS)


def test_names_are_cleaned_like_python() -> None:
    pair = next(p for p in PAIRS if p.name_limit == 6)
    for name, want in [("  Alice  ", "Alice"), ("ab cd ef", "ab cd"), ("abcde f", "abcde"),
                       ("     ", "Guest-"), ("", "Guest-"), (" a ", "a")]:
        got = check_equal(pair, json.dumps({"thirdUserName": name}).encode(), USER, NOW_MS)
        assert got is not None
        assert decode(got)["thirdUserName"] == want


@pytest.mark.parametrize("signer", [
    Signer(CHANNEL, SECRET, timestamp_format='%Y"%m'),
    Signer("k" * 300, SECRET),
], ids=["quote in timestamp", "prefix longer than 256 bytes"])
def test_unusual_prefix_is_left_to_python(signer: Signer) -> None:
    native = signer.flat_rewriter(TENANT, CHANNEL, URI, 64)
    assert native is not None
    assert native.rewrite(b'{"a":1}', USER, NOW_MS) is None


@pytest.mark.parametrize(("signer", "tenant"), [
    (Signer(CHANNEL, SECRET, signed_headers=("Content-Length", "Content-Type", "Host")), TENANT),
    (Signer(CHANNEL, SECRET, payload_fields=("thirdUserId", "timestamp")), TENANT),
    (Signer(CHANNEL, SECRET), 'tenant"quoted'),
], ids=["extra signed header", "non-identity payload field", "tenant needs escaping"])
def test_configurations_without_native_rewriter(signer: Signer, tenant: str) -> None:
    assert signer.flat_rewriter(tenant, CHANNEL, URI, 64) is None


# ---------------------------------------------------------------------------- 6. the object


def test_repr_hides_the_secret() -> None:
    text = repr(DEFAULT.native)
    assert SECRET not in text
    assert SECRET[:8] not in text
    assert TENANT in text


@pytest.mark.parametrize("dump", [pickle.dumps, copy.copy, copy.deepcopy],
                         ids=["pickle", "copy", "deepcopy"])
def test_cannot_be_pickled_or_copied(dump: Callable[[Any], object]) -> None:
    with pytest.raises(TypeError):
        dump(DEFAULT.native)


def test_misuse_raises() -> None:
    cls = _native.FlatRewriter
    blank = cls.__new__(cls)
    with pytest.raises(RuntimeError):
        blank.rewrite(b"{}", USER, NOW_MS)
    with pytest.raises(TypeError):
        DEFAULT.native.rewrite("{}", USER, NOW_MS)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        DEFAULT.native.rewrite(b"{}", USER)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        DEFAULT.native.rewrite(b"{}", USER, float(NOW_MS))  # type: ignore[arg-type]
    with pytest.raises(RuntimeError):
        DEFAULT.native.__init__(  # type: ignore[misc]
            TENANT, CHANNEL, URI, 64, b"x", "a", "b", "c", True, None, ("thirdUserId",),
            str)


# ---------------------------------------------------------------------------- 7. endpoints


def make_endpoints(**cec_kw: Any) -> tuple[ChatEndpoints, ChatEndpoints, GuestCookies]:
    """(native, reference) endpoints on one configuration and one fixed clock."""
    cec = CecConfig(tenant_space_id=TENANT, channel_config_id=CHANNEL,
                    auth=CecAuth(secret_key=SECRET), **cec_kw)
    signer = signer_from_config(cec)
    guest = GuestCookies(COOKIE_KEY, cec.guest.cookie_name)
    native = ChatEndpoints(cec, signer, guest, clock=lambda: NOW)
    reference = ChatEndpoints(cec, signer, guest, clock=lambda: NOW, native=False)
    assert native.native_rewrite
    assert not reference.native_rewrite
    return native, reference, guest


def request(cookie: str | None = None) -> web.Request:
    headers = {"Content-Type": "application/json"}
    if cookie is not None:
        headers["Cookie"] = cookie
    return make_mocked_request("POST", URI, headers=headers)


def returning(guest: GuestCookies, user_id: str = USER) -> str:
    return guest.cookie_header(user_id).split(";", 1)[0]


def rewrite_or_error(chat: ChatEndpoints, req: web.Request,
                     body: bytes) -> tuple[bytes, list[tuple[str, str]]] | str:
    try:
        return chat.rewrite_now(req, body)
    except InjectionError as exc:
        return f"InjectionError: {exc}"


ENDPOINT_BODIES = {
    "usual": b'{"thirdUserName":"Alice","language":"zh"}',
    "empty object": b"{}",
    "secret": b'{"secretKey":"s"}',
    "non-ASCII name": b'{"thirdUserName":"\xe5\xbc\xa0\xe4\xb8\x89"}',
    "nested": b'{"a":{"secretKey":"s","b":[1,2.5]}}',
    **REFUSED,
}


@pytest.mark.parametrize("body", ENDPOINT_BODIES.values(), ids=ENDPOINT_BODIES.keys())
def test_rewrite_now_native_equals_python(body: bytes) -> None:
    native, reference, guest = make_endpoints()
    cookie = returning(guest)
    a = rewrite_or_error(native, request(cookie), body)
    b = rewrite_or_error(reference, request(cookie), body)
    assert a == b
    if not isinstance(a, str):
        assert a[1] == []  # a returning guest gets no new cookie


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(body=any_bodies() | subset_bodies(), guest_hex=st.text("0123456789abcdef", min_size=20,
                                                                  max_size=20))
def test_rewrite_now_property(body: bytes, guest_hex: str) -> None:
    native, reference, guest = make_endpoints()
    cookie = returning(guest, "guest-" + guest_hex)
    assert (rewrite_or_error(native, request(cookie), body)
            == rewrite_or_error(reference, request(cookie), body))


@pytest.mark.parametrize("body", [b'{"thirdUserName":"Alice"}', b'{"a":{"b":1}}'])
def test_first_visit_sets_a_cookie_on_both_paths(body: bytes) -> None:
    native, reference, guest = make_endpoints()
    for chat in (native, reference):
        out, extra = chat.rewrite_now(request(), body)
        assert [name for name, _ in extra] == ["Set-Cookie"]
        cookie = extra[0][1].split(";", 1)[0]
        user_id = guest.read_cookie_header(cookie)
        assert user_id is not None
        assert decode(out)["thirdUserId"] == user_id
        # The same visitor coming back gets the same body from the reference path.
        assert reference.rewrite_now(request(cookie), body) == (out, [])


def test_oversized_body_is_refused_with_native() -> None:
    native, reference, guest = make_endpoints(max_json_size=64)
    cookie = returning(guest)
    fits = json.dumps({"a": "x" * 56}, separators=(",", ":")).encode()
    assert len(fits) == 64
    assert native.rewrite_now(request(cookie), fits) == reference.rewrite_now(
        request(cookie), fits)
    too_big = json.dumps({"a": "x" * 57}, separators=(",", ":")).encode()
    assert len(too_big) == 65
    for chat in (native, reference):
        with pytest.raises(InjectionError, match="larger than 64 bytes"):
            chat.rewrite_now(request(cookie), too_big)


def test_name_limit_reaches_the_native_path() -> None:
    native, reference, guest = make_endpoints(guest=CecGuest(max_name_length=3))
    cookie = returning(guest)
    body = b'{"thirdUserName":"Alice"}'
    out, _ = native.rewrite_now(request(cookie), body)
    assert decode(out)["thirdUserName"] == "Ali"
    assert reference.rewrite_now(request(cookie), body) == (out, [])
    rewriter = native._native
    assert rewriter is not None
    assert rewriter.rewrite(body, USER, NOW_MS) == out  # it was the native answer


def test_secret_warns_on_the_native_endpoint(caplog: pytest.LogCaptureFixture) -> None:
    native, _, guest = make_endpoints()
    with caplog.at_level(logging.WARNING, logger="gateway.chat"):
        out, _ = native.rewrite_now(request(returning(guest)), b'{"secretKey":"s","a":1}')
    assert "secretKey" not in decode(out)
    assert any("secretKey" in r.getMessage() for r in caplog.records)


def test_clock_feeds_both_paths() -> None:
    native, reference, guest = make_endpoints()
    cookie = returning(guest)
    out, _ = native.rewrite_now(request(cookie), b"{}")
    assert decode(out)["timestamp"] == NOW_MS
    assert reference.rewrite_now(request(cookie), b"{}") == (out, [])


class SpyRewriter:
    """Stands in for the FlatRewriter: records its calls, answers what it is told."""

    def __init__(self, answer: bytes | None) -> None:
        self.answer = answer
        self.calls: list[tuple[bytes, str, int]] = []

    def rewrite(self, body: bytes, user_id: str, now_ms: int) -> bytes | None:
        self.calls.append((body, user_id, now_ms))
        return self.answer


@pytest.mark.parametrize("answer", [b"native answer", None], ids=["taken", "declined"])
def test_rewrite_now_wiring(answer: bytes | None) -> None:
    """The guest id and the clock reach the native call; None falls back to Python."""
    native, reference, guest = make_endpoints()
    spy = SpyRewriter(answer)
    native._native = spy  # type: ignore[assignment]
    body = b'{"thirdUserName":"Alice"}'
    got = native.rewrite_now(request(returning(guest)), body)
    assert spy.calls == [(body, USER, NOW_MS)]
    if answer is not None:
        assert got == (answer, [])
    else:
        assert got == reference.rewrite_now(request(returning(guest)), body)
    with pytest.raises(InjectionError):
        native.rewrite_now(request(returning(guest)), b"{" + b" " * native.cec.max_json_size)
    assert len(spy.calls) == 1  # an oversized body never reaches the native call


# ------------------------------------------------------------- 8. logged-in identities

def login_endpoints(found: tuple[str, str | None] | None
                    ) -> tuple[ChatEndpoints, ChatEndpoints, GuestCookies]:
    """(native, reference) endpoints whose site says the visitor is ``found`` (None: a
    guest), as ``cec.identity.source: url`` does, on an authorization-mode channel."""
    cec = CecConfig(tenant_space_id=TENANT, channel_config_id=CHANNEL,
                    auth=CecAuth(secret_key=SECRET))
    signer = signer_from_config(cec)
    guest = GuestCookies(COOKIE_KEY, cec.guest.cookie_name)

    async def identify(request: web.BaseRequest) -> tuple[str, str | None] | None:
        return found

    native = ChatEndpoints(cec, signer, guest, clock=lambda: NOW, identify=identify)
    reference = ChatEndpoints(cec, signer, guest, clock=lambda: NOW, identify=identify,
                              native=False)
    assert native.native_rewrite and not reference.native_rewrite
    return native, reference, guest


async def rewrite_async_or_error(chat: ChatEndpoints, req: web.Request, body: bytes
                                 ) -> tuple[bytes, list[tuple[str, str]]] | str:
    try:
        return await chat.rewrite(req, body)
    except InjectionError as exc:
        return f"InjectionError: {exc}"


LOGINS: list[tuple[str, str | None] | None] = [
    None,  # not logged in: a guest
    ("u-1001", "Alice"),
    ("u-1001", "  Al  ice  "),
    ("u-1001", "   "),  # nothing left of the login's name: the page's, then the user id
    ("u-1001", None),
    ("u-1001", "张三"),  # cleaned in Python, then declined by the native side (not ASCII)
    ("u-1001", "A" * 300),  # over max_name_length
    ("u 1001 ", ""),
    ("用户-1", "Bob"),  # a user id that needs the Python path
    ('u"1', "Bob"),
]


@pytest.mark.parametrize("found", LOGINS, ids=[repr(f) for f in LOGINS])
@pytest.mark.parametrize("body", [b'{"thirdUserName":"Page Name","a":1}', b"{}",
                                  b'{"thirdUserName":"  "}', b'{"thirdUserName":7}',
                                  b'{"thirdUserName":"\xe5\xbc\xa0"}', b'{"a":1.5}', b"[]"],
                         ids=["page name", "empty", "blank page name", "number name",
                              "non-ASCII page name", "float", "not an object"])
async def test_logged_in_rewrite_native_equals_python(found: tuple[str, str | None] | None,
                                                      body: bytes) -> None:
    native, reference, guest = login_endpoints(found)
    cookie = returning(guest)
    a = await rewrite_async_or_error(native, request(cookie), body)
    b = await rewrite_async_or_error(reference, request(cookie), body)
    assert a == b
    if found is not None and not isinstance(a, str):
        assert decode(a[0])["thirdUserId"] == found[0]


async def test_logged_in_usual_body_is_rewritten_natively() -> None:
    """The login's name and id reach the native call: the answer is the native one."""
    native, reference, guest = login_endpoints(("u-1001", " Alice "))
    real = native._native
    assert real is not None
    answers: list[bytes | None] = []

    class Recording:
        def rewrite(self, *args: Any) -> bytes | None:
            answers.append(real.rewrite(*args))
            return answers[-1]

    native._native = Recording()  # type: ignore[assignment]
    body = b'{"thirdUserName":"Mallory","thirdUserId":"u-9999"}'
    out, headers = await native.rewrite(request(returning(guest)), body)
    assert headers == []
    assert (decode(out)["thirdUserName"], decode(out)["thirdUserId"]) == ("Alice", "u-1001")
    assert answers == [out]  # the native call answered, nothing fell back
    assert await reference.rewrite(request(returning(guest)), body) == (out, [])


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(body=any_bodies() | subset_bodies(),
       user_id=st.text(st.characters(codec="utf-8"), min_size=1, max_size=12),
       user_name=st.none() | st.text(st.characters(codec="utf-8"), max_size=12))
def test_logged_in_rewrite_property(body: bytes, user_id: str, user_name: str | None) -> None:
    native, reference, _ = login_endpoints((user_id, user_name))

    async def both() -> None:
        a = await rewrite_async_or_error(native, request(), body)
        b = await rewrite_async_or_error(reference, request(), body)
        assert a == b

    asyncio.run(both())
