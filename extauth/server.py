"""Entry point: `python -m extauth.server` serves Envoy's ext_authz over HTTP on EXTAUTH_LISTEN (and
over gRPC on EXTAUTH_GRPC_LISTEN when set), and metrics, readiness and the internal credential route
on EXTAUTH_METRICS_LISTEN."""

from __future__ import annotations

import asyncio
import logging
import signal

import uvloop
from opentelemetry.metrics import Meter, NoOpMeterProvider
from psycopg_pool import AsyncConnectionPool

from control.crypto import Keyring, load_keyring
from control.telemetry import prometheus_provider
from extauth import admin, hotstate, http_check
from extauth.checker import Checker
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

    pool = AsyncConnectionPool(settings.database_url, min_size=1, max_size=4, open=False)
    await pool.open(wait=True, timeout=30)
    hot = ScriptClient(settings.redis_url, hotstate.DECIDE_SCRIPT, settings.redis_timeout_ms / 1000)
    store = StateStore(pool, keyring(), settings.cache_size, keyring)
    metrics = ExtauthMetrics(_meter(settings.metrics_listen is not None), store)
    checker = Checker(store, hot, settings.redis_failure_mode, metrics, settings.managed_api_key)
    service = http_check.CheckService(checker, store)
    # No SO_REUSEPORT: a stale process on the same port must make start-up fail, not share traffic.
    server = await http_check.serve(service, settings.listen.host, settings.listen.port)
    grpc_transport = None
    if settings.grpc_listen is not None:
        from extauth.grpc_check import GrpcTransport  # grpcio only loads for operators who use it

        grpc_transport = GrpcTransport(checker, str(settings.grpc_listen))
        await grpc_transport.start()
    admin_runner = None
    if settings.metrics_listen is not None:
        admin_runner = await admin.serve(
            settings.metrics_listen.host, settings.metrics_listen.port, lambda: service.serving
        )
    log.info("ext_authz listening on %s", settings.listen)
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
    await http_check.drain(service, server, grace_s=5)
    if grpc_transport is not None:
        await grpc_transport.stop()
    if admin_runner is not None:
        await admin_runner.cleanup()
    await hot.close()
    await pool.close()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s extauth %(levelname)s %(message)s")
    uvloop.run(serve(ExtauthSettings.from_env()))


if __name__ == "__main__":
    main()
