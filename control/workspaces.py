"""Workspaces and their plans, and plan changes on the billing cycle (control/plans.py states the rule).

A pending downgrade is stored beside the plan (`pending_plan`, `pending_plan_at`: the start of the next
billing period, in real time) and published with the workspace, so every ext_authz applies it at that
moment without a restart or a database read; the control plane folds it into `plan` the next time it
resolves the workspace after that moment."""

from __future__ import annotations

from typing import Any

from control import hotsync, spend
from control.context import Context
from control.errors import ControlError
from control.ids import new_id
from control.money import usd
from control.plans import PLANS, effective_limits, is_downgrade
from extauth.ratelimit import burst


def _plan(plan: str) -> str:
    if plan not in PLANS:
        raise ControlError("invalid_plan", f"unknown plan {plan!r}; choose one of {', '.join(PLANS)}")
    return plan


def _read(ctx: Context, ref: str) -> tuple[Any, ...] | None:
    return ctx.db.execute(
        "SELECT id, name, plan, rpm_default, rpm_ceiling, pending_plan, pending_plan_at, pending_plan_at <= now()"
        " FROM workspaces WHERE id = %s OR name = %s",
        (ref, ref),
    ).fetchone()


def resolve(ctx: Context, ref: str) -> dict[str, Any]:
    """A workspace by id or by name, on the plan in force now (a pending change whose time has come is
    applied first)."""
    row = _read(ctx, ref)
    if row is None:
        raise ControlError("workspace_not_found", f"no workspace {ref!r}")
    if row[7]:
        with hotsync.changing(ctx) as change:
            ctx.db.execute(
                "UPDATE workspaces SET plan = pending_plan, rpm_default = NULL, rpm_ceiling = NULL,"
                " pending_plan = NULL, pending_plan_at = NULL WHERE id = %s AND pending_plan_at <= now()",
                (row[0],),
            )
            change.workspace(row[0])
        row = _read(ctx, row[0])
        assert row is not None
    ws_id, name, plan, rpm_default, rpm_ceiling, pending_plan, pending_at, _due = row
    default, ceiling = effective_limits(plan, rpm_default, rpm_ceiling)
    return {"id": ws_id, "name": name, "plan": plan, "rpm_default": default, "rpm_ceiling": ceiling,
            "pending_plan": pending_plan,
            # In the control plane's clock, as the billing period it starts is reckoned.
            "pending_plan_effective_at": (pending_at + ctx.clock_offset).isoformat() if pending_at else None}


def list_all(ctx: Context) -> list[dict[str, Any]]:
    """Every workspace with its plan and how many active keys and live deployments it has."""
    rows = ctx.db.execute(
        # The plan in force: a downgrade whose moment has passed counts even before it is folded in.
        "SELECT w.id, w.name, CASE WHEN w.pending_plan_at <= now() THEN w.pending_plan ELSE w.plan END, w.created_at,"
        " (SELECT count(*) FROM api_keys k WHERE k.workspace_id = w.id AND k.revoked_at IS NULL),"
        " (SELECT count(*) FROM deployments d WHERE d.workspace_id = w.id AND d.state <> 'deleted')"
        " FROM workspaces w ORDER BY w.name"
    ).fetchall()
    return [
        {"id": ws_id, "name": name, "plan": plan, "active_keys": active_keys, "live_deployments": live,
         "created_at": created.isoformat()}
        for ws_id, name, plan, created, active_keys, live in rows
    ]


def show(ctx: Context, ref: str) -> dict[str, Any]:
    """One workspace as an operator needs it: plan and the limits it gives a key, spend cap, RunPod link,
    keys and deployments."""
    ws = resolve(ctx, ref)
    row = ctx.db.execute(
        "SELECT w.created_at, w.spend_limit_usd, c.account_id, c.linked_at, c.rejected_at,"
        " (SELECT count(*) FROM api_keys k WHERE k.workspace_id = w.id AND k.revoked_at IS NULL),"
        " (SELECT count(*) FROM api_keys k WHERE k.workspace_id = w.id AND k.revoked_at IS NOT NULL),"
        " (SELECT count(*) FROM deployments d WHERE d.workspace_id = w.id AND d.state <> 'deleted')"
        " FROM workspaces w LEFT JOIN runpod_credentials c ON c.workspace_id = w.id WHERE w.id = %s",
        (ws["id"],),
    ).fetchone()
    assert row is not None
    created, spend_limit, account_id, linked_at, rejected_at, active_keys, revoked_keys, live = row
    plan = PLANS[ws["plan"]]
    return {
        **ws,
        "burst_default": burst(ws["rpm_default"]),
        "can_mint_keys": plan.can_mint_keys,
        "can_deploy": plan.can_deploy,
        "byoc_allowed": plan.byoc_allowed,
        "spend_limit_usd": None if spend_limit is None else usd(spend_limit),
        "runpod_account_id": account_id,
        "runpod_linked_at": linked_at.isoformat() if linked_at else None,
        "runpod_key_rejected": rejected_at is not None,
        "active_keys": active_keys,
        "revoked_keys": revoked_keys,
        "live_deployments": live,
        "created_at": created.isoformat(),
    }


def create(ctx: Context, name: str, plan: str) -> dict[str, Any]:
    if not name or len(name) > 100:
        raise ControlError("invalid_name", "a workspace name is 1 to 100 characters")
    ws_id = new_id("ws")
    with hotsync.changing(ctx) as change:
        cur = ctx.db.execute(
            "INSERT INTO workspaces (id, name, plan) VALUES (%s, %s, %s) ON CONFLICT (name) DO NOTHING",
            (ws_id, name, _plan(plan)),
        )
        change.workspace(ws_id)
    if cur.rowcount == 0:
        raise ControlError("workspace_exists", f"a workspace named {name!r} already exists")
    return resolve(ctx, ws_id)


def set_plan(
    ctx: Context, ref: str, plan: str, rpm_default: int | None = None, rpm_ceiling: int | None = None,
    now: bool = False,
) -> dict[str, Any]:
    """An upgrade (or the same plan) applies at once and drops any pending downgrade; a downgrade waits
    for the start of the next billing period, replacing a pending one, unless `now`."""
    ws = resolve(ctx, ref)
    _plan(plan)
    if plan != "enterprise" and (rpm_default or rpm_ceiling):
        raise ControlError("invalid_plan_limits", "--rpm-default and --rpm-ceiling apply to enterprise only")
    if rpm_default and rpm_ceiling and rpm_default > rpm_ceiling:
        raise ControlError("invalid_plan_limits", "--rpm-default cannot exceed --rpm-ceiling")
    with hotsync.changing(ctx) as change:
        if is_downgrade(ws["plan"], plan) and not now:
            _start, boundary = spend.billing_month(ctx.now())
            ctx.db.execute(
                "UPDATE workspaces SET pending_plan = %s, pending_plan_at = %s WHERE id = %s",
                (plan, boundary - ctx.clock_offset, ws["id"]),
            )
        else:
            ctx.db.execute(
                "UPDATE workspaces SET plan = %s, rpm_default = %s, rpm_ceiling = %s, pending_plan = NULL,"
                " pending_plan_at = NULL WHERE id = %s",
                (plan, rpm_default, rpm_ceiling, ws["id"]),
            )
        change.workspace(ws["id"])
    return resolve(ctx, ws["id"])


def cancel_plan_change(ctx: Context, ref: str) -> dict[str, Any]:
    """Drop a pending downgrade: the workspace stays on its plan."""
    ws = resolve(ctx, ref)
    if ws["pending_plan"] is None:
        raise ControlError("no_pending_plan_change", f"workspace {ws['name']!r} has no pending plan change")
    with hotsync.changing(ctx) as change:
        ctx.db.execute("UPDATE workspaces SET pending_plan = NULL, pending_plan_at = NULL WHERE id = %s",
                       (ws["id"],))
        change.workspace(ws["id"])
    return resolve(ctx, ws["id"])
