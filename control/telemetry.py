"""Exposing a process's OpenTelemetry metrics to Prometheus: one place, used by ext_authz and the meter."""

from __future__ import annotations

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource

from control.env import HostPort


def prometheus_provider(service_name: str) -> MeterProvider:
    """A provider whose instruments appear in prometheus_client's default registry (what `/metrics`
    serves, whichever HTTP server serves it)."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader

    return MeterProvider(
        metric_readers=[PrometheusMetricReader()], resource=Resource.create({"service.name": service_name})
    )


def serve_prometheus(listen: HostPort, service_name: str) -> MeterProvider:
    """Start a plain `/metrics` endpoint on `listen` and return the provider whose instruments it serves."""
    from prometheus_client import start_http_server

    start_http_server(listen.port, addr=listen.host)
    return prometheus_provider(service_name)
