"""Closed-loop throughput with wrk: a Lua script sends the same authenticated chat completion POST, and
its `done` hook prints the figures as one JSON line, so nothing depends on wrk's human-readable units."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from bench.procs import HarnessError, Processes

_MARK = "BENCH_JSON "

_SCRIPT = """
wrk.method = "POST"
wrk.body = [==[%(body)s]==]
wrk.headers["Content-Type"] = "application/json"
%(auth)s

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%(mark)s{"requests":%%d,"duration_us":%%d,"bytes":%%d,"connect":%%d,"read":%%d,"write":%%d,' ..
    '"status":%%d,"timeout":%%d,"p50_us":%%d,"p90_us":%%d,"p99_us":%%d,"mean_us":%%.1f,"max_us":%%d}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
"""


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    rps: float
    non_2xx: int  # wrk counts statuses >= 400; the gateway never answers 1xx or 3xx here
    socket_errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float


def write_script(path: Path, body: str, api_key: str | None) -> Path:
    auth = f'wrk.headers["Authorization"] = "Bearer {api_key}"' if api_key else ""
    path.write_text(_SCRIPT % {"body": body, "auth": auth, "mark": _MARK}, encoding="utf-8")
    return path


def available() -> bool:
    return shutil.which("wrk") is not None


def run(
    procs: Processes, name: str, url: str, script: Path, seconds: float, connections: int, threads: int
) -> WrkResult:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise HarnessError("wrk is not on PATH (`make bench` installs it; or apt-get install wrk)")
    argv = [wrk, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "5s", "--latency",
            "-s", str(script), url]
    output = procs.run(name, argv, {"PATH": "/usr/bin:/bin"}, timeout_s=seconds + 30)
    for line in output.splitlines():
        if line.startswith(_MARK):
            data = json.loads(line[len(_MARK) :])
            break
    else:
        raise HarnessError(f"wrk printed no result:\n{output}")
    secs = data["duration_us"] / 1e6
    return WrkResult(
        requests=data["requests"],
        seconds=secs,
        rps=data["requests"] / secs if secs else 0.0,
        non_2xx=data["status"],
        socket_errors=data["connect"] + data["read"] + data["write"] + data["timeout"],
        p50_ms=data["p50_us"] / 1000,
        p90_ms=data["p90_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        mean_ms=data["mean_us"] / 1000,
        max_ms=data["max_us"] / 1000,
    )
