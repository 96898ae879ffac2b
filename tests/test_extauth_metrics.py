"""ext_authz's histograms are recorded once the event loop has answered what is ready, not before: the
SDK's record() is a third of a check's Python time and would otherwise delay every answer."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from extauth.cache import BoundedCache
from extauth.metrics import ExtauthMetrics
from extauth.state import StateStore


def _metrics() -> tuple[ExtauthMetrics, InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    store = SimpleNamespace(keys=BoundedCache[Any, Any](4), workspaces=BoundedCache[Any, Any](4))
    meter = MeterProvider(metric_readers=[reader]).get_meter("test")
    return ExtauthMetrics(meter, cast(StateStore, store)), reader


def _counts(reader: InMemoryMetricReader) -> dict[str, int]:
    data = reader.get_metrics_data()
    counts: dict[str, int] = {}
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name in ("gateway.extauth.check.duration", "gateway.extauth.ratelimit.utilization"):
                    counts[metric.name] = sum(int(getattr(p, "count", 0)) for p in metric.data.data_points)
    return counts


def test_histograms_are_recorded_after_the_answers_of_the_turn() -> None:
    metrics, reader = _metrics()

    async def checks() -> tuple[dict[str, int], dict[str, int]]:
        for _ in range(3):
            metrics.rate_limited("key_a", 0.25)
            metrics.decided("allow", "ok", 0.0004)
        during = _counts(reader)
        await asyncio.sleep(0)  # the rest of the turn: the answers are written, then the records
        return during, _counts(reader)

    during, after = asyncio.run(checks())
    assert during.get("gateway.extauth.check.duration", 0) == 0
    assert after == {"gateway.extauth.check.duration": 3, "gateway.extauth.ratelimit.utilization": 3}


def test_without_an_event_loop_histograms_are_recorded_at_once() -> None:
    metrics, reader = _metrics()
    metrics.decided("deny", "invalid_api_key", 0.0002)
    assert _counts(reader).get("gateway.extauth.check.duration") == 1


def test_the_shipped_provider_keeps_each_histograms_own_buckets() -> None:
    """control/telemetry.py has histograms skip min and max (Prometheus's text format has neither): what
    /metrics shows is unchanged, the buckets still the instrument's advisory ones."""
    from prometheus_client import REGISTRY, generate_latest

    from control.telemetry import prometheus_provider

    provider = prometheus_provider("test-buckets")
    try:
        histogram = provider.get_meter("test").create_histogram(
            "test.buckets", unit="s", explicit_bucket_boundaries_advisory=(0.001, 0.5))
        for value in (0.0004, 0.2, 0.7):
            histogram.record(value)
        text = generate_latest(REGISTRY).decode()
        series = {line.split("{")[0] + ("{" + line.split('le="')[1].split('"')[0] + "}" if 'le="' in line else ""):
                  float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("test_buckets")}
        assert series == {"test_buckets_seconds_bucket{0.001}": 1, "test_buckets_seconds_bucket{0.5}": 2,
                          "test_buckets_seconds_bucket{+Inf}": 3, "test_buckets_seconds_count": 3,
                          "test_buckets_seconds_sum": 0.9004}
    finally:
        provider.shutdown()  # also takes its collector out of the registry
