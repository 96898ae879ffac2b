"""Keeping ext_authz's spend-limit flags current: control.spend owns them and expects the meter to
recompute, after each batch, the flag of every workspace the batch charged."""

from __future__ import annotations

import logging
from collections.abc import Collection

import redis

from control import spend
from control.context import DB

log = logging.getLogger(__name__)


class SpendFlags:
    def __init__(self, redis_url: str) -> None:
        self._client = redis.Redis.from_url(redis_url)

    def close(self) -> None:
        self._client.close()

    def refresh(self, db: DB, workspace_ids: Collection[str]) -> None:
        if not workspace_ids:
            return
        try:
            spend.refresh_flags(db, self._client, sorted(workspace_ids))
        except redis.RedisError as err:
            # Metering goes on: the flag is recomputed with the workspace's next charged batch.
            log.warning("could not refresh the spend-limit flags of %s: %s", ", ".join(workspace_ids), err)
