"""auth-v2 signing through the arguments the chat rewrite and the verifiers pass (issue 19):
every parameter of ``Signer.sign_fields`` and ``Signer.verify`` reaches the signature, the
Authorization parser's refusals, and each setup mistake's message."""

from __future__ import annotations

import pickle
import time
from datetime import UTC, datetime

import pytest

from gateway.signing import (
    Signer,
    SigningError,
    authorization,
    parse_authorization,
    signed_payload,
    verify,
)

SECRET = "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5bC7dE9f"
DATA = {"thirdUserName": "Ann", "thirdUserId": "u1", "tenantSpaceId": "t1",
        "channelConfigId": "c1"}
TS = "2026-11-24T00:00:00.000Z"


def test_sign_fields_passes_every_argument_on() -> None:
    signer = Signer("ak", SECRET)
    payload = signer.payload_for(DATA)
    for kwargs in ({"method": "PUT"}, {"uri": "/other"},
                   {"headers": {"Content-Type": "text/plain"}}):
        got = signer.sign_fields(DATA, timestamp=TS, **kwargs)
        assert got == signer.sign_payload(payload, timestamp=TS, **kwargs)
        assert got != signer.sign_fields(DATA, timestamp=TS)
        assert signer.verify(got, payload, **kwargs)
        assert not signer.verify(got, payload)


def test_signer_verify_checks_its_own_access_key() -> None:
    mine, other = Signer("ak1", SECRET), Signer("ak2", SECRET)
    payload = mine.payload_for(DATA)
    assert mine.verify(mine.sign_payload(payload, timestamp=TS), payload)
    assert not mine.verify(other.sign_payload(payload, timestamp=TS), payload)


def test_signer_verify_uses_its_content_type() -> None:
    signer = Signer("ak", SECRET, content_type="text/plain")
    payload = signer.payload_for(DATA)
    value = signer.sign_payload(payload, timestamp=TS)
    assert signer.verify(value, payload)
    assert verify(value, secret=SECRET, payload=payload, content_type="text/plain")
    assert not verify(value, secret=SECRET, payload=payload)


@pytest.mark.parametrize(("value", "parts"), [
    ("auth-v2/ak/ts/content-length;content-type/sig",
     ("ak", "ts", ("content-length", "content-type"), "sig")),
    ("auth-v2/ak/2026/11/24/content-length/sig", ("ak", "2026/11/24", ("content-length",), "sig")),
    ("auth-v2//ts/h/sig", None),
    ("auth-v2/ak/ts//sig", None),
    ("auth-v2/ak//h/sig", None),
    ("auth-v2/ak/ts/h/", None),
    ("auth-v2/ak/ts/h", None),
    ("auth-v2/ak", None),
    ("auth-v1/ak/ts/h/sig", None),
    ("auth-v2", None),
])
def test_parse_authorization(value: str, parts: tuple[object, ...] | None) -> None:
    parsed = parse_authorization(value)
    if parts is None:
        assert parsed is None
    else:
        assert parsed is not None
        assert (parsed.access_key, parsed.timestamp, parsed.signed_headers,
                parsed.signature) == parts


def test_a_timestamp_with_slashes_verifies() -> None:
    signer = Signer("ak", SECRET, timestamp_format="%Y/%m/%d %H:%M:%S.{ms}")
    payload = signer.payload_for(DATA)
    value = signer.sign_payload(payload, timestamp=signer.timestamp(datetime(2026, 1, 2,
                                                                             tzinfo=UTC)))
    assert "/2026/01/02 00:00:00.000/" in value
    assert signer.verify(value, payload)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"secret_key": ""}, "the secret key is empty"),
    ({"secret_key": SECRET, "signed_headers": ()}, "at least one signed header is needed"),
    ({"secret_key": SECRET, "signed_headers": ("Content-Type", "content-type")},
     r"signed header names repeat \(names are case-insensitive\)"),
])
def test_setup_mistakes_say_what_is_wrong(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(SigningError, match=f"^{message}$"):
        Signer("ak", **kwargs)  # type: ignore[arg-type]


def test_missing_values_are_named() -> None:
    with pytest.raises(SigningError, match=r"^payload field missing: thirdUserId, tenantSpaceId$"):
        signed_payload({"thirdUserName": "a", "channelConfigId": "c"})
    with pytest.raises(SigningError, match=r"^payload field missing: thirdUserId, tenantSpaceId$"):
        Signer("ak", SECRET).sign_fields({"thirdUserName": "a", "channelConfigId": "c"})
    signer = Signer("ak", SECRET, signed_headers=("Content-Length", "X-Date"))
    with pytest.raises(SigningError, match=r"^no value for signed header X-Date$"):
        signer.sign_payload("{}", timestamp=TS)


def test_pickling_is_refused_with_a_reason() -> None:
    with pytest.raises(TypeError, match=r"^Signer cannot be pickled$"):
        pickle.dumps(Signer("ak", SECRET))


def test_default_timestamp_is_utc_whatever_the_local_zone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        signer = Signer("ak", SECRET, timestamp_format="%Y-%m-%dT%H")
        before = datetime.now(UTC).strftime("%Y-%m-%dT%H")
        got = signer.timestamp()
        after = datetime.now(UTC).strftime("%Y-%m-%dT%H")
        assert got in (before, after)
    finally:
        monkeypatch.undo()
        time.tzset()


def test_an_empty_payload_is_signed_without_a_payload_line() -> None:
    """SPEC: the canonical request has no payload part when the payload is empty; the
    Signer agrees with the module-level signer on it (and on a non-empty one)."""
    signer = Signer("ak", SECRET)
    for payload in ("", "{}"):
        headers = signer.headers_for(payload)
        assert signer.sign_payload(payload, timestamp=TS, uri="/u") == authorization(
            SECRET, "ak", TS, "POST", "/u", headers, payload)


def test_headers_for_takes_the_callers_values() -> None:
    signer = Signer("ak", SECRET, signed_headers=("Content-Type", "Host"))
    assert signer.headers_for("{}", {"host": "shop.example", "Content-Type": "text/x"}) == {
        "Content-Type": "text/x", "Host": "shop.example"}
    with pytest.raises(SigningError, match="no value for signed header Host"):
        signer.headers_for("{}")
