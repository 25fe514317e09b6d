"""Every managed identity field with every kind of look-alike, and every invisible or
separator character in a display name (issue 19: the tests covered three of six fields and
three of the twenty invisible characters)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from gateway.chat.inject import clean_user_name, rewrite_third_user_data
from gateway.signing import Signer

SECRET = "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5bC7dE9f"
TENANT, CHANNEL, USER = "202007159031", "202011230001", "guest-0123456789abcdef0123"
# Written out here: a field dropped from the gateway's table must fail a test.
MANAGED = ["tenantSpaceId", "channelConfigId", "thirdUserId", "thirdUserName",
           "thirdPartAuthorization", "thirdUserToken"]
INVISIBLE = ["\u061c", "\u180e", "\u200b", "\u200e", "\u200f", "\u202a", "\u202b", "\u202c",
             "\u202d", "\u202e", "\u2060", "\u2061", "\u2062", "\u2063", "\u2064", "\u2066",
             "\u2067", "\u2068", "\u2069", "\ufeff"]
# One or more of each category turned into a space: controls, line and paragraph separators.
SEPARATORS = ["\x00", "\t", "\n", "\r", "\x1b", "\x7f", "\x85", "\x9f", "\u2028", "\u2029"]


def lookalikes(field: str) -> list[str]:
    first = field[0]
    return [
        field.upper(), field.lower(), first.upper() + field[1:],
        "".join(chr(ord(c) + 0xFEE0) for c in field),  # full-width
        chr(ord(first) + 0xFEE0) + field[1:],
        field[:5] + "\u200b" + field[5:], "\ufeff" + field, field + "\u2060",
        field[:5] + "_" + field[5:], field[:5] + "-" + field[5:], field + " ", " " + field,
        field + "\x00", field[:5] + "\u00ad" + field[5:],  # soft hyphen
        "\U0001d42d" + field[1:] if first == "t" else "\U0001d41c" + field[1:],  # math bold
    ]


def rewrite(data: dict[str, Any], token: str | None = "tok-1") -> dict[str, Any]:
    body = json.dumps(data, ensure_ascii=False).encode()
    result = rewrite_third_user_data(
        body, tenant_space_id=TENANT, channel_config_id=CHANNEL, user_id=USER,
        user_name=None, default_user_name="Guest", max_name_length=64, max_size=65536,
        signer=Signer(CHANNEL, SECRET), token=token,
        now=datetime(2026, 11, 24, tzinfo=UTC))
    out: dict[str, Any] = json.loads(result.body)
    return out


@pytest.mark.parametrize("field", MANAGED)
def test_every_lookalike_of_every_managed_field_is_dropped(field: str) -> None:
    for spelling in lookalikes(field):
        assert spelling != field
        out = rewrite({spelling: "evil", "locale": "en"})
        assert spelling not in out, (field, spelling)
        assert "evil" not in json.dumps(out, ensure_ascii=False), (field, spelling)
        assert out["locale"] == "en"
        assert out["tenantSpaceId"] == TENANT and out["channelConfigId"] == CHANNEL
        assert out["thirdUserId"] == USER and out["thirdUserToken"] == "tok-1"


@pytest.mark.parametrize("field", MANAGED)
def test_every_managed_field_is_forced(field: str) -> None:
    out = rewrite({field: "evil", "thirdUserName": "Ann"} if field != "thirdUserName"
                  else {field: "evil\u202e"})
    assert out["tenantSpaceId"] == TENANT and out["channelConfigId"] == CHANNEL
    assert out["thirdUserId"] == USER and out["thirdUserToken"] == "tok-1"
    assert out["thirdPartAuthorization"].startswith(f"auth-v2/{CHANNEL}/")
    assert out["thirdUserName"] == ("Ann" if field != "thirdUserName" else "evil")


@pytest.mark.parametrize("key", ["secretKey", "SECRETKEY", "secret_key", "secret\u200bKey",
                                 "\uff53ecretKey"])
def test_every_spelling_of_the_secret_is_stripped(key: str) -> None:
    out = rewrite({key: "s3cr3t", "nested": {key: "s3cr3t", "keep": 1}})
    assert "s3cr3t" not in json.dumps(out) and out["nested"] == {"keep": 1}


@pytest.mark.parametrize("char", INVISIBLE, ids=lambda c: f"U+{ord(c):04X}")
def test_every_invisible_character_is_removed_from_a_name(char: str) -> None:
    assert clean_user_name(f"{char}Ad{char}min{char}", 64) == "Admin"
    assert rewrite({"thirdUserName": f"Ad{char}min"})["thirdUserName"] == "Admin"


@pytest.mark.parametrize("char", SEPARATORS, ids=lambda c: f"U+{ord(c):04X}")
def test_every_separator_category_becomes_one_space(char: str) -> None:
    assert clean_user_name(f"{char}Ann{char}{char}Lee{char}", 64) == "Ann Lee"


def test_a_lone_surrogate_becomes_a_space() -> None:
    assert clean_user_name("Ann\ud800Lee", 64) == "Ann Lee"


@pytest.mark.parametrize("char", ["\u00a0", "\u3000", "\u2003", "é", "李", "\U0001f600"])
def test_visible_characters_and_spaces_stay(char: str) -> None:
    assert clean_user_name(f"A{char}B", 64) == f"A{char}B"
