"""Entry point: `python -m extauth.server` serves Envoy's ext_authz and gRPC health on EXTAUTH_LISTEN,
and metrics, readiness and the internal credential route on EXTAUTH_METRICS_LISTEN."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
import uvloop
from envoy.service.auth.v3 import external_auth_pb2_grpc as authz_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry.metrics import Meter, NoOpMeterProvider
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from control.crypto import Keyring, load_keyring
from control.telemetry import prometheus_provider
from extauth import admin
from extauth.metrics import ExtauthMetrics
from extauth.servicer import AuthorizationServicer
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
    timeout = settings.redis_timeout_ms / 1000
    redis = Redis.from_url(settings.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)
    store = StateStore(pool, keyring(), settings.cache_size, keyring)
    metrics = ExtauthMetrics(_meter(settings.metrics_listen is not None), store)
    # No SO_REUSEPORT: a stale process on the same port must make start-up fail, not share traffic.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    authz_grpc.add_AuthorizationServicer_to_server(
        AuthorizationServicer(store, redis, settings.redis_failure_mode, metrics, settings.managed_api_key), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(str(settings.listen))
    await server.start()
    serving = True
    admin_runner = None
    if settings.metrics_listen is not None:
        admin_runner = await admin.serve(settings.metrics_listen.host, settings.metrics_listen.port, lambda: serving)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info("ext_authz listening on %s", settings.listen)
    print(f"extauth listening on {settings.listen}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    # Report NOT_SERVING first and keep answering while Envoy's health check notices (it checks
    # every 0.25 s and ejects after two failures), then stop taking calls and let those in flight finish.
    serving = False
    await health_servicer.enter_graceful_shutdown()
    await asyncio.sleep(settings.drain_s)
    await server.stop(grace=5)
    if admin_runner is not None:
        await admin_runner.cleanup()
    await redis.aclose()
    await pool.close()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s extauth %(levelname)s %(message)s")
    uvloop.run(serve(ExtauthSettings.from_env()))


if __name__ == "__main__":
    main()
