"""Redirect rewriting judged by where a browser goes, not by the string the gateway emits.

``resolve`` below is a small WHATWG URL resolver written for this test, independently of
``gateway/boundary.py`` (a state machine over the spec's states for http/https; it does
not share code with the gateway). ``tests/e2e/test_e2e_boundary.py`` checks it against
Chromium's own ``new URL()``. The property: after the gateway's rewrite, the URL a browser
resolves is the gateway's origin (with the mapped path when the upstream pointed into the
route) or the target the original value resolved to; never a third host.
"""

from __future__ import annotations

import re
from typing import NamedTuple
from urllib.parse import unquote

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from yarl import URL

from gateway.boundary import rewrite_location, rewrite_refresh
from gateway.headers import UrlMap

DEFAULT_PORT = {"http": 80, "https": 443}


class Resolved(NamedTuple):
    scheme: str
    host: str
    port: int
    path: str
    had_authority: bool  # the host came from the value itself


def _dots(segments: list[str]) -> str:
    out: list[str] = []
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        low = seg.lower()
        if low in ("..", ".%2e", "%2e.", "%2e%2e"):
            if out:
                out.pop()
            if last:
                out.append("")
        elif low in (".", "%2e"):
            if last:
                out.append("")
        else:
            out.append(seg)
    return "/" + "/".join(out)


def resolve(value: str, base: Resolved) -> Resolved | None:
    """Where a browser on ``base`` goes with ``value``; None: not http(s), or a failure."""
    s = value.strip("".join(chr(i) for i in range(0x21)))
    s = s.replace("\t", "").replace("\n", "").replace("\r", "")
    i = 0
    state = "scheme start"
    scheme = base.scheme
    m = re.match(r"[A-Za-z][A-Za-z0-9+\-.]*:", s)
    if m:
        scheme = m.group()[:-1].lower()
        if scheme not in DEFAULT_PORT:
            return None
        i = m.end()
        if scheme == base.scheme:
            state = ("authority" if s[i:i + 2] in ("//",) else "relative")
        else:
            state = "authority"
    else:
        state = "relative"
    if state == "relative":
        c = s[i:i + 1]
        if c in ("/", "\\"):
            if s[i + 1:i + 2] in ("/", "\\"):
                state = "authority"
            else:
                state = "path"
        else:
            # a path relative to the base's directory (or just ?query / #fragment)
            rest = re.split(r"[?#]", s[i:], maxsplit=1)[0]
            directory = base.path.split("/")[1:-1]
            if rest == "":
                return Resolved(base.scheme, base.host, base.port, base.path, False)
            segs = directory + re.split(r"[/\\]", rest)
            return Resolved(base.scheme, base.host, base.port, _dots(segs), False)
    if state == "path":
        rest = re.split(r"[?#]", s[i:], maxsplit=1)[0]
        return Resolved(base.scheme, base.host, base.port,
                        _dots(re.split(r"[/\\]", rest)[1:]), False)
    # authority: skip every slash and backslash, then read up to / \ ? #
    while i < len(s) and s[i] in "/\\":
        i += 1
    j = i
    while j < len(s) and s[j] not in "/\\?#":
        j += 1
    authority = s[i:j]
    hostport = authority.rpartition("@")[2]
    if hostport.startswith("["):
        host, _, after = hostport.partition("]")
        host += "]"
        port_text = after[1:] if after.startswith(":") else ""
    else:
        host, _, port_text = hostport.partition(":")
    host = unquote(host).lower()  # browsers percent-decode a host (IDNA is not generated)
    if not host:
        return None
    port = DEFAULT_PORT[scheme]
    if port_text:
        if not port_text.isdigit():
            return None
        port = int(port_text)
    rest = re.split(r"[?#]", s[j:], maxsplit=1)[0]
    path = _dots(re.split(r"[/\\]", rest)[1:]) if rest else "/"
    return Resolved(scheme, host, port, path, True)


# ------------------------------------------------------------------ the property

GATEWAY = "gw.test"
ROUTES = {
    "cec": UrlMap.for_route("/service-cloud/", URL("https://cec.example.com/service-cloud/")),
    "site": UrlMap.for_route("/", URL("http://127.0.0.1:3000/")),
    "demo": UrlMap.for_route("/demo/", URL("http://origin.example:8080/app/")),
}

schemes = st.sampled_from(["", "", "http:", "https:", "HTTP:", "hTTps:", "javascript:", "ftp:"])
slashes = st.lists(st.sampled_from(["/", "\\", "\t", "\n", "/"]), max_size=4).map("".join)
hosts = st.sampled_from(["cec.example.com", "CEC.example.com", "cec.example.com:443",
                         "cec.example.com:8443", "127.0.0.1:3000", "127.0.0.1", GATEWAY,
                         "origin.example:8080", "evil.example", "cec.example.com.evil.example",
                         "user@cec.example.com", "cec.example.com@evil.example", "", " evil"])
segments = st.lists(st.sampled_from(["service-cloud", "app", "demo", "..", ".", "%2e", "%2E.",
                                     "", "evil.example", "x", "\t", "\\", " "]),
                    max_size=6).map("/".join)
tails = st.sampled_from(["", "?a=1", "?to=//evil.example", "#f", "?x=\\y#z"])
locations = st.builds(lambda pre, sch, sl, h, sep, p, t: pre + sch + sl + h + sep + p + t,
                      st.sampled_from(["", "", " ", "\t", "\x00"]), schemes, slashes, hosts,
                      st.sampled_from(["/", "\\", "", "/\t/"]), segments, tails)


def check(name: str, value: str, https: bool) -> None:
    urls = ROUTES[name]
    scheme = "https" if https else "http"
    page = Resolved(scheme, GATEWAY, DEFAULT_PORT[scheme], urls.prefix + "page", False)
    out = rewrite_location(value, urls, https)
    before = resolve(value, page)
    after = resolve(out, page)
    if after is None:
        assert before is None or before.host != GATEWAY or out == "", (value, out)
        return
    allowed = {GATEWAY} | ({before.host} if before is not None else set())
    assert after.host in allowed, f"{value!r} -> {out!r} goes to {after.host}"
    # A value the upstream meant as its own URL inside the route lands on the mapped path.
    up_scheme, _, up_rest = urls.upstream_origins[0].partition("://")
    up_host, _, up_port = up_rest.partition(":")
    upstream_page = Resolved(up_scheme, up_host, int(up_port) if up_port else
                             DEFAULT_PORT[up_scheme], urls.upstream_path + "page", False)
    meant = resolve(value, upstream_page)
    if (meant is not None and meant.had_authority and "@" not in value
            and (meant.scheme, meant.host, meant.port) == upstream_page[:3]
            and meant.path.startswith(urls.upstream_path)):
        expected = urls.prefix + meant.path[len(urls.upstream_path):]
        expected = "/" + expected.lstrip("/") if expected.startswith("//") else expected
        assert after.host == GATEWAY, (value, out)
        assert after.path == _dots(expected.split("/")[1:]), (value, out, after.path)


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from(sorted(ROUTES)), locations, st.booleans())
@example("site", "http://127.0.0.1:3000/\t/evil.example/x", False)
@example("site", "/\t/evil.example/x", True)
@example("cec", "https://cec.example.com/service-cloud/\\\\evil.example", True)
@example("site", "http:\\\\evil.example", False)
@example("site", "https:evil.example", False)
@example("cec", "https://cec.example.com/service-cloud/%2e%2e/%2e%2e//evil.example", False)
def test_a_rewritten_location_never_sends_the_browser_to_a_third_host(
        name: str, value: str, https: bool) -> None:
    check(name, value, https)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(ROUTES)), locations, st.booleans())
def test_refresh_follows_the_same_rule(name: str, value: str, https: bool) -> None:
    urls = ROUTES[name]
    out = rewrite_refresh(f"0; url={value}", urls, https)
    assert out.startswith("0; url=")
    # The whitespace before the URL is the Refresh syntax's, kept; the URL as a Location.
    ws = " \t\n\f\r"
    assert out[len("0; url="):].lstrip(ws) == rewrite_location(value.lstrip(ws), urls, https)


@pytest.mark.parametrize(("value", "expected"), [
    ("http://127.0.0.1:3000/\t/evil.example/x", "/evil.example/x"),
    ("/\t/evil.example/x", "http://evil.example/x"),
    ("http:\\\\evil.example/x", "http://evil.example/x"),
    ("HTTP://127.0.0.1:3000//evil.example", "/evil.example"),
    ("http://127.0.0.1:3000/a/../..//evil.example", "/evil.example"),
    ("javascript:alert(1)", "javascript:alert(1)"),
    ("https://login.example/", "https://login.example/"),
])
def test_known_cases(value: str, expected: str) -> None:
    assert rewrite_location(value, ROUTES["site"]) == expected


def test_the_resolver_knows_the_browser_tricks() -> None:
    page = Resolved("http", GATEWAY, 80, "/a/page", False)
    assert resolve("/\t/evil.example/x", page) == Resolved("http", "evil.example", 80, "/x",
                                                            True)
    assert resolve("\\\\evil.example", page)[1] == "evil.example"  # type: ignore[index]
    assert resolve("http:evil.example", page)[1] == GATEWAY  # type: ignore[index]
    assert resolve("https:evil.example", page)[1] == "evil.example"  # type: ignore[index]
    assert resolve("../../x", page) == Resolved("http", GATEWAY, 80, "/x", False)
