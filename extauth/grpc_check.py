"""The ext_authz gRPC transport (`envoy.service.auth.v3.Authorization/Check` and gRPC health), for
operators who set EXTAUTH_TRANSPORT=grpc (README, "The gRPC transport": Envoy then runs the gRPC blocks
of envoy/envoy.yaml). Served on EXTAUTH_LISTEN; it renders the same Decision as the HTTP transport, and
both services answer only calls carrying Envoy's secret as gRPC metadata (extauth/custody.py). Envoy
and Python together spend several times the CPU per check that the HTTP transport costs, hence not the
default. `/v1/models` is answered inside the CheckResponse (a 200 "denied" response never forwarded).
"""

from __future__ import annotations

import errno

import grpc
from envoy.config.core.v3 import base_pb2 as core
from envoy.service.auth.v3 import external_auth_pb2 as authz
from envoy.service.auth.v3 import external_auth_pb2_grpc as authz_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import json_format, struct_pb2
from google.rpc import code_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from extauth import body_facts
from extauth.checker import Checker
from extauth.custody import REFUSED, SECRET_HEADER, EnvoySecret
from extauth.decision import FORWARDED, META_KEY, PRECHECK_METADATA, Decision

_OVERWRITE = core.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_OK = status_pb2.Status(code=code_pb2.OK)
_DENIED = status_pb2.Status(code=code_pb2.PERMISSION_DENIED)


def _headers(pairs: list[tuple[str, str]]) -> list[core.HeaderValueOption]:
    return [core.HeaderValueOption(header=core.HeaderValue(key=k, value=v), append_action=_OVERWRITE) for k, v in pairs]


def render(decision: Decision) -> authz.CheckResponse:
    meta = struct_pb2.Struct()
    meta.update({META_KEY: decision.meta_json()})
    if decision.kind in FORWARDED:
        return authz.CheckResponse(
            status=_OK,
            ok_response=authz.OkHttpResponse(
                headers=_headers(decision.upstream_headers),
                headers_to_remove=decision.remove_headers,
                response_headers_to_add=_headers(decision.client_headers),
            ),
            dynamic_metadata=meta,
        )
    # Denials, and the answers the gateway gives itself (a 200 that never reaches an upstream).
    return authz.CheckResponse(
        status=_DENIED,
        denied_response=authz.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=decision.status),
            headers=_headers([("content-type", "application/json"), *decision.client_headers]),
            body=decision.body,
        ),
        dynamic_metadata=meta,
    )


def _presented(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == SECRET_HEADER:
            return str(value)
    return None


class AuthorizationServicer(authz_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(self, checker: Checker, secret: EnvoySecret) -> None:
        self._checker = checker
        self._secret = secret

    async def Check(self, request: authz.CheckRequest, context: grpc.aio.ServicerContext) -> authz.CheckResponse:
        # Envoy sends the secret as gRPC metadata (grpc_service.initial_metadata), never in the
        # CheckRequest's headers, so a client cannot supply it.
        if not self._secret.admits(_presented(context)):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, REFUSED.message)
        http = request.attributes.request.http
        # Envoy's pre-check of a large body says so in the call's metadata (README, "The gRPC transport").
        key_only = any(name == PRECHECK_METADATA for name, _ in context.invocation_metadata() or ())
        # The body's facts: json_to_metadata's namespace (the filter's metadata_context_namespaces).
        metadata = request.attributes.metadata_context.filter_metadata
        lifted = metadata.get(body_facts.NAMESPACE)
        namespace = {} if lifted is None else json_format.MessageToDict(lifted)
        # The body's size as Envoy states it (-1: not known, a body without a content-length).
        facts = body_facts.from_headers(http.headers, namespace, str(http.size) if http.size >= 0 else None)
        return render(await self._checker.check(http.method, http.path, http.headers, key_only, facts))


class GuardedHealth(health.aio.HealthServicer):  # type: ignore[misc]
    """gRPC health that answers only Envoy's health checks (grpc_health_check.initial_metadata), as
    the HTTP transport's /health does."""

    def __init__(self, secret: EnvoySecret) -> None:
        super().__init__()
        self._secret = secret

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        if not self._secret.admits(_presented(context)):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, REFUSED.message)
        return await super().Check(request, context)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, REFUSED.message)


class GrpcTransport:
    def __init__(self, checker: Checker, address: str, secret: EnvoySecret) -> None:
        # No SO_REUSEPORT: a stale process on the same port must make start-up fail, not share traffic.
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        authz_grpc.add_AuthorizationServicer_to_server(AuthorizationServicer(checker, secret), self.server)
        self._health = GuardedHealth(secret)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self.server)
        if self.server.add_insecure_port(address) == 0:
            raise OSError(errno.EADDRINUSE, f"gRPC could not bind {address}")

    async def start(self) -> None:
        await self.server.start()
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)

    async def drain(self) -> None:
        await self._health.enter_graceful_shutdown()

    async def stop(self) -> None:
        await self.server.stop(grace=5)
