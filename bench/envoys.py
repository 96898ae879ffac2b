"""The two extra Envoys of a run: the fast upstream and the bare baseline proxy.

The fast upstream stands in for RunPod's inference endpoints: a Python upstream would be the bottleneck
long before the gateway is, while an Envoy `direct_response` costs almost nothing. It answers every path
with one small OpenAI chat completion (usage included, so the gateway's usage reading runs as in
production), except the streaming endpoint's prefix, which it proxies to the RunPod simulator: the
simulator streams real SSE chunks, and going through this same hop both ways keeps the TTFT comparison
about the gateway alone.

The bare baseline is the same binary with nothing but a router in front of the same upstream: the
difference between it and the gateway is what the gateway's filters, ext_authz and access log cost.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from bench.procs import Child, Processes

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
BUFFER = "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer"

COMPLETION = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "bench-chat",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hello there!"}, "logprobs": None,
         "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
}


def _socket(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def _cluster(name: str, port: int) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": _socket(port)}}
        ]}]},
    }


def _listener(name: str, port: int, routes: list[dict[str, Any]], read_body: bool = False) -> dict[str, Any]:
    router = {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}
    # A direct response sent before the request body has arrived makes Envoy close the connection: the
    # upstream must read each request whole, as a real one does, or every request pays a reconnect.
    buffer = {"name": "envoy.filters.http.buffer", "typed_config": {"@type": BUFFER, "max_request_bytes": 1 << 20}}
    return {
        "name": name,
        "address": _socket(port),
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": HCM,
                "stat_prefix": name,
                "route_config": {"name": name, "virtual_hosts": [{"name": name, "domains": ["*"], "routes": routes}]},
                "http_filters": [buffer, router] if read_body else [router],
            },
        }]}],
    }


def upstream_config(port: int, stream_prefix: str, stream_port: int) -> dict[str, Any]:
    routes: list[dict[str, Any]] = [
        {"match": {"prefix": stream_prefix}, "route": {"cluster": "stream", "timeout": "60s"}},
        {
            "match": {"prefix": "/"},
            "direct_response": {"status": 200, "body": {"inline_string": json.dumps(COMPLETION)}},
            "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}],
        },
    ]
    return {"static_resources": {"listeners": [_listener("upstream", port, routes, read_body=True)],
                                 "clusters": [_cluster("stream", stream_port)]}}


def bare_config(port: int, upstream_port: int) -> dict[str, Any]:
    routes = [{"match": {"prefix": "/"}, "route": {"cluster": "upstream", "timeout": "60s"}}]
    return {"static_resources": {"listeners": [_listener("bare", port, routes)],
                                 "clusters": [_cluster("upstream", upstream_port)]}}


def start(procs: Processes, name: str, envoy: str, config: dict[str, Any], directory: Path) -> Child:
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    # No hot restart: these Envoys must not share a shared-memory base id with the gateway's own.
    return procs.spawn(name, [envoy, "-c", str(path), "--log-level", "warning", "--disable-hot-restart"],
                       {"PATH": "/usr/bin:/bin"})
