"""One check's outcome, independent of how Envoy asked for it (HTTP, the shipped transport, or gRPC).

Every field maps one-to-one onto Envoy's ext_authz contract, so each transport only renders it:
- `client_headers` reach the client on every answer (the rate-limit headers, `Retry-After`);
- `upstream_headers` replace same-named headers on a forwarded request (the injected credential, the
  destination that picks the cluster, the upstream path that envoy/gateway.lua applies to `:path`);
- `remove_headers` are dropped from a forwarded request;
- `meta` becomes dynamic metadata in namespace `envoy.filters.http.ext_authz` under `x-gw-<name>`,
  which the access log and envoy/gateway.lua read (the HTTP transport can only name metadata after the
  response headers that carry it, so both transports use those names).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import quote

ALLOW = "allow"  # forward to the customer's endpoint
DENY = "deny"  # answer the client with `status` and the OpenAI error `body`
LOCAL = "local"  # answered by the gateway itself (`/v1/models`): `body` with status 200

# Printable ASCII but "%": what a header value may carry verbatim; anything else is percent-escaped.
_HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")
META_PREFIX = "x-gw-"
# Read by the route table (envoy/envoy.yaml) to pick the cluster; only ext_authz may set it.
DESTINATION_HEADER = "x-gateway-destination"
# The path the forwarded request takes; envoy/gateway.lua moves it into `:path` (an HTTP answer cannot
# carry pseudo-headers, and both transports share one mechanism).
PATH_HEADER = "x-gateway-path"
# The request body's `model`, lifted by json_to_metadata and handed over, percent-escaped, by
# envoy/authz_request.lua.
MODEL_HEADER = "x-gateway-model"
# The destination of requests answered by the gateway itself, and the path prefix it serves them on.
LOCAL_DESTINATION = "local"
LOCAL_MODELS_PATH = "/_gateway/models/"


@dataclass(slots=True)
class Decision:
    kind: str
    status: int = 200
    body: str = ""
    client_headers: list[tuple[str, str]] = field(default_factory=list)
    upstream_headers: list[tuple[str, str]] = field(default_factory=list)
    remove_headers: list[str] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def error_code(self) -> str | None:
        return self.meta.get("error-code")


def header_safe(value: str) -> str:
    """A client-chosen string (the model) made safe to carry in a header: control characters, "%" and
    non-ASCII are percent-escaped, as envoy/authz_request.lua does."""
    return quote(value, safe=_HEADER_SAFE)
