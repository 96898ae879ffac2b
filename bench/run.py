"""One benchmark run, start to finish: start everything, measure in a fixed order, report, clean up.

Order matters on two shared cores. The meter's throughput is measured first, on an otherwise idle box.
Bare Envoy runs before the gateway so the meter's catching up after gateway load never overlaps the
baseline. The full gateway over the gRPC transport (EXTAUTH_TRANSPORT=grpc, the same envoy.yaml) runs
after the HTTP gateway's measurements, alone, and is stopped before the soak. The soak comes last and
is the longest part, so its start sees an ext_authz already warmed by everything before it and a flat
RSS means no growth per request rather than warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import clusterbench, envoys, meterbench, ttft, wrk
from bench.openloop import Spec
from bench.procs import Child, HarnessError, Processes, cpu_seconds, rss_bytes, tail, wait_for_port
from bench.report import Row, table, write_json
from bench.services import CHAT_MODEL, STREAM_MODEL, Gateway, Services, Tenant, base_env
from control.net import free_port

CHAT_BODY = json.dumps({"model": CHAT_MODEL, "messages": [{"role": "user", "content": "Hello there"}]})
STREAM_BODY = json.dumps({"model": STREAM_MODEL, "messages": [{"role": "user", "content": "one two three"}],
                          "stream": True})

# Targets (the product's performance contract).
MIN_GATEWAY_RPS = 5000.0
# The same target as the issue states it, relative to the trivial-authz ceiling measured in the same run:
# 5,000 is 70% of the ~7k Envoy reached with a do-nothing grpc.aio ext_authz on the reference machine
# (../shared/reference/envoy.md), so a slower machine is judged by the same rule.
MIN_CEILING_RATIO = 0.70
MAX_ADDED_P50_MS = 1.0
MAX_ADDED_P99_MS = 5.0
MAX_TTFT_ADDED_MS = 2.0
MIN_METER_LINES_PER_S = 20000.0
MAX_METER_CATCHUP_S = 2.0
MAX_RSS_GROWTH = 0.10
# The cluster-aware client may cost a little more than the one-server one (a slot per key, cached), never much.
MAX_CLUSTER_CLIENT_RATIO = 1.5


def say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Config:
    quick: bool
    duration_s: float  # each measured wrk run and each open-loop run
    warmup_s: float
    soak_s: float
    rate: float  # open-loop offered rate, requests/s
    soak_rate: float
    connections: int
    threads: int
    openloop_connections: int
    ttft_samples: int
    stream_delay_ms: int
    meter_lines: int
    client_checks: int

    @classmethod
    def from_env(cls, quick: bool) -> Config:
        def number(name: str, default: float, quick_default: float) -> float:
            raw = os.environ.get(name)
            try:
                value = float(raw) if raw else (quick_default if quick else default)
            except ValueError:
                raise HarnessError(f"{name} must be a number, got {raw!r}") from None
            if value <= 0:
                raise HarnessError(f"{name} must be positive, got {raw!r}")
            return value

        # The soak is the five minutes the memory target names; the rest of a run (set-up and the short
        # measurements) takes under two more on two cores. BENCH_SOAK_S shortens it for a quick look.
        return cls(
            quick=quick,
            duration_s=number("BENCH_DURATION_S", 10, 2),
            warmup_s=number("BENCH_WARMUP_S", 2, 1),
            soak_s=number("BENCH_SOAK_S", 300, 5),
            rate=number("BENCH_RATE", 1000, 1000),
            soak_rate=number("BENCH_SOAK_RATE", 1000, 1000),
            connections=int(number("BENCH_CONNECTIONS", 32, 32)),
            threads=int(number("BENCH_THREADS", 2, 2)),
            openloop_connections=int(number("BENCH_OPENLOOP_CONNECTIONS", 32, 32)),
            ttft_samples=int(number("BENCH_TTFT_SAMPLES", 50, 5)),
            stream_delay_ms=int(number("BENCH_STREAM_DELAY_MS", 10, 10)),
            meter_lines=int(number("BENCH_METER_LINES", 200_000, 20_000)),
            client_checks=int(number("BENCH_CLIENT_CHECKS", 50_000, 5_000)),
        )


def _cpu(pids: dict[str, list[int]]) -> dict[str, float]:
    return {role: sum(cpu_seconds(pid) for pid in group) for role, group in pids.items()}


def _per_request_us(before: dict[str, float], after: dict[str, float], requests: int) -> dict[str, float]:
    return {role: (after[role] - before[role]) / max(1, requests) * 1e6 for role in before}


class Bench:
    def __init__(self, cfg: Config, tmp: Path, procs: Processes, services: Services) -> None:
        self.cfg = cfg
        self.tmp = tmp
        self.procs = procs
        self.services = services
        self.details: dict[str, Any] = {}
        self.upstream_port = 0
        self.envoy_workers = 1

    # --- pieces ---------------------------------------------------------------------------------------

    def meter_throughput(self) -> meterbench.MeterRun:
        log = self.tmp / "meter-bench.log"
        size = meterbench.write_log(log, self.cfg.meter_lines)
        database_url = self.services.create_database("meter_bench")
        from control.migrate import apply_migrations

        apply_migrations(database_url)
        env = {**base_env(), "DATABASE_URL": database_url, "GATEWAY_ACCESS_LOG": str(log),
               "GATEWAY_STATE_DIR": str(self.tmp / "meter-state")}
        output = self.procs.run("meter-throughput", [sys.executable, "-m", "bench.meterbench"], env, timeout_s=600)
        result = meterbench.parse_run(output, database_url)
        if result.lines != self.cfg.meter_lines:
            raise HarnessError(f"the meter consumed {result.lines} of {self.cfg.meter_lines} lines")
        self.details["meter_throughput"] = {**asdict(result), "log_bytes": size, "lines_per_s": result.lines_per_s}
        return result

    def client_cost(self) -> dict[str, Any]:
        output = self.procs.run("redis-client", [sys.executable, "-m", "bench.clusterbench", str(self.tmp),
                                                 str(self.cfg.client_checks)], base_env(), timeout_s=300)
        result = clusterbench.parse_run(output)
        self.details["redis_client"] = result
        return result

    def check_reply(self, port: int, api_key: str) -> None:
        """One request before measuring anything: a setup that answers errors has nothing to measure."""
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions", data=CHAT_BODY.encode(), method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"},
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as reply:
                body = json.loads(reply.read())
        except urllib.error.HTTPError as err:
            raise HarnessError(f"port {port} answered {err.code}: {err.read()[:500]!r}") from None
        if "usage" not in body:
            raise HarnessError(f"port {port} answered without usage: {body}")

    def throughput(
        self, name: str, port: int, script: Path, pids: dict[str, list[int]]
    ) -> tuple[wrk.WrkResult, dict[str, float]]:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        c, t = self.cfg.connections, self.cfg.threads
        wrk.run(self.procs, f"wrk-{name}-warmup", url, script, self.cfg.warmup_s, c, t)
        before = _cpu(pids)
        result = wrk.run(self.procs, f"wrk-{name}", url, script, self.cfg.duration_s, c, t)
        cpu = _per_request_us(before, _cpu(pids), result.requests)
        self.details[f"wrk_{name}"] = {**asdict(result), "cpu_us_per_request": cpu}
        return result, cpu

    def ceiling(
        self, transport: str, envoy: str, upstream: Child, ext_authz: dict[str, Any], script: Path
    ) -> wrk.WrkResult:
        """Throughput of Envoy with the shipped ext_authz filter and a do-nothing Python ext_authz, stopped
        again afterwards so that only the gateway's own processes are busy from then on."""
        port, authz_port = free_port(), free_port()
        authz = self.procs.spawn(f"trivial-authz-{transport}", [
            sys.executable, "-m", "bench.trivial_authz", transport, str(authz_port)], base_env())
        wait_for_port(authz_port, 20, authz)
        proxy = envoys.start(self.procs, f"trivial-envoy-{transport}", envoy,
                             envoys.trivial_authz_config(port, self.upstream_port, authz_port, ext_authz, transport),
                             self.tmp, self.envoy_workers)
        wait_for_port(port, 20, proxy)
        say(f"throughput, Envoy with a do-nothing {transport} ext_authz")
        result, _ = self.throughput(f"ceiling_{transport}", port, script, {
            "envoy": [proxy.proc.pid], "authz": [authz.proc.pid], "upstream": [upstream.proc.pid]})
        for child in (proxy, authz):
            self.procs.stop(child)
        return result

    def openloop_spec(self, name: str, port: int, tenant: Tenant, rate: float, seconds: float) -> Path:
        spec = Spec(host="127.0.0.1", port=port, path="/v1/chat/completions",
                    headers={"Content-Type": "application/json", "Authorization": f"Bearer {tenant.api_key}"},
                    body=CHAT_BODY, rate=rate, seconds=seconds, connections=self.cfg.openloop_connections)
        path = self.tmp / f"openloop-{name}.json"
        path.write_text(json.dumps(asdict(spec)), encoding="utf-8")
        return path

    def openloop(self, name: str, port: int, tenant: Tenant) -> dict[str, Any]:
        spec = self.openloop_spec(name, port, tenant, self.cfg.rate, self.cfg.duration_s)
        output = self.procs.run(f"openloop-{name}", [sys.executable, "-m", "bench.openloop", str(spec)], base_env(),
                                timeout_s=self.cfg.duration_s + 60)
        result: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
        self.details[f"openloop_{name}"] = result
        return result

    def soak(self, gateway: Gateway, tenant: Tenant) -> tuple[int, int, int]:
        """(RSS at start, at end, at most) of ext_authz, all replicas summed, under a steady open-loop load."""
        extauth = gateway.pids()["extauth"]
        spec = self.openloop_spec("soak", gateway.listen_port, tenant, self.cfg.soak_rate, self.cfg.soak_s)
        child = self.procs.spawn("openloop-soak", [sys.executable, "-m", "bench.openloop", str(spec)], base_env())
        started = time.monotonic()
        samples: list[tuple[float, int]] = []
        # The first sample waits for the load to be under way: start means "at steady load".
        settle = min(2.0, self.cfg.soak_s / 5)
        interval = max(0.5, min(5.0, self.cfg.soak_s / 60))
        deadline = started + self.cfg.soak_s + 60
        while child.proc.poll() is None:
            elapsed = time.monotonic() - started
            if settle <= elapsed <= self.cfg.soak_s:
                samples.append((elapsed, sum(rss_bytes(pid) for pid in extauth)))
            if time.monotonic() > deadline:
                raise HarnessError("the soak's load generator did not finish")
            time.sleep(interval if elapsed >= settle else 0.1)
        if child.proc.returncode != 0 or not samples:
            raise HarnessError(f"the soak failed (exit {child.proc.returncode}):\n{tail(child.log.read_text())}")
        self.procs.children.remove(child)
        result = json.loads(child.log.read_text().strip().splitlines()[-1])
        self.details["soak"] = {**result, "rss_samples": [[round(t, 1), rss] for t, rss in samples]}
        return samples[0][1], samples[-1][1], max(rss for _, rss in samples)

    # --- the run ---------------------------------------------------------------------------------------

    def run(self) -> list[Row]:
        cfg, services = self.cfg, self.services
        say("starting PostgreSQL, Redis and the RunPod simulator")
        services.start_postgres()
        services.start_redis()
        services.start_simulator()

        say(f"meter throughput on {cfg.meter_lines:,} pre-written access-log lines")
        meter_run = self.meter_throughput()

        say(f"hot-path Redis client, {cfg.client_checks:,} checks on one Redis and on a 3-master cluster")
        client = self.client_cost()

        say("starting the gateway (gatewayctl up) and provisioning a tenant")
        upstream_port, bare_port = free_port(), free_port()
        self.upstream_port = upstream_port
        gateway = services.start_gateway(services.create_database("gateway"), f"http://127.0.0.1:{upstream_port}")
        tenant = services.provision(gateway)
        services.set_stream_delay(tenant.stream_endpoint, cfg.stream_delay_ms)
        from control.settings import settings_for
        from control.stack import envoy_binary

        envoy = envoy_binary()
        self.envoy_workers = settings_for(gateway.env).envoy_concurrency
        self.details["envoy_workers"] = self.envoy_workers
        upstream = envoys.start(self.procs, "upstream-envoy", envoy, envoys.upstream_config(
            upstream_port, f"/v2/{tenant.stream_endpoint}/", services.simulator_port), self.tmp, 1)
        wait_for_port(upstream_port, 20, upstream)
        bare = envoys.start(self.procs, "bare-envoy", envoy, envoys.bare_config(bare_port, upstream_port), self.tmp,
                            self.envoy_workers)
        wait_for_port(bare_port, 20, bare)
        self.check_reply(bare_port, tenant.api_key)
        self.check_reply(gateway.listen_port, tenant.api_key)
        pids = gateway.pids()
        self.details["pids"] = pids

        script = wrk.write_script(self.tmp / "chat.lua", CHAT_BODY, tenant.api_key)
        say(f"throughput, bare Envoy: wrk {cfg.connections} connections, {cfg.threads} threads, {cfg.duration_s:g} s")
        bare_wrk, _ = self.throughput("bare", bare_port, script, {
            "envoy": [bare.proc.pid], "upstream": [upstream.proc.pid]})

        shipped = settings_for(gateway.env).envoy_config
        ceilings = {transport: self.ceiling(transport, envoy, upstream, envoys.shipped_ext_authz(shipped, transport),
                                            script)
                    for transport in ("grpc", "http")}
        say("throughput, gateway")
        gw_roles = {**pids, "upstream": [upstream.proc.pid]}
        gw_wrk, gw_cpu = self.throughput("gateway", gateway.listen_port, script, gw_roles)
        stopped = time.monotonic()

        say("meter lag after the load")
        from control import stack

        flush_s = getattr(stack, "ENVOY_FLUSH_MS", 1000) / 1000
        database_url = gateway.env["DATABASE_URL"]
        lag = meterbench.lag_after_load(database_url, gateway.access_log, stopped, settle_s=max(1.5, 3 * flush_s),
                                        timeout_s=20)
        self.details["meter_lag"] = asdict(lag)

        say(f"added latency, open loop at {cfg.rate:g} req/s for {cfg.duration_s:g} s each")
        ol_bare = self.openloop("bare", bare_port, tenant)
        ol_gw = self.openloop("gateway", gateway.listen_port, tenant)

        say(f"streamed time to first token, {cfg.ttft_samples} requests each way")
        gateway_stream = (gateway.listen_port, ttft.request(gateway.listen_port, "/v1/chat/completions",
                                                            tenant.api_key, STREAM_BODY))
        direct_stream = (upstream_port, ttft.request(
            upstream_port, f"/v2/{tenant.stream_endpoint}/openai/v1/chat/completions", tenant.runpod_key, STREAM_BODY))
        first_token = ttft.measure(gateway_stream, direct_stream, cfg.ttft_samples)
        self.details["ttft"] = asdict(first_token)

        grpc_wrk, grpc_cpu, ol_grpc = self.grpc_gateway(f"http://127.0.0.1:{upstream_port}", upstream)

        say(f"soak: {cfg.soak_rate:g} req/s through the gateway for {cfg.soak_s:g} s")
        rss_start, rss_end, rss_max = self.soak(gateway, tenant)
        if gateway.child.proc.poll() is not None:
            raise HarnessError(f"the gateway exited during the run:\n{tail(gateway.child.log.read_text())}")
        self.details["meter_rows_vs_log_lines"] = self._meter_consistency(gateway)
        rows = self._rows(meter_run, bare_wrk, ceilings, gw_wrk, gw_cpu, lag, ol_bare, ol_gw, first_token,
                          (rss_start, rss_end, rss_max))
        # Side by side: the gRPC transport's rows right after the (shipped) HTTP gateway's.
        after = next(i for i, row in enumerate(rows) if row.key == "envoy_cpu_us") + 1
        rows[after:after] = self._grpc_rows(grpc_wrk, grpc_cpu, ceilings, ol_bare, ol_grpc)
        return rows + _client_rows(client)

    def grpc_gateway(
        self, inference_url: str, upstream: Child
    ) -> tuple[wrk.WrkResult, dict[str, float], dict[str, Any]]:
        """The full gateway once more, with EXTAUTH_TRANSPORT=grpc and nothing else changed: its own state
        and database, started only now and stopped right after, so it never shares the cores with the
        HTTP gateway's measurements."""
        services = self.services
        say("starting the gateway over gRPC (EXTAUTH_TRANSPORT=grpc)")
        gateway = services.start_gateway(services.create_database("gateway_grpc"), inference_url, name="state-grpc",
                                         extra_env={"EXTAUTH_TRANSPORT": "grpc"})
        tenant = services.provision(gateway)
        self.check_reply(gateway.listen_port, tenant.api_key)
        script = wrk.write_script(self.tmp / "chat-grpc.lua", CHAT_BODY, tenant.api_key)
        say("throughput, gateway over gRPC")
        result, cpu = self.throughput("gateway_grpc", gateway.listen_port, script,
                                      {**gateway.pids(), "upstream": [upstream.proc.pid]})
        say(f"added latency over gRPC, open loop at {self.cfg.rate:g} req/s")
        openloop = self.openloop("gateway_grpc", gateway.listen_port, tenant)
        self.procs.stop(gateway.child)
        return result, cpu, openloop

    def _grpc_rows(
        self, gw: wrk.WrkResult, cpu: dict[str, float], ceilings: dict[str, wrk.WrkResult], ol_bare: dict[str, Any],
        ol: dict[str, Any],
    ) -> list[Row]:
        """Beside the HTTP gateway's rows, for context: the targets are the shipped transport's."""
        ceiling = ceilings["grpc"].rps
        return [
            Row("gateway_grpc_rps", "gateway throughput, gRPC transport", gw.rps, "req/s"),
            Row("gateway_grpc_non_2xx", "gateway gRPC non-2xx + socket errors", gw.non_2xx + gw.socket_errors, "",
                "0", gw.non_2xx + gw.socket_errors == 0),
            Row("gateway_grpc_p50_ms", "gateway gRPC latency p50", gw.p50_ms, "ms"),
            Row("gateway_grpc_p99_ms", "gateway gRPC latency p99", gw.p99_ms, "ms"),
            Row("grpc_ceiling_ratio", "throughput gateway gRPC / do-nothing gRPC ext_authz",
                gw.rps / ceiling if ceiling else 0.0, ""),
            Row("extauth_grpc_cpu_us", "ext_authz CPU per request, gRPC", cpu["extauth"], "us"),
            Row("envoy_grpc_cpu_us", "gateway Envoy CPU per request, gRPC", cpu["envoy"], "us"),
            Row("openloop_gateway_grpc_p50_ms", "open loop: gateway gRPC p50", ol["latency_p50_ms"], "ms"),
            Row("openloop_gateway_grpc_p99_ms", "open loop: gateway gRPC p99", ol["latency_p99_ms"], "ms"),
            Row("openloop_gateway_grpc_failures", "open loop: gateway gRPC non-2xx + errors",
                ol["non_2xx"] + ol["errors"], "", "0", ol["non_2xx"] + ol["errors"] == 0),
            Row("added_grpc_p50_ms", "added latency p50, gRPC", ol["latency_p50_ms"] - ol_bare["latency_p50_ms"], "ms"),
            Row("added_grpc_p99_ms", "added latency p99, gRPC", ol["latency_p99_ms"] - ol_bare["latency_p99_ms"], "ms"),
        ]

    def _meter_consistency(self, gateway: Gateway) -> dict[str, int]:
        import psycopg

        lines = gateway.access_log.read_bytes().count(b"\n")
        with psycopg.connect(gateway.env["DATABASE_URL"]) as conn:
            row = conn.execute("SELECT count(*) FROM usage_events").fetchone()
        return {"access_log_lines": lines, "usage_rows": int(row[0]) if row else 0}

    def _rows(
        self,
        meter_run: meterbench.MeterRun,
        bare: wrk.WrkResult,
        ceilings: dict[str, wrk.WrkResult],
        gw: wrk.WrkResult,
        gw_cpu: dict[str, float],
        lag: meterbench.Lag,
        ol_bare: dict[str, Any],
        ol_gw: dict[str, Any],
        first_token: ttft.Ttft,
        rss: tuple[int, int, int],
    ) -> list[Row]:
        added_p50 = ol_gw["latency_p50_ms"] - ol_bare["latency_p50_ms"]
        added_p99 = ol_gw["latency_p99_ms"] - ol_bare["latency_p99_ms"]
        ttft_added = first_token.gateway_ms - first_token.direct_ms
        rss_start, rss_end, rss_max = rss
        growth = (rss_end - rss_start) / rss_start
        ratio = {t: gw.rps / c.rps if c.rps else 0.0 for t, c in ceilings.items()}
        mib = 1024 * 1024
        open_ok = ol_gw["non_2xx"] == 0 and ol_gw["errors"] == 0
        return [
            Row("bare_rps", "bare Envoy throughput", bare.rps, "req/s"),
            Row("bare_p50_ms", "bare Envoy latency p50", bare.p50_ms, "ms"),
            Row("bare_p90_ms", "bare Envoy latency p90", bare.p90_ms, "ms"),
            Row("bare_p99_ms", "bare Envoy latency p99", bare.p99_ms, "ms"),
            Row("bare_non_2xx", "bare Envoy non-2xx + socket errors", bare.non_2xx + bare.socket_errors, ""),
            *(Row(f"ceiling_{t}_rps", f"do-nothing {t.upper()} ext_authz throughput", ceilings[t].rps, "req/s")
              for t in ("grpc", "http")),
            Row("ceiling_non_2xx", "do-nothing ext_authz non-2xx + socket errors",
                sum(c.non_2xx + c.socket_errors for c in ceilings.values()), ""),
            Row("gateway_rps", "gateway throughput", gw.rps, "req/s", f">= {MIN_GATEWAY_RPS:,.0f}",
                gw.rps >= MIN_GATEWAY_RPS),
            Row("ceiling_ratio", "throughput gateway / do-nothing gRPC ext_authz", ratio["grpc"], "",
                f">= {MIN_CEILING_RATIO:g}", ratio["grpc"] >= MIN_CEILING_RATIO),
            Row("http_ceiling_ratio", "throughput gateway / do-nothing HTTP ext_authz", ratio["http"], ""),
            Row("gateway_non_2xx", "gateway non-2xx + socket errors", gw.non_2xx + gw.socket_errors, "", "0",
                gw.non_2xx + gw.socket_errors == 0),
            Row("gateway_p50_ms", "gateway latency p50", gw.p50_ms, "ms"),
            Row("gateway_p90_ms", "gateway latency p90", gw.p90_ms, "ms"),
            Row("gateway_p99_ms", "gateway latency p99", gw.p99_ms, "ms"),
            Row("rps_ratio", "throughput gateway / bare", gw.rps / bare.rps if bare.rps else 0.0, ""),
            Row("extauth_cpu_us", "ext_authz CPU per request", gw_cpu["extauth"], "us"),
            Row("envoy_cpu_us", "gateway Envoy CPU per request", gw_cpu["envoy"], "us"),
            Row("openloop_bare_p50_ms", f"open loop {ol_bare['offered_rps']:g}/s: bare p50",
                ol_bare["latency_p50_ms"], "ms"),
            Row("openloop_bare_p99_ms", "open loop: bare p99", ol_bare["latency_p99_ms"], "ms"),
            Row("openloop_gateway_p50_ms", "open loop: gateway p50", ol_gw["latency_p50_ms"], "ms"),
            Row("openloop_gateway_p99_ms", "open loop: gateway p99", ol_gw["latency_p99_ms"], "ms"),
            Row("openloop_gateway_rps", "open loop: gateway achieved rate", ol_gw["achieved_rps"], "req/s"),
            Row("openloop_gateway_failures", "open loop: gateway non-2xx + errors",
                ol_gw["non_2xx"] + ol_gw["errors"], "", "0", open_ok),
            Row("openloop_send_lag_p99_ms", "open loop: generator send lag p99",
                max(ol_bare["send_lag_p99_ms"], ol_gw["send_lag_p99_ms"]), "ms"),
            Row("added_p50_ms", "added latency p50", added_p50, "ms", f"<= {MAX_ADDED_P50_MS:g} ms",
                added_p50 <= MAX_ADDED_P50_MS),
            Row("added_p99_ms", "added latency p99", added_p99, "ms", f"<= {MAX_ADDED_P99_MS:g} ms",
                added_p99 <= MAX_ADDED_P99_MS),
            Row("ttft_direct_ms", "TTFT direct to upstream, median", first_token.direct_ms, "ms"),
            Row("ttft_gateway_ms", "TTFT through gateway, median", first_token.gateway_ms, "ms"),
            Row("ttft_added_ms", "TTFT added by the gateway", ttft_added, "ms", f"<= {MAX_TTFT_ADDED_MS:g} ms",
                ttft_added <= MAX_TTFT_ADDED_MS),
            Row("meter_lines_per_s", "meter throughput", meter_run.lines_per_s, "lines/s",
                f">= {MIN_METER_LINES_PER_S:,.0f}", meter_run.lines_per_s >= MIN_METER_LINES_PER_S),
            Row("meter_lag_bytes_at_stop", "meter lag when load stopped", lag.bytes_at_stop, "bytes"),
            Row("meter_catchup_s", "meter zero lag after load stops", lag.seconds_to_zero, "s",
                f"<= {MAX_METER_CATCHUP_S:g} s", lag.reached and lag.seconds_to_zero <= MAX_METER_CATCHUP_S),
            Row("extauth_rss_start_mib", "ext_authz RSS, soak start", rss_start / mib, "MiB"),
            Row("extauth_rss_end_mib", "ext_authz RSS, soak end", rss_end / mib, "MiB"),
            Row("extauth_rss_max_mib", "ext_authz RSS, soak max", rss_max / mib, "MiB"),
            Row("extauth_rss_growth_pct", "ext_authz RSS growth over soak", growth * 100, "%",
                f"within {MAX_RSS_GROWTH * 100:g}%", abs(growth) <= MAX_RSS_GROWTH),
        ]


def _client_rows(client: dict[str, Any]) -> list[Row]:
    single, cluster = client["single"]["cpu_us"], client["cluster"]["cpu_us"]
    per_check = client["redis_per_check"]
    return [
        Row("redis_client_single_us", "Redis client CPU per check, one Redis", single, "us"),
        Row("redis_client_cluster_us", "Redis client CPU per check, 3-master cluster", cluster, "us",
            f"<= {MAX_CLUSTER_CLIENT_RATIO:g}x one Redis", cluster <= MAX_CLUSTER_CLIENT_RATIO * single),
        Row("redis_py_cluster_us", "redis-py asyncio RedisCluster CPU per check", client["redis_py_cluster"]["cpu_us"],
            "us"),
        Row("redis_commands_per_check", "Redis commands per check (script's own included)", per_check["commands"], ""),
        Row("redis_script_us", "Redis time per check (in the script)", per_check["script_us"], "us"),
        Row("redis_bytes_per_check", "Redis bytes per check (in + out)", per_check["bytes_in"] + per_check["bytes_out"],
            "bytes"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds per measurement")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, configs)")
    args = parser.parse_args(argv)
    out = Path(os.environ.get("GATEWAY_STATE_DIR", ".gateway")).resolve() / "bench.json"
    try:
        cfg = Config.from_env(args.quick)
    except HarnessError as err:
        print(f"bench: {err}", file=sys.stderr)
        return 2

    def _interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    # Explicitly, because a shell starts background jobs with SIGINT ignored, and Python then keeps it so.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-")).resolve()
    os.chmod(tmp, 0o755)  # embedded PostgreSQL runs as its own user when the harness runs as root
    say(f"working in {tmp}")
    procs = Processes(tmp / "logs")
    services = Services(procs, tmp)
    started = time.monotonic()
    code = 0
    try:
        bench = Bench(cfg, tmp, procs, services)
        rows = bench.run()
        config = {**asdict(cfg), "elapsed_s": round(time.monotonic() - started, 1), "cpus": os.cpu_count(),
                  "extauth_replicas": len(bench.details["pids"]["extauth"]), "redis_server": services.redis_server}
        write_json(out, rows, config, bench.details)
        title = (f"Gateway benchmark{' (quick)' if cfg.quick else ''}: wrk {cfg.connections} connections x "
                 f"{cfg.threads} threads x {cfg.duration_s:g} s; open loop {cfg.rate:g} req/s; "
                 f"soak {cfg.soak_s:g} s at {cfg.soak_rate:g} req/s; {os.cpu_count()} CPUs; "
                 f"{bench.envoy_workers} Envoy worker(s)")
        print(table(rows, title), flush=True)
        print(f"written to {out}", flush=True)
    except KeyboardInterrupt:
        say("interrupted; stopping everything")
        code = 130
    except Exception as exc:
        traceback.print_exc()
        say(f"the harness failed: {exc}")
        for log in sorted((tmp / "logs").glob("*.log")):
            print(f"--- {log.name} (tail) ---\n{tail(log.read_text(errors='replace'), 15)}", file=sys.stderr)
        code = 1
    finally:
        # A second Ctrl-C must not cut the clean-up short and leave processes behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        procs.stop_all()
        services.close()
        if args.keep:
            say(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    say(f"done in {time.monotonic() - started:.0f} s")
    return code
