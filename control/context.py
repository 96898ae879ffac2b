"""What every control-plane command works with: the database, Redis and the master keyring."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from control.crypto import Keyring, load_keyring
from control.errors import ControlError
from control.redisconn import SyncRedis
from control.redisconn import client as redis_client
from control.runpod_client import RunPodClient
from control.settings import ControlSettings

DB = psycopg.Connection[tuple[Any, ...]]


@dataclass
class Context:
    settings: ControlSettings
    db: DB
    redis: SyncRedis
    keyring: Keyring

    @property
    def clock_offset(self) -> timedelta:
        return timedelta(seconds=self.settings.clock_offset_s)

    def now(self) -> datetime:
        """The control plane's clock (GATEWAY_CLOCK_OFFSET_S ahead of the host's). Stored instants stay in
        real time, which ext_authz and Redis compare against: subtract `clock_offset` before storing."""
        return datetime.now(UTC) + self.clock_offset

    def runpod(self, api_key: str) -> RunPodClient:
        return RunPodClient(self.settings.runpod_api_url, api_key, self.settings.runpod_inference_url)


@contextmanager
def open_context(settings: ControlSettings) -> Iterator[Context]:
    if not settings.database_url or not settings.redis_url:
        raise ControlError(
            "not_configured",
            "no database: start the stack with `gatewayctl up` or set DATABASE_URL and REDIS_URL",
        )
    keyring = load_keyring(settings.master_key, settings.master_key_file, create=False)
    try:
        db = psycopg.connect(settings.database_url, autocommit=True)
    except psycopg.OperationalError:
        raise ControlError("database_unreachable", "the database could not be reached") from None
    client = redis_client(settings.redis_url)
    try:
        yield Context(settings, db, client, keyring)
    finally:
        db.close()
        client.close()
