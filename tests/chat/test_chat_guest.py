"""The signed guest cookie: format, tampering, attributes, and reading from a real request."""

from __future__ import annotations

import pickle
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import RawTestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.chat.guest import GUEST_ID_RE, GuestCookies

KEY = b"k" * 32


def test_new_id_format_and_randomness() -> None:
    ids = {GuestCookies.new_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(GUEST_ID_RE.match(i) for i in ids)
    assert all(len(i) == len("guest-") + 20 for i in ids)


def test_round_trip_and_tampering() -> None:
    g = GuestCookies(KEY)
    gid = g.new_id()
    value = g.value_for(gid)
    assert g.read_value(value) == gid
    assert gid in value  # signed, not encrypted: the id itself is no secret
    # Another id with the old signature, a changed signature, garbage, another key.
    other = g.new_id()
    assert g.read_value(value.replace(gid, other)) is None
    # Change a middle character of the signature: the last base64 character of a 32-byte
    # signature carries padding bits, so changing it may decode to the same bytes.
    i = len(value) - 10
    assert g.read_value(value[:i] + ("A" if value[i] != "A" else "B") + value[i + 1:]) is None
    assert g.read_value("guest-0123") is None
    assert g.read_value("") is None and g.read_value(None) is None
    assert g.read_value("ünïcode.sig") is None
    assert GuestCookies(b"x" * 32).read_value(value) is None
    # A validly signed value that is not a guest id (e.g. from another use of the key).
    assert g.read_value(g.value_for("admin")) is None


def test_cookie_header_attributes() -> None:
    g = GuestCookies(KEY, "my_guest", max_age=3600)
    header = g.cookie_header("guest-0123456789abcdef0123")
    parts = [p.strip() for p in header.split(";")]
    name, _, value = parts[0].partition("=")
    assert name == "my_guest"
    assert g.read_value(value) == "guest-0123456789abcdef0123"
    assert set(parts[1:]) == {"Path=/", "Max-Age=3600", "HttpOnly", "SameSite=Lax"}
    secure = GuestCookies(KEY, secure=True).cookie_header("guest-0123456789abcdef0123")
    assert secure.endswith("; Secure")
    assert secure.startswith("cec_guest=")


def test_read_cookie_header() -> None:
    g = GuestCookies(KEY)
    gid = g.new_id()
    header = f"a=1; cec_guest={g.value_for(gid)}; b=2"
    assert g.read_cookie_header(header) == gid
    assert g.read_cookie_header("a=1") is None
    assert g.read_cookie_header(None) is None


def test_bad_setup_and_redaction() -> None:
    with pytest.raises(ValueError):
        GuestCookies(b"short")
    with pytest.raises(ValueError):
        GuestCookies(KEY, "bad name;")
    with pytest.raises(ValueError):
        GuestCookies(KEY, max_age=0)
    g = GuestCookies(b"very-secret-cookie-key-123456789")
    assert "very-secret" not in repr(g)
    with pytest.raises(TypeError):
        pickle.dumps(g)


@pytest.fixture
async def server() -> AsyncIterator[tuple[RawTestServer, GuestCookies]]:
    guest = GuestCookies(KEY)

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        found = guest.read(request)
        if found is None:
            gid = guest.new_id()
            return web.Response(text=f"new {gid}", headers={"Set-Cookie": guest.cookie_header(gid)})
        return web.Response(text=f"old {found}")

    srv = RawTestServer(handler)
    await srv.start_server()
    try:
        yield srv, guest
    finally:
        await srv.close()


async def test_read_from_real_request(server: tuple[RawTestServer, GuestCookies]) -> None:
    srv, _guest = server
    url = str(srv.make_url("/"))
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
        async with browser.get(url) as r:
            first = await r.text()
            assert r.headers["Set-Cookie"].startswith("cec_guest=")
        assert first.startswith("new guest-")
        async with browser.get(url) as r:
            assert await r.text() == "old " + first.split()[1]
            assert "Set-Cookie" not in r.headers
    # A forged cookie is ignored and replaced.
    async with aiohttp.ClientSession() as raw:
        async with raw.get(url, headers={"Cookie": "cec_guest=guest-0123456789abcdef0123.x"}) as r:
            assert (await r.text()).startswith("new ")


def test_read_cookie_header_edge_cases() -> None:
    g = GuestCookies(KEY)
    gid, other = g.new_id(), g.new_id()
    value = g.value_for(gid)
    # A stale or forged cookie of the same name does not hide the valid one, in either order.
    assert g.read_cookie_header(f"cec_guest=forged; cec_guest={value}") == gid
    assert g.read_cookie_header(f"cec_guest={value}; cec_guest={g.value_for(other)}") == gid
    assert g.read_cookie_header(f'cec_guest="{value}"') == gid
    assert g.read_cookie_header(f"  cec_guest = {value} ;x=y") == gid
    # Other names that merely contain ours are not ours.
    assert g.read_cookie_header(f"xcec_guest={value}; cec_guest_old={value}") is None
    assert g.read_cookie_header("cec_guest") is None
    assert g.read_cookie_header("cec_guest=") is None
    assert g.read_cookie_header(f"cec_guest={value[:-2]}") is None


def _reference_read(g: GuestCookies, header: str | None) -> str | None:
    """The reader as first written: split on ';', the first pair of ours that verifies."""
    if not header:
        return None
    for part in header.split(";"):
        key, eq, value = part.partition("=")
        if eq and key.strip() == g.cookie_name:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            guest_id = g.read_value(value)
            if guest_id is not None:
                return guest_id
    return None


_G = GuestCookies(KEY)
_VALID = [_G.value_for(_G.new_id()) for _ in range(2)]
_blank = st.sampled_from(["", " ", "  ", "\t", "\u00a0", "\u3000", "\n"])
_value = st.one_of(st.sampled_from(_VALID), st.sampled_from(_VALID).map(lambda v: f'"{v}"'),
                   st.sampled_from(_VALID).map(lambda v: v[:-1]), st.text(max_size=8))
_pair = st.tuples(_blank, st.sampled_from(["cec_guest", "xcec_guest", "cec_guest_x", "a", ""]),
                  _blank, st.sampled_from(["=", "", "=="]), _blank, _value, _blank).map("".join)


@settings(max_examples=500, deadline=None)
@given(st.lists(_pair, max_size=5), st.sampled_from(["; ", ";", " ; "]))
def test_read_cookie_header_equals_the_split_reader(pairs: list[str], sep: str) -> None:
    header = sep.join(pairs)
    assert _G.read_cookie_header(header) == _reference_read(_G, header)


def test_long_values_are_refused_without_being_kept() -> None:
    """A real value is about 70 characters; a long one cannot verify and is not cached."""
    g = GuestCookies(KEY)
    gid = g.new_id()
    value = g.value_for(gid)
    assert len(value) < 100
    assert g.read_value(value) == gid
    assert g.read_value(value + "x" * 200) is None
    assert g.read_cookie_header("cec_guest=" + "y" * 8000) is None
    info = g._verified.cache_info()
    assert info.currsize == 1  # only the real value was verified (and kept)
