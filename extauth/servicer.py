"""The Authorization servicer: one decision per request, in the order a client's mistakes are best
reported: route, credential, rate limit, model, then the upstream credential."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2 as core
from envoy.service.auth.v3 import external_auth_pb2 as authz
from envoy.service.auth.v3 import external_auth_pb2_grpc as authz_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2
from redis.asyncio import Redis
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from control import apikeys
from control.plans import BYOC_MODALITIES, PLANS
from extauth import errors, hotstate, ratelimit, routes, upstream
from extauth.errors import Denial
from extauth.metrics import ExtauthMetrics
from extauth.state import DeploymentEntry, KeyEntry, StateStore, WorkspaceEntry

log = logging.getLogger("extauth")

_OVERWRITE = core.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
BODY_METADATA_NAMESPACE = "envoy.filters.http.json_to_metadata"


def _header(name: str, value: str) -> core.HeaderValueOption:
    return core.HeaderValueOption(header=core.HeaderValue(key=name, value=value), append_action=_OVERWRITE)


def _metadata(fields: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update({k: v for k, v in fields.items() if v is not None})
    return out


def _respond(
    status: int, body: str, headers: list[tuple[str, str]], meta: dict[str, Any]
) -> authz.CheckResponse:
    return authz.CheckResponse(
        status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED),
        denied_response=authz.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=[_header("content-type", "application/json"), *(_header(k, v) for k, v in headers)],
            body=body,
        ),
        dynamic_metadata=_metadata(meta),
    )


def _deny(denial: Denial, headers: list[tuple[str, str]], meta: dict[str, Any]) -> authz.CheckResponse:
    meta["error_code"] = denial.code
    return _respond(denial.status, denial.body(), [*headers, *denial.headers], meta)


def byoc_denial(workspace: WorkspaceEntry, dep: DeploymentEntry) -> Denial | None:
    """Why a bring-your-own-RunPod deployment cannot be signed for now, if it cannot."""
    if not PLANS[workspace.plan].byoc_allowed:
        return errors.byoc_plan_required(workspace.plan)
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


class AuthorizationServicer(authz_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(
        self,
        store: StateStore,
        redis: Redis,
        redis_failure_mode: str,
        metrics: ExtauthMetrics,
        managed_key: str | None = None,
    ) -> None:
        self._store = store
        self._managed_key = managed_key
        self._redis = redis
        self._decide = redis.register_script(hotstate.DECIDE_SCRIPT)
        self._fail_open = redis_failure_mode == "open"
        self._metrics = metrics

    async def Check(self, request: authz.CheckRequest, context: grpc.aio.ServicerContext) -> authz.CheckResponse:
        started = time.perf_counter()
        meta: dict[str, Any] = {}
        response = await self._check(request, meta)
        code = meta.get("error_code")
        self._metrics.decided(
            "deny" if code else meta.get("decision", "allow"), code or "ok", time.perf_counter() - started
        )
        return response

    async def _check(self, request: authz.CheckRequest, meta: dict[str, Any]) -> authz.CheckResponse:
        http = request.attributes.request.http
        path = routes.split_path(http.path)
        meta["route"] = path
        route = routes.ROUTES.get(path)
        retrieve_model = None
        if route is None and path.startswith(routes.MODEL_PREFIX) and http.method == "GET":
            route, retrieve_model = routes.ROUTES["/v1/models"], path[len(routes.MODEL_PREFIX) :]
        if route is None:
            return _deny(errors.unknown_url(http.method, path), [], meta)
        if http.method != route.method:
            return _deny(errors.method_not_allowed(http.method, path), [], meta)

        authorization = http.headers.get("authorization")
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
        meta.update(workspace_id=key.workspace_id, key_id=key.key_id)

        try:
            verdict, key, workspace = await self._rate_limit(key_hash, key, workspace)
        except (RedisError, OSError, TimeoutError) as exc:
            mode = "open" if self._fail_open else "closed"
            log.warning("rate limiter unavailable (%s); failing %s", type(exc).__name__, mode)
            self._metrics.redis_error(isinstance(exc, (TimeoutError, RedisTimeoutError)))
            self._metrics.failure_mode(mode)
            if not self._fail_open:
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
            return _deny(errors.rate_limited(verdict.limit), limit_headers, meta)

        if not route.modalities:
            return self._models(workspace, retrieve_model, limit_headers, meta)
        over_spend = verdict is not None and verdict.over_spend == 1
        return self._allow(request, route, workspace, limit_headers, meta, over_spend)

    async def _rate_limit(
        self, key_hash: bytes, key: KeyEntry, workspace: WorkspaceEntry
    ) -> tuple[hotstate.Verdict, KeyEntry, WorkspaceEntry]:
        """One script call in steady state; on a stale or missing view, reload and publish it, then
        decide again (bounded: a view freshly read from PostgreSQL is never older than Redis's)."""
        refresh = False
        for _ in range(3):
            args: list[Any] = [key.generation, workspace.generation]
            if refresh:
                kf = hotstate.key_fields(key.generation, key.revoked, key.rpm_limit)
                wf = hotstate.workspace_fields(workspace.generation, workspace.rpm_default, workspace.rpm_ceiling)
                args += [len(kf), *kf, *wf]
            else:
                args.append(0)
            verdict = hotstate.parse_verdict(
                await self._decide(
                    keys=[
                        hotstate.key_redis_key(key.key_id),
                        hotstate.workspace_redis_key(workspace.workspace_id),
                        hotstate.bucket_redis_key(key.key_id),
                        hotstate.spend_redis_key(workspace.workspace_id),
                    ],
                    args=args,
                )
            )
            if verdict.status not in (hotstate.UNKNOWN, hotstate.STALE):
                return verdict, key, workspace
            reloaded_key = await self._store.reload_key(key_hash)
            reloaded_ws = await self._store.reload_workspace(key.workspace_id)
            if reloaded_key is None or reloaded_ws is None:
                return hotstate.Verdict(hotstate.REVOKED), key, workspace
            key, workspace, refresh = reloaded_key, reloaded_ws, True
        raise RuntimeError("hot state did not converge")

    def _models(
        self,
        workspace: WorkspaceEntry,
        model: str | None,
        limit_headers: list[tuple[str, str]],
        meta: dict[str, Any],
    ) -> authz.CheckResponse:
        # Answered by the gateway itself: a 200 carried in a "denied" response never reaches an upstream.
        meta["decision"] = "local"
        if model is None:
            return _respond(200, workspace.models_body, limit_headers, meta)
        dep = workspace.deployments.get(model)
        if dep is None:
            return _deny(errors.model_not_found(model), limit_headers, meta)
        body = {"id": dep.public_name, "object": "model", "created": dep.created, "owned_by": dep.destination}
        return _respond(200, json.dumps(body), limit_headers, meta)

    def _allow(
        self,
        request: authz.CheckRequest,
        route: routes.Route,
        workspace: WorkspaceEntry,
        limit_headers: list[tuple[str, str]],
        meta: dict[str, Any],
        over_spend: bool,
    ) -> authz.CheckResponse:
        body_meta = request.attributes.metadata_context.filter_metadata.get(BODY_METADATA_NAMESPACE)
        model_value = body_meta.fields.get("model") if body_meta is not None else None
        model = model_value.string_value if model_value is not None else ""
        if not model:
            return _deny(errors.missing_model(), limit_headers, meta)
        meta["model"] = model
        dep = workspace.deployments.get(model)
        if dep is None:
            return _deny(errors.model_not_found(model), limit_headers, meta)
        if dep.destination == "runpod":
            denial = byoc_denial(workspace, dep)
            if denial is not None:
                return _deny(denial, limit_headers, meta)
            upstream_key = workspace.credential.runpod_key if workspace.credential else None
        else:
            if over_spend:
                return _deny(errors.plan_limit_exceeded(), limit_headers, meta)
            upstream_key = self._managed_key
        if dep.modality not in route.modalities:
            return _deny(errors.wrong_route_for_model(model, route.name), limit_headers, meta)
        path = routes.upstream_path(dep.endpoint_id, route)
        if not upstream_key or path is None:
            return _deny(errors.gateway_unavailable(), limit_headers, meta)
        meta.update(deployment_id=dep.deployment_id, destination=dep.destination, decision="allow")
        http = request.attributes.request.http
        return authz.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=authz.OkHttpResponse(
                headers=[
                    _header(k, v) for k, v in upstream.injected_headers(path, upstream_key, dep.destination)
                ],
                headers_to_remove=upstream.headers_to_remove(http.headers.keys()),
                response_headers_to_add=[_header(k, v) for k, v in limit_headers],
            ),
            dynamic_metadata=_metadata(meta),
        )
