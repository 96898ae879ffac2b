"""Settling ext_authz's spend reservations after each committed batch: control.spend owns the contract
(release by request id, raise the month's spend to PostgreSQL's figure) and states its guarantee."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable

from control import redisconn, spend
from control.context import DB
from meter.parse import UsageRecord

log = logging.getLogger(__name__)


# Releases kept for a later try when Redis could not take them; past this many the oldest are dropped
# (they expire on their own, EXTAUTH_SPEND_RESERVATION_TTL_S).
MAX_UNSETTLED = 100_000


class SpendSettlement:
    def __init__(self, redis_url: str) -> None:
        self._url = redis_url
        self._client = redisconn.client(redis_url)
        self._settler = spend.Settler(self._client)
        # (workspace id, request id) committed to PostgreSQL but not yet released in Redis, oldest first.
        self._unsettled: dict[tuple[str, str], None] = {}

    def close(self) -> None:
        self._client.close()

    def _reconnect(self) -> None:
        with contextlib.suppress(*redisconn.ERRORS):
            self._client.close()
        self._client = redisconn.client(self._url)
        self._settler = spend.Settler(self._client)

    @property
    def unsettled(self) -> int:
        return len(self._unsettled)

    def settle(self, db: DB, records: Iterable[UsageRecord]) -> None:
        # Every managed row of the batch, new or replayed: releasing twice is harmless, never releasing
        # would hold the reservation until it expires.
        for r in records:
            if r.destination == "managed" and r.workspace_id:
                self._unsettled[(r.workspace_id, r.request_id)] = None
        self.retry(db)

    def retry(self, db: DB) -> None:
        """Release what is still held: the meter calls this after each batch and whenever it is idle, so a
        Redis that was away (a restart, a Cluster failover while redis-py relearns the slot map) gets every
        release once it answers again, not only the next batch's."""
        if not self._unsettled:
            return
        while len(self._unsettled) > MAX_UNSETTLED:
            del self._unsettled[next(iter(self._unsettled))]
        managed = list(self._unsettled)
        # Twice at once: after a Redis Cluster failover the first call fails while redis-py relearns the
        # slot map, and a settle is safe to repeat.
        for attempt in range(2):
            try:
                self._settler.settle(db, managed)
            except redisconn.ERRORS as err:
                if attempt:
                    # Metering goes on; the releases are tried again (and the spend raised) on the next
                    # batch or idle poll, with a new client: redis-py's Cluster client can keep aiming at
                    # a master that died, where a new one learns the slot map from the configured nodes.
                    log.warning("could not settle %d spend reservation(s) yet: %s", len(managed), err)
                    self._reconnect()
                continue
            for done in managed:
                self._unsettled.pop(done, None)
            return
