"""Linking a workspace's RunPod key: validated live, sealed with AES-256-GCM, never shown again.

Decryption happens only on the deployment-engine paths (provision, status, teardown) through
`runpod_key`, which loads by the asking workspace's id and opens with that id as associated data;
ext_authz does the same for inference.
"""

from __future__ import annotations

from typing import Any

from control import hf_tokens, hotsync, workspaces
from control.context import Context
from control.crypto import Sealed, save_keyring
from control.errors import ControlError
from control.runpod_client import RunPodError


def link(ctx: Context, ws_ref: str, runpod_key: str) -> dict[str, Any]:
    ws = workspaces.resolve(ctx, ws_ref)
    runpod_key = runpod_key.strip()
    if not runpod_key or any(c.isspace() for c in runpod_key):
        raise ControlError("runpod_key_invalid", "that is not a RunPod API key; nothing was stored")
    account_id = ctx.runpod(runpod_key).account_id()
    current = ctx.db.execute(
        "SELECT account_id FROM runpod_credentials WHERE workspace_id = %s", (ws["id"],)
    ).fetchone()
    if current is not None and current[0] != account_id:
        live = ctx.db.execute(
            "SELECT count(*) FROM deployments WHERE workspace_id = %s AND destination = 'runpod'"
            " AND state IN ('creating', 'ready', 'deleting')",
            (ws["id"],),
        ).fetchone()
        if live is not None and live[0] > 0:
            raise ControlError(
                "runpod_account_mismatch",
                f"this key belongs to a different RunPod account, and the workspace has {live[0]} live "
                "deployment(s) on the linked account; tear them down before linking another account",
            )
    sealed = ctx.keyring.seal(runpod_key, ws["id"])
    with hotsync.changing(ctx) as change:
        ctx.db.execute(
            "INSERT INTO runpod_credentials (workspace_id, account_id, key_version, nonce, ciphertext)"
            " VALUES (%s, %s, %s, %s, %s)"
            " ON CONFLICT (workspace_id) DO UPDATE SET account_id = excluded.account_id,"
            " key_version = excluded.key_version, nonce = excluded.nonce, ciphertext = excluded.ciphertext,"
            " linked_at = now(), rejected_at = NULL",
            (ws["id"], account_id, sealed.key_version, sealed.nonce, sealed.ciphertext),
        )
        change.workspace(ws["id"])
    return {"workspace_id": ws["id"], "account_id": account_id, "rotated": current is not None}


def unlink(ctx: Context, ws_ref: str) -> dict[str, Any]:
    ws = workspaces.resolve(ctx, ws_ref)
    with hotsync.changing(ctx) as change:
        cur = ctx.db.execute("DELETE FROM runpod_credentials WHERE workspace_id = %s", (ws["id"],))
        change.workspace(ws["id"])
    return {"workspace_id": ws["id"], "unlinked": cur.rowcount > 0}


def runpod_key(ctx: Context, workspace_id: str) -> tuple[str, str]:
    """(account id, plaintext key) of the asking workspace's own credential."""
    row = ctx.db.execute(
        "SELECT account_id, key_version, nonce, ciphertext FROM runpod_credentials WHERE workspace_id = %s",
        (workspace_id,),
    ).fetchone()
    if row is None:
        raise ControlError(
            "byoc_runpod_not_linked", "no RunPod key is linked to this workspace; run `gatewayctl runpod link`"
        )
    account_id, version, nonce, ciphertext = row
    return account_id, ctx.keyring.open(Sealed(version, bytes(nonce), bytes(ciphertext)), workspace_id)


def confirm_rejected(ctx: Context, workspace_id: str) -> bool:
    """RunPod refused the workspace's key at inference: ask RunPod's account API whether the key is
    really dead, and only then mark it. A 403 at inference can be a WAF block or a scoped key, and the
    route reporting it is unauthenticated, so a report alone never takes a working key out of service."""
    try:
        _account, key = runpod_key(ctx, workspace_id)
    except ControlError:
        return False
    try:
        ctx.runpod(key).account_id()
    except RunPodError as exc:
        if exc.code == "runpod_key_invalid":
            return mark_rejected(ctx, workspace_id)
    return False


def mark_rejected(ctx: Context, workspace_id: str) -> bool:
    """Record that RunPod refused the workspace's key, so requests fail fast until it is re-linked."""
    with hotsync.changing(ctx) as change:
        cur = ctx.db.execute(
            "UPDATE runpod_credentials SET rejected_at = now() WHERE workspace_id = %s AND rejected_at IS NULL",
            (workspace_id,),
        )
        if cur.rowcount:
            change.workspace(workspace_id)
    return cur.rowcount > 0


def rotate_master_key(ctx: Context, retire_old: bool) -> dict[str, Any]:
    """Add a master-key version, re-seal every stored RunPod key and Hugging Face token under it and, with
    `retire_old`, drop the older versions once nothing uses them. Running services load the new version on
    their own the first time they meet it, so old and new both work throughout."""
    path = ctx.settings.master_key_file
    if ctx.settings.master_key:
        raise ControlError(
            "master_key_inline",
            "GATEWAY_MASTER_KEY is set inline; rotation rewrites the keyring file, so use GATEWAY_MASTER_KEY_FILE",
        )
    ctx.keyring = ctx.keyring.with_new_version()
    save_keyring(ctx.keyring, path)
    resealed = 0
    rows = ctx.db.execute("SELECT workspace_id FROM runpod_credentials ORDER BY workspace_id").fetchall()
    for (workspace_id,) in rows:
        with hotsync.changing(ctx) as change:
            row = ctx.db.execute(
                "SELECT key_version, nonce, ciphertext FROM runpod_credentials WHERE workspace_id = %s FOR UPDATE",
                (workspace_id,),
            ).fetchone()
            if row is None or row[0] == ctx.keyring.current_version:
                continue
            plaintext = ctx.keyring.open(Sealed(row[0], bytes(row[1]), bytes(row[2])), workspace_id)
            sealed = ctx.keyring.seal(plaintext, workspace_id)
            ctx.db.execute(
                "UPDATE runpod_credentials SET key_version = %s, nonce = %s, ciphertext = %s WHERE workspace_id = %s",
                (sealed.key_version, sealed.nonce, sealed.ciphertext, workspace_id),
            )
            change.workspace(workspace_id)
            resealed += 1
    resealed += hf_tokens.reseal_all(ctx)
    if retire_old:
        ctx.keyring = ctx.keyring.without_versions_below(ctx.keyring.current_version)
        save_keyring(ctx.keyring, path)
    return {"current_version": ctx.keyring.current_version, "versions": ctx.keyring.versions, "resealed": resealed}
