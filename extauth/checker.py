"""The decision for one request, in the order a client's mistakes are best reported: route, credential,
rate limit, model, spend limit, then the upstream credential. Transport-free: extauth/http_check.py (the
shipped transport) and extauth/grpc_check.py render the same Decision.

A managed request of a workspace with a spend limit reserves its estimated cost (extauth/reservation.py)
in the same script call as the rate limit (control/spend.py states the guarantee). Only a request that
would otherwise be allowed asks for a reservation, so no refusal holds any."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from control import apikeys
from control.plans import BYOC_MODALITIES, PLANS, in_force
from extauth import body_facts, errors, hotstate, ratelimit, routes, upstream
from extauth.body_facts import BodyFacts
from extauth.decision import ALLOW, BODY_CHECK, DENY, LOCAL, LOCAL_MODELS_PATH, Decision
from extauth.errors import Denial
from extauth.metrics import ExtauthMetrics
from extauth.redis_client import RedisUnavailable
from extauth.reservation import ReservationPolicy
from extauth.state import DeploymentEntry, KeyEntry, StateStore, WorkspaceEntry

log = logging.getLogger("extauth")


class HotState(Protocol):
    """The one Redis call a check makes (extauth/redis_client.py)."""

    async def decide(self, keys: Sequence[str], args: list[Any]) -> list[int]: ...


def _deny(denial: Denial, headers: list[tuple[str, str]], meta: dict[str, str]) -> Decision:
    meta["error_code"] = denial.code
    return Decision(DENY, denial.status, denial.body(), [*headers, *denial.headers], meta=meta)


def _body_check(denial: Decision) -> Decision:
    """A refusal for a body whose fault only the body shows: Envoy forwards it, without the client's
    key, to ext_authz's admin port, which answers (extauth/admin.py). Nothing was reserved for it."""
    return Decision(BODY_CHECK, 200, "", denial.client_headers, upstream.body_check_headers(), ["authorization"],
                    denial.meta)


def byoc_denial(workspace: WorkspaceEntry, dep: DeploymentEntry, now_us: int) -> Denial | None:
    """Why a bring-your-own-RunPod deployment cannot be signed for now (`now_us`, Redis's clock), if it
    cannot."""
    plan = in_force(workspace.plan, workspace.pending_plan, workspace.switch.at_us, now_us)
    if not PLANS[plan].byoc_allowed:
        return errors.byoc_plan_required(plan)
    if dep.modality not in BYOC_MODALITIES:
        return errors.byoc_modality_unsupported(dep.modality)
    cred = workspace.credential
    if cred is None:
        return errors.byoc_runpod_not_linked()
    if not cred.usable:
        return errors.gateway_unavailable()
    if cred.rejected:
        return errors.byoc_runpod_key_rejected()
    if dep.account_id is not None and cred.account_id != dep.account_id:
        return errors.byoc_account_mismatch()
    return None


def models_body(workspace: WorkspaceEntry, model: str | None) -> str | None:
    """The `/v1/models` (model None) or `/v1/models/{model}` answer; None if there is no such model."""
    if model is None:
        return workspace.models_body
    dep = workspace.deployments.get(model)
    if dep is None:
        return None
    return json.dumps({"id": dep.public_name, "object": "model", "created": dep.created, "owned_by": dep.destination})


class Checker:
    def __init__(
        self,
        store: StateStore,
        hot: HotState,
        redis_failure_mode: str,
        metrics: ExtauthMetrics,
        managed_key: str | None = None,
        spend: ReservationPolicy | None = None,
        redis_timeout_s: float = 0.25,
        check_budget_s: float = 0.5,
    ) -> None:
        self._store = store
        self._hot = hot
        self._managed_key = managed_key
        self._fail_open = redis_failure_mode == "open"
        self._metrics = metrics
        self._spend = spend or ReservationPolicy()
        # The script refuses to act once this process or Envoy has given up on the check (one answered
        # 503 during a Redis stall or a database wait must not take from the bucket or the limit later).
        self._clock = hotstate.RedisClock(redis_timeout_s, check_budget_s)
        self._months = hotstate.MonthClock()

    async def check(
        self, method: str, path: str, headers: Mapping[str, str], key_only: bool = False,
        facts: BodyFacts | None = None, header_bytes: int | None = None,
    ) -> Decision:
        """`path` as the client sent it (query included); `headers` every header the client sent, plus
        the body's facts as Envoy hands them over (extauth/body_facts.py), unless a transport read them
        (`facts`). `key_only`: Envoy's pre-check of a large body (envoy.yaml, gateway.key_precheck):
        route and key, nothing counted or injected. `header_bytes`: at least the headers' size, if the
        transport knows it (upstream.fits_upstream)."""
        started = time.perf_counter()
        started_us = self._clock.now_us()
        if facts is None:
            facts = body_facts.from_headers(headers)
        try:
            decision = await self._check(method, path, headers, facts, started_us, key_only, header_bytes)
        except Exception:  # never forward unchecked, never answer with a trace
            log.exception("check failed")
            decision = _deny(errors.gateway_unavailable(), [], {})
        if facts.model is None and decision.error_code == "missing_model":  # say what is wrong with the body
            if facts.problem == body_facts.UNKNOWN:
                decision = _body_check(decision)
            else:
                decision = _deny(errors.bad_body(facts.problem), decision.client_headers, decision.meta)
        kind = "precheck" if key_only else decision.kind
        self._metrics.decided(kind, decision.error_code or "ok", time.perf_counter() - started)
        return decision

    async def _check(
        self,
        method: str,
        raw_path: str,
        headers: Mapping[str, str],
        facts: BodyFacts,
        started_us: int,
        key_only: bool = False,
        header_bytes: int | None = None,
    ) -> Decision:
        path = routes.split_path(raw_path)
        meta = {"route": path}
        route = routes.ROUTES.get(path)
        retrieve_model = None
        if route is None and path.startswith(routes.MODEL_PREFIX) and method == "GET":
            route, retrieve_model = routes.ROUTES["/v1/models"], path[len(routes.MODEL_PREFIX) :]
        if route is None:
            return _deny(errors.unknown_url(method, path), [], meta)
        if method != route.method:
            return _deny(errors.method_not_allowed(method, path), [], meta)

        authorization = headers.get("authorization")
        if not authorization:
            return _deny(errors.missing_api_key(), [], meta)
        token = apikeys.bearer_token(authorization)
        key_hash = apikeys.digest(token) if token else None
        if key_hash is None:
            return _deny(errors.invalid_api_key(), [], meta)

        try:
            key = await self._store.key(key_hash)
            workspace = await self._store.workspace(key.workspace_id) if key else None
        except Exception:  # database unreachable on a cache miss: fail closed, never forward unchecked
            log.exception("state load failed")
            self._metrics.database_error()
            return _deny(errors.gateway_unavailable(), [], meta)
        # A revocation this process has already read stands even if Redis is away (fail-open).
        if key is None or workspace is None or key.revoked:
            return _deny(errors.invalid_api_key(), [], meta)
        meta["workspace_id"] = key.workspace_id
        meta["key_id"] = key.key_id
        if key_only:
            return Decision(ALLOW, meta=meta)
        # Refused before the script call, so a request Envoy could not forward neither counts against
        # the bucket nor holds a spend reservation.
        if not upstream.fits_upstream(headers, header_bytes):
            return _deny(errors.request_headers_too_large(), [], meta)

        # Under whichever view of the workspace the script call ends up using (a reload may bring a limit).
        size = None
        if route.modalities:
            size = lambda ws: self._reservation(route, ws, facts)  # noqa: E731
        try:
            verdict, key, workspace = await self._rate_limit(key_hash, key, workspace, size, headers, started_us)
        except RedisUnavailable as exc:
            mode = "open" if self._fail_open else "closed"
            log.warning("rate limiter unavailable (%s); failing %s", exc, mode)
            self._metrics.redis_error(exc.timeout)
            self._metrics.failure_mode(mode)
            # Failing open admits without a rate limit, never past a spend limit it cannot hold.
            if not self._fail_open or (size is not None and size(workspace)):
                return _deny(errors.gateway_unavailable(), [], meta)
            verdict = None
        except Exception:
            log.exception("state load failed")
            self._metrics.database_error()
            return _deny(errors.gateway_unavailable(), [], meta)
        if verdict is not None and verdict.status == hotstate.REVOKED:
            return _deny(errors.invalid_api_key(), [], meta)
        limit_headers = ratelimit.headers(verdict) if verdict and verdict.limit else []
        if verdict is not None and verdict.limit:
            self._metrics.rate_limited(key.key_id, ratelimit.utilization(verdict))
        if verdict is not None and verdict.status == hotstate.OVER_LIMIT:
            return _deny(errors.rate_limited(verdict.limit, ratelimit.retry_after_s(verdict)), limit_headers, meta)

        if not route.modalities:
            return self._models(workspace, retrieve_model, limit_headers, meta)
        over_spend = verdict is not None and verdict.spend == hotstate.SPEND_REFUSED
        return self._allow(route, workspace, facts.model, limit_headers, meta, over_spend)

    def _reservation(self, route: routes.Route, workspace: WorkspaceEntry, facts: BodyFacts) -> int:
        """The micro-USD this request reserves against the spend limit: 0 unless it is a managed request
        of a limited workspace that _allow would let through."""
        if workspace.spend_limit_uusd is None or not facts.model:
            return 0
        dep = workspace.deployments.get(facts.model)
        if (dep is None or dep.destination != "managed" or not dep.priced
                or dep.modality not in route.modalities or not self._managed_key
                or routes.upstream_path(dep.endpoint_id, route) is None):
            return 0
        return self._spend.cost_uusd(dep, facts.body_bytes, facts.max_tokens, facts.choices, facts.audio_seconds)

    async def _rate_limit(
        self,
        key_hash: bytes,
        key: KeyEntry,
        workspace: WorkspaceEntry,
        size: Callable[[WorkspaceEntry], int] | None,
        headers: Mapping[str, str],
        started_us: int,
    ) -> tuple[hotstate.Verdict, KeyEntry, WorkspaceEntry]:
        """One script call in steady state; on a stale or missing view, reload and publish it, then
        decide again (bounded: a view freshly read from PostgreSQL is never older than Redis's). A reply
        EXPIRED in time means this process misjudged Redis's clock: retried once on the corrected one.
        `size` gives the request's spend reservation under a view (None: it reserves nothing)."""
        refresh = expired = False
        reserve = size(workspace) if size else 0
        request_id = (headers.get("x-request-id") or uuid.uuid4().hex) if size else ""
        for _ in range(4):
            if refresh:
                args = hotstate.decide_args(
                    self._clock.deadline_us(started_us), key.generation, workspace.generation, workspace.month, reserve,
                    request_id, self._spend.ttl_s, workspace.spent_uusd,
                    hotstate.key_fields(key.generation, key.revoked, key.rpm_limit),
                    hotstate.workspace_fields(workspace.generation, workspace.rpm_default, workspace.rpm_ceiling,
                                              workspace.spend_limit_uusd, workspace.switch),
                )
            else:
                args = hotstate.decide_args(self._clock.deadline_us(started_us), key.generation, workspace.generation,
                                            self._months.month(), reserve, request_id, self._spend.ttl_s)
            verdict = hotstate.parse_verdict(
                await self._hot.decide(hotstate.decide_keys(key.key_id, workspace.workspace_id), args)
            )
            self._clock.observe(verdict.now_us)
            if verdict.status == hotstate.EXPIRED:
                if expired:
                    raise RedisUnavailable("Redis ran the check past its deadline", timeout=True)
                expired = True
                continue
            if verdict.status not in (hotstate.UNKNOWN, hotstate.STALE):
                return verdict, key, workspace
            reloaded_key = await self._store.reload_key(key_hash)
            reloaded_ws = await self._store.reload_workspace(key.workspace_id)
            if reloaded_key is None or reloaded_ws is None:
                return hotstate.Verdict(hotstate.REVOKED), key, workspace
            key, workspace, refresh = reloaded_key, reloaded_ws, True
            reserve = size(workspace) if size else 0
        raise RuntimeError("hot state did not converge")

    def _models(
        self,
        workspace: WorkspaceEntry,
        model: str | None,
        limit_headers: list[tuple[str, str]],
        meta: dict[str, str],
    ) -> Decision:
        body = models_body(workspace, model)
        if body is None:
            return _deny(errors.model_not_found(model or ""), limit_headers, meta)
        meta["decision"] = LOCAL
        path = LOCAL_MODELS_PATH + workspace.workspace_id + ("" if model is None else "/" + routes.path_segment(model))
        return Decision(LOCAL, 200, body, limit_headers, upstream.local_headers(path), ["authorization"], meta)

    def _allow(
        self,
        route: routes.Route,
        workspace: WorkspaceEntry,
        model: str | None,
        limit_headers: list[tuple[str, str]],
        meta: dict[str, str],
        over_spend: bool,
    ) -> Decision:
        if not model:
            return _deny(errors.missing_model(), limit_headers, meta)
        meta["model"] = model
        dep = workspace.deployments.get(model)
        if dep is None:
            return _deny(errors.model_not_found(model), limit_headers, meta)
        if dep.destination == "runpod":
            # On Redis's clock, as the script switches the rate limits: one moment for every rule (read
            # only when a change is pending).
            now_us = self._clock.now_us() + self._clock.offset_us if workspace.pending_plan else 0
            denial = byoc_denial(workspace, dep, now_us)
            if denial is not None:
                return _deny(denial, limit_headers, meta)
            upstream_key = workspace.credential.runpod_key if workspace.credential else None
        else:
            if not dep.priced:
                return _deny(errors.model_not_priced(model), limit_headers, meta)
            if over_spend:
                return _deny(errors.plan_limit_exceeded(), limit_headers, meta)
            upstream_key = self._managed_key
        if dep.modality not in route.modalities:
            return _deny(errors.wrong_route_for_model(model, route.name), limit_headers, meta)
        path = routes.upstream_path(dep.endpoint_id, route)
        if not upstream_key or path is None:
            return _deny(errors.gateway_unavailable(), limit_headers, meta)
        meta["model"] = dep.public_name
        meta["deployment_id"] = dep.deployment_id
        meta["destination"] = dep.destination
        meta["decision"] = ALLOW
        return Decision(
            ALLOW,
            200,
            "",
            limit_headers,
            upstream.injected_headers(path, upstream_key, dep.destination),
            [],
            meta,
        )
