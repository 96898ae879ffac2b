"""Deployment tiers. Flex (the default) scales to zero when idle: an unused deployment costs nothing.
Active keeps `min_workers` warm on the managed destination (RunPod REST v2 `workers.min`; RunPod's
"Active (min) workers", always running: runpod/docs `serverless/pricing.md`) and carries a flat monthly
base fee per warm worker by GPU pool, from the repo's catalog (control/tier_fees.json), on top of the
per-token prices. A customer's own RunPod account is Flex only: RunPod bills its workers to the customer.

The fee is fixed on the deployment when it is created and prorated per UTC day: each day from the day
it first served to the day it was torn down (both included) costs the monthly fee divided by that
month's days, rounded to the micro-dollar.
"""

from __future__ import annotations

import calendar
import functools
import json
from collections import defaultdict
from datetime import date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from control.context import Context
from control.errors import ControlError
from control.money import usd

TIERS = ("flex", "active")
CATALOG = Path(__file__).with_name("tier_fees.json")
_MICRO = Decimal("0.000001")


@functools.cache
def catalog() -> dict[str, Decimal]:
    """Monthly base fee in USD per warm worker, by GPU pool."""
    pools = json.loads(CATALOG.read_text(encoding="utf-8"))["gpu_pools"]
    try:
        return {pool: Decimal(fee) for pool, fee in pools.items()}
    except InvalidOperation:
        raise ControlError("invalid_tier_catalog", f"{CATALOG} is malformed") from None


def check(tier: str, destination: str, min_workers: int | None, workers_max: int) -> int:
    """The warm workers a deploy asks for (0 for Flex), or a clear refusal."""
    if tier not in TIERS:
        raise ControlError("invalid_tier", f"unknown tier {tier!r}; choose flex or active")
    if tier == "flex":
        if min_workers:
            raise ControlError("invalid_min_workers", "--min-workers applies to --tier active only (Flex scales "
                               "to zero)")
        return 0
    if destination != "managed":
        raise ControlError("active_tier_managed_only",
                           "the Active tier runs on the managed destination only; your own RunPod account is "
                           "Flex only (scale to zero): deploy with --tier flex, or with --destination managed")
    warm = 1 if min_workers is None else min_workers
    if warm < 1:
        raise ControlError("invalid_min_workers", "the Active tier keeps at least 1 worker warm")
    if warm > workers_max:
        raise ControlError("invalid_min_workers", f"--min-workers {warm} is above --workers-max {workers_max}")
    return warm


def monthly_fee(pools: tuple[str, ...], min_workers: int) -> tuple[Decimal, Decimal]:
    """(fee per warm worker, fee for all of them) a month: the dearest listed pool's, since a warm worker
    may be placed on any of them."""
    if min_workers == 0:
        return Decimal(0), Decimal(0)
    fees = catalog()
    missing = [p for p in pools if p not in fees]
    if missing:
        raise ControlError("tier_fee_unknown", f"the Active tier has no base fee for GPU pool {missing[0]!r} "
                           f"({CATALOG.name} lists {', '.join(fees)})")
    per_worker = max(fees[p] for p in pools)
    return per_worker, per_worker * min_workers


def daily(monthly: Decimal, day: date) -> Decimal:
    return (monthly / calendar.monthrange(day.year, day.month)[1]).quantize(_MICRO, ROUND_HALF_UP)


def base_fees(ctx: Context, ws_id: str, start: datetime, end: datetime, now: datetime) -> tuple[
        dict[date, Decimal], list[dict[str, Any]]]:
    """The Active base fees a workspace owes for the days of [start, end) up to `now`: by day, and per
    deployment."""
    rows = ctx.db.execute(
        "SELECT id, public_name, min_workers, base_fee_usd_month, billed_from, deleted_at FROM deployments"
        " WHERE workspace_id = %s AND tier = 'active' AND billed_from IS NOT NULL AND billed_from < %s"
        " AND (deleted_at IS NULL OR deleted_at >= %s) ORDER BY billed_from, id",
        (ws_id, min(end, now), start),
    ).fetchall()
    by_day: dict[date, Decimal] = defaultdict(Decimal)
    per_deployment = []
    last = min(end - timedelta(days=1), now).date()
    for dep_id, name, warm, monthly, billed_from, deleted_at in rows:
        day = max(start, billed_from).date()
        until = min(last, deleted_at.date()) if deleted_at else last
        total, days = Decimal(0), 0
        while day <= until:
            fee = daily(monthly, day)
            by_day[day] += fee
            total += fee
            days += 1
            day += timedelta(days=1)
        per_deployment.append({"deployment_id": dep_id, "model": name, "tier": "active", "min_workers": warm,
                               "monthly_usd": usd(monthly), "days": days, "base_fee_usd": usd(total)})
    return dict(by_day), per_deployment
