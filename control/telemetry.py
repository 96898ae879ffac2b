"""Exposing a process's OpenTelemetry metrics to Prometheus: one place, used by ext_authz and the meter."""

from __future__ import annotations

from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, Histogram, MeterProvider
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource

from control.env import HostPort


def prometheus_provider(service_name: str) -> MeterProvider:
    """A provider whose instruments appear in prometheus_client's default registry (what `/metrics`
    serves, whichever HTTP server serves it)."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader

    # Prometheus's text format carries no exemplars, so none are sampled: the default filter looks up
    # the current span on every histogram record (~5% of a record's cost, twice per ext_authz check).
    # Nor min and max, which a histogram records by default: each record() then costs ~10% less (twice per
    # ext_authz check). The buckets stay each instrument's own (boundaries None: its advisory ones).
    return MeterProvider(
        metric_readers=[PrometheusMetricReader()], resource=Resource.create({"service.name": service_name}),
        exemplar_filter=AlwaysOffExemplarFilter(),
        views=[View(instrument_type=Histogram, aggregation=ExplicitBucketHistogramAggregation(record_min_max=False))],
    )


def serve_prometheus(listen: HostPort, service_name: str) -> MeterProvider:
    """Start a plain `/metrics` endpoint on `listen` and return the provider whose instruments it serves."""
    from prometheus_client import start_http_server

    start_http_server(listen.port, addr=listen.host)
    return prometheus_provider(service_name)
