"""The sandbox's independent auth-v2 verifier, against the SPEC.md vectors."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from pydantic import SecretStr

from gateway.errors import GatewayError
from gateway.sandbox.authv2 import (
    AuthV2Error,
    AuthV2Verifier,
    ReplayGuard,
    canonical_payload,
    normalize,
    parse_authorization,
)

SECRET = "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5bC7dE9f"
URI = "/service-cloud/webclient/chat_client/js/newThirdPartyClient.js"
VECTOR_TIME = dt.datetime(2026, 11, 24, 8, 30, 15, 123000, tzinfo=dt.UTC).timestamp()
VECTORS = [
    ({"thirdUserName": "Tom", "thirdUserId": "10010001", "tenantSpaceId": "202007159031",
      "channelConfigId": "202011230001"}, 112,
     "auth-v2/202011230001/2026-11-24T08:30:15.123Z/content-length;content-type/"
     "bb22f7612ab6d3a91f2eb4011042ba86d7dc98bb29b6c6569004093e01f75c13"),
    ({"thirdUserName": '张三 & "Bob"', "thirdUserId": "guest-7f3a",
      "tenantSpaceId": "202007159031", "channelConfigId": "202011230001"}, 127,
     "auth-v2/202011230001/2026-11-24T08:30:15.123Z/content-length;content-type/"
     "82556873c7d8154371d9c2bf216744e90510d93782e6876e483a171b88817aae"),
]


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def verifier(clock: Clock, **kw: object) -> AuthV2Verifier:
    return AuthV2Verifier(access_key="202011230001", secret_key=SecretStr(SECRET),
                          clock=clock, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("fields", "length", "expected"), VECTORS)
def test_vectors_verify_with_frozen_clock(fields: dict[str, str], length: int,
                                          expected: str) -> None:
    body = {**fields, "locale": "zh", "timestamp": 1, "thirdPartAuthorization": expected}
    assert len(canonical_payload(body, list(fields)).encode()) == length
    parsed = verifier(Clock(VECTOR_TIME)).verify(expected, method="POST", uri=URI, body=body)
    assert parsed.access_key == "202011230001"
    assert parsed.signed_headers == ("content-length", "content-type")


def test_wrong_signature_refused() -> None:
    fields, _, good = VECTORS[0]
    bad = good[:-1] + ("0" if good[-1] != "0" else "1")
    with pytest.raises(AuthV2Error) as err:
        verifier(Clock(VECTOR_TIME)).verify(bad, method="POST", uri=URI, body=fields)
    assert err.value.reason == "signature"
    assert isinstance(err.value, GatewayError)
    assert SECRET not in str(err.value) and good not in str(err.value)


def test_tampered_body_refused() -> None:
    fields, _, good = VECTORS[0]
    with pytest.raises(AuthV2Error) as err:
        verifier(Clock(VECTOR_TIME)).verify(good, method="POST", uri=URI,
                                            body={**fields, "thirdUserId": "10010002"})
    assert err.value.reason == "signature"


def test_other_uri_refused() -> None:
    fields, _, good = VECTORS[0]
    with pytest.raises(AuthV2Error) as err:
        verifier(Clock(VECTOR_TIME)).verify(good, method="POST", uri="/other", body=fields)
    assert err.value.reason == "signature"


@pytest.mark.parametrize("offset", [-301.0, 301.0])
def test_stale_timestamp_refused(offset: float) -> None:
    fields, _, good = VECTORS[0]
    with pytest.raises(AuthV2Error) as err:
        verifier(Clock(VECTOR_TIME + offset)).verify(good, method="POST", uri=URI, body=fields)
    assert err.value.reason == "stale"


@pytest.mark.parametrize("offset", [-299.0, 299.0])
def test_timestamp_within_skew_accepted(offset: float) -> None:
    fields, _, good = VECTORS[0]
    verifier(Clock(VECTOR_TIME + offset)).verify(good, method="POST", uri=URI, body=fields)


def test_replay_refused_within_window_then_allowed_after() -> None:
    fields, _, good = VECTORS[0]
    clock = Clock(VECTOR_TIME)
    v = verifier(clock, replay_window=120.0)
    v.verify(good, method="POST", uri=URI, body=fields)
    clock.now += 100
    with pytest.raises(AuthV2Error) as err:
        v.verify(good, method="POST", uri=URI, body=fields)
    assert err.value.reason == "replay"
    clock.now += 30  # past the replay window, still inside the clock skew
    v.verify(good, method="POST", uri=URI, body=fields)


def test_failed_attempts_do_not_burn_the_signature() -> None:
    fields, _, good = VECTORS[0]
    v = verifier(Clock(VECTOR_TIME))
    with pytest.raises(AuthV2Error):
        v.verify(good, method="POST", uri=URI, body={**fields, "thirdUserName": "Eve"})
    v.verify(good, method="POST", uri=URI, body=fields)


def test_wrong_access_key_refused() -> None:
    fields, _, good = VECTORS[0]
    v = AuthV2Verifier(access_key="999", secret_key=SecretStr(SECRET), clock=Clock(VECTOR_TIME))
    with pytest.raises(AuthV2Error) as err:
        v.verify(good, method="POST", uri=URI, body=fields)
    assert err.value.reason == "access_key"


@pytest.mark.parametrize("value", [
    "", "auth-v1/202011230001/2026-11-24T08:30:15.123Z/content-length;content-type/" + "a" * 64,
    "auth-v2/202011230001/2026-11-24T08:30:15Z/content-length;content-type/" + "a" * 64,
    "auth-v2/202011230001/2026-11-24T08:30:15.123Z/content-length;content-type/" + "A" * 64,
    "auth-v2/202011230001/2026-11-24T08:30:15.123Z/content-length;content-type",
    "auth-v2//2026-11-24T08:30:15.123Z/content-length;content-type/" + "a" * 64,
    "x" * 2000,
])
def test_malformed_refused(value: str) -> None:
    with pytest.raises(AuthV2Error) as err:
        parse_authorization(value)
    assert err.value.reason == "malformed"


def test_signed_headers_must_match_configuration() -> None:
    fields, _, good = VECTORS[0]
    only_type = good.replace("content-length;content-type", "content-type")
    with pytest.raises(AuthV2Error) as err:
        verifier(Clock(VECTOR_TIME)).verify(only_type, method="POST", uri=URI, body=fields)
    assert err.value.reason == "signed_headers"


def test_missing_payload_field_refused() -> None:
    fields, _, good = VECTORS[0]
    body = {k: v for k, v in fields.items() if k != "thirdUserId"}
    with pytest.raises(AuthV2Error) as err:
        verifier(Clock(VECTOR_TIME)).verify(good, method="POST", uri=URI, body=body)
    assert err.value.reason == "payload"


def test_normalize() -> None:
    assert normalize("aZ09-._~") == "aZ09-._~"
    assert normalize("a b/张") == "a%20b%2F%E5%BC%A0"
    assert normalize('"') == "%22"


def test_canonical_payload_is_compact_and_keeps_unicode() -> None:
    fields = VECTORS[1][0]
    text = canonical_payload({**fields, "extra": "x"}, list(fields))
    assert text == json.dumps(fields, ensure_ascii=False, separators=(",", ":"))
    assert "张三" in text and " & " in text


def test_repr_hides_secret() -> None:
    assert SECRET not in repr(verifier(Clock(0.0)))


def test_replay_guard_is_bounded() -> None:
    guard = ReplayGuard(100.0, max_entries=3)
    for i in range(10):
        guard.remember(f"s{i}", 0.0)
    assert len(guard) == 3
    assert guard.seen("s9", 1.0) and not guard.seen("s0", 1.0)
    assert not guard.seen("s9", 200.0)
