"""Giving memory back to the system once a crowd of connections has gone.

A few thousand client connections at once leave a worker's RSS tens of MiB above where it
started, long after they closed, although the Python objects are gone: CPython keeps freed
objects on its free lists, and one such object left in a 1 MiB pymalloc arena keeps the
whole arena mapped; glibc's malloc keeps freed heap pages (parser buffers, transports)
until something asks for them back. Neither is a leak (the next crowd reuses the space),
but an operator sizing a host sees the peak stay.

So, when the open connection count has dropped well below its peak (the crowd went),
``CrowdRelease`` runs one full ``gc.collect()`` (it also empties CPython's free lists,
letting arenas go) and then glibc's ``malloc_trim(0)``, and again a few times later. A second
after the crowd went, unless a new crowd came meanwhile, the upstream pools also close
the idle connections the crowd left beyond the clients still connected (``shed``: those
clients cannot use more at once, and a new crowd opens what it needs): kept for their
``idle_timeout``, they would hold the arenas they were allocated in, several MiB per
thousand, for that long. The release a second later gives that memory back. Nothing runs
while connections stay few, and never more often than once a second.

That alone left most of the crowd's arenas mapped. What kept them were dead objects parked
in the free lists of C extension types, which ``gc.collect()`` does not empty (it empties
CPython's own): uvloop's callback and timer handles (up to 250 each, one per
``call_soon``/``call_later``), asyncio's future iterators (up to 255, one per ``await`` of
a future) and multidict's dicts and key tables. When a crowd goes, the first of its
objects to be freed fill those lists, each in whichever arena the crowd allocated it, so a
few hundred small objects keep as many 1 MiB arenas resident. ``FreeLists`` swaps them
out at each release: it takes every parked object out of a list (by making as many
objects as the list holds), puts back a set of the same objects made before any crowd
(the "plug"), so that the crowd's objects, now beyond the list's capacity, go back to the
allocator, and after the collection takes the plug back out. The lists are then empty and
refill with objects allocated after the release, in the arenas that stayed. multidict
empties its own lists on request (a private call, in ``gateway/aiohttp_adapter.py``).
Likewise, each counter that every request replaces (request counts, the latency histogram,
request ids) is the number object made at its latest increment, during a crowd in one of
its arenas: after the collection the release has them made anew (``remake``), and remakes
its own follow-up timer too.

The collector is also tuned for a server holding many connections (``tune_collector``):
CPython collects its youngest generation every 700 net allocations of container objects
and promotes what survives. While requests come and go at a steady number of connections,
their objects are freed by reference counting and the net count barely moves (no
collection at all in a 64-connection run). What moves it is what lives as long as a
connection: a crowd of 5,000 arriving brings its client protocols, its requests in flight
and the upstream connections opened for them, some twenty container objects each, all
alive when the youngest generation is collected. Each collection then promotes them, and
the oldest generation's growth triggers full collections that walk every object of the
process, connections included. Measured per thread at 5,000 connections: with CPython's
700, a fifth of a worker's CPU; with 10,000, 7.9 µs per request (126 young, 11 middle and
one full collection in a 15 s run); with 50,000, 0.4 µs (seven young ones). A young
generation of 50,000 lets a crowd settle before anything is promoted; cycles wait longer to
be freed (at most 50,000 allocations' worth: a few MiB), and one young collection walks up
to that many objects (a few milliseconds, when it comes).
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import ctypes.util
import gc
import logging
import sys
import time
from collections.abc import Callable

from gateway.aiohttp_adapter import multidict_freelist_clear

log = logging.getLogger("gateway.memory")

# A crowd: at least this many connections open at once; it went when at most a quarter of
# them remain (a full gc pass with thousands of connections open would stall them all).
CROWD = 256
# Seconds after the crowd went at which memory is given back: at once; a second later (the
# crowd "went" with up to a quarter of it still connected; those close meanwhile), when the
# pools also shed their idle connections; a second after that, once those are freed; and
# later again, for what was kept in the pools until its idle timeout (30 s by default).
FOLLOW_UPS = (0.0, 1.0, 2.0, 8.0, 32.0, 128.0)
_SHED_AT = 1  # the index in FOLLOW_UPS of the release that sheds idle connections first


# How many freed objects each free list keeps: uvloop's Cython classes
# (``@cython.freelist(DEFAULT_FREELIST_SIZE)``) and CPython's ``_asyncio`` future
# iterators (``FI_FREELIST_MAXLEN``). A larger list in another version only leaves part of
# it unswapped.
UVLOOP_FREE_LIST = 250
FUTURE_ITER_FREE_LIST = 255
# A delay no plug timer ever reaches: each is cancelled as soon as it is made.
_NEVER = 86_400.0


# Net allocations of container objects between two collections of the youngest generation
# (CPython's default: 700).
YOUNG_GENERATION = 50_000


def tune_collector(young: int = YOUNG_GENERATION) -> None:
    """Size the collector's youngest generation for a serving process (see the module
    docstring); the older generations' thresholds stay as they are."""
    _, middle, old = gc.get_threshold()
    gc.set_threshold(young, middle, old)


def _libc_malloc_trim() -> Callable[[int], int] | None:
    # malloc_trim is glibc's: it returns freed pages anywhere in the heap to the system
    # (free() alone only shrinks the top of the heap). Other C libraries (musl, macOS) do
    # not have it; there the gc pass still runs and this step is skipped.
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    result: Callable[[int], int] = trim
    return result


class Trim:
    """``malloc_trim(0)`` where the C library has it; ``available`` says whether it does."""

    def __init__(self, find: Callable[[], Callable[[int], int] | None] = _libc_malloc_trim
                 ) -> None:
        self._trim = find()

    @property
    def available(self) -> bool:
        return self._trim is not None

    def __call__(self) -> bool:
        """True when memory was returned to the system."""
        return bool(self._trim(0)) if self._trim is not None else False


def _noop() -> None:
    return None


class FreeLists:
    """Swaps the objects a crowd left in C extension types' free lists for ones made at
    start-up (see the module docstring). Made on the event loop before any crowd.

    A swap takes three steps, each a pass of the event loop apart: the loop holds a
    cancelled callback handle until its next pass, and a cancelled timer handle stays
    referenced by its libuv timer until that timer's close completes at the end of the
    pass. ``begin`` empties the lists (by making as many objects as they hold), ``plug``
    drops the plugs into them and lets the drained objects go, and ``finish`` (after the
    collection) takes the plugs back out. The plug lists are filled in place: a new list
    object made during a release would itself sit in an arena the crowd left."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        # The plugs hold references only: cancelled handles, iterators of a future that
        # never completes.
        self._future: asyncio.Future[None] = loop.create_future()
        # One empty context for all of them (their callback never runs): a handle otherwise
        # copies the current one, a new object per handle, made while the crowd's arenas
        # are still there.
        self._context = contextvars.Context()
        # Plain asyncio's handles are Python objects without a free list of their own.
        self.uvloop = type(loop).__module__.startswith("uvloop")
        self._iters: list[object] = []
        self._handles: list[asyncio.Handle] = []
        self._timers: list[asyncio.Handle] = []
        self._drained_iters: list[object] = []
        self._drained_handles: list[asyncio.Handle] = []
        self._drained_timers: list[asyncio.Handle] = []
        self._fill(self._iters, self._handles, self._timers)
        self._multidict_clear = multidict_freelist_clear()
        self.swaps = 0

    def _fill(self, iters: list[object], handles: list[asyncio.Handle],
              timers: list[asyncio.Handle]) -> None:
        iters.extend(self._future.__await__() for _ in range(FUTURE_ITER_FREE_LIST))
        if not self.uvloop:
            return
        context = self._context
        handles.extend(self._loop.call_soon(_noop, context=context)
                       for _ in range(UVLOOP_FREE_LIST))
        timers.extend(self._loop.call_later(_NEVER, _noop, context=context)
                      for _ in range(UVLOOP_FREE_LIST))
        for handle in handles:
            handle.cancel()
        for timer in timers:
            timer.cancel()

    def begin(self) -> None:
        """Take every parked object out of the free lists (and fresh ones for the rest)."""
        self._fill(self._drained_iters, self._drained_handles, self._drained_timers)

    def plug(self) -> None:
        """The plugs fill the lists to their capacity again; what was drained, now beyond
        it, goes back to the allocator."""
        # What entered the lists since ``begin`` (a handle the loop ran meanwhile: the
        # release's own timer) is drained too, or a plug object would not fit.
        self.begin()
        for plug, drained in ((self._iters, self._drained_iters),
                              (self._handles, self._drained_handles),
                              (self._timers, self._drained_timers)):
            plug.clear()
            drained.clear()

    def clear_multidict(self) -> None:
        if self._multidict_clear is not None:
            self._multidict_clear()

    def finish(self) -> None:
        """Take the plugs back out: the lists are empty, and refill with objects allocated
        after the release, in the arenas that stayed. Called after the collection, as
        taking a timer handle out makes a new float (its deadline) that would otherwise
        land in an arena the crowd left."""
        self._fill(self._iters, self._handles, self._timers)
        self.swaps += 1


class CrowdRelease:
    """Counts open connections; gives memory back once a crowd of them has closed."""

    def __init__(self, *, crowd: int = CROWD, follow_ups: tuple[float, ...] = FOLLOW_UPS,
                 every: float = 1.0, trim: Trim | None = None,
                 shed: Callable[[int], object] | None = None,
                 remake: Callable[[], object] | None = None) -> None:
        self.crowd = crowd
        # Called after the collection: long-lived values that every request replaces
        # (counters) are made anew, away from the arenas the crowd left.
        self.remake = remake
        # Called with the connections still open a second after the crowd went: close idle
        # upstream connections beyond that many.
        self.shed = shed
        self.every = every  # how often to look whether the crowd went
        self.follow_ups = follow_ups
        self.trim = trim if trim is not None else Trim()
        self.open = 0
        self.peak = 0
        self.releases = 0
        self._handle: asyncio.TimerHandle | None = None
        self._step = 0  # index into follow_ups once the crowd went
        # Made with the first connection, before any crowd (see FreeLists).
        self.free_lists: FreeLists | None = None
        self._rearm_at: float | None = None  # the follow-up timer, while it is remade

    def opened(self) -> None:
        if self.free_lists is None:
            self.free_lists = FreeLists(asyncio.get_running_loop())
        self.open += 1
        if self.open > self.peak:
            self.peak = self.open
            if self.peak >= self.crowd and self._handle is None:
                self._arm(self.every)
        if self._step and self.open >= self.crowd:
            # A new crowd: watch it from now on; its own follow-ups once it goes.
            self._step = 0
            self.close()
            self._arm(self.every)

    def closed(self) -> None:
        self.open -= 1

    def _arm(self, delay: float) -> None:
        self._handle = asyncio.get_running_loop().call_later(delay, self._check)

    def _check(self) -> None:
        self._handle = None
        if self._step == 0:
            if self.open * 4 > self.peak:
                if self.peak >= self.crowd:
                    self._arm(self.every)  # more than a quarter of the crowd is still here
                return
            self._step = 1
        elif self._step == _SHED_AT + 1 and self.shed is not None:
            # No new crowd came within the first follow-up (it would have reset the
            # steps): the pools need no more idle connections than the clients left.
            self.shed(self.open)
        self.release()
        self.peak = self.open
        if self._step < len(self.follow_ups):
            wait = self.follow_ups[self._step] - self.follow_ups[self._step - 1]
            self._step += 1
            self._arm(wait)
        else:
            self._step = 0
            if self.peak >= self.crowd:
                self._arm(self.every)

    def release(self) -> None:
        """Empty the free lists of the crowd's objects, then (once the loop let go of the
        handles that takes) collect and trim."""
        if self.free_lists is None:
            self._collect()
            return
        self.free_lists.begin()
        asyncio.get_running_loop().call_soon(self._plug)

    def _plug(self) -> None:
        # The next follow-up's timer was made before the crowd's arenas went: cancelled
        # now (it is freed while the free list is full) and made again after the
        # collection, where what stayed is.
        if self._handle is not None:
            when = self._handle.when()
            self.close()
            self._rearm_at = when
        if self.free_lists is not None:
            self.free_lists.plug()
        asyncio.get_running_loop().call_soon(self._collect)

    def _collect(self) -> None:
        if self.free_lists is not None:
            self.free_lists.clear_multidict()
        started = time.perf_counter()
        gc.collect()
        if self._rearm_at is not None:
            if self._handle is None:
                self._handle = asyncio.get_running_loop().call_at(self._rearm_at,
                                                                  self._check)
            self._rearm_at = None
        if self.free_lists is not None:
            self.free_lists.finish()
        if self.remake is not None:
            self.remake()
        collected = time.perf_counter()
        trimmed = self.trim()
        self.releases += 1
        log.debug("gave memory back after a crowd (%d connections open): gc %.1f ms, "
                  "malloc_trim %.1f ms (%s)", self.open, (collected - started) * 1000,
                  (time.perf_counter() - collected) * 1000,
                  "returned pages" if trimmed else "nothing returned or unavailable")

    def close(self) -> None:
        self._rearm_at = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
