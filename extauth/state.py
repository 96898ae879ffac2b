"""What ext_authz knows about keys and workspaces: loaded from PostgreSQL on a miss, then held in bounded
in-process caches. Freshness is not checked here but on every request by the hot-state script (a
generation compare in the same Redis round trip as the rate limit), so steady state reads no database.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from psycopg_pool import AsyncConnectionPool

from control.crypto import CryptoError, Keyring, Sealed
from control.plans import effective_limits
from control.pricing import TOKEN, UNITS
from extauth import hotstate
from extauth.cache import BoundedCache

log = logging.getLogger("extauth")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class KeyEntry:
    key_id: str
    workspace_id: str
    generation: int
    revoked: bool
    rpm_limit: int | None


@dataclass(frozen=True, slots=True)
class DeploymentEntry:
    deployment_id: str
    public_name: str
    modality: str
    destination: str
    endpoint_id: str
    account_id: str | None
    created: int
    # Managed deployments' prices, USD per million tokens (= micro-USD per token); None: unpriced.
    input_price: float | None = None
    output_price: float | None = None
    # The unit the price is in, and USD per unit for every unit but tokens (control/pricing.py).
    unit: str | None = TOKEN
    unit_price: float | None = None

    @property
    def priced(self) -> bool:
        """A price in this modality's own unit (a token price on an image model is no price)."""
        if self.input_price is None or self.output_price is None or self.unit != UNITS.get(self.modality):
            return False
        return self.unit == TOKEN or self.unit_price is not None


@dataclass(frozen=True, slots=True)
class CredentialEntry:
    account_id: str
    runpod_key: str = field(repr=False)
    rejected: bool
    # False when the stored ciphertext does not open for this workspace: altered, moved from another
    # workspace, or sealed under a master key this process cannot load.
    usable: bool = True


@dataclass(frozen=True, slots=True)
class WorkspaceEntry:
    workspace_id: str
    plan: str
    generation: int
    rpm_default: int
    rpm_ceiling: int
    deployments: dict[str, DeploymentEntry]
    credential: CredentialEntry | None
    models_body: str  # the /v1/models answer, built once per load
    spend_limit_uusd: int | None = None  # monthly cap on managed spend, micro-USD; None: no cap
    # Managed spend committed in `month` (YYYYMM) as PostgreSQL had it at this load, published to Redis
    # whenever this view is (the spend limit's state is rebuilt from it when Redis lost it).
    spent_uusd: int = 0
    month: int = 0
    # A pending downgrade: the plan, and when it takes effect with its limits (control/plans.py in_force).
    pending_plan: str | None = None
    switch: hotstate.PlanSwitch = hotstate.NO_SWITCH


class StateStore:
    def __init__(
        self, pool: AsyncConnectionPool, keyring: Keyring, capacity: int, reload_keyring: Callable[[], Keyring]
    ) -> None:
        self._pool = pool
        self._keyring = keyring
        self._reload_keyring = reload_keyring
        self.keys: BoundedCache[bytes, KeyEntry] = BoundedCache(capacity)
        # Digests known not to exist. Keys are 256-bit random, so a digest absent now cannot belong to
        # a key minted later: this cache never needs invalidating.
        self.unknown: BoundedCache[bytes, bool] = BoundedCache(capacity)
        self.workspaces: BoundedCache[str, WorkspaceEntry] = BoundedCache(capacity)
        # Loads under way: concurrent misses of one key or workspace (a burst on a cold cache, every
        # request seeing the same change) share one database read instead of queueing for the pool.
        self._loading: dict[object, asyncio.Future[Any]] = {}

    async def _single_flight(self, what: object, load: Callable[[], Awaitable[T]]) -> T:
        pending = self._loading.get(what)
        if pending is not None:
            result: T = await asyncio.shield(pending)
            return result
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._loading[what] = future
        try:
            value = await load()
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters get it, nobody else needs to
            raise
        else:
            future.set_result(value)
            return value
        finally:
            del self._loading[what]

    async def key(self, key_hash: bytes) -> KeyEntry | None:
        entry = self.keys.get(key_hash)
        if entry is not None or self.unknown.get(key_hash):
            return entry
        return await self.reload_key(key_hash)

    async def reload_key(self, key_hash: bytes) -> KeyEntry | None:
        return await self._single_flight(("key", key_hash), lambda: self._load_key(key_hash))

    async def _load_key(self, key_hash: bytes) -> KeyEntry | None:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT id, workspace_id, generation, revoked_at IS NOT NULL, rpm_limit"
                " FROM api_keys WHERE key_hash = %s",
                (key_hash,),
            )
            row = await cur.fetchone()
        if row is None:
            self.keys.discard(key_hash)
            self.unknown.put(key_hash, True)
            return None
        entry = KeyEntry(*row)
        self.keys.put(key_hash, entry)
        return entry

    async def workspace(self, workspace_id: str) -> WorkspaceEntry | None:
        entry = self.workspaces.get(workspace_id)
        if entry is not None:
            return entry
        return await self.reload_workspace(workspace_id)

    async def reload_workspace(self, workspace_id: str) -> WorkspaceEntry | None:
        return await self._single_flight(("workspace", workspace_id), lambda: self._load_workspace(workspace_id))

    async def _load_workspace(self, workspace_id: str) -> WorkspaceEntry | None:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT plan, generation, rpm_default, rpm_ceiling, spend_limit_usd, pending_plan,"
                " (extract(epoch FROM pending_plan_at) * 1000000)::bigint FROM workspaces WHERE id = %s",
                (workspace_id,),
            )
            ws = await cur.fetchone()
            if ws is None:
                self.workspaces.discard(workspace_id)
                return None
            cur = await conn.execute(
                "SELECT d.id, d.public_name, d.modality, d.destination, d.endpoint_id, d.account_id,"
                " extract(epoch FROM d.created_at)::bigint, p.input_usd_per_mtok::float8,"
                " p.output_usd_per_mtok::float8, p.unit, p.usd_per_unit::float8"
                " FROM deployments d LEFT JOIN deployment_prices p ON p.deployment_id = d.id"
                " WHERE d.workspace_id = %s AND d.state = 'ready' AND d.endpoint_id IS NOT NULL"
                " ORDER BY d.public_name",
                (workspace_id,),
            )
            deployments = {row[1]: DeploymentEntry(*row) for row in await cur.fetchall()}
            month = hotstate.month_tag(datetime.now(UTC))
            cur = await conn.execute(
                "SELECT spent_usd FROM workspace_spend WHERE workspace_id = %s AND month = %s", (workspace_id, month)
            )
            spent_row = await cur.fetchone()
            cur = await conn.execute(
                "SELECT account_id, key_version, nonce, ciphertext, rejected_at IS NOT NULL"
                " FROM runpod_credentials WHERE workspace_id = %s",
                (workspace_id,),
            )
            cred_row = await cur.fetchone()
        plan, generation, rpm_default, rpm_ceiling, spend_limit, pending_plan, pending_at_us = ws
        default, ceiling = effective_limits(plan, rpm_default, rpm_ceiling)
        entry = WorkspaceEntry(
            workspace_id=workspace_id,
            plan=plan,
            generation=generation,
            rpm_default=default,
            rpm_ceiling=ceiling,
            deployments=deployments,
            credential=self._credential(workspace_id, cred_row),
            models_body=_models_body(deployments),
            spend_limit_uusd=None if spend_limit is None else hotstate.uusd(spend_limit),
            spent_uusd=hotstate.uusd(spent_row[0]) if spent_row else 0,
            month=month,
            pending_plan=pending_plan,
            switch=hotstate.plan_switch(pending_plan, pending_at_us),
        )
        self.workspaces.put(workspace_id, entry)
        return entry

    def _credential(self, workspace_id: str, row: tuple[str, int, bytes, bytes, bool] | None) -> CredentialEntry | None:
        if row is None:
            return None
        account_id, version, nonce, ciphertext, rejected = row
        if version not in self._keyring.versions:
            # Sealed under a master-key version added by a rotation since this process started.
            self._keyring = self._reload_keyring()
        try:
            # The row was selected by this workspace's id and the workspace id is the associated data:
            # a ciphertext that belongs to any other workspace cannot open here.
            key = self._keyring.open(Sealed(version, bytes(nonce), bytes(ciphertext)), workspace_id)
        except CryptoError as exc:
            log.error("workspace %s: stored RunPod key unusable: %s", workspace_id, exc)
            return CredentialEntry(account_id, "", rejected, usable=False)
        return CredentialEntry(account_id, key, rejected)


def _models_body(deployments: dict[str, DeploymentEntry]) -> str:
    return json.dumps(
        {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": dep.created, "owned_by": dep.destination}
                for name, dep in deployments.items()
            ],
        }
    )
