"""The meter: throughput on a pre-written access log, and how long it takes to catch up after load.

Throughput runs the meter's own `run_once` in a process of its own (`python -m bench.meterbench LOG`
with DATABASE_URL set) against a fresh database, timing consumption only: interpreter start-up is not
the meter's steady-state speed.

Lag is bytes of the live access log beyond the offset the meter has committed in `meter_offsets`. Envoy
flushes its log every few hundred milliseconds, so the log can still grow after the load stops: zero lag
counts only once it stays zero until the log can no longer change.
"""

from __future__ import annotations

import json
import random
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

_MARK = "METER_JSON "


def access_log_entry(i: int, start: datetime) -> dict[str, Any]:
    """One line as envoy/envoy.yaml's json_format writes it: mostly allowed chat completions, with the
    denials (nulls where ext_authz set no metadata) a real log holds too."""
    moment = (start + timedelta(microseconds=i * 137)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if i % 20 == 19:
        authz = {"route": "/v1/chat/completions", "workspace_id": "ws_bench", "key_id": "key_bench",
                 "error_code": "rate_limit_exceeded"}
        return {
            "request_id": str(uuid.uuid4()), "start_time": moment, "method": "POST", "status": 429, "flags": "UAEX",
            "authz": json.dumps(authz, separators=(",", ":")), "usage": None,
            "upstream_host": None, "duration_ms": 0, "ttfb_ms": 0, "bytes_received": 112, "bytes_sent": 190,
        }
    prompt = random.randint(5, 4000)
    authz = {"route": "/v1/chat/completions", "workspace_id": "ws_bench", "key_id": "key_bench", "model": "bench-chat",
             "deployment_id": "dep_bench", "destination": "runpod", "decision": "allow"}
    return {
        "request_id": str(uuid.uuid4()), "start_time": moment, "method": "POST", "status": 200, "flags": "-",
        "authz": json.dumps(authz, separators=(",", ":")),
        "usage": {"usage": {"completion_tokens": random.randint(1, 800), "model": "bench-chat", "prompt_tokens": prompt,
                            "source": "final"}},
        "upstream_host": "127.0.0.1:8443", "duration_ms": random.randint(1, 900),
        "ttfb_ms": random.randint(1, 300), "bytes_received": 90 + prompt * 4, "bytes_sent": 420,
    }


def write_log(path: Path, lines: int) -> int:
    start = datetime(2025, 1, 1, tzinfo=UTC)
    with path.open("w", encoding="utf-8") as fh:
        for i in range(lines):
            fh.write(json.dumps(access_log_entry(i, start), separators=(",", ":")))
            fh.write("\n")
    return path.stat().st_size


@dataclass(frozen=True)
class MeterRun:
    lines: int
    seconds: float
    rows: int

    @property
    def lines_per_s(self) -> float:
        return self.lines / self.seconds if self.seconds > 0 else 0.0


def parse_run(output: str, database_url: str) -> MeterRun:
    for line in output.splitlines():
        if line.startswith(_MARK):
            data = json.loads(line[len(_MARK) :])
            break
    else:
        raise ValueError(f"the meter run printed no result:\n{output}")
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*) FROM usage_events").fetchone()
    return MeterRun(data["lines"], data["seconds"], int(row[0]) if row else 0)


@dataclass(frozen=True)
class Lag:
    bytes_at_stop: int
    seconds_to_zero: float
    reached: bool


def lag_after_load(database_url: str, log: Path, stopped_at: float, settle_s: float, timeout_s: float) -> Lag:
    """Sample until the lag has been zero since some moment and `settle_s` has passed since the load
    stopped; that moment, relative to `stopped_at`, is the time to zero lag."""
    at_stop: int | None = None
    zero_since: float | None = None
    with psycopg.connect(database_url, autocommit=True) as conn:
        while True:
            now = time.monotonic()
            size = log.stat().st_size
            lag = size - _committed_offset(conn, log)
            if at_stop is None:
                at_stop = lag
            if lag > 0:
                zero_since = None
            elif zero_since is None:
                zero_since = now
            if zero_since is not None and now - stopped_at >= settle_s:
                return Lag(at_stop, max(0.0, zero_since - stopped_at), True)
            if now - stopped_at > timeout_s:
                return Lag(at_stop, now - stopped_at, False)
            time.sleep(0.05)


def _committed_offset(conn: psycopg.Connection[Any], log: Path) -> int:
    rows = conn.execute('SELECT log_path, "offset" FROM meter_offsets').fetchall()
    for path, offset in rows:
        if Path(path).resolve() == log:
            return int(offset)
    # The gateway's meter follows exactly one log: if its key is spelled differently, it is still that one.
    return int(rows[0][1]) if len(rows) == 1 else 0


def main(argv: list[str]) -> int:
    # The meter's own settings, from the environment the harness set (DATABASE_URL, GATEWAY_ACCESS_LOG).
    from meter.consumer import run_once
    from meter.settings import MeterSettings

    settings = MeterSettings.from_env()
    started = time.perf_counter()
    lines = run_once(settings)
    print(_MARK + json.dumps({"lines": lines, "seconds": time.perf_counter() - started}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
