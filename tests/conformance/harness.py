"""The conformance harness: a scripted raw upstream, a raw client, and a case runner.

A case is a raw client request, the exact bytes the upstream writes back (as a list of
writes, so a response can be split anywhere or coalesced with the next one), and what the
client must see. ``run_case`` plays it twice through one gateway, each time from a new
client connection, on one pooled upstream connection when the first answer was clean (on a
new one when it was not), and checks that the second client sees nothing of the first.

The marker ``RUN?`` in a case's bytes becomes ``RUN1`` in the first run and ``RUN2`` in the
second (same length, so framing is unchanged): a ``RUN1`` in the second client's bytes is a
leak between visitors, whatever header or body it hides in.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from gateway.fastpath import FastRequestHandler
from tests.support.rawhttp import RawResponse, read_response
from tests.support.upstreams import RawRecorder, UpConn, UpRequest, run_recorder

MARK = b"RUN?"
WARM_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nwarm"
_RUN = re.compile(rb"RUN([12])")


def request(method: str = "GET", target: str = "/c/RUN?", *headers: str, body: bytes = b"",
            host: str = "www.example.com") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", *headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass
class Case:
    """One conformance case; ``writes`` are the upstream's raw writes for the request."""

    id: str
    writes: Sequence[bytes]
    status: int
    body: bytes | None = None  # the body the client must get (after its own framing)
    request: bytes = field(default_factory=request)
    head: bool = False  # the client's request is a HEAD (its answer has no body)
    reused: bool = True  # the upstream connection is clean afterwards and serves run 2
    absent: tuple[str, ...] = ()  # header names the client must not see
    present: dict[str, str] = field(default_factory=dict)  # header name -> exact value
    close: bool = False  # the upstream closes the connection after its writes
    requests: int = 1  # how often the request reaches the upstream per run (2: retried)
    nginx: bool = False  # nginx is the reference: tests/conformance/test_nginx.py
    gap: float = 0.005  # seconds between writes, so that each arrives as a read of its own
    busy: float = 0.0  # after its writes, the upstream reads its next request this much later
    upstream_has: tuple[bytes, ...] = ()  # in the request head the upstream received
    upstream_lacks: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        if self.close or self.status == 502:
            self.reused = False
        if self.status == 502 and self.requests == 1:
            # An invalid answer on a pooled connection may be stray bytes from before: the
            # request (idempotent) is retried once on a fresh connection, which answers the
            # same. (Each run rides a pooled connection: see run_case.)
            self.requests = 2


@dataclass
class ScriptedUpstream(RawRecorder):
    """The recording upstream answering ``/warm`` with a fixed 200 and any other request
    with ``case.writes``."""

    case: Case | None = None
    since: int = 0  # where() looks at requests from this seq on (the current case)
    written: int = 0  # bytes of case answers written so far (drained to the socket)
    busy_until: dict[int, float] = field(default_factory=dict)  # per connection

    def __post_init__(self) -> None:
        self.behaviour = self._answer

    def where(self, marker: bytes) -> list[int]:
        """Indexes of the connections that received a request carrying ``marker``."""
        return [c.index for c in self.conns for r in c.requests
                if marker.decode() in r.target and r.seq >= self.since]

    async def _answer(self, req: UpRequest, conn: UpConn, writer: asyncio.StreamWriter
                      ) -> bool:
        loop = asyncio.get_running_loop()
        if (busy := self.busy_until.get(conn.index, 0.0) - loop.time()) > 0:
            await self.pause(busy)
        if req.target.endswith("/warm"):
            writer.write(WARM_ANSWER)
            await writer.drain()
            return True
        assert self.case is not None
        run = _RUN.search(req.target.encode("latin-1"))
        mark = b"RUN" + (run[1] if run else b"?")
        # The marker may be cut by a split: replace it in the whole, cut the same.
        whole = b"".join(self.case.writes).replace(MARK, mark)
        at = 0
        for i, chunk in enumerate(self.case.writes):
            if i and self.case.gap:
                await asyncio.sleep(self.case.gap)
            writer.write(whole[at:at + len(chunk)])
            at += len(chunk)
            await writer.drain()
            self.written += len(chunk)
        # A handler still running (e.g. streaming a body a HEAD answer omits): the next
        # request on this connection is answered after it.
        self.busy_until[conn.index] = loop.time() + self.case.busy
        return not self.case.close


def scripted_upstream() -> contextlib.AbstractAsyncContextManager[ScriptedUpstream]:
    # run_recorder serves the recorder it is given: this one.
    return cast("contextlib.AbstractAsyncContextManager[ScriptedUpstream]",
                run_recorder(rec=ScriptedUpstream()))


# ------------------------------------------------------------------ the client side


async def fetch(port: int, data: bytes, *, head: bool = False, limit_s: float = 3.0
                ) -> RawResponse:
    """One request on a new connection: the final answer, whole by its own framing; ``raw``
    holds every byte received (interim answers too)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    raw = b""
    try:
        writer.write(data)
        async with asyncio.timeout(limit_s):
            while True:
                answer = await read_response(reader, head_request=head)
                assert answer is not None and answer.complete, (answer, raw)
                raw += answer.raw
                if answer.status >= 200:
                    break
    finally:
        writer.close()
    answer.raw = raw
    return answer


# ------------------------------------------------------------------ the fast-path switch


@dataclass
class PathSwitch:
    """Which request path serves requests: ``fast`` (the lean path, whenever it can) or
    ``full`` (the fast path declines everything, aiohttp's loop and Gateway.handle serve)."""

    name: str
    taken: list[tuple[str, bool]] = field(default_factory=list)

    def install(self, monkeypatch: Any) -> None:
        original: Callable[..., bool] = FastRequestHandler._try_inline
        switch = self

        def spy(handler: FastRequestHandler, msg: Any, payload: Any) -> bool:
            taken = switch.name == "fast" and original(handler, msg, payload)
            switch.taken.append((getattr(msg, "path", "?"), taken))
            return taken

        monkeypatch.setattr(FastRequestHandler, "_try_inline", spy)

    def served_fast(self, marker: str) -> bool:
        return any(taken for path, taken in self.taken if marker in path)


# ------------------------------------------------------------------ the runner


async def warm(port: int) -> None:
    answer = await fetch(port, request(target="/warm"))
    assert answer.status == 200 and answer.body == b"warm", answer.raw
    assert b"RUN" not in answer.raw, answer.raw  # nothing of an earlier exchange


def check(case: Case, answer: RawResponse, run: int) -> None:
    where = f"{case.id}, run {run}: {answer.raw[:600]!r}"
    assert answer.status == case.status, where
    if case.body is not None:
        assert answer.body == case.body.replace(MARK, b"RUN%d" % run), where
    for name in case.absent:
        assert not answer.all(name), where
    for name, value in case.present.items():
        assert answer.all(name) == [value], where
    # Exactly one Date (added when the upstream sent none), and never a second framing.
    assert len(answer.all("Date")) == 1, where
    assert len(answer.all("Content-Length")) + len(answer.all("Transfer-Encoding")) <= 1, where


async def run_case(case: Case, port: int, up: ScriptedUpstream, path: PathSwitch) -> None:
    """Play ``case`` twice, each time from a new client; see the module docstring."""
    up.case = case
    up.since = up.received
    path.taken.clear()
    await warm(port)
    answers = []
    for run in (1, 2):
        data = case.request.replace(MARK, b"RUN%d" % run)
        answer = await fetch(port, data, head=case.head)
        check(case, answer, run)
        answers.append(answer)
        marker = b"RUN%d" % run
        seen = up.where(marker)
        assert len(seen) == case.requests, (case.id, run, seen)
        if run == 1:
            first_conn = up.conns[seen[-1]]
            if not case.reused:
                # The gateway must close a connection the upstream broke framing on.
                await up.wait_closed(first_conn)
                await warm(port)  # a clean pooled connection again, for the fast path
        else:
            if case.reused:
                assert seen == [first_conn.index], (case.id, "run 2 not on the pooled conn",
                                                    seen)
            else:
                assert first_conn.index not in seen, (case.id, "broken conn reused", seen)
        if path.name == "fast" and case.request.startswith((b"GET ", b"HEAD ")):
            assert path.served_fast(marker.decode()), (case.id, run, path.taken)
        if path.name == "full":
            assert not path.served_fast(marker.decode())
    # The second visitor sees nothing of the first, whatever it hides in.
    assert b"RUN1" not in answers[1].raw, (case.id, answers[1].raw)
    assert b"RUN2" not in answers[0].raw, (case.id, answers[0].raw)
    # What the upstream received: the client's request line, and the case's facts.
    method, target, _ = case.request.decode("latin-1").split("\r\n", 1)[0].split(" ", 2)
    assert not up.errors, (case.id, up.errors)  # every request forwarded is well-formed
    for run in (1, 2):
        tag = f"RUN{run}"
        for req in (r for c in up.conns for r in c.requests
                    if tag in r.target and r.seq >= up.since):
            assert (req.method, req.target.replace(tag, "RUN?")) == (method, target), req.raw
            assert req.head.endswith(b"\r\n\r\n") and b"\r\nHost: " in req.head, req.head
            for fact in case.upstream_has:
                assert fact in req.head, (case.id, fact, req.head)
            for fact in case.upstream_lacks:
                assert fact not in req.head, (case.id, fact, req.head)
