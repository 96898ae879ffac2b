"""The two extra Envoys of a run: the fast upstream and the bare baseline proxy.

The fast upstream stands in for RunPod's inference endpoints: a Python upstream would be the bottleneck
long before the gateway is, while an Envoy `direct_response` costs almost nothing. It answers every path
with one small OpenAI chat completion (usage included, so the gateway's usage reading runs as in
production), except the streaming endpoint's prefix, which it proxies to the RunPod simulator: the
simulator streams real SSE chunks, and going through this same hop both ways keeps the TTFT comparison
about the gateway alone.

The fast upstream runs one worker thread: it stands in for a remote endpoint that costs this machine
nothing, so the less of the shared cores it takes the closer a run is to production (one worker needs
~20% less CPU per request than two here, and serves far more than any proxy in front of it can send).

The bare baseline is the same binary with nothing but a router in front of the same upstream: the
difference between it and the gateway is what the gateway's filters, ext_authz and access log cost.

The trivial-authz ceilings are the bare baseline plus the shipped ext_authz filter, taken from
envoy/envoy.yaml, calling a do-nothing Python ext_authz (bench/trivial_authz.py) over gRPC and over
HTTP: what Envoy costs with an ext_authz that decides nothing, so the gateway's share of it is what its
real work keeps. Both run as many worker threads as the gateway's own Envoy (GATEWAY_ENVOY_CONCURRENCY),
so each comparison differs only in the filters.
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


def _listener(
    name: str, port: int, routes: list[dict[str, Any]], filters: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    router = {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}
    return {
        "name": name,
        "address": _socket(port),
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": HCM,
                "stat_prefix": name,
                "route_config": {"name": name, "virtual_hosts": [{"name": name, "domains": ["*"], "routes": routes}]},
                "http_filters": [*(filters or []), router],
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
    # A direct response sent before the request body has arrived makes Envoy close the connection: the
    # upstream must read each request whole, as a real one does, or every request pays a reconnect.
    buffer = {"name": "envoy.filters.http.buffer", "typed_config": {"@type": BUFFER, "max_request_bytes": 1 << 20}}
    return {"static_resources": {"listeners": [_listener("upstream", port, routes, [buffer])],
                                 "clusters": [_cluster("stream", stream_port)]}}


def bare_config(port: int, upstream_port: int) -> dict[str, Any]:
    routes = [{"match": {"prefix": "/"}, "route": {"cluster": "upstream", "timeout": "60s"}}]
    return {"static_resources": {"listeners": [_listener("bare", port, routes)],
                                 "clusters": [_cluster("upstream", upstream_port)]}}


def shipped_ext_authz(shipped: Path, transport: str) -> dict[str, Any]:
    """The ext_authz filter of the shipped config with `transport` selected as `gatewayctl up` selects it
    (EXTAUTH_TRANSPORT), otherwise unchanged (its cluster is named `extauth`)."""
    from control.envoy_config import select_transport

    config = select_transport(yaml.safe_load(shipped.read_text(encoding="utf-8")), transport)
    for listener in config["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                for http_filter in network_filter["typed_config"].get("http_filters", []):
                    if http_filter["name"] == "envoy.filters.http.ext_authz":
                        return dict(http_filter)
    raise ValueError(f"{shipped} has no envoy.filters.http.ext_authz filter")


def trivial_authz_config(
    port: int, upstream_port: int, authz_port: int, ext_authz: dict[str, Any], transport: str
) -> dict[str, Any]:
    """Bare Envoy plus the shipped ext_authz filter of that transport (shipped_ext_authz); for gRPC the
    cluster speaks HTTP/2, as the gateway's does."""
    authz_cluster = _cluster("extauth", authz_port)
    if transport == "grpc":
        authz_cluster["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }}
    routes = [{"match": {"prefix": "/"}, "route": {"cluster": "upstream", "timeout": "60s"}}]
    return {"static_resources": {"listeners": [_listener("trivial", port, routes, [ext_authz])],
                                 "clusters": [_cluster("upstream", upstream_port), authz_cluster]}}


def start(
    procs: Processes, name: str, envoy: str, config: dict[str, Any], directory: Path, concurrency: int
) -> Child:
    path = directory / f"{name}.yaml"
    # JSON, as control/envoy_config.py writes it: PyYAML leaves strings such as `n` bare, which Envoy's
    # YAML parser reads as booleans.
    path.write_text(json.dumps(config, indent=1), encoding="utf-8")
    # No hot restart: these Envoys must not share a shared-memory base id with the gateway's own.
    return procs.spawn(name, [envoy, "-c", str(path), "--log-level", "warning", "--disable-hot-restart",
                              "--concurrency", str(concurrency)], {"PATH": "/usr/bin:/bin"})
