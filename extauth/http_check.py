"""The ext_authz HTTP transport (the shipped one, see envoy/envoy.yaml): a minimal HTTP/1.1 server on
EXTAUTH_LISTEN, written on asyncio's protocol layer because per-request overhead is the whole budget
(a check costs a few tens of microseconds here; a web framework's request object alone costs more).

It serves exactly three things, to Envoy only (extauth/custody.py: every request must carry the secret
Envoy adds; anything else gets 403 and nothing more):
- `<method> /check/<client path>`: the check. Envoy sends the client headers ext_authz reads (its
  `allowed_headers`: the key, the forwarded ones, a voice form's `x-gateway-form`; the edge removed
  all others) and the body's facts, `x-gateway-body`, and no body.
  Status 200 allows, any other status is the client's answer with this body (Envoy's HTTP ext_authz
  contract); headers map as extauth/decision.py describes.
- `<method> /precheck/<client path>`: the pre-check of a large body (envoy/envoy.yaml,
  `gateway.key_precheck`): the route and the key only, before Envoy waits for the body; 200 allows
  and changes nothing.
- `GET /_gateway/models/<workspace>[/<model>]`: the `/v1/models` answers, reached only through the
  route ext_authz itself picked for an allowed models request (destination `local`).
- `GET /health`: 200 while serving, 503 once draining (Envoy's active health check). Refused without
  the secret too, so a process that is not one of this gateway's replicas never looks healthy to it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import cast
from urllib.parse import unquote

from extauth import errors
from extauth.checker import Checker, models_body
from extauth.custody import REFUSED, SECRET_HEADER, EnvoySecret
from extauth.decision import DENY, LOCAL_MODELS_PATH, META_KEY, Decision
from extauth.state import StateStore

log = logging.getLogger("extauth")

CHECK_PREFIX = "/check"
PRECHECK_PREFIX = "/precheck"
HEALTH_PATH = "/health"
# Envoy refuses client header blocks over 60 KiB, so a check request is always smaller than this.
_MAX_HEAD = 96 * 1024
_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n" for s in HTTPStatus}
_REMOVE_HEADER = "x-envoy-auth-headers-to-remove"


def render(decision: Decision) -> bytes:
    """A Decision as Envoy's HTTP ext_authz reads it."""
    lines = [_STATUS_LINES[decision.status if decision.kind == DENY else 200]]
    for name, value in decision.client_headers:
        lines.append(f"{name}: {value}\r\n")
    for name, value in decision.upstream_headers:
        lines.append(f"{name}: {value}\r\n")
    if decision.remove_headers:
        lines.append(f"{_REMOVE_HEADER}: {','.join(decision.remove_headers)}\r\n")
    if decision.meta:
        lines.append(f"{META_KEY}: {decision.meta_json()}\r\n")
    body = decision.body.encode() if decision.kind == DENY else b""
    if body:
        lines.append("content-type: application/json\r\n")
    lines.append(f"content-length: {len(body)}\r\n\r\n")
    return "".join(lines).encode("latin-1") + body


def _plain(status: int, text: str, content_type: str = "text/plain") -> bytes:
    body = text.encode()
    head = f"{_STATUS_LINES[status]}content-type: {content_type}\r\ncontent-length: {len(body)}\r\n\r\n"
    return head.encode() + body


def _refused() -> bytes:
    return _plain(REFUSED.status, REFUSED.body(), "application/json")


class CheckService:
    """What the connections share: the checker, the state for model listings, and the draining flag."""

    def __init__(self, checker: Checker, store: StateStore, secret: EnvoySecret) -> None:
        self.checker = checker
        self.store = store
        self.secret = secret
        self.serving = True
        self.connections: set[CheckConnection] = set()

    async def models(self, path: str) -> bytes:
        workspace_id, _, model = path[len(LOCAL_MODELS_PATH) :].partition("/")
        try:
            workspace = await self.store.workspace(workspace_id)
        except Exception:
            log.exception("state load failed")
            return _plain(503, errors.gateway_unavailable().body(), "application/json")
        body = None if workspace is None else models_body(workspace, unquote(model) if model else None)
        if body is None:
            return _plain(404, errors.model_not_found(unquote(model)).body(), "application/json")
        return _plain(200, body, "application/json")

    def health(self) -> bytes:
        return _plain(200, "serving") if self.serving else _plain(503, "draining")


class CheckConnection(asyncio.Protocol):
    """One connection from Envoy. Envoy's HTTP/1.1 pool never pipelines, but requests are still
    answered strictly one at a time and in order."""

    def __init__(self, service: CheckService) -> None:
        self._service = service
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._task: asyncio.Task[None] | None = None
        self._close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        # Kept for every check on this connection: get_running_loop() costs a getpid() system call.
        self._loop = asyncio.get_running_loop()
        self._service.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._service.connections.discard(self)
        self._transport = None

    @property
    def idle(self) -> bool:
        return self._task is None

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._task is None:
            self._next()

    def _next(self) -> None:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > _MAX_HEAD:
                # Envoy would relay it to the client as the check's answer: in OpenAI's shape.
                too_large = errors.request_headers_too_large().body()
                self._finish(_plain(431, too_large, "application/json"), close=True)
            return
        head = self._buffer[:end].decode("latin-1")
        request_line, *header_lines = head.split("\r\n")
        pairs = [line.partition(":") for line in header_lines]
        headers = {name.strip().lower(): value.strip() for name, _, value in pairs}
        if len(headers) != len(pairs):
            # Repeated headers fold into one value, as Envoy's gRPC CheckRequest does: a repeated
            # `authorization` then never parses as one key. (Rare: the common case is one comprehension.)
            headers = {}
            for name, _, value in pairs:
                name, value = name.strip().lower(), value.strip()
                headers[name] = f"{headers[name]},{value}" if name in headers else value
        length = headers.get("content-length", "0")
        if not length.isdigit():
            self._finish(_plain(400, "bad content-length"), close=True)
            return
        total = end + 4 + int(length)
        if len(self._buffer) < total:
            return  # a body is announced (never by Envoy's checks): wait for all of it, then ignore it
        del self._buffer[:total]
        parts = request_line.split(" ")
        if len(parts) != 3:
            self._finish(_plain(400, "bad request line"), close=True)
            return
        method, target, _version = parts
        self._close_after = headers.get("connection", "").lower() == "close"
        # Popped, so it never reaches the checker (nor is counted among the forwarded headers).
        if not self._service.secret.admits(headers.pop(SECRET_HEADER, None)):
            self._finish(_refused())
        elif target.startswith(CHECK_PREFIX + "/"):
            # The header block's length bounds the headers' bytes (extauth/upstream.py fits_upstream).
            self._run_check(self._service.checker.check(method, target[len(CHECK_PREFIX) :], headers,
                                                         header_bytes=end))
        elif target.startswith(PRECHECK_PREFIX + "/"):
            self._run_check(self._service.checker.check(method, target[len(PRECHECK_PREFIX) :], headers,
                                                         key_only=True))
        elif target.startswith(LOCAL_MODELS_PATH) and method == "GET":
            self._run(self._service.models(target))
        elif target == HEALTH_PATH:
            self._finish(self._service.health())
        else:
            self._finish(_plain(404, "not found"))

    def _run_check(self, decision: Awaitable[Decision]) -> None:
        # The check's coroutine awaited directly, without one of its own around it: a check's answer
        # passes through every coroutine between it and the task, once per Redis reply.
        async def respond() -> None:
            self._finish(render(await decision))

        self._task = self._loop.create_task(respond())

    def _run(self, answer: Awaitable[bytes]) -> None:
        async def respond() -> None:
            self._finish(await answer)

        self._task = self._loop.create_task(respond())

    def _finish(self, response: bytes, close: bool = False) -> None:
        self._task = None
        if self._transport is None:
            return
        self._transport.write(response)
        if close or self._close_after:
            self._transport.close()
            self._buffer.clear()
        elif self._buffer:
            self._next()


async def serve(service: CheckService, host: str, port: int) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    factory: Callable[[], CheckConnection] = lambda: CheckConnection(service)  # noqa: E731
    return await loop.create_server(factory, host, port, reuse_port=False, backlog=1024)


async def drain(service: CheckService, server: asyncio.Server, grace_s: float) -> None:
    """Stop accepting, let checks in flight finish (at most grace_s), then close every connection."""
    server.close()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_s
    while any(not c.idle for c in service.connections) and loop.time() < deadline:
        await asyncio.sleep(0.02)
    for connection in list(service.connections):
        connection.close()
