"""thirdUserData rewriting: forced identity, name cleaning, secret stripping, and the oracle.

The signature is checked by an independent verifier written here (urllib's quote as the
normaliser, hmac directly), never by gateway.signing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import unicodedata
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.chat.inject import (
    InjectionError,
    RewriteResult,
    clean_user_name,
    effective_user_name,
    parse_body,
    rewrite_third_user_data,
)
from gateway.errors import BadRequest, GatewayError
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
