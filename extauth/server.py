"""Entry point: `python -m extauth.server` serves Envoy's ext_authz on EXTAUTH_LISTEN, over HTTP (the
shipped envoy/envoy.yaml) or over gRPC (EXTAUTH_TRANSPORT=grpc, with the gRPC blocks of envoy.yaml
selected), and metrics, readiness and the internal credential route on EXTAUTH_METRICS_LISTEN."""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import signal
import sys

import uvloop
from opentelemetry.metrics import Meter, NoOpMeterProvider
from psycopg_pool import AsyncConnectionPool

from control.crypto import Keyring, load_keyring
from control.net import EXIT_CANNOT_LISTEN
from control.telemetry import prometheus_provider
from extauth import admin, hotstate, http_check
from extauth.checker import Checker
from extauth.custody import EnvoySecret
from extauth.metrics import ExtauthMetrics
from extauth.redis_client import ScriptClient
from extauth.settings import ExtauthSettings
from extauth.state import StateStore

log = logging.getLogger("extauth")


def _meter(enabled: bool) -> Meter:
    # The admin port serves /metrics itself (beside /ready and the internal route).
    provider = prometheus_provider("gateway-extauth") if enabled else NoOpMeterProvider()
    return provider.get_meter("extauth")


async def serve(settings: ExtauthSettings) -> None:
    def keyring() -> Keyring:
        return load_keyring(settings.master_key, settings.master_key_file, create=False)

    # Checked on checkout (one round trip, on cache misses only): after a database restart the pooled
    # connections are dead, and each would otherwise fail one check with a 503.
    pool = AsyncConnectionPool(settings.database_url, min_size=1, max_size=4, open=False,
                               check=AsyncConnectionPool.check_connection)
    await pool.open(wait=True, timeout=30)
    hot = ScriptClient(settings.redis_url, hotstate.DECIDE_SCRIPT, settings.redis_timeout_ms / 1000)
    store = StateStore(pool, keyring(), settings.cache_size, keyring)
    metrics = ExtauthMetrics(_meter(settings.metrics_listen is not None), store)
    checker = Checker(store, hot, settings.redis_failure_mode, metrics, settings.managed_api_key, settings.spend,
                      settings.redis_timeout_ms / 1000, settings.check_budget_s)
    secret = EnvoySecret(settings.envoy_secret)
    service = http_check.CheckService(checker, store, secret)
    server = grpc_transport = None
    if settings.transport == "grpc":
        from extauth.grpc_check import GrpcTransport  # grpcio loads only for operators who use it

        grpc_transport = GrpcTransport(checker, str(settings.listen), secret)
        await grpc_transport.start()
    else:
        # No SO_REUSEPORT: a stale process on the same port must make start-up fail, not share traffic.
        server = await http_check.serve(service, settings.listen.host, settings.listen.port)
    admin_runner = None
    if settings.metrics_listen is not None:
        admin_runner = await admin.serve(
            settings.metrics_listen.host, settings.metrics_listen.port, lambda: service.serving, secret
        )
    # Everything allocated so far (modules, the SDKs, pools: ~72k objects) lives as long as the process.
    # Frozen, the cyclic collector stops re-scanning it: a full collection over it takes ~30 ms on the
    # 2-core bench machine, and every check in flight would wait that long.
    gc.collect()
    gc.freeze()
    log.info("ext_authz (%s) listening on %s", settings.transport, settings.listen)
    print(f"extauth listening on {settings.listen}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    # Fail the health check first and keep answering while Envoy notices (it checks every 0.25 s and
    # ejects after two failures), then stop taking checks and let those in flight finish.
    service.serving = False
    if grpc_transport is not None:
        await grpc_transport.drain()
    await asyncio.sleep(settings.drain_s)
    if server is not None:
        await http_check.drain(service, server, grace_s=5)
    if grpc_transport is not None:
        await grpc_transport.stop()
    if admin_runner is not None:
        await admin_runner.cleanup()
    await hot.close()
    await pool.close()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s extauth %(levelname)s %(message)s")
    settings = ExtauthSettings.from_env()
    try:
        uvloop.run(serve(settings))
    except OSError as err:
        if err.errno != errno.EADDRINUSE:
            raise
        # Fatal, not retried: restarting cannot free the port, and a replica on another process's port
        # must never look like this gateway's (control/stack.py stops the stack on this status).
        print(f"extauth: cannot listen on {settings.listen} or {settings.metrics_listen}: {err.strerror or err}",
              file=sys.stderr, flush=True)
        sys.exit(EXIT_CANNOT_LISTEN)


if __name__ == "__main__":
    main()
