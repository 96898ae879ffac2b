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
