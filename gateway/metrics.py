"""Prometheus metrics, one registry per process (served by ``admin`` on its own listener).

With several workers the supervisor serves the host's view on ``admin.port``: it scrapes
every worker's registry (each on a private Unix socket) and adds them up
(``gateway/hostmetrics.py``). That keeps each worker's series exact and its bookkeeping
plain, where prometheus-client's multiprocess mode would need a shared directory of
memory-mapped files, a write per increment, and would lose the process and GC collectors.
Besides the gateway's own series, each registry has the client library's process, GC and
platform collectors, ``gateway_build_info`` and an in-flight gauge.

The per-request series (requests, latency) are plain integers and lists updated with a dict
lookup, and turned into metric families only when scraped: the client library's locks and
label resolution cost more than the rest of a request's bookkeeping.
"""

from __future__ import annotations

import platform
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from gateway.accesslog import dropped_lines

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        from gateway import __version__

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)
        GCCollector(registry=r)
        PlatformCollector(registry=r)
        Gauge("gateway_build_info", "The gateway's version (the value is always 1)",
              ["version", "python"], registry=r).labels(
            __version__, platform.python_version()).set(1)
        # Read at scrape time from the server's connections (Runtime sets the source), so
        # that requests pay nothing for it.
        self.in_flight: Callable[[], int] = lambda: 0
        Gauge("gateway_requests_in_flight",
              "Requests being answered now (open WebSocket sessions included)",
              registry=r).set_function(lambda: self.in_flight())
        # The upstream pools' state and the connections they opened, read at scrape time
        # (Runtime sets the sources): ``UpstreamPool.upstream_stats`` and ``.opened``.
        self.pool_stats: Callable[[], Iterable[tuple[str, int, int, int]]] = lambda: ()
        self.pool_opened: Callable[[], int] = lambda: 0
        self._counts: dict[tuple[str, str, int], int] = {}
        # route -> [count per bucket (non-cumulative, last one +Inf), sum of durations]
        self._hist: dict[str, tuple[list[int], list[float]]] = {}
        self.signatures = 0  # auth-v2 signatures made: a plain integer, like the requests
        r.register(_RequestCollector(self))
        r.register(_PoolCollector(self))
        self.upstream_errors = Counter("gateway_upstream_errors", "Upstream failures",
                                       ["route", "kind"], registry=r)
        self.websockets = Gauge("gateway_websockets_open", "WebSocket connections open",
                                registry=r)
        self.token_events = Counter("gateway_token_events",
                                    "Token endpoint outcomes (validations by result, issuing)",
                                    ["endpoint", "outcome"], registry=r)
        self.lockouts = Counter("gateway_lockouts", "Lock-outs started (token guessing)",
                                registry=r)
        self.reloads = Counter("gateway_config_reloads", "Config reloads", ["result"],
                               registry=r)
        # Health of what this process depends on (gateway.health); not part of readiness.
        self.upstream_up = Gauge("gateway_upstream_up",
                                 "1 when the route's upstream accepted a connection at the last "
                                 "check, else 0", ["route"], registry=r)
        self.store_up = Gauge("gateway_store_up",
                              "1 when the token store answered at the last check, else 0",
                              registry=r)
        self.token_guesses = Counter("gateway_token_guesses",
                                     "Wrong tokens sent to the validation callback, by whether "
                                     "they were within the per-user allowance", ["result"],
                                     registry=r)
        self.token_store_refused = Counter("gateway_token_store_refused",
                                           "Tokens not minted because the store is full",
                                           registry=r)
        # gateway/boundary.py: a third party's Set-Cookie for a name the site or gateway owns.
        self.cookies_refused = Counter("gateway_cookies_refused",
                                       "Set-Cookie from a third-party route refused",
                                       ["route"], registry=r)
        # Requests refused before routing (parse errors, limits, header timeout); the
        # reasons are a fixed set chosen by gateway.server, never client text.
        self.rejected = Counter("gateway_rejected_requests",
                                "Requests refused by the parser layer", ["status", "reason"],
                                registry=r)

    def observe(self, route: str, method: str, status: int, duration: float,
                upstream_error: str | None) -> None:
        counts = self._counts
        key = (route, method, status)
        n = counts.get(key)
        if n is not None:  # the usual case: a series already counted
            counts[key] = n + 1
        else:
            if len(counts) > 2000:  # methods are client-chosen: bound the series
                key = (route, "OTHER", status)
            counts[key] = counts.get(key, 0) + 1
        if upstream_error is not None:
            self.upstream_errors.labels(route, upstream_error).inc()
        if status == 101:
            return  # a WebSocket session's length is not a request latency
        hist = self._hist.get(route)
        if hist is None:
            hist = self._hist[route] = ([0] * (len(_BUCKETS) + 1), [0.0])
        hist[0][bisect_left(_BUCKETS, duration)] += 1
        hist[1][0] += duration

    def remake(self) -> None:
        """Make each count's number object anew (once a crowd went: gateway.memory). An
        integer or float counter is the object made at its latest increment; after a crowd
        that is in an arena the crowd allocated, and that one object keeps the whole 1 MiB
        arena mapped. ``n + 0`` is a new object equal to ``n`` (not a small int: those are
        shared and never freed), made where memory stayed."""
        counts = self._counts
        for key, n in counts.items():
            counts[key] = n + 0
        for buckets, total in self._hist.values():
            buckets[:] = [n + 0 for n in buckets]
            total[0] += 0.0
        self.signatures += 0

    def token_event(self, endpoint: str, outcome: str) -> None:
        self.token_events.labels(endpoint, outcome).inc()
        if outcome == "lockout_started":
            self.lockouts.inc()
        elif endpoint == "validate" and outcome in ("failed", "limited", "rate_limited"):
            # "counted": within the userId's allowance; "limited": answered 429/503 instead.
            self.token_guesses.labels("counted" if outcome == "failed" else "limited").inc()
        elif outcome == "store_full":
            self.token_store_refused.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _RequestCollector(Collector):
    """The per-request series, read from Metrics' plain counters at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("gateway_requests", "Requests answered",
                                       labels=["route", "method", "status"])
        for (route, method, status), n in sorted(self._m._counts.items()):
            requests.add_metric([route, method, str(status)], n)
        yield requests
        yield CounterMetricFamily("gateway_signatures", "auth-v2 signatures made",
                                  value=self._m.signatures)
        yield CounterMetricFamily(
            "gateway_access_log_dropped",
            "Log lines (access lines and others) dropped because the log destination did "
            "not keep up",
            value=dropped_lines())
        latency = HistogramMetricFamily("gateway_request_duration_seconds",
                                        "Time from request to the end of the response",
                                        labels=["route"])
        for route, (buckets, total) in sorted(self._m._hist.items()):
            cumulative = []
            running = 0
            for bound, n in zip((*_BUCKETS, float("inf")), buckets, strict=True):
                running += n
                cumulative.append(("+Inf" if bound == float("inf") else repr(bound), running))
            latency.add_metric([route], cumulative, total[0])
        yield latency


class _PoolCollector(Collector):
    """The upstream connection pool, per upstream, read at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        open_ = GaugeMetricFamily("gateway_upstream_connections_open",
                                  "Upstream connections open or being opened (idle included)",
                                  labels=["upstream"])
        idle = GaugeMetricFamily("gateway_upstream_connections_idle",
                                 "Upstream connections kept idle for the next request",
                                 labels=["upstream"])
        queued = GaugeMetricFamily("gateway_upstream_requests_queued",
                                   "Requests waiting for an upstream connection "
                                   "(at the route's max_connections)", labels=["upstream"])
        for upstream, n_open, n_idle, n_queued in sorted(self._m.pool_stats()):
            open_.add_metric([upstream], n_open)
            idle.add_metric([upstream], n_idle)
            queued.add_metric([upstream], n_queued)
        yield open_
        yield idle
        yield queued
        yield CounterMetricFamily("gateway_upstream_connections_opened",
                                  "Upstream connections opened (few when they are reused)",
                                  value=self._m.pool_opened())
