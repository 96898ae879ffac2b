"""Publishes control-plane changes to the Redis hot state that every ext_authz replica checks on each
request, so a revoke, limit, plan, deployment, price or credential change applies on the next request.

Use `with changing(ctx) as change:` around a change: the generations are bumped in the same
transaction, and published to Redis only after it commits (publishing earlier would let a replica
reload the old rows under the new generation). Should publishing fail, the hot state expires within
HOTSTATE_TTL_S and is rebuilt from PostgreSQL, which the warning tells the operator.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from control import redisconn
from control.context import DB, Context
from control.plans import effective_limits
from control.redisconn import SyncRedis
from extauth import hotstate


@dataclass
class Change:
    workspaces: set[str] = field(default_factory=set)
    keys: set[str] = field(default_factory=set)

    def workspace(self, workspace_id: str) -> None:
        self.workspaces.add(workspace_id)

    def key(self, key_id: str) -> None:
        self.keys.add(key_id)


def _bump(db: DB, change: Change) -> list[tuple[str, list[Any]]]:
    puts: list[tuple[str, list[Any]]] = []
    for ws_id in sorted(change.workspaces):
        row = db.execute(
            "UPDATE workspaces SET generation = generation + 1 WHERE id = %s"
            " RETURNING generation, plan, rpm_default, rpm_ceiling, spend_limit_usd, pending_plan,"
            " (extract(epoch FROM pending_plan_at) * 1000000)::bigint",
            (ws_id,),
        ).fetchone()
        if row is not None:
            generation, plan, rpm_default, rpm_ceiling, spend_limit, pending_plan, pending_at_us = row
            default, ceiling = effective_limits(plan, rpm_default, rpm_ceiling)
            limit = None if spend_limit is None else hotstate.uusd(spend_limit)
            puts.append((hotstate.workspace_redis_key(ws_id), hotstate.workspace_fields(
                generation, default, ceiling, limit, hotstate.plan_switch(pending_plan, pending_at_us))))
    for key_id in sorted(change.keys):
        row = db.execute(
            "UPDATE api_keys SET generation = generation + 1 WHERE id = %s"
            " RETURNING workspace_id, generation, revoked_at IS NOT NULL, rpm_limit",
            (key_id,),
        ).fetchone()
        if row is not None:
            ws_id, generation, revoked, rpm_limit = row
            puts.append((hotstate.key_redis_key(ws_id, key_id), hotstate.key_fields(generation, revoked, rpm_limit)))
    return puts


def publish(client: SyncRedis, puts: list[tuple[str, list[Any]]]) -> None:
    try:
        for redis_key, fields in puts:
            client.eval(hotstate.PUT_SCRIPT, 1, redis_key, *fields)
    except redisconn.ERRORS:
        print(
            f"warning: Redis could not be updated; the change applies within {hotstate.HOTSTATE_TTL_S} s",
            file=sys.stderr,
        )


@contextmanager
def changing(ctx: Context) -> Iterator[Change]:
    change = Change()
    with ctx.db.transaction():
        yield change
        puts = _bump(ctx.db, change)
    publish(ctx.redis, puts)
