"""Managed inference is priced per token; a workspace may cap its monthly spend. This module owns the
cap: the flag ext_authz reads (in its one Redis call) while a workspace is at its limit, refreshed by the
meter after every batch it records and by the control plane whenever a limit changes."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import redis

from control import workspaces
from control.context import DB, Context
from control.errors import ControlError
from control.money import usd as money
from extauth.hotstate import spend_redis_key


def billing_month(now: datetime) -> tuple[datetime, datetime]:
    start = now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    return start, end


def refresh_flags(db: DB, client: redis.Redis, workspace_ids: list[str]) -> dict[str, bool]:
    """Set or clear the at-limit flag of each workspace from its managed spend this month."""
    if not workspace_ids:
        return {}
    start, end = billing_month(datetime.now(UTC))
    rows = db.execute(
        "SELECT w.id, w.spend_limit_usd, coalesce(sum(u.cost_usd), 0) FROM workspaces w"
        " LEFT JOIN usage_events u ON u.workspace_id = w.id AND u.destination = 'managed'"
        "  AND u.start_time >= %s AND u.start_time < %s"
        " WHERE w.id = ANY(%s) GROUP BY w.id, w.spend_limit_usd",
        (start, end, list(workspace_ids)),
    ).fetchall()
    at_limit: dict[str, bool] = {}
    with client.pipeline(transaction=False) as pipe:
        for ws_id, limit, spent in rows:
            at_limit[ws_id] = limit is not None and Decimal(spent) >= Decimal(limit)
            if at_limit[ws_id]:
                pipe.set(spend_redis_key(ws_id), 1, exat=int(end.timestamp()))
            else:
                pipe.delete(spend_redis_key(ws_id))
        pipe.execute()
    return at_limit


def set_limit(ctx: Context, ws_ref: str, usd: Decimal | None) -> dict[str, Any]:
    ws = workspaces.resolve(ctx, ws_ref)
    if usd is not None and usd < 0:
        raise ControlError("invalid_limit", "a spend limit is a non-negative amount of US dollars")
    ctx.db.execute("UPDATE workspaces SET spend_limit_usd = %s WHERE id = %s", (usd, ws["id"]))
    at_limit = refresh_flags(ctx.db, ctx.redis, [ws["id"]])[ws["id"]]
    return {"workspace_id": ws["id"], "spend_limit_usd": None if usd is None else money(usd), "at_limit": at_limit}


def set_price(ctx: Context, scope: str, ref: str, input_usd: Decimal, output_usd: Decimal) -> dict[str, Any]:
    if input_usd < 0 or output_usd < 0:
        raise ControlError("invalid_price", "prices are non-negative US dollars per million tokens")
    ctx.db.execute(
        "INSERT INTO model_prices (scope, ref, input_usd_per_mtok, output_usd_per_mtok) VALUES (%s, %s, %s, %s)"
        " ON CONFLICT (scope, ref) DO UPDATE SET input_usd_per_mtok = excluded.input_usd_per_mtok,"
        " output_usd_per_mtok = excluded.output_usd_per_mtok",
        (scope, ref, input_usd, output_usd),
    )
    return {"scope": scope, "ref": ref, "input_usd_per_mtok": money(input_usd),
            "output_usd_per_mtok": money(output_usd)}
