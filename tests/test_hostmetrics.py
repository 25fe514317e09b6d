"""How the supervisor adds up its workers' expositions (the pure part of hostmetrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from gateway.hostmetrics import _Families, aggregate
from tests.lifecycle_helpers import metric

WORKER = """\
# HELP gateway_requests_total Requests answered
# TYPE gateway_requests_total counter
gateway_requests_total{{route="/app/",method="GET",status="200"}} {n}
# HELP gateway_reloads_total Config reloads
# TYPE gateway_reloads_total counter
gateway_reloads_total{{result="ok"}} 1
gateway_reloads_created{{result="ok"}} {created}
# HELP gateway_request_duration_seconds Time
# TYPE gateway_request_duration_seconds histogram
gateway_request_duration_seconds_bucket{{route="/app/",le="0.1"}} {n}
gateway_request_duration_seconds_bucket{{route="/app/",le="+Inf"}} {n}
gateway_request_duration_seconds_count{{route="/app/"}} {n}
gateway_request_duration_seconds_sum{{route="/app/"}} 0.5
# HELP gateway_requests_in_flight In flight
# TYPE gateway_requests_in_flight gauge
gateway_requests_in_flight {n}
# HELP gateway_build_info Build
# TYPE gateway_build_info gauge
gateway_build_info{{version="0.1.0"}} 1
# HELP process_resident_memory_bytes RSS
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes {rss}
"""


def test_counters_histograms_gauges_add_up_process_series_stay_per_worker() -> None:
    texts = {"0": WORKER.format(n=3, created=200.0, rss=1000),
             "1": WORKER.format(n=4, created=100.0, rss=2000)}
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(aggregate(texts)))
    out = generate_latest(registry).decode()
    assert metric(out, "gateway_requests_total", route="/app/", status="200") == 7
    assert metric(out, "gateway_request_duration_seconds_bucket", le="0.1") == 7
    assert metric(out, "gateway_request_duration_seconds_count") == 7
    assert metric(out, "gateway_request_duration_seconds_sum") == 1.0
    assert metric(out, "gateway_requests_in_flight") == 7
    assert metric(out, "gateway_reloads_total") == 2
    assert metric(out, "gateway_reloads_created") == 100.0  # the earliest, not a sum
    assert metric(out, "gateway_build_info", version="0.1.0") == 1  # once, not per worker
    assert metric(out, "process_resident_memory_bytes", worker="0") == 1000
    assert metric(out, "process_resident_memory_bytes", worker="1") == 2000
    assert "process_resident_memory_bytes 3000" not in out
