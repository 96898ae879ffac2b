"""Deploying models as serverless endpoints on the workspace's own RunPod account or the managed
destination (REST v2), in the Flex or Active tier (control/tiers.py), their status and teardown.

A deploy is safe to retry: its row is written first (state `creating`) and the RunPod template and
endpoint are named after the row's id, so a retry after a crash finds what the first attempt created
instead of duplicating or orphaning it.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from psycopg.types.json import Jsonb

from control import credentials, hf_tokens, hotsync, pricing, readiness, tiers, workspaces
from control.context import Context
from control.errors import ControlError
from control.ids import new_id
from control.money import usd
from control.plans import BYOC_MODALITIES, PLANS
from control.runpod_client import RunPodClient
from control.sizing import Sizing, size
from extauth.routes import is_endpoint_id

VLLM_IMAGE = "runpod/worker-v1-vllm:v2.25.2"
EMBEDDING_IMAGE = "runpod/worker-infinity-embedding:1.1.4"
# The CUDA versions each image's `.runpod/hub.json` allows. worker-vllm v2.25.2 needs a CUDA 13 driver: a
# worker scheduled on an older one fails at container start (its commit dac05b6).
VLLM_CUDA = ("13.0",)
EMBEDDING_CUDA = ("12.7", "12.6", "12.5", "12.4")
# The worker each modality runs. worker-vllm proxies any OpenAI route to vLLM (runpod-workers.md), and
# vLLM serves Whisper's audio/transcriptions and audio/translations (voice). RunPod publishes no worker
# that serves images/generations or audio/speech as OpenAI routes (its image and audio workers take queue
# jobs): image and speech deployments are ASSUMED to run an OpenAI-serving worker that reads worker-vllm's
# env (MODEL_NAME, OPENAI_SERVED_MODEL_NAME_OVERRIDE); change their image here when one is chosen.
WORKER_IMAGES = {"llm": VLLM_IMAGE, "embedding": EMBEDDING_IMAGE, "image": VLLM_IMAGE, "speech": VLLM_IMAGE,
                 "voice": VLLM_IMAGE}
# Organisations whose Hugging Face models are commonly gated: a deploy without a token warns.
GATED_ORGS = ("meta-llama", "google", "mistralai")
# RunPod's model caching ("Cached models", runpod/docs `serverless/endpoints/model-caching.mdx`) is set in
# the console's Model field only: RunPod's REST v2 OpenAPI document has no field for it.
MODEL_CACHE = ("not offered by RunPod's REST v2 API (console only); the container disk is sized to hold "
               "the model's download instead")
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
    max_model_len: int | None = None  # None: the longest that fits the smallest pool (control/sizing.py)
    params_b: float | None = None  # billions of parameters, when the model's name does not say
    disk_gb: int | None = None
    init_timeout_s: int | None = None
    tier: str = "flex"
    min_workers: int | None = None  # Active: warm workers (default 1)


@dataclass(frozen=True)
class _Plan:
    """Everything a deploy configures besides names and ids, worked out before anything is created."""

    sizing: Sizing
    cuda: tuple[str, ...]
    hf_token: str | None = field(repr=False)
    hf_source: str
    pools: list[dict[str, Any]]
    warnings: tuple[str, ...]
    min_workers: int = 0  # warm workers: 0 for Flex
    fee_per_worker: Decimal = Decimal(0)  # Active base fee, USD a month
    fee_month: Decimal = Decimal(0)


def _template_body(name: str, opts: DeployOptions, plan: _Plan, hf_token: str | None) -> dict[str, Any]:
    common = {"RUNPOD_INIT_TIMEOUT": str(plan.sizing.init_timeout_s)}
    if hf_token:
        common["HF_TOKEN"] = hf_token
    if opts.modality == "llm":
        image = VLLM_IMAGE
        env = {
            "MODEL_NAME": opts.model,
            "OPENAI_SERVED_MODEL_NAME_OVERRIDE": opts.public_name,
            "MAX_MODEL_LEN": str(plan.sizing.max_model_len),
            # Usage in every stream, whether or not the client asked: the meter depends on it.
            "ENABLE_FORCE_INCLUDE_USAGE": "true",
            **common,
        }
    elif opts.modality == "embedding":
        image = EMBEDDING_IMAGE
        env = {"MODEL_NAMES": opts.model, "OPENAI_SERVED_MODEL_NAME_OVERRIDE": opts.public_name, **common}
    else:
        image = WORKER_IMAGES[opts.modality]
        env = {"MODEL_NAME": opts.model, "OPENAI_SERVED_MODEL_NAME_OVERRIDE": opts.public_name, **common}
    return {"name": name, "image": image, "env": env, "serverless": True, "disk": plan.sizing.disk_gb,
            "allowedCudaVersions": list(plan.cuda), "startSsh": False, "startJupyter": False}


def _endpoint_body(name: str, template_id: str, opts: DeployOptions, plan: _Plan) -> dict[str, Any]:
    return {
        "name": name,
        "type": "QUEUE",
        "templateId": template_id,
        # The template's CUDA set would seed this too; stated so the endpoint says what it needs.
        "gpu": {"pools": list(opts.gpu_pools), "count": 1, "allowedCudaVersions": list(plan.cuda)},
        # Flex: scale to zero when idle, so an unused deployment costs nothing; Active keeps `min` warm.
        "workers": {"min": plan.min_workers, "max": opts.workers_max, "idleTimeout": opts.idle_timeout_s},
        "scaling": {"type": "QUEUE_DELAY", "queueDelay": 4},
        "flashboot": "FLASHBOOT",
    }


def _plan(ctx: Context, client: RunPodClient, ws_id: str, opts: DeployOptions, utilization: float,
          min_workers: int) -> _Plan:
    catalog = [g for g in client.gpu_catalog() if g.get("pool") and (g.get("price") or {}).get("serverless")]
    pools: dict[str, dict[str, Any]] = {}
    for gpu in catalog:
        entry = pools.setdefault(gpu["pool"], {"memory_gb": int(gpu["memory"]), "usd_per_hour": 0.0})
        entry["memory_gb"] = min(entry["memory_gb"], int(gpu["memory"]))
        entry["usd_per_hour"] = float(gpu["price"]["serverless"])
    unknown = [p for p in opts.gpu_pools if p not in pools]
    if unknown:
        valid = ", ".join(f"{p} ({v['memory_gb']} GB, ${v['usd_per_hour']:.2f}/h)" for p, v in sorted(pools.items()))
        raise ControlError("unknown_gpu_pool",
                           f"RunPod lists no serverless GPU pool {unknown[0]!r}; valid pools: {valid}")
    memory = min(pools[p]["memory_gb"] for p in opts.gpu_pools)  # a worker may land on any listed pool
    sizing = size(opts.model, opts.modality == "llm", memory, opts.params_b, opts.max_model_len, opts.disk_gb,
                  opts.init_timeout_s)
    token = hf_tokens.for_deploy(ctx, ws_id, opts.destination)
    source = "none" if token is None else ("the platform's" if opts.destination == "managed" else "the workspace's")
    warnings = list(sizing.warnings)
    if token is None and opts.model.split("/", 1)[0] in GATED_ORGS:
        warnings.append(
            f"{opts.model} may be gated on Hugging Face and no token is set: its workers cannot download it; "
            + ("set GATEWAY_MANAGED_HF_TOKEN" if opts.destination == "managed"
               else "store one with `gatewayctl hf-token set WORKSPACE` (read from stdin)"))
    priced = []
    for pool in opts.gpu_pools:
        per_second = pools[pool]["usd_per_hour"] / 3600
        priced.append({
            "pool": pool, "memory_gb": pools[pool]["memory_gb"], "usd_per_second": round(per_second, 8),
            "projected_monthly_usd_per_worker": round(per_second * SECONDS_PER_MONTH * utilization, 2),
        })
    cuda = VLLM_CUDA if WORKER_IMAGES[opts.modality] == VLLM_IMAGE else EMBEDDING_CUDA
    per_worker, fee = tiers.monthly_fee(opts.gpu_pools, min_workers)
    return _Plan(sizing, cuda, token, source, priced, tuple(warnings), min_workers, per_worker, fee)


def _check_deployable(ctx: Context, ws: dict[str, Any], opts: DeployOptions) -> int:
    """Refuses what may not be deployed; the warm workers asked for."""
    if _PUBLIC_NAME_RE.fullmatch(opts.public_name) is None:
        raise ControlError("invalid_name", "a model name is 1-128 letters, digits and . _ : / -")
    warm = tiers.check(opts.tier, opts.destination, opts.min_workers, opts.workers_max)
    if opts.destination == "managed":
        if not PLANS[ws["plan"]].can_deploy:
            raise ControlError("plan_required", f"the {ws['plan']} plan cannot deploy models, on the managed "
                               "destination or your own RunPod; upgrade to pro or above")
        if not ctx.settings.managed_api_key:
            raise ControlError("managed_not_configured", "the managed destination needs GATEWAY_MANAGED_API_KEY")
        return warm
    if opts.modality not in BYOC_MODALITIES:
        raise ControlError(
            "byoc_modality_unsupported",
            f"{opts.modality} models cannot run on your own RunPod account; deploy them with --destination managed",
        )
    if not PLANS[ws["plan"]].byoc_allowed or not PLANS[ws["plan"]].can_deploy:
        raise ControlError(
            "byoc_plan_required", f"bring-your-own RunPod needs plan pro or above (this workspace: {ws['plan']})"
        )
    return warm


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
    `utilization` of the time (Flex workers bill per second only while running). A Hugging Face token
    shows masked."""
    if not 0 < utilization <= 1:
        raise ControlError("invalid_utilization", "--utilization is a fraction between 0 and 1")
    ws = workspaces.resolve(ctx, ws_ref)
    warm = _check_deployable(ctx, ws, opts)
    _account, client = _runpod_for(ctx, ws["id"], opts.destination)
    plan = _plan(ctx, client, ws["id"], opts, utilization, warm)
    name = "gw-<deployment id>"
    usage = Decimal(str(plan.pools[0]["projected_monthly_usd_per_worker"]))
    return {
        "dry_run": True,
        "workspace_id": ws["id"],
        "model": opts.model,
        "template": _template_body(name, opts, plan, hf_tokens.MASK if plan.hf_token else None),
        "endpoint": _endpoint_body(name, "<template id>", opts, plan),
        "memory_estimate": plan.sizing.estimate(),
        "hf_token": plan.hf_source,
        "model_cache": MODEL_CACHE,
        "warnings": list(plan.warnings),
        "utilization": utilization,
        "gpu_pools": plan.pools,
        "tier": opts.tier,
        "min_workers": warm,
        # Money as the usage report prints it. The usage estimate: one worker busy `utilization` of the
        # month at the first (preferred) pool's per-second rate; a busier endpoint scales to more.
        "base_fee_usd_per_worker_month": usd(plan.fee_per_worker),
        "base_fee_usd_month": usd(plan.fee_month),
        "usage_estimate_usd_month": usd(usage),
        "projected_monthly_usd": usd(plan.fee_month + usage),
    }


def render_dry_run(result: dict[str, Any]) -> str:
    """The dry run as a person reads it."""
    tpl, ep = result["template"], result["endpoint"]
    env = "\n".join(f"    {k}={v}" for k, v in tpl["env"].items())
    pools = "\n".join(
        f"    {p['pool']}: {p['memory_gb']} GB, ${p['usd_per_second']:.6f}/s per worker, "
        f"~${p['projected_monthly_usd_per_worker']:.2f}/month per worker at {result['utilization']:.0%} busy"
        for p in result["gpu_pools"])
    workers = ep["workers"]
    lines = [
        f"Dry run, nothing was created. Deploying {result['model']} to workspace {result['workspace_id']}"
        " would create:",
        f"  template {tpl['name']}: image {tpl['image']}, container disk {tpl['disk']} GB, "
        f"CUDA {', '.join(tpl['allowedCudaVersions'])}",
        f"  env:\n{env}",
        f"  endpoint {ep['name']}: {ep['type']}, {workers['min']}-{workers['max']} workers, "
        f"idle timeout {workers['idleTimeout']} s, flashboot {ep['flashboot']}, "
        f"CUDA {', '.join(ep['gpu']['allowedCudaVersions'])}",
        f"  GPU pools, in order of preference:\n{pools}",
        f"  memory: {result['memory_estimate']}",
        f"  Hugging Face token: {result['hf_token']}",
        f"  model cache: {result['model_cache']}",
        f"  tier: {result['tier']}" + (f", {result['min_workers']} warm worker(s), base fee "
                                       f"${Decimal(result['base_fee_usd_per_worker_month']):.2f}/month each"
                                       if result["min_workers"] else " (scales to zero when idle)"),
        f"  projected cost: ~${Decimal(result['projected_monthly_usd']):.2f}/month = base fee "
        f"${Decimal(result['base_fee_usd_month']):.2f} + usage estimate "
        f"${Decimal(result['usage_estimate_usd_month']):.2f}",
    ]
    lines += [f"warning: {w}" for w in result["warnings"]]
    return "\n".join(lines)


def deploy(
    ctx: Context, ws_ref: str, opts: DeployOptions, progress: Callable[[str], None] | None = None,
    price: pricing.Price | None = None,
) -> dict[str, Any]:
    """`price`: a managed deployment's, else the catalog's for its model (control/pricing.py)."""
    say = progress or (lambda message: print(message, file=sys.stderr))
    ws = workspaces.resolve(ctx, ws_ref)
    warm = _check_deployable(ctx, ws, opts)
    managed_price = pricing.for_deploy(opts.model, price, opts.modality) if opts.destination == "managed" else None
    account_id, client = _runpod_for(ctx, ws["id"], opts.destination)
    plan = _plan(ctx, client, ws["id"], opts, 1.0, warm)
    for warning in plan.warnings:
        say(f"warning: {warning}")
    settings = {"max_model_len": plan.sizing.max_model_len, "disk_gb": plan.sizing.disk_gb,
                "init_timeout_s": plan.sizing.init_timeout_s, "gpu_pools": list(opts.gpu_pools),
                "cuda": list(plan.cuda), "hf_token": plan.hf_source, "tier": opts.tier, "min_workers": warm,
                "base_fee_usd_month": usd(plan.fee_month)}

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
            "INSERT INTO deployments (id, workspace_id, public_name, model, modality, destination, account_id, state,"
            " options, tier, min_workers, base_fee_usd_month) VALUES (%s, %s, %s, %s, %s, %s, %s, 'creating', %s,"
            " %s, %s, %s)",
            (dep_id, ws["id"], opts.public_name, opts.model, opts.modality, opts.destination, account_id,
             Jsonb(settings), opts.tier, warm, plan.fee_month),
        )
        template_id, endpoint_id = None, None
    else:
        dep_id, template_id, endpoint_id = row[0], row[4], row[5]
        say(f"resuming deployment {dep_id}")

    resource_name = f"gw-{dep_id}"
    if template_id is None:
        found = client.find_template(resource_name)
        template = found or client.create_template(_template_body(resource_name, opts, plan, plan.hf_token))
        template_id = str(template["id"])
        ctx.db.execute("UPDATE deployments SET template_id = %s WHERE id = %s", (template_id, dep_id))
        say(f"template {template_id} {'found' if found else 'created'}")
    if endpoint_id is None:
        found = client.find_endpoint(resource_name)
        endpoint = found or client.create_endpoint(_endpoint_body(resource_name, template_id, opts, plan))
        endpoint_id = str(endpoint["id"])
        if not is_endpoint_id(endpoint_id):  # never stored, so never spliced into a path
            raise ControlError("runpod_bad_endpoint_id",
                               "RunPod returned an endpoint id that is not a plain path segment")
        ctx.db.execute("UPDATE deployments SET endpoint_id = %s WHERE id = %s", (endpoint_id, dep_id))
        say(f"endpoint {endpoint_id} {'found' if found else 'created'}")

    hint = f"see `gatewayctl status {dep_id}`; `gatewayctl teardown {dep_id}` removes it"
    served_after = readiness.wait_until_serving(client, endpoint_id, opts.wait_timeout_s,
                                                plan.sizing.init_timeout_s, say, hint,
                                                poll_s=min(2.0, max(0.05, opts.wait_timeout_s / 20)))
    with hotsync.changing(ctx) as change:
        if managed_price is not None:  # priced in the same transaction that opens it to traffic
            pricing.record(ctx, dep_id, managed_price, replace=price is not None)
        # The base fee runs from the moment it serves (only Active deployments have one).
        ctx.db.execute("UPDATE deployments SET state = 'ready', billed_from = coalesce(billed_from, now())"
                       " WHERE id = %s", (dep_id,))
        change.workspace(ws["id"])
    return {"id": dep_id, "workspace_id": ws["id"], "model": opts.public_name, "endpoint_id": endpoint_id,
            "template_id": template_id, "state": "ready", "served_after_s": round(served_after, 1),
            **settings, "warnings": list(plan.warnings)}


def list_deployments(ctx: Context, ws_ref: str, include_deleted: bool = False) -> list[dict[str, Any]]:
    ws = workspaces.resolve(ctx, ws_ref)
    rows = ctx.db.execute(
        "SELECT id, public_name, model, modality, destination, tier, min_workers, state, endpoint_id, created_at"
        " FROM deployments WHERE workspace_id = %s AND (%s OR state <> 'deleted') ORDER BY created_at",
        (ws["id"], include_deleted),
    ).fetchall()
    names = ("id", "name", "model", "modality", "destination", "tier", "min_workers", "state", "endpoint_id")
    return [{**dict(zip(names, row[:-1], strict=True)), "created_at": row[-1].isoformat()} for row in rows]


def find(ctx: Context, ref: str, ws_ref: str | None = None) -> str:
    """The id of a live deployment named by its id or by the public name clients send, within `ws_ref`
    when given. A name live in several workspaces is refused, listing them, rather than guessed."""
    ws_id = workspaces.resolve(ctx, ws_ref)["id"] if ws_ref else None
    rows = ctx.db.execute(
        "SELECT d.id, w.name FROM deployments d JOIN workspaces w ON w.id = d.workspace_id"
        " WHERE (d.id = %s OR d.public_name = %s) AND d.state <> 'deleted'"
        " AND (%s::text IS NULL OR d.workspace_id = %s) ORDER BY w.name",
        (ref, ref, ws_id, ws_id),
    ).fetchall()
    if any(dep_id == ref for dep_id, _ in rows):
        return ref
    if len(rows) == 1:
        return str(rows[0][0])
    if not rows:
        where = f" in workspace {ws_ref!r}" if ws_ref else ""
        raise ControlError("deployment_not_found", f"no live deployment {ref!r}{where}; "
                           "`gatewayctl deployments list WS` lists a workspace's deployments")
    candidates = ", ".join(f"{ws_name} ({dep_id})" for dep_id, ws_name in rows)
    raise ControlError("deployment_ambiguous", f"{ref!r} is live in {len(rows)} workspaces: {candidates}; "
                       "name one with --workspace WS, or give the deployment id")


def _load(
    ctx: Context, dep_ref: str, ws_ref: str | None = None
) -> tuple[str, str, str | None, str | None, str, RunPodClient]:
    row = ctx.db.execute(
        "SELECT d.id, d.workspace_id, d.template_id, d.endpoint_id, d.state, d.destination FROM deployments d"
        " WHERE d.id = %s AND d.state <> 'deleted'",
        (find(ctx, dep_ref, ws_ref),),
    ).fetchone()
    if row is None:
        raise ControlError("deployment_not_found", f"no live deployment {dep_ref!r}")
    _account, client = _runpod_for(ctx, row[1], row[5])
    return row[0], row[1], row[2], row[3], row[4], client


def status(ctx: Context, dep_ref: str, ws_ref: str | None = None) -> dict[str, Any]:
    """RunPod's view of the deployment in the words `deploy` uses while it waits. It sends no inference
    request (that would wake a scaled-down worker); `serves` says whether the next request is served, at
    worst after a cold start: the deploy saw a served request, and RunPod reports nothing wrong since."""
    dep_id, ws_id, _template_id, endpoint_id, state, client = _load(ctx, dep_ref, ws_ref)
    health = (readiness.read(client, endpoint_id) if endpoint_id
              else readiness.Health(readiness.UNREACHABLE, "the deployment has no RunPod endpoint yet"))
    return {"id": dep_id, "workspace_id": ws_id, "endpoint_id": endpoint_id, "state": state,
            "health": health.state, "detail": health.detail, "workers": health.workers,
            "jobs_in_queue": health.in_queue, "serves": state == "ready" and health.state in readiness.SERVING}


def teardown(ctx: Context, dep_ref: str, ws_ref: str | None = None) -> dict[str, Any]:
    dep_id, ws_id, template_id, endpoint_id, _state, client = _load(ctx, dep_ref, ws_ref)
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
