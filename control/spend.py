"""A workspace may cap its monthly spend on managed inference. This module owns the cap and its state.

The limit holds within one request (extauth/hotstate.py holds the Redis side): each managed request of a
limited workspace reserves an estimate of its cost at admission, in the check's one script call, and is
refused with 403 plan_limit_exceeded when spent + reserved + its reservation would exceed the limit. The
meter settles after every batch it commits (`settle`): the batch's managed requests release their
reservations by request id, and the month's spend is raised to PostgreSQL's committed figure
(`workspace_spend`, kept by the meter's own insert), never counted up, so a replayed batch or a second
meter never counts twice.

Guarantee. At any moment, a workspace's managed cost this month ≤ its limit + Σ over requests in flight
or not yet settled of max(0, actual cost - reservation). A reservation bounds a request's cost whenever
the request states its completion budget (`max_tokens`/`max_completion_tokens`) and its prompt tokens
do not exceed its body's bytes; otherwise the excess counts against the bound. Two events widen it:
- Redis loses its data (restart without persistence): the reservations of the requests then in flight
  are forgotten, so each of them may overshoot by its whole cost; the spend itself is rebuilt from
  PostgreSQL by the first check that misses it.
- Settlement stops (PostgreSQL or the meter down): reservations hold for EXTAUTH_SPEND_RESERVATION_TTL_S
  (default 1 h, longer than any request Envoy lets run), so the limit holds through an outage that short;
  past it, requests served since more than that long also count against the bound until the meter
  catches up. Managed traffic keeps flowing meanwhile (admission reads no database).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from control import hotsync, workspaces
from control.context import DB, Context
from control.errors import ControlError
from control.money import usd as money
from control.redisconn import SyncRedis
from extauth import hotstate


def billing_month(now: datetime) -> tuple[datetime, datetime]:
    start = now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    return start, end


def spent_uusd(db: DB, workspace_ids: list[str], month: int) -> dict[str, int]:
    """Committed managed spend in `month` of each workspace that has a spend limit, in micro-USD."""
    rows = db.execute(
        "SELECT w.id, coalesce(s.spent_usd, 0) FROM workspaces w"
        " LEFT JOIN workspace_spend s ON s.workspace_id = w.id AND s.month = %s"
        " WHERE w.id = ANY(%s) AND w.spend_limit_usd IS NOT NULL",
        (month, workspace_ids),
    ).fetchall()
    return {ws_id: hotstate.uusd(spent) for ws_id, spent in rows}


class Settler:
    """The meter's half of the spend limit (see the module docstring)."""

    def __init__(self, client: SyncRedis) -> None:
        self._client = client

    def settle(self, db: DB, managed: Iterable[tuple[str, str]]) -> None:
        """After a batch committed: `managed` holds (workspace id, request id) of its managed rows, newly
        recorded or not (a replayed row's reservation may still be held if a settle was lost)."""
        by_workspace: dict[str, list[str]] = defaultdict(list)
        for workspace_id, request_id in managed:
            by_workspace[workspace_id].append(request_id)
        if not by_workspace:
            return
        month = hotstate.month_tag(datetime.now(UTC))
        spent = spent_uusd(db, sorted(by_workspace), month)
        # EVAL, not EVALSHA: redis-py's cluster pipeline refuses EVALSHA (and hides eval), and a settle is no hot
        # path. On a cluster each workspace's call goes to its own slot's master.
        with self._client.pipeline(transaction=False) as pipe:
            for workspace_id, request_ids in sorted(by_workspace.items()):
                keys = hotstate.spend_redis_keys(workspace_id)
                pipe.execute_command("EVAL", hotstate.SETTLE_SCRIPT, len(keys), *keys, month,
                                     spent.get(workspace_id, -1), *request_ids)
            pipe.execute()


def set_limit(ctx: Context, ws_ref: str, usd: Decimal | None) -> dict[str, Any]:
    ws = workspaces.resolve(ctx, ws_ref)
    if usd is not None and usd < 0:
        raise ControlError("invalid_limit", "a spend limit is a non-negative amount of US dollars")
    # Published with the workspace's generation: every replica's next check reloads the workspace, and
    # with it this month's spend from PostgreSQL.
    with hotsync.changing(ctx) as change:
        ctx.db.execute("UPDATE workspaces SET spend_limit_usd = %s WHERE id = %s", (usd, ws["id"]))
        change.workspace(ws["id"])
    month = hotstate.month_tag(datetime.now(UTC))
    spent = spent_uusd(ctx.db, [ws["id"]], month).get(ws["id"], 0)
    at_limit = usd is not None and spent >= hotstate.uusd(usd)
    return {"workspace_id": ws["id"], "spend_limit_usd": None if usd is None else money(usd), "at_limit": at_limit}
