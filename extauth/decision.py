"""One check's outcome, independent of how Envoy asked for it (HTTP, the shipped transport, or gRPC).

Every field maps one-to-one onto Envoy's ext_authz contract, so each transport only renders it:
- `client_headers` reach the client on every answer (the rate-limit headers, `Retry-After`);
- `upstream_headers` replace same-named headers on a forwarded request (the injected credential, the
  destination that picks the cluster, the upstream path that envoy/gateway.lua applies to `:path`);
- `remove_headers` are dropped from a forwarded request;
- `meta` (who asked, what was decided, which deployment) becomes one JSON object in dynamic metadata
  `envoy.filters.http.ext_authz:x-gw-log`, which the access log writes as its `authz` field and
  envoy/gateway.lua reads. One field rather than one per fact: the HTTP transport can only carry
  metadata as response headers, and Envoy's cost per header showed (about 8% of throughput for eight).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import orjson

ALLOW = "allow"  # forward to the customer's endpoint
DENY = "deny"  # answer the client with `status` and the OpenAI error `body`
LOCAL = "local"  # answered by the gateway itself (`/v1/models`): `body` with status 200
# Forwarded to ext_authz's admin port, which reads the body and answers what is wrong with it (a JSON
# body without a `model` the check could name; extauth/body_facts.py, envoy.yaml route `body_check`).
BODY_CHECK = "body_check"
# The kinds Envoy forwards (both transports render them as an allowed check).
FORWARDED = frozenset({ALLOW, BODY_CHECK})

META_KEY = "x-gw-log"
# Read by the route table (envoy/envoy.yaml) to pick the cluster; only ext_authz may set it.
DESTINATION_HEADER = "x-gateway-destination"
# The path the forwarded request takes; envoy/gateway.lua moves it into `:path` (an HTTP answer cannot
# carry pseudo-headers, and both transports share one mechanism).
PATH_HEADER = "x-gateway-path"
# Marks, as gRPC call metadata, Envoy's key pre-check of a large body (envoy.yaml gateway.key_precheck);
# over HTTP the pre-check has its own path prefix instead.
PRECHECK_METADATA = "x-gateway-precheck"
# The destination of requests answered by the gateway itself, and the path prefix it serves them on.
LOCAL_DESTINATION = "local"
LOCAL_MODELS_PATH = "/_gateway/models/"
# The admin port's path for a body the check could not judge (its destination is BODY_CHECK).
BODY_CHECK_PATH = "/internal/body-check"
# One encoder for every check: json.dumps with options builds a new one per call.
_COMPACT = json.JSONEncoder(separators=(",", ":"))


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
        return self.meta.get("error_code")

    def meta_json(self) -> str:
        # It travels as a header value: control characters, DEL and non-ASCII must all be escaped.
        # orjson escapes control characters but writes non-ASCII as UTF-8; the values are nearly always
        # ASCII (ids, routes, model names), and orjson takes a tenth of the stdlib encoder's time.
        text = orjson.dumps(self.meta).decode()
        if not text.isascii():
            text = _COMPACT.encode(self.meta)  # ensure_ascii
        return text.replace("\x7f", "\\u007f")
