"""Workspaces and their plans."""

from __future__ import annotations

from typing import Any

from control import hotsync
from control.context import Context
from control.errors import ControlError
from control.ids import new_id
from control.plans import PLANS, effective_limits


def _plan(plan: str) -> str:
    if plan not in PLANS:
        raise ControlError("invalid_plan", f"unknown plan {plan!r}; choose one of {', '.join(PLANS)}")
    return plan


def resolve(ctx: Context, ref: str) -> dict[str, Any]:
    """A workspace by id or by name."""
    row = ctx.db.execute(
        "SELECT id, name, plan, rpm_default, rpm_ceiling FROM workspaces WHERE id = %s OR name = %s",
        (ref, ref),
    ).fetchone()
    if row is None:
        raise ControlError("workspace_not_found", f"no workspace {ref!r}")
    ws_id, name, plan, rpm_default, rpm_ceiling = row
    default, ceiling = effective_limits(plan, rpm_default, rpm_ceiling)
    return {"id": ws_id, "name": name, "plan": plan, "rpm_default": default, "rpm_ceiling": ceiling}


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
    ctx: Context, ref: str, plan: str, rpm_default: int | None = None, rpm_ceiling: int | None = None
) -> dict[str, Any]:
    ws = resolve(ctx, ref)
    _plan(plan)
    if plan != "enterprise" and (rpm_default or rpm_ceiling):
        raise ControlError("invalid_plan_limits", "--rpm-default and --rpm-ceiling apply to enterprise only")
    if rpm_default and rpm_ceiling and rpm_default > rpm_ceiling:
        raise ControlError("invalid_plan_limits", "--rpm-default cannot exceed --rpm-ceiling")
    with hotsync.changing(ctx) as change:
        ctx.db.execute(
            "UPDATE workspaces SET plan = %s, rpm_default = %s, rpm_ceiling = %s WHERE id = %s",
            (plan, rpm_default, rpm_ceiling, ws["id"]),
        )
        change.workspace(ws["id"])
    return resolve(ctx, ws["id"])
