"""The meter's OpenTelemetry metrics, served to Prometheus on METER_METRICS_LISTEN (`/metrics`, by
control.telemetry).

Exported names (the exporter turns dots into underscores and suffixes counters with `_total`):

- `gen_ai_client_token_usage_total{gen_ai_token_type="input"|"output", workspace_id, gen_ai_request_model}`
  tokens of newly recorded requests (OTel `gen_ai.client.token.usage`)
- `gateway_meter_requests_total{http_response_status_code="2xx"|...}` newly recorded requests, by
  status class (`gateway.meter.requests`)
- `gateway_meter_lines_total` access-log lines consumed, malformed ones included (`gateway.meter.lines`)
- `gateway_meter_malformed_lines_total` lines kept aside in meter_rejects (`gateway.meter.malformed_lines`)
- `gateway_meter_lag_bytes` bytes of the log not yet consumed (`gateway.meter.lag_bytes`, a gauge)

Beyond MAX_USAGE_PAIRS distinct (workspace_id, model) pairs, token usage is exported under
workspace_id="other", gen_ai_request_model="other". Every series also carries the exporter's
otel_scope_name="meter" (and empty otel_scope_version, otel_scope_schema_url) labels; the endpoint serves
`target_info` and prometheus_client's process and Python series too.

Counts start at 0 with each process and cover rows it added: a replayed line, already in the database, is
not counted again.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation

from meter.store import RecordedUsage

# Two token series per pair: 900 pairs, plus "other", stay under the 2000 points per instrument past
# which the OTel SDK folds series on its own, into an overflow series without the labels.
MAX_USAGE_PAIRS = 900
OTHER = "other"
UNKNOWN = "unknown"


class UsageLabels:
    """Caps the distinct (workspace, model) pairs exported: pairs beyond the first `limit` become
    ("other", "other"), so a flood of made-up model names cannot exhaust Prometheus."""

    def __init__(self, limit: int = MAX_USAGE_PAIRS) -> None:
        self._limit = limit
        self._seen: set[tuple[str, str]] = set()

    def __call__(self, workspace_id: str | None, model: str | None) -> tuple[str, str]:
        pair = (workspace_id or UNKNOWN, model or UNKNOWN)
        if pair in self._seen:
            return pair
        if len(self._seen) >= self._limit:
            return (OTHER, OTHER)
        self._seen.add(pair)
        return pair


class MeterMetrics:
    def __init__(self, provider: MeterProvider, labels: UsageLabels | None = None) -> None:
        meter = provider.get_meter("meter")
        self.lag_bytes = 0
        self._labels = labels or UsageLabels()
        self._tokens = meter.create_counter(
            "gen_ai.client.token.usage", unit="{token}", description="Tokens of recorded requests"
        )
        self._requests = meter.create_counter(
            "gateway.meter.requests", unit="{request}", description="Requests recorded, by status class"
        )
        self._lines = meter.create_counter(
            "gateway.meter.lines", unit="{line}", description="Access-log lines consumed"
        )
        self._malformed = meter.create_counter(
            "gateway.meter.malformed_lines", unit="{line}", description="Access-log lines kept aside"
        )
        meter.create_observable_gauge(
            "gateway.meter.lag_bytes", callbacks=[self._observe_lag], description="Log bytes not yet consumed"
        )

    def record(self, lines: int, malformed: int, recorded: Sequence[RecordedUsage]) -> None:
        self._lines.add(lines)
        if malformed:
            self._malformed.add(malformed)
        # Folding into "other" can merge rows of a batch: sum them, one add per series per batch.
        tokens: Counter[tuple[str, str, str]] = Counter()
        statuses: Counter[str] = Counter()
        for row in recorded:
            workspace_id, model = self._labels(row.workspace_id, row.model)
            tokens[(workspace_id, model, "input")] += row.prompt_tokens
            tokens[(workspace_id, model, "output")] += row.completion_tokens
            statuses[f"{row.status_class}xx" if row.status_class else UNKNOWN] += row.requests
        for (workspace_id, model, kind), count in tokens.items():
            self._tokens.add(
                count,
                {"gen_ai.token.type": kind, "workspace_id": workspace_id, "gen_ai.request.model": model},
            )
        for status, count in statuses.items():
            self._requests.add(count, {"http.response.status_code": status})

    def _observe_lag(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(self.lag_bytes)]
