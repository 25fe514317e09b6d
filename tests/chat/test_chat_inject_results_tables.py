"""What the rewrite reports besides the body (issue 19): whether a secret was stripped, for
each place a secret can hide; the URI the signature is for; the size limit's edge; and the
reason each refused body is given."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from gateway.chat.inject import InjectionError, RewriteResult, rewrite_third_user_data
from gateway.signing import DEFAULT_URI, Signer

SECRET = "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5bC7dE9f"
NOW = datetime(2026, 11, 24, tzinfo=UTC)


def rewrite(body: bytes, *, uri: str | None = None, max_size: int = 65536,
            user_id: str = "guest-1", signer: Signer | None = None) -> RewriteResult:
    kwargs: dict[str, Any] = {} if uri is None else {"uri": uri}
    return rewrite_third_user_data(
        body, tenant_space_id="t1", channel_config_id="c1", user_id=user_id, user_name=None,
        default_user_name="Guest", max_name_length=64, max_size=max_size,
        signer=signer or Signer("c1", SECRET), token=None, now=NOW, **kwargs)


@pytest.mark.parametrize(("doc", "stripped"), [
    ({}, False),
    ({"a": 1, "b": "x", "c": None}, False),
    ({"nested": {"a": {"b": 1}}, "list": [1, "x", {"k": [2]}]}, False),
    ({"list": [[], {}]}, False),
    ({"secretKey": "s"}, True),
    ({"SECRET_KEY": "s"}, True),
    ({"nested": {"secretKey": "s"}}, True),
    ({"nested": {"a": {"secretKey": "s"}}}, True),
    ({"list": [{"secretKey": "s"}]}, True),
    ({"list": [1, [{"secretKey": "s"}]]}, True),
    ({"list": [{"secretKey": "s"}, 1]}, True),
    ({"nested": {"secretKey": "s", "b": 1}, "list": [1]}, True),
])
def test_stripped_secret_is_reported_exactly(doc: dict[str, Any], stripped: bool) -> None:
    result = rewrite(json.dumps(doc).encode())
    assert result.stripped_secret is stripped
    assert '"s"' not in result.body.decode()


@pytest.mark.parametrize("uri", ["/service-cloud/other.js", DEFAULT_URI])
def test_signature_is_for_the_uri_given(uri: str) -> None:
    signer = Signer("c1", SECRET)
    out = json.loads(rewrite(b"{}", uri=uri, signer=signer).body)
    payload = signer.payload_for(out)
    assert signer.verify(out["thirdPartAuthorization"], payload, uri=uri)
    if uri != DEFAULT_URI:
        assert not signer.verify(out["thirdPartAuthorization"], payload)


def test_size_limit_is_inclusive() -> None:
    body = b'{"a":"' + b"x" * 10 + b'"}'
    assert json.loads(rewrite(body, max_size=len(body)).body)["a"] == "x" * 10
    with pytest.raises(InjectionError, match=r"^thirdUserData is larger than 17 bytes$"):
        rewrite(body, max_size=len(body) - 1)


@pytest.mark.parametrize(("body", "reason"), [
    (b"", "thirdUserData is empty"),
    (b" \r\n", "thirdUserData is empty"),
    (b'{"a":"\xff"}', "thirdUserData is not UTF-8"),
    (b'{"a":', "thirdUserData is not valid JSON"),
    (b'{"a":NaN}', "JSON constant NaN is not allowed"),
    (b"[]", "thirdUserData must be a JSON object"),
    (b'{"a":"\\ud800"}', "thirdUserData holds invalid Unicode"),
    (b'{"a":1e999}', "thirdUserData holds a number out of range"),
])
def test_each_refusal_says_why(body: bytes, reason: str) -> None:
    with pytest.raises(InjectionError) as info:
        rewrite(body)
    assert str(info.value) == reason


def test_an_identity_that_cannot_be_signed_says_why() -> None:
    with pytest.raises(InjectionError) as info:
        rewrite(b"{}", user_id="guest-\ud800")
    assert str(info.value) == "thirdUserData holds invalid Unicode"
