"""ext_authz's metrics (OpenTelemetry, served to Prometheus on EXTAUTH_METRICS_LISTEN at `/metrics`).

Exported names (dots become underscores; counters get `_total`):
- `gateway_extauth_decisions_total{decision="allow"|"deny"|"local"|"body_check"|"precheck", code}`:
  checks answered; `code` is the OpenAI error code of a denial, or `ok` (`body_check`: a body without a
  `model` the check could name, answered by the admin port with what is wrong with it; its code is
  `missing_model`)
- `gateway_extauth_check_duration_seconds` (histogram): time spent deciding one check
- `gateway_extauth_cache_lookups_total{cache="key"|"workspace", result="hit"|"miss"}`
- `gateway_extauth_redis_errors_total{kind="error"|"timeout"}`: failed hot-state calls
- `gateway_extauth_database_errors_total`: failed loads on a cache miss
- `gateway_extauth_failure_mode_total{mode="open"|"closed"}`: checks decided by the failure policy
  because Redis was unavailable
- `gateway_extauth_ratelimit_utilization` (histogram): how full each key's bucket was at each decision,
  0 to 1 (1: the request was refused, or was the last one the bucket admitted)
- `gateway_extauth_ratelimit_top_keys{key_id}` (gauge): the highest utilization (0 to 1) seen per key
  since the previous scrape, for the 10 busiest keys only
Labels take only values from the fixed sets above, the error catalog, or at most 10 key ids, so
cardinality is bounded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from opentelemetry.metrics import CallbackOptions, Histogram, Meter, Observation

from extauth.state import StateStore

_CHECK_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
_UTILIZATION_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)
TOP_KEYS = 10
# Keys tracked between scrapes before the least busy are dropped: bounds memory under a key flood.
_TRACKED_KEYS = 1000


class ExtauthMetrics:
    def __init__(self, meter: Meter, store: StateStore) -> None:
        self._store = store
        # Counted in a plain dict and read at scrape time: an OpenTelemetry counter's add() costs a few
        # microseconds a check (attribute hashing), this costs a dict update.
        self._decided: dict[tuple[str, str], int] = {}
        meter.create_observable_counter("gateway.extauth.decisions", callbacks=[self._decisions], unit="{check}")
        self._duration = meter.create_histogram(
            "gateway.extauth.check.duration", unit="s", explicit_bucket_boundaries_advisory=_CHECK_BUCKETS
        )
        self._redis_errors = meter.create_counter("gateway.extauth.redis.errors", unit="{error}")
        self._db_errors = meter.create_counter("gateway.extauth.database.errors", unit="{error}")
        self._failure_mode = meter.create_counter("gateway.extauth.failure_mode", unit="{check}")
        meter.create_observable_counter("gateway.extauth.cache.lookups", callbacks=[self._cache_lookups])
        self._utilization = meter.create_histogram(
            "gateway.extauth.ratelimit.utilization", unit="1", explicit_bucket_boundaries_advisory=_UTILIZATION_BUCKETS
        )
        meter.create_observable_gauge("gateway.extauth.ratelimit.top_keys", callbacks=[self._top_keys], unit="1")
        self._peaks: dict[str, float] = {}
        self._unrecorded: list[tuple[Histogram, float]] = []

    def _record_later(self, histogram: Histogram, value: float) -> None:
        """Histogram values are recorded once the event loop has run what is ready, so after the checks
        decided in this turn have been answered: a record() costs ~13 us of SDK plumbing (two per check, a
        third of a check's Python time), which then no longer delays any answer."""
        if not self._unrecorded:
            try:
                asyncio.get_running_loop().call_soon(self._record_pending)
            except RuntimeError:  # no event loop (a synchronous caller): record now
                histogram.record(value)
                return
        self._unrecorded.append((histogram, value))

    def _record_pending(self) -> None:
        pending, self._unrecorded = self._unrecorded, []
        for histogram, value in pending:
            histogram.record(value)

    def decided(self, decision: str, code: str, seconds: float) -> None:
        key = (decision, code)
        self._decided[key] = self._decided.get(key, 0) + 1
        self._record_later(self._duration, seconds)

    def _decisions(self, _options: CallbackOptions) -> Iterable[Observation]:
        for (decision, code), count in list(self._decided.items()):
            yield Observation(count, {"decision": decision, "code": code})

    def redis_error(self, timeout: bool) -> None:
        self._redis_errors.add(1, {"kind": "timeout" if timeout else "error"})

    def database_error(self) -> None:
        self._db_errors.add(1)

    def failure_mode(self, mode: str) -> None:
        self._failure_mode.add(1, {"mode": mode})

    def rate_limited(self, key_id: str, utilization: float) -> None:
        self._record_later(self._utilization, utilization)
        if utilization > self._peaks.get(key_id, -1.0):
            self._peaks[key_id] = utilization
            if len(self._peaks) > _TRACKED_KEYS:
                del self._peaks[min(self._peaks, key=self._peaks.__getitem__)]

    def _top_keys(self, _options: CallbackOptions) -> Iterable[Observation]:
        peaks, self._peaks = self._peaks, {}
        for key_id in sorted(peaks, key=peaks.__getitem__, reverse=True)[:TOP_KEYS]:
            yield Observation(peaks[key_id], {"key_id": key_id})

    def _cache_lookups(self, _options: CallbackOptions) -> Iterable[Observation]:
        for name, cache in (("key", self._store.keys), ("workspace", self._store.workspaces)):
            yield Observation(cache.hits, {"cache": name, "result": "hit"})
            yield Observation(cache.misses, {"cache": name, "result": "miss"})
