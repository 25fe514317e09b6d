"""auth-v2 signing: SPEC.md vectors, each intermediate step, normalize properties, options."""

from __future__ import annotations

import hashlib
import hmac
import pickle
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import signing
from gateway.signing import Signer, SigningError

SECRET = "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5bC7dE9f"
AK = "202011230001"
TS = "2026-11-24T08:30:15.123Z"
URI = "/service-cloud/webclient/chat_client/js/newThirdPartyClient.js"
PAYLOAD_1 = (
    '{"thirdUserName":"Tom","thirdUserId":"10010001",'
    '"tenantSpaceId":"202007159031","channelConfigId":"202011230001"}'
)
PAYLOAD_2 = (
    '{"thirdUserName":"张三 & \\"Bob\\"","thirdUserId":"guest-7f3a",'
    '"tenantSpaceId":"202007159031","channelConfigId":"202011230001"}'
)
EXPECTED_1 = (
    "auth-v2/202011230001/2026-11-24T08:30:15.123Z/content-length;content-type/"
    "bb22f7612ab6d3a91f2eb4011042ba86d7dc98bb29b6c6569004093e01f75c13"
)
EXPECTED_2 = (
    "auth-v2/202011230001/2026-11-24T08:30:15.123Z/content-length;content-type/"
    "82556873c7d8154371d9c2bf216744e90510d93782e6876e483a171b88817aae"
)
DATA_1 = {
    "thirdUserName": "Tom",
    "thirdUserId": "10010001",
    "tenantSpaceId": "202007159031",
    "channelConfigId": "202011230001",
}
DATA_2 = {
    "thirdUserName": '张三 & "Bob"',
    "thirdUserId": "guest-7f3a",
    "tenantSpaceId": "202007159031",
    "channelConfigId": "202011230001",
}


def test_payload_lengths_match_spec() -> None:
    assert len(PAYLOAD_1.encode()) == 112
    assert len(PAYLOAD_2.encode()) == 127


@pytest.mark.parametrize(
    ("payload", "expected"), [(PAYLOAD_1, EXPECTED_1), (PAYLOAD_2, EXPECTED_2)]
)
def test_spec_vectors_via_signer(payload: str, expected: str) -> None:
    signer = Signer(AK, SECRET)
    assert signer.sign_payload(payload, timestamp=TS, uri=URI) == expected
    assert signer.verify(expected, payload, uri=URI)


@pytest.mark.parametrize(("data", "expected"), [(DATA_1, EXPECTED_1), (DATA_2, EXPECTED_2)])
def test_spec_vectors_from_fields(data: dict[str, object], expected: str) -> None:
    # Extra fields are ignored; field order in the input does not matter.
    shuffled = {"locale": "zh", **dict(reversed(list(data.items())))}
    assert Signer(AK, SECRET).sign_fields(shuffled, timestamp=TS, uri=URI) == expected


def test_spec_vectors_via_functions() -> None:
    for payload, expected in ((PAYLOAD_1, EXPECTED_1), (PAYLOAD_2, EXPECTED_2)):
        headers = signing.default_headers(payload)
        assert signing.authorization(SECRET, AK, TS, "POST", URI, headers, payload) == expected


def test_signed_payload_matches_spec_text() -> None:
    assert signing.signed_payload(DATA_1) == PAYLOAD_1
    assert signing.signed_payload(DATA_2) == PAYLOAD_2


def test_vector_1_intermediate_steps() -> None:
    headers = signing.default_headers(PAYLOAD_1)
    assert headers == {
        "Content-Length": "112",
        "Content-Type": "application/json;charset=UTF-8",
    }
    assert signing.signed_headers_line(list(headers)) == "content-length;content-type"
    prefix = signing.auth_string_prefix(AK, TS, list(headers))
    assert prefix == "auth-v2/202011230001/2026-11-24T08:30:15.123Z/content-length;content-type"
    key = signing.signing_key(SECRET, prefix)
    assert key == "aebf3d570aa1e1d7bdf39891e06882ccf6a7a69f25a634268b79b325303a41d1"
    canon_headers = signing.canonical_headers(headers)
    assert canon_headers == (
        "content-length:112\ncontent-type:application%2Fjson%3Bcharset%3DUTF-8"
    )
    canon = signing.canonical_request("POST", URI, headers, PAYLOAD_1)
    assert canon == (
        "POST\n"
        "/service-cloud/webclient/chat_client/js/newThirdPartyClient.js\n"
        "content-length;content-type\n"
        "content-length:112\ncontent-type:application%2Fjson%3Bcharset%3DUTF-8\n"
        "%7B%22thirdUserName%22%3A%22Tom%22%2C%22thirdUserId%22%3A%2210010001%22%2C"
        "%22tenantSpaceId%22%3A%22202007159031%22%2C%22channelConfigId%22%3A"
        "%22202011230001%22%7D"
    )
    sig = signing.signature(key, canon)
    assert sig == "bb22f7612ab6d3a91f2eb4011042ba86d7dc98bb29b6c6569004093e01f75c13"
    # The key is used as its hex *text*, not as raw bytes.
    raw = hmac.new(bytes.fromhex(key), canon.encode(), hashlib.sha256).hexdigest()
    assert raw != sig


def test_canonical_headers_lowercases_trims_and_sorts() -> None:
    got = signing.canonical_headers({"X-B": "  two words ", "Content-Type": "a/b", "x-a": "1"})
    assert got == "content-type:a%2Fb\nx-a:1\nx-b:two%20words"


def test_canonical_request_omits_empty_payload() -> None:
    got = signing.canonical_request("get", "/p", {"Content-Length": "0"}, "")
    assert got == "GET\n/p\ncontent-length\ncontent-length:0"


def _reference_normalize(s: str) -> str:
    """An independent reading of SPEC.md: per byte, keep unreserved, else %XX."""
    out = []
    for byte in s.encode("utf-8"):
        if (
            0x41 <= byte <= 0x5A
            or 0x61 <= byte <= 0x7A
            or 0x30 <= byte <= 0x39
            or byte in (0x2D, 0x2E, 0x5F, 0x7E)
        ):
            out.append(chr(byte))
        else:
            out.append("%" + "0123456789ABCDEF"[byte >> 4] + "0123456789ABCDEF"[byte & 15])
    return "".join(out)


@given(st.text())
def test_normalize_matches_reference(s: str) -> None:
    assert signing.normalize(s) == _reference_normalize(s)


@given(st.text())
def test_normalize_output_alphabet_and_round_trip(s: str) -> None:
    from urllib.parse import unquote

    out = signing.normalize(s)
    assert set(out) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~%")
    assert unquote(out, errors="strict") == s


def test_normalize_examples() -> None:
    assert signing.normalize("aZ09-._~") == "aZ09-._~"
    assert signing.normalize(" /+*") == "%20%2F%2B%2A"
    assert signing.normalize("张") == "%E5%BC%A0"
    assert signing.normalize("\x00\xff") == "%00%C3%BF"


def test_format_timestamp() -> None:
    dt = datetime(2026, 11, 24, 8, 30, 15, 123999, tzinfo=UTC)
    assert signing.format_timestamp(dt) == TS
    # Other zones are converted to UTC; naive means UTC.
    east = dt.astimezone(timezone(timedelta(hours=8)))
    assert signing.format_timestamp(east) == TS
    assert signing.format_timestamp(dt.replace(tzinfo=None)) == TS
    assert signing.format_timestamp(dt.replace(microsecond=7000)) == "2026-11-24T08:30:15.007Z"
    assert signing.format_timestamp(dt, "%Y%m%dT%H%M%SZ") == "20261124T083015Z"


def test_timestamp_format_changes_result() -> None:
    dt = datetime(2026, 11, 24, 8, 30, 15, 123000, tzinfo=UTC)
    default = Signer(AK, SECRET)
    other = Signer(AK, SECRET, timestamp_format="%Y%m%dT%H%M%S{ms}Z")
    assert default.sign_fields(DATA_1, timestamp=default.timestamp(dt), uri=URI) == EXPECTED_1
    got = other.sign_fields(DATA_1, timestamp=other.timestamp(dt), uri=URI)
    assert got.startswith("auth-v2/202011230001/20261124T083015123Z/content-length;content-type/")
    assert got != EXPECTED_1


def test_signed_header_set_is_configurable() -> None:
    only_type = Signer(AK, SECRET, signed_headers=["Content-Type"])
    got = only_type.sign_payload(PAYLOAD_1, timestamp=TS, uri=URI)
    assert got.split("/")[3] == "content-type"
    expected = signing.authorization(
        SECRET, AK, TS, "POST", URI, {"Content-Type": "application/json;charset=UTF-8"}, PAYLOAD_1
    )
    assert got == expected != EXPECTED_1
    assert signing.verify(got, secret=SECRET, payload=PAYLOAD_1, uri=URI)

    with_host = Signer(AK, SECRET, signed_headers=["Host", "Content-Type", "Content-Length"])
    with pytest.raises(SigningError):
        with_host.sign_payload(PAYLOAD_1, timestamp=TS, uri=URI)
    got = with_host.sign_payload(PAYLOAD_1, timestamp=TS, uri=URI, headers={"host": "cec.example"})
    assert got.split("/")[3] == "content-length;content-type;host"
    assert signing.verify(got, secret=SECRET, payload=PAYLOAD_1, uri=URI,
                          headers={"Host": "cec.example"})
    assert not signing.verify(got, secret=SECRET, payload=PAYLOAD_1, uri=URI,
                              headers={"Host": "evil.example"})


def test_explicit_header_values_override_defaults() -> None:
    signer = Signer(AK, SECRET)
    other = signer.sign_payload(
        PAYLOAD_1, timestamp=TS, uri=URI, headers={"content-type": "application/json"}
    )
    assert other != EXPECTED_1
    assert signer.sign_payload(
        PAYLOAD_1, timestamp=TS, uri=URI, headers={"content-type": "application/json;charset=UTF-8"}
    ) == EXPECTED_1


def test_content_type_option_changes_result() -> None:
    got = Signer(AK, SECRET, content_type="application/json").sign_payload(
        PAYLOAD_1, timestamp=TS, uri=URI
    )
    assert got != EXPECTED_1


def test_payload_fields_configurable() -> None:
    data = {**DATA_1, "locale": "zh"}
    signer = Signer(AK, SECRET, payload_fields=["thirdUserId", "locale"])
    assert signer.payload_for(data) == '{"thirdUserId":"10010001","locale":"zh"}'
    got = signer.sign_fields(data, timestamp=TS, uri=URI)
    assert got != EXPECTED_1
    assert signing.verify(
        got, secret=SECRET, payload='{"thirdUserId":"10010001","locale":"zh"}', uri=URI
    )
    with pytest.raises(SigningError, match="locale"):
        signer.sign_fields(DATA_1, timestamp=TS)


def test_method_and_uri_matter() -> None:
    signer = Signer(AK, SECRET)
    assert signer.sign_payload(PAYLOAD_1, timestamp=TS, uri="/other") != EXPECTED_1
    assert signer.sign_payload(PAYLOAD_1, timestamp=TS, uri=URI, method="PUT") != EXPECTED_1
    assert signer.sign_payload(PAYLOAD_1, timestamp=TS, uri=URI, method="post") == EXPECTED_1
    assert signing.DEFAULT_URI == URI
    assert signer.sign_payload(PAYLOAD_1, timestamp=TS) == EXPECTED_1


def test_default_timestamp_is_now() -> None:
    before = datetime.now(UTC)
    got = Signer(AK, SECRET).sign_payload(PAYLOAD_1)
    parsed = signing.parse_authorization(got)
    assert parsed is not None
    stamp = datetime.strptime(parsed.timestamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert before - timedelta(seconds=1) <= stamp <= datetime.now(UTC)


def test_verify_rejects_tampering() -> None:
    assert signing.verify(EXPECTED_1, secret=SECRET, payload=PAYLOAD_1, access_key=AK)
    assert not signing.verify(EXPECTED_1, secret=SECRET, payload=PAYLOAD_1, access_key="x")
    assert not signing.verify(EXPECTED_1, secret=SECRET + "x", payload=PAYLOAD_1)
    assert not signing.verify(EXPECTED_1, secret=SECRET, payload=PAYLOAD_2)
    assert not signing.verify(EXPECTED_1[:-1] + "0", secret=SECRET, payload=PAYLOAD_1)
    assert not signing.verify("", secret=SECRET, payload=PAYLOAD_1)
    assert not signing.verify("auth-v2/x", secret=SECRET, payload=PAYLOAD_1)
    assert not signing.verify(
        EXPECTED_1.replace("content-length;content-type", "content-type;x-unknown"),
        secret=SECRET,
        payload=PAYLOAD_1,
    )


def test_parse_authorization() -> None:
    parsed = signing.parse_authorization(EXPECTED_1)
    assert parsed is not None
    assert (parsed.access_key, parsed.timestamp) == (AK, TS)
    assert parsed.signed_headers == ("content-length", "content-type")
    assert parsed.signature == EXPECTED_1.rsplit("/", 1)[1]
    assert signing.parse_authorization("auth-v1/a/b/c/d") is None


def test_signer_never_shows_secret() -> None:
    signer = Signer(AK, SECRET)
    for text in (repr(signer), str(signer), f"{signer}", repr([signer])):
        assert SECRET not in text
        assert AK in text
    assert not hasattr(signer, "__dict__")
    with pytest.raises(TypeError):
        pickle.dumps(signer)


def test_signer_rejects_bad_setup() -> None:
    with pytest.raises(SigningError):
        Signer(AK, "")
    with pytest.raises(SigningError):
        Signer(AK, SECRET, signed_headers=[])
    with pytest.raises(SigningError):
        Signer(AK, SECRET, signed_headers=["Content-Type", "content-type"])
    with pytest.raises(SigningError) as info:
        Signer(AK, SECRET).sign_fields({"thirdUserName": "x"})
    assert SECRET not in str(info.value)


@settings(max_examples=300, deadline=None)
@given(ms=st.integers(min_value=-(10**12), max_value=4 * 10**12))
def test_timestamps_from_epoch_milliseconds(ms: int) -> None:
    """The signing path formats epoch milliseconds; it equals formatting the datetime."""
    when = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    assert signing.epoch_ms(when) == ms
    assert signing.format_epoch_ms(ms) == signing.format_timestamp(when)
    signer = Signer(AK, SECRET, timestamp_format="%Y%m%dT%H%M%S.{ms}Z")
    assert signer.timestamp_at(ms) == signer.timestamp(when)


@pytest.mark.parametrize("signer", [
    Signer(AK, SECRET),
    Signer("ak 2", SECRET, signed_headers=(" content-length ",),
           payload_fields=("channelConfigId", "tenantSpaceId", "thirdUserId"),
           timestamp_format="%Y/%m/%d %H:%M:%S {ms}"),
], ids=["default", "length only, compact timestamp"])
def test_signing_key_cache_follows_the_timestamp(signer: Signer) -> None:
    """The derived key is kept for the last timestamp: same ms, next ms, across a second,
    back in time; every signature equals the uncached module-level computation."""
    start = 1795509015123
    boundary = start - start % 1000 + 999
    steps = [start, start, start + 1, boundary, boundary + 1, boundary, start - 1,
             start - 86_400_000, start + 1, start]
    users = [{**DATA_1, "thirdUserId": f"user-{i}"} for i in range(2)]
    for ms in steps:
        ts = signer.timestamp_at(ms)
        for data in users:
            payload = signer.payload_for(data)
            headers = signer.headers_for(payload)
            expected = signing.authorization(SECRET, signer.access_key, ts, "POST", URI,
                                             headers, payload)
            assert signer.sign_fields(data, timestamp=ts, uri=URI) == expected, ms
    assert Signer(AK, SECRET).sign_fields(DATA_1, timestamp=TS, uri=URI) == EXPECTED_1


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=300)
@given(fields=st.lists(st.sampled_from(["a", "b", "名", "c d", ""]), max_size=5),
       values=st.dictionaries(st.sampled_from(["a", "b", "名", "c d", ""]), _JSON_VALUES))
def test_sign_fields_equals_signing_the_whole_payload(fields: list[str],
                                                      values: dict[str, object]) -> None:
    """The Signer builds the payload and its normalised text piece by piece; the result is
    the module-level signature of ``signed_payload`` for any values and field list
    (repeated or no fields, non-ASCII, nested, numbers)."""
    signer = Signer(AK, SECRET, payload_fields=fields)
    data = {f: values.get(f, f"v-{f}") for f in fields}
    payload = signing.signed_payload(data, fields)
    expected = signing.authorization(SECRET, AK, TS, "POST", URI,
                                     signing.default_headers(payload), payload)
    assert signer.sign_fields(data, timestamp=TS, uri=URI) == expected
    assert signer.sign_payload(payload, timestamp=TS, uri=URI) == expected
