"""Request smuggling and parsing: what the client gets and what the upstream sees.

Every case is sent on a raw socket to a gateway whose upstream is the raw recorder
(``rawhttp.RawRecorder``), which frames requests strictly. A malformed request must be
refused with 400 (the connection closed, since its framing cannot be trusted) or be
normalised so that the upstream receives exactly the requests the gateway answered, each
well-formed. Most cases carry a second request hidden where a lax parser would find it
(``GET /smuggled``): the upstream must never see it unless the gateway answered it as a
request of its own.

The cases were written for this gateway; their shapes follow the public catalogues of
desync research (CL.TE / TE.CL / TE.TE, chunk-size and line-ending quirks).
"""

from __future__ import annotations

import asyncio

import pytest

from gateway.runtime import Running
from tests.support.gateway import GatewayStarter
from tests.support.rawhttp import exchange, read_response
from tests.support.upstreams import RawRecorder, UpRequest, recorder_barrier

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"


def post(*headers: bytes, body: bytes = b"", target: bytes = b"/p") -> bytes:
    head = b"POST " + target + b" HTTP/1.1\r\nHost: gw.test\r\n" + b"".join(
        h + b"\r\n" for h in headers)
    return head + b"\r\n" + body


def get(*headers: bytes, target: bytes = b"/g", line_end: bytes = b"\r\n") -> bytes:
    lines = [b"GET " + target + b" HTTP/1.1", b"Host: gw.test", *headers, b"", b""]
    return line_end.join(lines)


CHUNKED_SMUGGLE = b"0\r\n\r\n" + SMUGGLED

# Each of these must be answered 400, with the connection closed and nothing forwarded.
REJECTED: dict[str, bytes] = {
    # -- Content-Length and Transfer-Encoding together (CL.TE / TE.CL)
    "cl_te": post(b"Content-Length: 42", b"Transfer-Encoding: chunked", body=CHUNKED_SMUGGLE),
    "te_cl": post(b"Transfer-Encoding: chunked", b"Content-Length: 4",
                  body=b"5c\r\nGPOST / HTTP/1.1\r\n\r\n0\r\n\r\n"),
    "cl_te_obfuscated": post(b"Content-Length: 42", b"Transfer-Encoding: xchunked",
                             body=CHUNKED_SMUGGLE),
    # -- Content-Length variants
    "two_different_cl": post(b"Content-Length: 5", b"Content-Length: 41",
                             body=b"hello" + SMUGGLED),
    "cl_list": post(b"Content-Length: 5, 41", body=b"hello" + SMUGGLED),
    "cl_plus": post(b"Content-Length: +5", body=b"hello"),
    "cl_negative": post(b"Content-Length: -1", body=SMUGGLED),
    "cl_hex": post(b"Content-Length: 0x5", body=b"hello"),
    "cl_inner_space": post(b"Content-Length: 4 1", body=b"hello" + SMUGGLED),
    "cl_overflow": post(b"Content-Length: 18446744073709551621", body=b"hello" + SMUGGLED),
    "cl_empty": post(b"Content-Length: ", body=SMUGGLED),
    # -- Transfer-Encoding obfuscations that must not be taken for chunked
    "te_xchunked": post(b"Transfer-Encoding: xchunked", body=CHUNKED_SMUGGLE),
    "te_chunked_identity": post(b"Transfer-Encoding: chunked, identity", body=CHUNKED_SMUGGLE),
    "te_twice": post(b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked",
                     body=CHUNKED_SMUGGLE),
    "te_chunked_chunked": post(b"Transfer-Encoding: chunked, chunked", body=CHUNKED_SMUGGLE),
    "te_space_before_colon": post(b"Transfer-Encoding : chunked", body=CHUNKED_SMUGGLE),
    "te_tab_before_colon": post(b"Transfer-Encoding\t: chunked", body=CHUNKED_SMUGGLE),
    "te_vertical_tab": post(b"Transfer-Encoding: \x0bchunked", body=CHUNKED_SMUGGLE),
    "te_folded": post(b"Transfer-Encoding: identity", b" chunked", body=CHUNKED_SMUGGLE),
    "te_nul": post(b"Transfer-Encoding: chunked\x00", body=CHUNKED_SMUGGLE),
    # -- chunk sizes
    "chunk_0x": post(b"Transfer-Encoding: chunked", body=b"0x1\r\nA\r\n" + CHUNKED_SMUGGLE),
    "chunk_plus": post(b"Transfer-Encoding: chunked", body=b"+1\r\nA\r\n" + CHUNKED_SMUGGLE),
    "chunk_minus": post(b"Transfer-Encoding: chunked", body=b"-1\r\nA\r\n" + CHUNKED_SMUGGLE),
    "chunk_underscore": post(b"Transfer-Encoding: chunked",
                             body=b"1_0\r\n0123456789abcdef\r\n" + CHUNKED_SMUGGLE),
    "chunk_leading_space": post(b"Transfer-Encoding: chunked",
                                body=b" 1\r\nA\r\n" + CHUNKED_SMUGGLE),
    "chunk_trailing_space": post(b"Transfer-Encoding: chunked",
                                 body=b"1 \r\nA\r\n" + CHUNKED_SMUGGLE),
    "chunk_empty_size": post(b"Transfer-Encoding: chunked", body=b"\r\nA\r\n" + CHUNKED_SMUGGLE),
    "chunk_overflow": post(b"Transfer-Encoding: chunked",
                           body=b"FFFFFFFFFFFFFFFFF1\r\nA\r\n" + CHUNKED_SMUGGLE),
    "chunk_overflow_wraps_to_1": post(b"Transfer-Encoding: chunked",
                                      body=b"10000000000000001\r\nA\r\n" + CHUNKED_SMUGGLE),
    "chunk_size_bare_lf": post(b"Transfer-Encoding: chunked", body=b"1\nA\r\n" + CHUNKED_SMUGGLE),
    "chunk_ext_bare_lf": post(b"Transfer-Encoding: chunked",
                              body=b"1;a\nX\r\nA\r\n" + CHUNKED_SMUGGLE),
    "chunk_ext_bare_cr": post(b"Transfer-Encoding: chunked",
                              body=b"1;a\rb\r\nA\r\n" + CHUNKED_SMUGGLE),
    "chunk_data_overrun": post(b"Transfer-Encoding: chunked",
                               body=b"3\r\nabcX\r\n" + CHUNKED_SMUGGLE),
    "chunk_last_bare_lf": post(b"Transfer-Encoding: chunked", body=b"3\nabc\n0\n\n" + SMUGGLED),
    "trailer_bare_lf": post(b"Transfer-Encoding: chunked",
                            body=b"0\r\nX: y\n\r\n" + SMUGGLED),
    "trailer_content_length": post(b"Transfer-Encoding: chunked",
                                   body=b"0\r\nContent-Length: 41\r\n\r\n" + SMUGGLED),
    # -- header lines
    "obs_fold_space": get(b"X-A: b", b" c"),
    "obs_fold_tab": get(b"X-A: b", b"\tc"),
    "first_header_folded": b"GET /g HTTP/1.1\r\n Host: gw.test\r\n\r\n",
    "nul_in_value": get(b"X-A: b\x00c"),
    "cr_in_value": get(b"X-A: b\rc"),
    "cr_in_value_smuggles_header": get(b"X-A: b\rTransfer-Encoding: chunked"),
    "bare_lf_everywhere": get(b"X-A: b", line_end=b"\n") + SMUGGLED,
    "bare_lf_one_line": b"GET /g HTTP/1.1\r\nHost: gw.test\nX-A: b\r\n\r\n",
    "bare_cr_line_end": b"GET /g HTTP/1.1\rHost: gw.test\r\n\r\n",
    "space_before_colon": get(b"X-A : b"),
    "space_in_name": get(b"X A: b"),
    "empty_name": get(b": b"),
    "no_colon": get(b"X-A-no-colon"),
    # -- Host
    "two_hosts": get(b"Host: evil.example"),
    "no_host": b"GET /g HTTP/1.1\r\nX-A: b\r\n\r\n",
    # -- request line
    "lower_case_method": b"get /g HTTP/1.1\r\nHost: gw.test\r\n\r\n",
    "version_1_10": b"GET /g HTTP/1.10\r\nHost: gw.test\r\n\r\n",
    "request_line_trailing_space": b"GET /g HTTP/1.1 \r\nHost: gw.test\r\n\r\n",
    "request_line_tab": b"GET\t/g HTTP/1.1\r\nHost: gw.test\r\n\r\n",
    "space_in_target": b"GET /g /smuggled HTTP/1.1\r\nHost: gw.test\r\n\r\n",
    "control_in_target": b"GET /g\x01 HTTP/1.1\r\nHost: gw.test\r\n\r\n",
    "del_in_target": b"GET /g\x7f HTTP/1.1\r\nHost: gw.test\r\n\r\n",
    "authority_form_get": b"GET evil.example:443 HTTP/1.1\r\nHost: gw.test\r\n\r\n",
}

# Refused with 400 and never forwarded; the connection may stay open (the framing is sound).
REFUSED_TARGETS: dict[str, bytes] = {
    "absolute_form_userinfo": b"GET http://u:p@evil/ HTTP/1.1\r\nHost: evil\r\n\r\n",
    "absolute_form_other_scheme": b"GET ftp://evil/x HTTP/1.1\r\nHost: evil\r\n\r\n",
    "connect": b"CONNECT evil:443 HTTP/1.1\r\nHost: evil:443\r\n\r\n",
    "connect_loopback": b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n",
    "asterisk_form": b"OPTIONS * HTTP/1.1\r\nHost: gw.test\r\n\r\n",
}


@pytest.mark.parametrize("data", REJECTED.values(), ids=REJECTED.keys())
async def test_malformed_request_is_rejected(gw: Running, recorder: RawRecorder,
                                             data: bytes) -> None:
    answers, closed = await exchange(gw.port, data, responses=2)
    assert [a.status for a in answers] == [400], [(a.status, a.body) for a in answers]
    assert closed, "the connection must be closed after a framing error"
    assert b"smuggled" not in answers[0].body
    await recorder_barrier(gw.port, recorder)
    assert [r.target for r in recorder.assert_clean(at_most=1)] == ["/after"]
    assert b"smuggled" not in recorder.raw_bytes()


@pytest.mark.parametrize("data", REFUSED_TARGETS.values(), ids=REFUSED_TARGETS.keys())
async def test_not_an_open_proxy(gw: Running, recorder: RawRecorder, data: bytes) -> None:
    answers, _ = await exchange(gw.port, data)
    assert [a.status for a in answers] == [400]
    await recorder_barrier(gw.port, recorder)
    assert [r.target for r in recorder.assert_clean(at_most=1)] == ["/after"]
    assert len(recorder.conns) == 1, "no upstream connection is opened for the refused one"


# RFC 9112 3.2.2: a server MUST accept the absolute form. Its authority replaces Host and
# the path is routed as usual: the upstream is still the configured one, never the named host.
ABSOLUTE_FORMS: dict[str, tuple[bytes, str]] = {
    "absolute_form_http": (b"GET http://evil/ HTTP/1.1\r\nHost: evil\r\n\r\n", "/"),
    "absolute_form_https": (b"GET https://evil.example/x HTTP/1.1\r\nHost: evil.example\r\n\r\n",
                            "/x"),
    "absolute_form_same_host": (b"GET http://gw.test/g HTTP/1.1\r\nHost: gw.test\r\n\r\n", "/g"),
}


@pytest.mark.parametrize("case", ABSOLUTE_FORMS.values(), ids=ABSOLUTE_FORMS.keys())
async def test_absolute_form_is_routed_not_proxied(gw: Running, recorder: RawRecorder,
                                                   case: tuple[bytes, str]) -> None:
    data, target = case
    answers, _ = await exchange(gw.port, data)
    assert [a.status for a in answers] == [200]
    reqs = recorder.assert_clean(at_most=1)
    assert [(r.method, r.target) for r in reqs] == [("GET", target)]
    assert reqs[0].header("Host") == f"127.0.0.1:{recorder.port}"


# Accepted by RFC 9112 (transfer-coding names are case-insensitive, OWS around values,
# a leading empty line is ignored): the gateway re-frames these itself.
NORMALISED: dict[str, tuple[bytes, bytes]] = {
    "te_upper_case": (post(b"Transfer-Encoding: CHUNKED",
                           body=b"5\r\nhello\r\n" + CHUNKED_SMUGGLE), b"hello"),
    "te_tab_before_value": (post(b"Transfer-Encoding:\tchunked",
                                 body=b"5\r\nhello\r\n" + CHUNKED_SMUGGLE), b"hello"),
    "te_two_spaces": (post(b"Transfer-Encoding:  chunked",
                           body=b"5\r\nhello\r\n" + CHUNKED_SMUGGLE), b"hello"),
    "te_trailing_space": (post(b"Transfer-Encoding: chunked ",
                               body=b"5\r\nhello\r\n" + CHUNKED_SMUGGLE), b"hello"),
    "chunk_extension": (post(b"Transfer-Encoding: chunked",
                             body=b"5;name=\"v;x\"\r\nhello\r\n" + CHUNKED_SMUGGLE), b"hello"),
    "chunk_upper_hex": (post(b"Transfer-Encoding: chunked",
                             body=b"A\r\n0123456789\r\n" + CHUNKED_SMUGGLE), b"0123456789"),
    "chunk_leading_zeros": (post(b"Transfer-Encoding: chunked",
                                 body=b"0005\r\nhello\r\n" + CHUNKED_SMUGGLE), b"hello"),
    "trailer_section": (post(b"Transfer-Encoding: chunked",
                             body=b"5\r\nhello\r\n0\r\nX-Checksum: 99\r\n\r\n" + SMUGGLED),
                        b"hello"),
    "content_length": (post(b"Content-Length: 5", body=b"hello" + SMUGGLED), b"hello"),
    "leading_empty_line": (b"\r\n" + post(b"Content-Length: 5", body=b"hello" + SMUGGLED),
                           b"hello"),
}


@pytest.mark.parametrize("case", NORMALISED.values(), ids=NORMALISED.keys())
async def test_valid_framing_is_reframed(gw: Running, recorder: RawRecorder,
                                         case: tuple[bytes, bytes]) -> None:
    """The body ends where the gateway says; what follows is a request of its own."""
    data, body = case
    answers, _ = await exchange(gw.port, data, responses=2)
    assert [a.status for a in answers] == [200, 200]
    assert answers[0].body.endswith(b"POST /p\n")
    assert answers[1].body.endswith(b"GET /smuggled\n")
    reqs = recorder.assert_clean(at_most=2)
    assert [(r.method, r.target) for r in reqs] == [("POST", "/p"), ("GET", "/smuggled")]
    assert reqs[0].body == body
    # One framing header, set by the gateway; never the client's own spelling.
    framing = [(k, v) for k, v in reqs[0].headers
               if k.lower() in ("content-length", "transfer-encoding")]
    assert framing in ([("Content-Length", str(len(body)))], [("Transfer-Encoding", "chunked")])
    assert reqs[1].body == b""


async def test_chunked_body_reaches_upstream_whole(gw: Running, recorder: RawRecorder) -> None:
    chunks = b"".join(b"%x\r\n%b\r\n" % (len(c), c) for c in (b"a" * 100, b"b", b"c" * 4000))
    answers, _ = await exchange(gw.port, post(b"Transfer-Encoding: chunked",
                                              body=chunks + b"0\r\n\r\n"))
    assert [a.status for a in answers] == [200]
    (req,) = recorder.assert_clean(at_most=1)
    assert req.body == b"a" * 100 + b"b" + b"c" * 4000


# Client header names an upstream may fold onto framing or forwarding headers: CGI and WSGI
# servers map both ``X-Real-IP`` and ``X_Real_IP`` to HTTP_X_REAL_IP (nginx drops names with
# underscores by default for this reason).
UNDERSCORE_HEADERS = [
    b"Transfer_Encoding: chunked", b"Content_Length: 5", b"X_Real_IP: 6.6.6.6",
    b"X_Forwarded_For: 6.6.6.6", b"X_Forwarded_Host: evil.example",
]


async def test_underscore_lookalikes_of_framing_and_forwarding_headers_are_not_forwarded(
        gw: Running, recorder: RawRecorder) -> None:
    data = post(*UNDERSCORE_HEADERS, b"Content-Length: 5", body=b"hello")
    answers, _ = await exchange(gw.port, data)
    statuses = [a.status for a in answers]
    assert statuses in ([200], [400]), statuses
    reqs = recorder.assert_clean(at_most=1)
    for req in reqs:
        names = {k.lower().replace("_", "-") for k, _ in req.headers if "_" in k}
        clash = names & {"transfer-encoding", "content-length", "x-real-ip", "x-forwarded-for",
                         "x-forwarded-host"}
        assert not clash, f"the upstream received look-alike headers: {req.raw[:400]!r}"
        assert req.header("X-Real-IP") == "127.0.0.1"


async def test_http10_keep_alive_requests_answered_in_order(gw: Running,
                                                             recorder: RawRecorder) -> None:
    data = (b"GET /a HTTP/1.0\r\nHost: gw.test\r\nConnection: keep-alive\r\n\r\n"
            b"POST /b HTTP/1.0\r\nHost: gw.test\r\nConnection: keep-alive\r\n"
            b"Content-Length: 3\r\n\r\nabc"
            b"GET /c HTTP/1.0\r\nHost: gw.test\r\n\r\n")
    answers, closed = await exchange(gw.port, data, responses=3)
    assert [a.status for a in answers] == [200, 200, 200]
    assert [a.version for a in answers] == ["HTTP/1.0"] * 3
    assert [a.body.split(b":", 2)[2] for a in answers] == [b"GET /a\n", b"POST /b\n", b"GET /c\n"]
    assert [a.header("Connection") for a in answers] == ["keep-alive", "keep-alive", "close"]
    assert closed, "an HTTP/1.0 request without keep-alive ends the connection"
    reqs = recorder.assert_clean(at_most=3)
    assert [(r.method, r.target, r.version) for r in reqs] == [
        ("GET", "/a", "1.1"), ("POST", "/b", "1.1"), ("GET", "/c", "1.1")]
    assert reqs[1].body == b"abc"


async def test_http10_transfer_encoding_closes_the_connection(gw: Running,
                                                               recorder: RawRecorder) -> None:
    """RFC 9112 6.1: TE in an HTTP/1.0 request means faulty framing; close afterwards."""
    data = (b"POST /p HTTP/1.0\r\nHost: gw.test\r\nConnection: keep-alive\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + CHUNKED_SMUGGLE)
    answers, closed = await exchange(gw.port, data, responses=2)
    assert len(answers) <= 1 and closed
    recorder.assert_clean(at_most=1)
    assert b"smuggled" not in recorder.raw_bytes()


async def test_requests_after_connection_close_are_never_forwarded(
        gw: Running, recorder: RawRecorder) -> None:
    """RFC 9112 9.6: process nothing after a request that said close.

    aiohttp's C parser refuses a read that holds data after ``Connection: close`` as a
    whole, so the requests before it in the same packet get one 400 instead of their
    answers (a known limitation, in the README). What matters for safety holds: nothing
    after the close is forwarded, and nothing at all reaches the upstream half-processed.
    """
    data = (b"GET /a HTTP/1.1\r\nHost: gw.test\r\n\r\n"
            b"GET /b HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n" + SMUGGLED)
    answers, closed = await exchange(gw.port, data, responses=3)
    assert closed
    assert b"smuggled" not in recorder.raw_bytes()
    recorder.assert_clean(at_most=2)
    statuses = [a.status for a in answers]
    assert statuses in ([200, 200], [400]), statuses
    if statuses == [400]:
        assert recorder.requests == []


PIPELINE = (
    b"GET /1 HTTP/1.1\r\nHost: gw.test\r\n\r\n"
    b"POST /2 HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 3\r\n\r\nabc"
    b"GET /3 HTTP/1.1\r\nHost: gw.test\r\n\r\n"
    b"HEAD /4 HTTP/1.1\r\nHost: gw.test\r\n\r\n"
    b"POST /5 HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
    b"GET /slow HTTP/1.1\r\nHost: gw.test\r\n\r\n"
    b"GET /7 HTTP/1.1\r\nHost: gw.test\r\n\r\n"
    b"GET /8 HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n"
)
PIPELINE_ORDER = ["GET /1", "POST /2", "GET /3", "HEAD /4", "POST /5", "GET /slow", "GET /7",
                  "GET /8"]


@pytest.mark.parametrize("warm", [False, True], ids=["cold_pool", "warm_pool"])
async def test_pipelined_requests_answered_in_order(recorder: RawRecorder,
                                                    start_gateway: GatewayStarter,
                                                    warm: bool) -> None:
    """Fast-path GETs, full-path POSTs and a slow answer behind each other keep their order."""
    async def slow_first(req: UpRequest, conn: object, writer: asyncio.StreamWriter) -> bool:
        if req.target == "/slow":
            await asyncio.sleep(0.3)
        body = f"{req.method} {req.target}\n".encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
        if req.method != "HEAD":
            writer.write(body)
        await writer.drain()
        return True

    recorder.behaviour = slow_first
    running = await start_gateway(recorder.url)
    if warm:  # idle pooled connections: the GETs take the fast path
        await asyncio.gather(*(exchange(running.port, get(b"Connection: close"))
                               for _ in range(4)))
    before = len(recorder.requests)
    answers, closed = await exchange(running.port, PIPELINE, responses=9, head_at=(3,))
    assert closed
    assert [a.status for a in answers] == [200] * 8
    got = [a.body.decode().strip() for a in answers]
    assert got[:3] == PIPELINE_ORDER[:3] and got[4:] == PIPELINE_ORDER[4:]
    assert answers[3].body == b"" and answers[3].header("Content-Length") == "8"
    reqs = recorder.assert_clean(at_most=before + 8)[before:]
    assert sorted(f"{r.method} {r.target}" for r in reqs) == sorted(PIPELINE_ORDER)
    assert {r.target: r.body for r in reqs}["/2"] == b"abc"
    assert {r.target: r.body for r in reqs}["/5"] == b"hi"


async def test_malformed_request_in_a_pipeline_stops_it(gw: Running,
                                                         recorder: RawRecorder) -> None:
    data = (b"GET /1 HTTP/1.1\r\nHost: gw.test\r\n\r\n"
            + post(b"Content-Length: 4", b"Transfer-Encoding: chunked", body=CHUNKED_SMUGGLE)
            + b"GET /3 HTTP/1.1\r\nHost: gw.test\r\n\r\n")
    answers, closed = await exchange(gw.port, data, responses=3)
    assert closed
    assert [a.status for a in answers][-1:] == [400]
    reqs = recorder.assert_clean(at_most=1)
    assert [r.target for r in reqs] in ([], ["/1"])
    assert b"smuggled" not in recorder.raw_bytes() and b"/3 " not in recorder.raw_bytes()


async def test_upstream_extra_response_never_reaches_another_client(
        gw: Running, recorder: RawRecorder) -> None:
    """An upstream answering twice must not poison the next exchange on that connection."""
    async def double(req: UpRequest, conn: object, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none")
        if req.target == "/double":
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nPOISONED")
        await writer.drain()
        return True

    recorder.behaviour = double
    for target in (b"/double", b"/next", b"/next"):
        answers, _ = await exchange(gw.port, get(target=target))
        assert [(a.status, a.body) for a in answers] == [(200, b"one")]
    recorder.assert_clean(at_most=3)


async def test_head_answer_has_no_body_even_for_errors(gw: Running,
                                                       recorder: RawRecorder) -> None:
    """A HEAD answered 502 on the fast path must not carry the error text as a body: the
    client would read it as the start of the next response (response-queue desync)."""
    async def vanish_on_head(req: UpRequest, conn: object,
                             writer: asyncio.StreamWriter) -> bool:
        if req.method == "HEAD":
            return False  # close without answering, every time
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        return True

    recorder.behaviour = vanish_on_head
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(get(target=b"/warm"))  # leaves an idle pooled connection
        first = await asyncio.wait_for(read_response(reader), 3)
        assert first is not None and first.status == 200
        writer.write(b"HEAD /h HTTP/1.1\r\nHost: gw.test\r\n\r\n" + get(target=b"/after"))
        head = await asyncio.wait_for(read_response(reader, head_request=True), 3)
        assert head is not None and head.status == 502
        after = await asyncio.wait_for(read_response(reader), 3)
        assert after is not None, "connection closed after the HEAD"
        assert (after.status, after.body) == (200, b"ok"), (
            f"the HEAD's error body leaked into the next response: {after}")
    finally:
        writer.close()
