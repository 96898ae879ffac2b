"""Settling ext_authz's spend reservations after each committed batch: control.spend owns the contract
(release by request id, raise the month's spend to PostgreSQL's figure) and states its guarantee."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from control import redisconn, spend
from control.context import DB
from meter.parse import UsageRecord

log = logging.getLogger(__name__)


class SpendSettlement:
    def __init__(self, redis_url: str) -> None:
        self._client = redisconn.client(redis_url)
        self._settler = spend.Settler(self._client)

    def close(self) -> None:
        self._client.close()

    def settle(self, db: DB, records: Iterable[UsageRecord]) -> None:
        # Every managed row of the batch, new or replayed: releasing twice is harmless, never releasing
        # would hold the reservation until it expires.
        managed = [(r.workspace_id, r.request_id) for r in records if r.destination == "managed" and r.workspace_id]
        if not managed:
            return
        # Twice at most: after a Redis Cluster failover the first call fails while redis-py relearns the
        # slot map, and a settle is safe to repeat.
        for attempt in range(2):
            try:
                self._settler.settle(db, managed)
                return
            except redisconn.ERRORS as err:
                if attempt:
                    # Metering goes on: the reservations expire on their own, and the spend is raised by
                    # the workspace's next settled batch (or rebuilt from PostgreSQL if Redis lost it).
                    log.warning("could not settle the spend reservations of this batch: %s", err)
