"""Prometheus metrics, one registry per process (served by ``admin`` on its own listener).

With several workers each worker serves its own registry on ``admin.port + worker index``
(documented in the README): no shared directory, no multiprocess-mode caveats, and every
series stays exact. Labelled children are cached so the hot path does a dict lookup and an
increment, not a label resolution.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("gateway_requests", "Requests answered",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("gateway_request_duration_seconds",
                                 "Time from request to the end of the response", ["route"],
                                 buckets=_BUCKETS, registry=r)
        self.upstream_errors = Counter("gateway_upstream_errors", "Upstream failures",
                                       ["route", "kind"], registry=r)
        self.websockets = Gauge("gateway_websockets_open", "WebSocket connections open",
                                registry=r)
        self.signatures = Counter("gateway_signatures", "auth-v2 signatures made", registry=r)
        self.token_events = Counter("gateway_token_events",
                                    "Token endpoint outcomes (validations by result, issuing)",
                                    ["endpoint", "outcome"], registry=r)
        self.lockouts = Counter("gateway_lockouts", "Lock-outs started (token guessing)",
                                registry=r)
        self.reloads = Counter("gateway_config_reloads", "Config reloads", ["result"],
                               registry=r)
        self._req: dict[tuple[str, str, int], Counter] = {}
        self._lat: dict[str, Histogram] = {}

    def observe(self, route: str, method: str, status: int, duration: float,
                upstream_error: str | None) -> None:
        key = (route, method, status)
        child = self._req.get(key)
        if child is None:
            if len(self._req) > 2000:  # methods are client-chosen: bound the series
                key = (route, "OTHER", status)
            child = self._req[key] = self.requests.labels(route, key[1], str(status))
        child.inc()
        if upstream_error is not None:
            self.upstream_errors.labels(route, upstream_error).inc()
        if status == 101:
            return  # a WebSocket session's length is not a request latency
        hist = self._lat.get(route)
        if hist is None:
            hist = self._lat[route] = self.latency.labels(route)
        hist.observe(duration)

    def token_event(self, endpoint: str, outcome: str) -> None:
        self.token_events.labels(endpoint, outcome).inc()
        if outcome == "lockout_started":
            self.lockouts.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
