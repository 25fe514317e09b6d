"""CORS policy (pure): preflight answers, actual-response headers, unknown origins get none."""

from __future__ import annotations

from gateway.config import Cors
from gateway.cors import CorsPolicy

POLICY = CorsPolicy(Cors(allow_origins=["https://www.example.com", "http://localhost:3000"],
                         allow_credentials=True, max_age=600,
                         expose_headers=["X-Request-ID"]))


def as_dict(headers: list[tuple[str, str]] | None) -> dict[str, str]:
    assert headers is not None
    return dict(headers)


def test_disabled_without_origins() -> None:
    policy = CorsPolicy(Cors())
    assert not policy.enabled
    assert policy.actual("https://www.example.com") is None


def test_preflight_allowed() -> None:
    h = as_dict(POLICY.preflight("https://www.example.com", "Content-Type, X-Token"))
    assert h["Access-Control-Allow-Origin"] == "https://www.example.com"
    assert h["Access-Control-Allow-Credentials"] == "true"
    assert "POST" in h["Access-Control-Allow-Methods"]
    assert h["Access-Control-Allow-Headers"] == "Content-Type, X-Token"  # echoed
    assert h["Access-Control-Max-Age"] == "600"


def test_origin_match_ignores_case_but_echoes_as_sent() -> None:
    h = as_dict(POLICY.preflight("HTTPS://WWW.EXAMPLE.COM", None))
    assert h["Access-Control-Allow-Origin"] == "HTTPS://WWW.EXAMPLE.COM"
    assert "Access-Control-Allow-Headers" not in h


def test_preflight_denied() -> None:
    assert POLICY.preflight("https://evil.example", "Content-Type") is None
    # lookalikes are not the trusted origin
    assert POLICY.preflight("https://www.example.com.evil.example", None) is None
    assert POLICY.preflight("http://www.example.com", None) is None
    assert POLICY.preflight("http://localhost:3001", None) is None
    assert POLICY.preflight("null", None) is None


def test_actual_allowed_and_denied() -> None:
    h = as_dict(POLICY.actual("http://localhost:3000"))
    assert h == {"Access-Control-Allow-Origin": "http://localhost:3000",
                 "Access-Control-Allow-Credentials": "true",
                 "Access-Control-Expose-Headers": "X-Request-ID"}
    assert POLICY.actual("https://evil.example") is None


def test_configured_allow_headers_and_methods() -> None:
    policy = CorsPolicy(Cors(allow_origins=["https://a.example"], allow_methods=["GET"],
                             allow_headers=["Content-Type"], max_age=5))
    h = as_dict(policy.preflight("https://a.example", "X-Anything"))
    assert h["Access-Control-Allow-Methods"] == "GET"
    assert h["Access-Control-Allow-Headers"] == "Content-Type"
    assert h["Access-Control-Max-Age"] == "5"
    assert "Access-Control-Allow-Credentials" not in h


def test_wildcard_without_credentials() -> None:
    policy = CorsPolicy(Cors(allow_origins=["*"]))
    h = as_dict(policy.actual("https://anyone.example"))
    assert h["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in h
