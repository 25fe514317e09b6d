"""CORS header values built from lists, and the wildcard next to named origins (issue 19)."""

from __future__ import annotations

import pytest

from gateway.config import Cors
from gateway.cors import CorsPolicy


def test_every_list_is_joined_as_one_header_value() -> None:
    policy = CorsPolicy(Cors(allow_origins=["https://a.example"], allow_methods=["GET", "POST"],
                             allow_headers=["Content-Type", "X-Token"],
                             expose_headers=["X-Request-ID", "X-Trace"]))
    pre = dict(policy.preflight("https://a.example", "X-Ignored") or [])
    assert pre["Access-Control-Allow-Methods"] == "GET, POST"
    assert pre["Access-Control-Allow-Headers"] == "Content-Type, X-Token"
    actual = dict(policy.actual("https://a.example") or [])
    assert actual["Access-Control-Expose-Headers"] == "X-Request-ID, X-Trace"


@pytest.mark.parametrize("origin", ["https://A.example", "https://a.EXAMPLE", "*"])
def test_named_origins_match_without_case(origin: str) -> None:
    policy = CorsPolicy(Cors(allow_origins=["HTTPS://a.example"]))
    assert policy.allowed(origin) is (origin != "*")
    assert policy.enabled


def test_a_wildcard_answers_star_whatever_else_is_listed() -> None:
    policy = CorsPolicy(Cors(allow_origins=["https://a.example", "*"]))
    for origin in ("https://a.example", "https://b.example", "null"):
        assert dict(policy.actual(origin) or []) == {"Access-Control-Allow-Origin": "*"}
    assert "Access-Control-Allow-Credentials" not in dict(policy.actual("x") or [])
