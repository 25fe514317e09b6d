"""thirdUserData rewriting: forced identity, name cleaning, secret stripping, and the oracle.

The signature is checked by an independent verifier written here (urllib's quote as the
normaliser, hmac directly), never by gateway.signing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import unicodedata
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from gateway.chat.inject import (
    InjectionError,
    RewriteResult,
    clean_user_name,
    effective_user_name,
    fold_key,
    parse_body,
    rewrite_third_user_data,
)
from gateway.errors import BadRequest, GatewayError
from gateway.sandbox.authv2 import AuthV2Error, AuthV2Verifier
from gateway.signing import Signer

SECRET = "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5bC7dE9f"
TENANT = "202007159031"
CHANNEL = "202011230001"
USER = "guest-0123456789abcdef0123"
NOW = datetime(2026, 11, 24, 8, 30, 15, 123000, tzinfo=UTC)
NOW_MS = 1795509015123
URI = "/service-cloud/webclient/chat_client/js/newThirdPartyClient.js"


def fullwidth(text: str) -> str:
    """The full-width look-alike of ASCII letters (U+FF01 block)."""
    return "".join(chr(ord(c) + 0xFEE0) for c in text)


def independent_signature(name: str, user_id: str, ts: str = "2026-11-24T08:30:15.123Z") -> str:
    payload = json.dumps(
        {"thirdUserName": name, "thirdUserId": user_id, "tenantSpaceId": TENANT,
         "channelConfigId": CHANNEL},
        ensure_ascii=False, separators=(",", ":"),
    )
    length = len(payload.encode())
    prefix = f"auth-v2/{CHANNEL}/{ts}/content-length;content-type"
    key = hmac.new(SECRET.encode(), prefix.encode(), hashlib.sha256).hexdigest()
    canon = "\n".join([
        "POST", URI, "content-length;content-type",
        f"content-length:{length}\ncontent-type:{quote('application/json;charset=UTF-8', safe='')}",
        quote(payload, safe=""),
    ])
    return prefix + "/" + hmac.new(key.encode(), canon.encode(), hashlib.sha256).hexdigest()


def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), f"duplicate keys in output: {keys}"
    return dict(pairs)


def rewrite(body: bytes | str, **kw: Any) -> RewriteResult:
    if isinstance(body, str):
        body = body.encode()
    args: dict[str, Any] = {
        "tenant_space_id": TENANT,
        "channel_config_id": CHANNEL,
        "user_id": USER,
        "user_name": None,
        "default_user_name": "Guest-012345",
        "max_name_length": 64,
        "max_size": 16384,
        "signer": Signer(CHANNEL, SECRET),
        "token": None,
        "now": NOW,
        "uri": URI,
    }
    args.update(kw)
    return rewrite_third_user_data(body, **args)


def decode(result: RewriteResult) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(result.body.decode("utf-8"), object_pairs_hook=no_duplicates)
    return out


def fold(key: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKC", key).lower() if c.isalnum())


IDENTITY_FOLDS = {fold(k) for k in (
    "thirdUserId", "thirdUserName", "tenantSpaceId", "channelConfigId",
    "thirdPartAuthorization", "thirdUserToken", "secretKey",
)}


def assert_forced(out: dict[str, Any], name: str, user_id: str = USER) -> None:
    assert out["tenantSpaceId"] == TENANT
    assert out["channelConfigId"] == CHANNEL
    assert out["thirdUserId"] == user_id
    assert out["thirdUserName"] == name
    assert out["thirdPartAuthorization"] == independent_signature(name, user_id)
    canonical = {"thirdUserId", "thirdUserName", "tenantSpaceId", "channelConfigId",
                 "thirdPartAuthorization", "thirdUserToken"}
    for key in out:
        if fold(key) in IDENTITY_FOLDS:
            assert key in canonical, f"look-alike key forwarded: {key!r}"
    assert "secretkey" not in json.dumps(out).lower()


def test_errors_are_gateway_errors() -> None:
    assert issubclass(InjectionError, BadRequest)
    assert issubclass(InjectionError, GatewayError)


def test_basic_rewrite() -> None:
    body = json.dumps({
        "thirdUserName": "Tom", "thirdUserId": "10010001", "tenantSpaceId": "1",
        "channelConfigId": "2", "locale": "en", "mapService": "google", "timestamp": 1234,
    })
    result = rewrite(body)
    out = decode(result)
    assert not result.stripped_secret
    assert_forced(out, "Tom")
    assert out["locale"] == "en" and out["mapService"] == "google"
    assert out["timestamp"] == 1234
    assert b" " not in result.body  # compact
    assert list(out)[:4] == ["thirdUserName", "thirdUserId", "tenantSpaceId", "channelConfigId"]


def test_spec_vector_2_shape_passes_through_unescaped() -> None:
    result = rewrite(json.dumps({"thirdUserName": '张三 & "Bob"'}), user_id="guest-7f3a")
    assert '"thirdUserName":"张三 & \\"Bob\\""'.encode() in result.body
    out = decode(result)
    # The same signature as SPEC vector 2 (same fields, same time).
    assert out["thirdPartAuthorization"] == (
        "auth-v2/202011230001/2026-11-24T08:30:15.123Z/content-length;content-type/"
        "82556873c7d8154371d9c2bf216744e90510d93782e6876e483a171b88817aae"
    )


def test_timestamp_rules() -> None:
    assert decode(rewrite("{}"))["timestamp"] == NOW_MS
    assert decode(rewrite('{"timestamp": "2020-01-01"}'))["timestamp"] == NOW_MS
    assert decode(rewrite('{"timestamp": true}'))["timestamp"] == NOW_MS
    assert decode(rewrite('{"timestamp": 17.5}'))["timestamp"] == 17.5


def test_logged_in_name_wins() -> None:
    out = decode(rewrite('{"thirdUserName": "Mallory"}', user_id="u-1", user_name="Alice"))
    assert_forced(out, "Alice", "u-1")
    # An empty identity name falls back to the page's, then to the default.
    assert decode(rewrite('{"thirdUserName": "Bob"}', user_name=" "))["thirdUserName"] == "Bob"
    assert decode(rewrite("{}", user_name=""))["thirdUserName"] == "Guest-012345"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, "Guest-012345"),
        (42, "Guest-012345"),
        (["x"], "Guest-012345"),
        ("", "Guest-012345"),
        ("   \t\n ", "Guest-012345"),
        ("  Tom  ", "Tom"),
        ("a\x00\x01\x02b", "a b"),
        ("a\r\nb", "a b"),
        ("a\u2028b", "a b"),
        ("ad\u202emin", "admin"),
        ("\u200b\ufeff", "Guest-012345"),
        ("x" * 100, "x" * 64),
        ("é" * 70, "é" * 64),
    ],
)
def test_name_cleaning(value: object, expected: str) -> None:
    out = decode(rewrite(json.dumps({"thirdUserName": value})))
    assert_forced(out, expected)


def test_name_cut_then_trimmed() -> None:
    assert clean_user_name("abc def", 4) == "abc"
    assert clean_user_name("abc def", 0) == ""


@given(st.text(), st.integers(min_value=0, max_value=80))
def test_clean_user_name_idempotent_and_bounded(value: str, limit: int) -> None:
    once = clean_user_name(value, limit)
    assert clean_user_name(once, limit) == once
    assert len(once) <= limit
    assert once == once.strip()
    assert not any(unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") for c in once)


def test_effective_user_name() -> None:
    assert effective_user_name({"thirdUserName": " x "}, None, "d", 10) == "x"
    assert effective_user_name({"thirdUserName": "x"}, "y", "d", 10) == "y"
    assert effective_user_name({}, None, "Guest-abcdefghij", 8) == "Guest-ab"


@pytest.mark.parametrize(
    "body",
    [
        '{"secretKey": "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5bC7dE9f"}',
        '{"SECRETKEY": "s"}',
        '{"secret_key": "s"}',
        '{"Secret-Key": "s"}',
        '{"' + fullwidth("secretKey") + '": "s"}',
        '{"nested": {"deep": [{"secretKey": "s"}]}}',
    ],
)
def test_secret_key_is_stripped(body: str) -> None:
    result = rewrite(body)
    assert result.stripped_secret
    assert b"aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5bC7dE9f" not in result.body
    assert_forced(decode(result), "Guest-012345")


def test_nested_objects_survive_without_secret() -> None:
    out = decode(rewrite('{"extra": {"a": [1, {"secretKey": "x", "b": 2}]}}'))
    assert out["extra"] == {"a": [1, {"b": 2}]}


def test_token_set_and_signer_optional() -> None:
    result = rewrite('{"thirdUserToken": "forged"}', signer=None, token="tok-1")
    out = decode(result)
    assert out["thirdUserToken"] == "tok-1"
    assert "thirdPartAuthorization" not in out
    assert out["thirdUserId"] == USER


def test_page_signature_replaced() -> None:
    out = decode(rewrite('{"thirdPartAuthorization": "auth-v2/evil/x/y/z"}'))
    assert_forced(out, "Guest-012345")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "empty"),
        (b"   ", "empty"),
        (b"{", "not valid JSON"),
        (b"[]", "JSON object"),
        (b'"x"', "JSON object"),
        (b"null", "JSON object"),
        (b'{"a": NaN}', "NaN"),
        (b'{"a": Infinity}', "Infinity"),
        (b'{"a": 1} x', "not valid JSON"),
        (b"\xff\xfe{}", "UTF-8"),
        (b'\xef\xbb\xbf{"a": 1}', "not valid JSON"),
        (b'{"a": ' + b"1" * 5000 + b"}", "not valid JSON"),
        (b"[" * 100000, None),
        (b'{"a": "' + b"x" * 20000 + b'"}', "larger than 16384"),
    ],
)
def test_bad_bodies(body: bytes, reason: str | None) -> None:
    with pytest.raises(InjectionError) as info:
        rewrite(body, max_size=200000 if reason is None or "larger" not in reason else 16384)
    if reason:
        assert reason in str(info.value)
    assert len(str(info.value)) < 80


def test_lone_surrogate_is_rejected_or_cleaned() -> None:
    # In the name it is cleaned; elsewhere the body cannot be re-encoded: a 400.
    out = decode(rewrite('{"thirdUserName": "a\\ud800b"}'))
    assert out["thirdUserName"] == "a b"
    with pytest.raises(InjectionError):
        rewrite('{"other": "\\ud800"}')


def test_missing_signed_field_is_a_400() -> None:
    signer = Signer(CHANNEL, SECRET, payload_fields=["thirdUserId", "locale"])
    with pytest.raises(InjectionError, match="locale"):
        rewrite("{}", signer=signer)


# ------------------------------------------------------------------ the signing oracle

ORACLE_BODIES = [
    # Other tenant / channel / user, asked for directly.
    '{"tenantSpaceId": "999", "channelConfigId": "888", "thirdUserId": "admin"}',
    # Duplicate keys: the last one would win in a naive parser, the first in another.
    '{"thirdUserId": "admin", "thirdUserId": "root", "tenantSpaceId": "1", "tenantSpaceId": "2"}',
    # Case and Unicode look-alikes that a lenient parser might map onto the real fields.
    '{"ThirdUserId": "admin", "THIRDUSERID": "root", "thirduserid": "x"}',
    '{"' + fullwidth("thirdUserId") + '": "admin",'
    ' "thirdUser\\u200bId": "root", "third_user_id": "y"}',
    '{"TenantSpaceId": "999", "channel_config_id": "888", "CHANNELCONFIGID": "777"}',
    '{"thirdUserId\\u0000": "admin", "thirdUserId ": "root"}',
    # Identity smuggled through nested objects or non-string values.
    '{"thirdUserId": {"id": "admin"}, "tenantSpaceId": ["999"], "channelConfigId": 888}',
    '{"data": {"thirdUserId": "admin", "tenantSpaceId": "999"}}',
    # A name trying to carry JSON that would re-shape the signed payload.
    '{"thirdUserName": "x\\",\\"thirdUserId\\":\\"admin"}',
    # A signature for another identity, pre-computed.
    '{"thirdPartAuthorization":'
    ' "auth-v2/888/2026-11-24T08:30:15.123Z/content-length;content-type/00"}',
]


@pytest.mark.parametrize("body", ORACLE_BODIES)
def test_oracle_cases(body: str) -> None:
    out = decode(rewrite(body))
    page = json.loads(body)
    name = page.get("thirdUserName") if isinstance(page.get("thirdUserName"), str) else None
    assert_forced(out, (name or "Guest-012345")[:64])
    assert "admin" not in out["thirdPartAuthorization"]


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.text(max_size=20),
    st.sampled_from(["999", "888", "admin", TENANT, CHANNEL]),
)
hostile_keys = st.one_of(
    st.sampled_from([
        "thirdUserId", "thirdUserName", "tenantSpaceId", "channelConfigId", "secretKey",
        "thirdPartAuthorization", "thirdUserToken", "timestamp", "THIRDUSERID", "tenantspaceid",
        "Channel_Config_Id", fullwidth("tenantSpaceId"), "secret-key", "locale",
    ]),
    st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(hostile_keys, children, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(hostile_keys, json_values), max_size=8), st.text(max_size=30))
def test_oracle_property(pairs: list[tuple[str, Any]], user_id: str) -> None:
    # Built by hand so duplicate keys really reach the parser.
    body = "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs) + "}"
    uid = "guest-" + user_id.encode().hex()[:20]
    try:
        result = rewrite(body, user_id=uid)
    except InjectionError:
        # Only strings that cannot be re-encoded (lone surrogates) may be refused here.
        assert "\\ud" in body.lower()
        return
    out = decode(result)
    assert out["thirdUserId"] == uid
    assert_forced(out, out["thirdUserName"], uid)
    last_name = None
    for k, v in pairs:
        if k == "thirdUserName":
            last_name = v
    assert out["thirdUserName"] == (clean_user_name(last_name, 64) or "Guest-012345")


@pytest.mark.parametrize("body", [b'{"a":1} x', b'{"a":1}{"b":2}', b" ", b'{"a":NaN}',
                                  b'{"a":Infinity}', b"[1]", b'{"a":1', b"\x0c{}"])
def test_parse_body_refuses_what_json_loads_refuses(body: bytes) -> None:
    with pytest.raises(InjectionError):
        parse_body(body, 1000)


@pytest.mark.parametrize(("value", "written"), [
    ("2**70", b"1180591620717411303424"), ("-9223372036854775809", b"-9223372036854775809"),
    ("1e-7", b"1e-07"), ("1.5", b"1.5"), ("-0", b"0"), ("[1,{\"b\":null}]", b'[1,{"b":null}]'),
])
def test_numbers_and_nesting_are_written_back_as_read(value: str, written: bytes) -> None:
    """Integers beyond 64 bits stay exact; other values come back in the json module's spelling."""
    literal = str(2**70) if value == "2**70" else value
    out = rewrite('{"a":' + literal + "}").body
    assert b'{"a":' + written + b"," in out


@pytest.mark.parametrize(("body", "reason"), [
    (b'{"a":1e400}', "out of range"), (b'{"a":-1e999}', "out of range"),
    (b'{"a":"\\ud800"}', "invalid Unicode"),
])
def test_values_that_cannot_be_written_back_are_a_400(body: bytes, reason: str) -> None:
    with pytest.raises(InjectionError, match=reason):
        rewrite(body)


@pytest.mark.parametrize("depth", [900, 990, 1024])
def test_deep_documents_give_a_400_not_a_crash(depth: int) -> None:
    """The secret stripping walks nested values; too deep for it is a bad request."""
    body = b'{"a":' + b"[" * depth + b"]" * depth + b"}"
    try:
        result = rewrite(body, max_size=1 << 20)
    except InjectionError as exc:
        assert "nested too deeply" in str(exc) or "not valid JSON" in str(exc)
    else:
        assert json.loads(result.body)["thirdUserId"] == USER


# ------------------------------------------------------------------ body cases

REFUSED = {
    "array": b"[]", "string": b'"x"', "number": b"1", "truncated value": b'{"a":"b"',
    "truncated after colon": b'{"a":', "truncated key": b'{"a', "two objects": b"{}{}",
    "trailing comma": b'{"a":1,}', "leading zero": b'{"a":01}', "raw control": b'{"a":"\x01"}',
    "raw newline in key": b'{"a\nb":1}', "overlong UTF-8": b'{"a":"\xc0\xaf"}',
    "encoded surrogate": b'{"a":"\xed\xa0\x80"}', "cut UTF-8": b'{"a":"\xe4\xb8"}',
    "invalid byte in key": b'{"\xff":1}', "form feed after": b'{"a":1}\f',
    "vertical tab": b"{\v}", "no-break space": b"{}\xc2\xa0", "comment": b'{"a":1} //',
    "lone surrogate escape": b'{"a":"\\ud800"}',
}


@pytest.mark.parametrize("body", REFUSED.values(), ids=REFUSED.keys())
def test_refused_bodies(body: bytes) -> None:
    with pytest.raises(InjectionError):
        rewrite(body)


def test_empty_object_gets_every_forced_field_in_order() -> None:
    out = decode(rewrite(b" {\n} "))
    assert list(out) == ["thirdUserName", "thirdUserId", "tenantSpaceId", "channelConfigId",
                         "timestamp", "thirdPartAuthorization"]
    assert_forced(out, "Guest-012345")
    assert out["timestamp"] == NOW_MS


def test_page_keys_keep_their_position() -> None:
    body = '{"timestamp":1,"thirdPartAuthorization":"forged","a":"b","thirdUserId":"evil"}'
    out = decode(rewrite(body))
    assert list(out) == ["timestamp", "thirdPartAuthorization", "a", "thirdUserId",
                         "thirdUserName", "tenantSpaceId", "channelConfigId"]
    assert out["timestamp"] == 1
    assert_forced(out, "Guest-012345")


@pytest.mark.parametrize("stamp", ["0", "1700000000000", "-5", "123456789012345678"])
def test_integer_timestamp_is_kept(stamp: str) -> None:
    assert decode(rewrite('{"timestamp":' + stamp + "}"))["timestamp"] == int(stamp)


@pytest.mark.parametrize("stamp", ['"2020-01-01"', '""', "true", "false", "null", "[1]"])
def test_other_timestamp_is_replaced_in_place(stamp: str) -> None:
    out = decode(rewrite('{"a":1,"timestamp":' + stamp + ',"b":2}'))
    assert out["timestamp"] == NOW_MS
    assert list(out)[:3] == ["a", "timestamp", "b"]


@pytest.mark.parametrize(("name", "want"), [
    ("  Alice  ", "Alice"), ("ab cd ef", "ab cd"), ("abcde f", "abcde"), ("     ", "Guest-"),
    ("", "Guest-"), (" a ", "a"),
])
def test_names_are_cut_to_the_limit_then_trimmed(name: str, want: str) -> None:
    out = decode(rewrite(json.dumps({"thirdUserName": name}), max_name_length=6))
    assert out["thirdUserName"] == want


def test_user_id_that_cannot_be_encoded_is_a_400() -> None:
    with pytest.raises(InjectionError):
        rewrite("{}", user_id="guest-\ud800")


# ------------------------------------------------------------------ credentials per mode
# Only the credential the gateway sets reaches the CEC (issue 13): in authorization mode the
# page's token is removed, in token mode the page's signature.

PAGE_CREDENTIALS = '{"thirdPartAuthorization":"page-signature","thirdUserToken":"page-token"}'


def test_authorization_mode_removes_the_page_token() -> None:
    out = decode(rewrite(PAGE_CREDENTIALS))
    assert "thirdUserToken" not in out
    assert_forced(out, "Guest-012345")


def test_token_mode_removes_the_page_signature() -> None:
    out = decode(rewrite(PAGE_CREDENTIALS, signer=None, token="tok-1"))
    assert "thirdPartAuthorization" not in out
    assert out["thirdUserToken"] == "tok-1"


def test_both_credentials_set_when_the_gateway_has_both() -> None:
    out = decode(rewrite(PAGE_CREDENTIALS, token="tok-1"))
    assert out["thirdUserToken"] == "tok-1"
    assert_forced(out, "Guest-012345")


def test_neither_credential_when_the_gateway_sets_none() -> None:
    out = decode(rewrite(PAGE_CREDENTIALS, signer=None))
    assert "thirdPartAuthorization" not in out and "thirdUserToken" not in out


# ------------------------------------------------------------------ look-alike keys

MANAGED = ("thirdUserName", "thirdUserId", "tenantSpaceId", "channelConfigId",
           "thirdPartAuthorization", "thirdUserToken")


def _look_alikes(name: str) -> list[str]:
    """Spellings of ``name`` that a lenient parser (Java equalsIgnoreCase, JS toUpperCase,
    NFKC, accent- or separator-insensitive matching) could map onto it."""
    out = [name.lower(), name.upper(), name[0].upper() + name[1:], fullwidth(name),
           name[:5] + "\u200b" + name[5:], name[:5] + "_" + name[5:], name + " ",
           name[:3] + "\u00ad" + name[3:], name + "\U000e0041", name + "\u200b" * 80]
    for ascii_char, tricks in {"i": ("\u0131", "\u0130"), "s": ("\u017f",), "k": ("\u212a",),
                               "a": ("\u00e0", "a\u0301", "\U0001d41a")}.items():
        for trick in tricks:
            for variant in (name, name.lower()):
                at = variant.lower().find(ascii_char)
                if at >= 0:
                    out.append(variant[:at] + trick + variant[at + 1:])
    return [k for k in dict.fromkeys(out) if k != name]


LOOK_ALIKE_CASES = [(name, alike) for name in (*MANAGED, "secretKey")
                    for alike in _look_alikes(name)]


def test_every_managed_field_has_tricky_look_alikes() -> None:
    """The table reaches every field with the letters Unicode case mapping tricks on."""
    tricks = {"\u0131", "\u017f", "\u212a"}
    covered = {name for name, alike in LOOK_ALIKE_CASES if tricks & set(alike)}
    assert covered == {*MANAGED, "secretKey"}


@pytest.mark.parametrize(("name", "alike"), LOOK_ALIKE_CASES,
                         ids=[repr(a) for _, a in LOOK_ALIKE_CASES])
def test_look_alike_keys_never_reach_the_cec(name: str, alike: str) -> None:
    for signer, token in ((Signer(CHANNEL, SECRET), None), (None, "tok-1")):
        result = rewrite(json.dumps({alike: "999", "a": 1}), signer=signer, token=token)
        out = decode(result)
        assert alike not in out, f"{alike!r} ({name}) forwarded"
        assert out["a"] == 1
        assert "999" not in json.dumps(out)
        if name == "secretKey":
            assert result.stripped_secret


def _lenient_images(c: str) -> set[str]:
    """What case mapping and compatibility normalisation turn ``c`` into, letters and
    digits only."""
    forms = (c.upper(), c.lower(), c.casefold(), c.upper().lower(),
             unicodedata.normalize("NFKC", c), unicodedata.normalize("NFKD", c))
    return {"".join(ch for ch in unicodedata.normalize("NFKD", f) if ch.isalnum())
            for f in forms}


def test_fold_key_agrees_with_every_ascii_case_mapping() -> None:
    """Every code point that some case mapping or normalisation turns into ASCII letters or
    digits folds exactly to them (U+0131 to i, U+017F to s, U+212A to k, ...)."""
    wrong = []
    ascii_alnum = re.compile("[0-9A-Za-z]")
    for cp in range(0x110000):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        c = chr(cp)
        probe = c.upper() + c.lower() + c.casefold() + unicodedata.normalize("NFKD", c)
        if not ascii_alnum.search(probe):
            continue  # nothing ASCII can come out of it (fast path of this test)
        for image in _lenient_images(c):
            if image and image.isascii() and fold_key(c) != image.lower():
                wrong.append((hex(cp), image, fold_key(c)))
    assert not wrong, wrong[:20]
    assert fold_key("th\u0131rdUserId") == fold_key("thirdUserId")


# ------------------------------------------------------------------ the CEC's verifier
# The sandbox's verifier (gateway/sandbox/authv2.py) shares no code with gateway.signing:
# whatever the page sends, the forwarded body verifies there for the forced identity.

SIGNERS = {
    "default": Signer(CHANNEL, SECRET),
    "type only, two fields reordered": Signer(
        "ak-1", SECRET, signed_headers=("Content-Type",),
        content_type="application/json; charset=utf-8",
        payload_fields=("thirdUserId", "thirdUserName")),
    "length only, three fields": Signer(
        "ak-2", SECRET, signed_headers=("Content-Length",),
        payload_fields=("channelConfigId", "tenantSpaceId", "thirdUserId")),
}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(label=st.sampled_from(sorted(SIGNERS)),
       pairs=st.lists(st.tuples(hostile_keys, json_values), max_size=6),
       name=st.text(max_size=80), user=st.text(max_size=20),
       now_ms=st.integers(946_684_800_000, 4_102_444_800_000))
def test_forwarded_body_verifies_with_the_sandbox_verifier(
        label: str, pairs: list[tuple[str, Any]], name: str, user: str, now_ms: int) -> None:
    signer = SIGNERS[label]
    pairs.append(("thirdUserName", name))
    body = "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs) + "}"
    uid = "guest-" + user.encode().hex()[:20]
    now = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=now_ms)
    try:
        out = decode(rewrite(body, signer=signer, user_id=uid, now=now))
    except InjectionError:
        assert "\\ud" in body.lower()  # only a lone surrogate cannot be written back
        return
    verifier = AuthV2Verifier(
        access_key=signer.access_key, secret_key=SecretStr(SECRET),
        signed_headers=signer.signed_headers, content_type=signer.content_type,
        payload_fields=signer.payload_fields, clock=lambda: now_ms / 1000)
    parsed = verifier.verify(out["thirdPartAuthorization"], method="POST", uri=URI, body=out)
    assert parsed.timestamp == signer.timestamp_at(now_ms)
    assert (out["thirdUserId"], out["tenantSpaceId"], out["channelConfigId"]) == (
        uid, TENANT, CHANNEL)
    with pytest.raises(AuthV2Error) as refused:
        verifier.verify(out["thirdPartAuthorization"], method="POST", uri=URI,
                        body={**out, "thirdUserId": uid + "x"})
    assert refused.value.reason == "signature"
