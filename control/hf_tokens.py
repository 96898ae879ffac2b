"""The Hugging Face token a deploy gives its workers for gated models (worker-vllm and
worker-infinity-embedding download with `HF_TOKEN`).

A workspace's own token is read from stdin, sealed with the master keyring (the workspace id and the
purpose as associated data) and never shown again; the managed destination uses the platform's token
from GATEWAY_MANAGED_HF_TOKEN. Only `for_deploy` opens it. The Hub cannot be reached from here, so a
token is checked for shape only; a wrong one shows as unhealthy workers at deploy.
"""

from __future__ import annotations

from typing import Any

from control import workspaces
from control.context import Context
from control.crypto import HF_TOKEN, Sealed
from control.errors import ControlError

MASK = "********"  # what dry runs show instead of a token: fixed, so nothing of the token leaks
_MAX_LEN = 512


def set_token(ctx: Context, ws_ref: str, token: str) -> dict[str, Any]:
    ws = workspaces.resolve(ctx, ws_ref)
    token = token.strip()
    if not token or len(token) > _MAX_LEN or not token.isascii() or not token.isprintable() or " " in token:
        raise ControlError("hf_token_invalid", "that is not a Hugging Face token; nothing was stored")
    sealed = ctx.keyring.seal(token, ws["id"], HF_TOKEN)
    cur = ctx.db.execute(
        "INSERT INTO hf_credentials (workspace_id, key_version, nonce, ciphertext) VALUES (%s, %s, %s, %s)"
        " ON CONFLICT (workspace_id) DO UPDATE SET key_version = excluded.key_version, nonce = excluded.nonce,"
        " ciphertext = excluded.ciphertext, set_at = now() RETURNING (xmax <> 0)",
        (ws["id"], sealed.key_version, sealed.nonce, sealed.ciphertext),
    ).fetchone()
    return {"workspace_id": ws["id"], "hf_token": "stored", "replaced": bool(cur and cur[0])}


def clear_token(ctx: Context, ws_ref: str) -> dict[str, Any]:
    ws = workspaces.resolve(ctx, ws_ref)
    cur = ctx.db.execute("DELETE FROM hf_credentials WHERE workspace_id = %s", (ws["id"],))
    return {"workspace_id": ws["id"], "cleared": cur.rowcount > 0}


def for_deploy(ctx: Context, workspace_id: str, destination: str) -> str | None:
    """The token a deployment's workers get, or None."""
    if destination == "managed":
        return ctx.settings.managed_hf_token
    row = ctx.db.execute(
        "SELECT key_version, nonce, ciphertext FROM hf_credentials WHERE workspace_id = %s", (workspace_id,)
    ).fetchone()
    if row is None:
        return None
    return ctx.keyring.open(Sealed(row[0], bytes(row[1]), bytes(row[2])), workspace_id, HF_TOKEN)


def reseal_all(ctx: Context) -> int:
    """Re-seal every stored token under the keyring's current version (master-key rotation)."""
    resealed = 0
    for (workspace_id,) in ctx.db.execute("SELECT workspace_id FROM hf_credentials ORDER BY workspace_id").fetchall():
        with ctx.db.transaction():
            row = ctx.db.execute(
                "SELECT key_version, nonce, ciphertext FROM hf_credentials WHERE workspace_id = %s FOR UPDATE",
                (workspace_id,),
            ).fetchone()
            if row is None or row[0] == ctx.keyring.current_version:
                continue
            token = ctx.keyring.open(Sealed(row[0], bytes(row[1]), bytes(row[2])), workspace_id, HF_TOKEN)
            sealed = ctx.keyring.seal(token, workspace_id, HF_TOKEN)
            ctx.db.execute(
                "UPDATE hf_credentials SET key_version = %s, nonce = %s, ciphertext = %s WHERE workspace_id = %s",
                (sealed.key_version, sealed.nonce, sealed.ciphertext, workspace_id),
            )
            resealed += 1
    return resealed
