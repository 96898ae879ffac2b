"""Gateway API keys: minted for plans that allow it, limited up to the plan's ceiling, revocable."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from control import apikeys, hotsync, workspaces
from control.context import Context
from control.errors import ControlError
from control.ids import new_id
from control.plans import PLANS
from extauth.ratelimit import burst


def _check_limit(ws: dict[str, Any], rpm: int | None) -> None:
    if rpm is None:
        return
    if rpm < 1:
        raise ControlError("invalid_limit", "a rate limit is at least 1 request per minute")
    if rpm > ws["rpm_ceiling"]:
        raise ControlError(
            "limit_above_ceiling",
            f"{rpm} requests/minute is above the {ws['plan']} plan ceiling of {ws['rpm_ceiling']}",
        )


def create(ctx: Context, ws_ref: str, name: str = "", rpm: int | None = None) -> dict[str, Any]:
    ws = workspaces.resolve(ctx, ws_ref)
    if not PLANS[ws["plan"]].can_mint_keys:
        raise ControlError(
            "plan_required", f"the {ws['plan']} plan cannot create API keys; upgrade to pro or above"
        )
    _check_limit(ws, rpm)
    key = apikeys.generate()
    digest = apikeys.digest(key)
    key_id = new_id("key")
    # Published at once, so the key's first requests find its limit in Redis instead of all reloading it.
    with hotsync.changing(ctx) as change:
        ctx.db.execute(
            "INSERT INTO api_keys (id, workspace_id, name, key_hash, key_hint, rpm_limit)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            (key_id, ws["id"], name, digest, apikeys.hint(key), rpm),
        )
        change.key(key_id)
    return {"id": key_id, "workspace_id": ws["id"], "name": name, "key": key,
            "rpm_limit": rpm or ws["rpm_default"]}


def list_keys(ctx: Context, ws_ref: str) -> list[dict[str, Any]]:
    """The workspace's keys, each with the limit it gets and when it was last used (the start of its
    latest metered request; None if it never made one)."""
    ws = workspaces.resolve(ctx, ws_ref)
    last_used: dict[str, datetime] = dict(ctx.db.execute(
        "SELECT key_id, max(start_time) FROM usage_events WHERE workspace_id = %s GROUP BY key_id", (ws["id"],)
    ).fetchall())
    rows = ctx.db.execute(
        "SELECT id, name, key_hint, rpm_limit, created_at, revoked_at FROM api_keys"
        " WHERE workspace_id = %s ORDER BY created_at",
        (ws["id"],),
    ).fetchall()
    out = []
    for key_id, name, hint, rpm, created, revoked in rows:
        limit = min(rpm or ws["rpm_default"], ws["rpm_ceiling"])
        used = last_used.get(key_id)
        out.append({
            "id": key_id,
            "name": name,
            "hint": hint,
            "rpm_limit": limit,
            "burst": burst(limit),
            "created_at": created.isoformat(),
            "last_used_at": used.isoformat() if used else None,
            "revoked": revoked is not None,
        })
    return out


def find_active(ctx: Context, ws_id: str, key: str) -> str | None:
    """The id of `key` if it is an active key of the workspace: how a holder of a key is recognised
    without the key ever being stored."""
    digest = apikeys.digest(key)
    if digest is None:
        return None
    row = ctx.db.execute(
        "SELECT id FROM api_keys WHERE key_hash = %s AND workspace_id = %s AND revoked_at IS NULL", (digest, ws_id)
    ).fetchone()
    return None if row is None else str(row[0])


def _key_workspace(ctx: Context, key_id: str) -> str:
    row = ctx.db.execute("SELECT workspace_id FROM api_keys WHERE id = %s", (key_id,)).fetchone()
    if row is None:
        raise ControlError("key_not_found", f"no API key {key_id!r}")
    return str(row[0])


def revoke(ctx: Context, key_id: str) -> dict[str, Any]:
    _key_workspace(ctx, key_id)
    with hotsync.changing(ctx) as change:
        ctx.db.execute("UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = %s", (key_id,))
        change.key(key_id)
    return {"id": key_id, "revoked": True}


def set_limit(ctx: Context, key_id: str, rpm: int) -> dict[str, Any]:
    ws = workspaces.resolve(ctx, _key_workspace(ctx, key_id))
    _check_limit(ws, rpm)
    with hotsync.changing(ctx) as change:
        ctx.db.execute("UPDATE api_keys SET rpm_limit = %s WHERE id = %s", (rpm, key_id))
        change.key(key_id)
    return {"id": key_id, "rpm_limit": rpm}
