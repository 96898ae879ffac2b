"""Deploying models as serverless endpoints on the workspace's own RunPod account (REST v2), their
status and teardown.

A deploy is safe to retry: its row is written first (state `creating`) and the RunPod template and
endpoint are named after the row's id, so a retry after a crash finds what the first attempt created
instead of duplicating or orphaning it.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from control import credentials, hotsync, pricing, workspaces
from control.context import Context
from control.errors import ControlError
from control.ids import new_id
from control.plans import BYOC_MODALITIES, PLANS
from control.runpod_client import RunPodClient, RunPodError

VLLM_IMAGE = "runpod/worker-v1-vllm:v2.25.2"
EMBEDDING_IMAGE = "runpod/worker-infinity-embedding:1.1.4"
_PUBLIC_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")


@dataclass(frozen=True)
class DeployOptions:
    model: str
    modality: str
    public_name: str
    gpu_pools: tuple[str, ...] = ("ADA_24",)
    workers_max: int = 3
    idle_timeout_s: int = 5
    wait_timeout_s: float = 600.0
    destination: str = "runpod"


def _template_body(name: str, opts: DeployOptions) -> dict[str, Any]:
    if opts.modality == "llm":
        image = VLLM_IMAGE
        env = {
            "MODEL_NAME": opts.model,
            "OPENAI_SERVED_MODEL_NAME_OVERRIDE": opts.public_name,
            # Usage in every stream, whether or not the client asked: the meter depends on it.
            "ENABLE_FORCE_INCLUDE_USAGE": "true",
        }
    else:
        image = EMBEDDING_IMAGE
        env = {"MODEL_NAMES": opts.model, "OPENAI_SERVED_MODEL_NAME_OVERRIDE": opts.public_name}
    return {"name": name, "image": image, "env": env, "serverless": True, "disk": 50,
            "startSsh": False, "startJupyter": False}


def _endpoint_body(name: str, template_id: str, opts: DeployOptions) -> dict[str, Any]:
    return {
        "name": name,
        "type": "QUEUE",
        "templateId": template_id,
        "gpu": {"pools": list(opts.gpu_pools), "count": 1},
        # Flex: scale to zero when idle, so an unused deployment costs nothing.
        "workers": {"min": 0, "max": opts.workers_max, "idleTimeout": opts.idle_timeout_s},
        "scaling": {"type": "QUEUE_DELAY", "queueDelay": 4},
        "flashboot": "FLASHBOOT",
    }


def _check_deployable(ctx: Context, ws: dict[str, Any], opts: DeployOptions) -> None:
    if _PUBLIC_NAME_RE.fullmatch(opts.public_name) is None:
        raise ControlError("invalid_name", "a model name is 1-128 letters, digits and . _ : / -")
    if opts.destination == "managed":
        if not ctx.settings.managed_api_key:
            raise ControlError("managed_not_configured", "the managed destination needs GATEWAY_MANAGED_API_KEY")
        return
    if opts.modality not in BYOC_MODALITIES:
        raise ControlError(
            "byoc_modality_unsupported",
            f"{opts.modality} models cannot run on your own RunPod account; deploy them with --destination managed",
        )
    if not PLANS[ws["plan"]].byoc_allowed:
        raise ControlError(
            "byoc_plan_required", f"bring-your-own RunPod needs plan pro or above (this workspace: {ws['plan']})"
        )


SECONDS_PER_MONTH = 30 * 24 * 3600


def _runpod_for(ctx: Context, workspace_id: str, destination: str) -> tuple[str | None, RunPodClient]:
    """The account and client a deployment's resources live under: the workspace's own RunPod account,
    or the platform's for the managed destination."""
    if destination == "managed":
        return None, RunPodClient(ctx.settings.runpod_api_url, ctx.settings.managed_api_key or "",
                                  ctx.settings.managed_url)
    account_id, key = credentials.runpod_key(ctx, workspace_id)
    return account_id, ctx.runpod(key)


def dry_run(ctx: Context, ws_ref: str, opts: DeployOptions, utilization: float) -> dict[str, Any]:
    """What `deploy` would create, and what the endpoint would cost a month if workers were busy for
    `utilization` of the time (Flex workers bill per second only while running)."""
    if not 0 < utilization <= 1:
        raise ControlError("invalid_utilization", "--utilization is a fraction between 0 and 1")
    ws = workspaces.resolve(ctx, ws_ref)
    _check_deployable(ctx, ws, opts)
    _account, client = _runpod_for(ctx, ws["id"], opts.destination)
    prices = {gpu.get("pool"): gpu["price"].get("serverless") for gpu in client.gpu_catalog()}
    pools = []
    for pool in opts.gpu_pools:
        per_hour = prices.get(pool)
        if per_hour is None:
            raise ControlError("unknown_gpu_pool", f"RunPod lists no serverless price for GPU pool {pool!r}")
        per_second = float(per_hour) / 3600
        pools.append({
            "pool": pool, "usd_per_second": round(per_second, 8),
            "projected_monthly_usd_per_worker": round(per_second * SECONDS_PER_MONTH * utilization, 2),
        })
    name = "gw-<deployment id>"
    return {
        "dry_run": True,
        "workspace_id": ws["id"],
        "template": _template_body(name, opts),
        "endpoint": _endpoint_body(name, "<template id>", opts),
        "utilization": utilization,
        "gpu_pools": pools,
        # The first pool is the preferred one; a busier endpoint scales to more workers at this rate each.
        "projected_monthly_usd": pools[0]["projected_monthly_usd_per_worker"],
    }


def deploy(
    ctx: Context, ws_ref: str, opts: DeployOptions, progress: Callable[[str], None] | None = None,
    price: pricing.Price | None = None,
) -> dict[str, Any]:
    """`price`: a managed deployment's, else the catalog's for its model (control/pricing.py)."""
    say = progress or (lambda message: print(message, file=sys.stderr))
    ws = workspaces.resolve(ctx, ws_ref)
    _check_deployable(ctx, ws, opts)
    managed_price = pricing.for_deploy(opts.model, price) if opts.destination == "managed" else None
    account_id, client = _runpod_for(ctx, ws["id"], opts.destination)

    row = ctx.db.execute(
        "SELECT id, state, model, modality, template_id, endpoint_id FROM deployments"
        " WHERE workspace_id = %s AND public_name = %s AND state <> 'deleted'",
        (ws["id"], opts.public_name),
    ).fetchone()
    if row is not None and (row[1] != "creating" or (row[2], row[3]) != (opts.model, opts.modality)):
        raise ControlError(
            "deployment_exists", f"{opts.public_name!r} is already deployed in this workspace ({row[0]})"
        )
    if row is None:
        dep_id = new_id("dep")
        ctx.db.execute(
            "INSERT INTO deployments (id, workspace_id, public_name, model, modality, destination, account_id, state)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, 'creating')",
            (dep_id, ws["id"], opts.public_name, opts.model, opts.modality, opts.destination, account_id),
        )
        template_id, endpoint_id = None, None
    else:
        dep_id, template_id, endpoint_id = row[0], row[4], row[5]
        say(f"resuming deployment {dep_id}")

    resource_name = f"gw-{dep_id}"
    if template_id is None:
        found = client.find_template(resource_name)
        template = found or client.create_template(_template_body(resource_name, opts))
        template_id = str(template["id"])
        ctx.db.execute("UPDATE deployments SET template_id = %s WHERE id = %s", (template_id, dep_id))
        say(f"template {template_id} {'found' if found else 'created'}")
    if endpoint_id is None:
        found = client.find_endpoint(resource_name)
        endpoint = found or client.create_endpoint(_endpoint_body(resource_name, template_id, opts))
        endpoint_id = str(endpoint["id"])
        ctx.db.execute("UPDATE deployments SET endpoint_id = %s WHERE id = %s", (endpoint_id, dep_id))
        say(f"endpoint {endpoint_id} {'found' if found else 'created'}")

    _wait_ready(client, endpoint_id, opts.wait_timeout_s, say)
    with hotsync.changing(ctx) as change:
        if managed_price is not None:  # priced in the same transaction that opens it to traffic
            pricing.record(ctx, dep_id, managed_price, replace=price is not None)
        ctx.db.execute("UPDATE deployments SET state = 'ready' WHERE id = %s", (dep_id,))
        change.workspace(ws["id"])
    return {"id": dep_id, "workspace_id": ws["id"], "model": opts.public_name, "endpoint_id": endpoint_id,
            "template_id": template_id, "state": "ready"}


def _wait_ready(client: RunPodClient, endpoint_id: str, timeout_s: float, say: Callable[[str], None]) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        health = classify(client, endpoint_id)
        if health != last:
            say(f"endpoint {endpoint_id}: {health}")
            last = health
        if health == "ready":
            return
        if time.monotonic() > deadline:
            raise ControlError(
                "deploy_timeout",
                f"endpoint {endpoint_id} was not ready after {timeout_s:.0f} s (last: {health}); "
                "run the same deploy again to keep waiting",
            )
        time.sleep(min(2.0, max(0.05, timeout_s / 20)))


def classify(client: RunPodClient, endpoint_id: str) -> str:
    """ready, initializing, throttled, unhealthy or unreachable, from RunPod's own health report."""
    try:
        workers = client.health(endpoint_id).get("workers", {})
    except RunPodError:
        return "unreachable"
    count: Callable[[str], int] = lambda state: int(workers.get(state) or 0)  # noqa: E731
    if count("ready") + count("idle") + count("running") > 0:
        return "ready"
    if count("unhealthy") > 0:
        return "unhealthy"
    if count("throttled") > 0:
        return "throttled"
    if count("initializing") > 0:
        return "initializing"
    return "ready"  # scaled to zero: the next request starts a worker


def _load(ctx: Context, dep_ref: str) -> tuple[str, str, str | None, str | None, str, RunPodClient]:
    row = ctx.db.execute(
        "SELECT d.id, d.workspace_id, d.template_id, d.endpoint_id, d.state, d.destination FROM deployments d"
        " WHERE d.id = %s AND d.state <> 'deleted'",
        (dep_ref,),
    ).fetchone()
    if row is None:
        raise ControlError("deployment_not_found", f"no live deployment {dep_ref!r}")
    _account, client = _runpod_for(ctx, row[1], row[5])
    return row[0], row[1], row[2], row[3], row[4], client


def status(ctx: Context, dep_ref: str) -> dict[str, Any]:
    dep_id, ws_id, _template_id, endpoint_id, state, client = _load(ctx, dep_ref)
    health = classify(client, endpoint_id) if endpoint_id else "unreachable"
    return {"id": dep_id, "workspace_id": ws_id, "endpoint_id": endpoint_id, "state": state, "health": health}


def teardown(ctx: Context, dep_ref: str) -> dict[str, Any]:
    dep_id, ws_id, template_id, endpoint_id, _state, client = _load(ctx, dep_ref)
    # Traffic stops first: once `deleting` is published no request is signed for the endpoint.
    with hotsync.changing(ctx) as change:
        ctx.db.execute("UPDATE deployments SET state = 'deleting' WHERE id = %s", (dep_id,))
        change.workspace(ws_id)
    if endpoint_id:
        client.delete_endpoint(endpoint_id)
    if template_id:
        client.delete_template(template_id)
    ctx.db.execute("UPDATE deployments SET state = 'deleted', deleted_at = now() WHERE id = %s", (dep_id,))
    return {"id": dep_id, "state": "deleted"}
