"""Do-nothing ext_authz services: the ceilings the gateway is measured against.

Both allow every check and decide nothing (no key, no Redis, no headers back):
- over HTTP/1.1, the transport the gateway ships, in the same style as extauth/http_check.py
  (asyncio's protocol layer on uvloop);
- over gRPC with grpc.aio, as the "trivial do-nothing Python ext_authz" the performance issue's
  ceiling was measured with (../shared/reference/envoy.md).
Envoy in front of one of them, with only the ext_authz filter and a router, is as fast as Envoy can go
with that kind of Python ext_authz on this machine; the gateway's throughput over it is the share of
that ceiling its real work keeps.

`python -m bench.trivial_authz http|grpc PORT`
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any, cast

import uvloop

_ALLOW = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"


class _Allow(asyncio.Protocol):
    def __init__(self) -> None:
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        # Envoy's checks carry no body and are never pipelined; one answer per complete header block.
        self._buffer += data
        answers = self._buffer.count(b"\r\n\r\n")
        if answers and self._transport is not None:
            self._buffer = self._buffer[self._buffer.rfind(b"\r\n\r\n") + 4 :]
            self._transport.write(_ALLOW * answers)


async def _serve_http(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(_Allow, "127.0.0.1", port, backlog=1024)
    print(f"trivial HTTP authz listening on {port}", flush=True)
    async with server:
        await server.serve_forever()


async def _serve_grpc(port: int) -> None:
    import grpc
    from envoy.service.auth.v3 import external_auth_pb2 as authz
    from envoy.service.auth.v3 import external_auth_pb2_grpc as authz_grpc

    allow = authz.CheckResponse(ok_response=authz.OkHttpResponse())

    class Allow(authz_grpc.AuthorizationServicer):  # type: ignore[misc]
        async def Check(self, request: Any, context: Any) -> Any:
            return allow

    server = grpc.aio.server()
    authz_grpc.add_AuthorizationServicer_to_server(Allow(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"trivial gRPC authz listening on {port}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    transport, port = sys.argv[1], int(sys.argv[2])
    uvloop.run(_serve_grpc(port) if transport == "grpc" else _serve_http(port))


if __name__ == "__main__":
    main()
