"""Derives the config Envoy actually runs from the shipped `envoy/envoy.yaml`, changing only the
documented settings: listener, admin and stats addresses, ext_authz endpoints and transport, the RunPod
inference address and its TLS, and the access-log path. Everything else an operator edits is taken as
it is.

`python -m control.envoy_config --transport grpc SOURCE TARGET` applies only the transport, for
docker-compose.grpc.yml (compose keeps the file's addresses).
"""

from __future__ import annotations

import argparse
import copy
import ipaddress
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from control.env import HostPort, SettingsError
from extauth.decision import PRECHECK_METADATA

LISTENER = "gateway"
STATS_LISTENER = "stats"
ENVOY_ADMIN_CLUSTER = "envoy_admin"
EXTAUTH_FILTER = "envoy.filters.http.ext_authz"
# The key pre-check of large bodies: a second ext_authz client, wrapped in a matcher (envoy.yaml).
PRECHECK_FILTER = "gateway.key_precheck"
# The routes' request-body limits: a buffer filter, its own limit the default, a route's in its per-route config.
BODY_LIMIT_FILTER = "gateway.body_limit"
ENVOY_DEFAULT_BUFFER_LIMIT = 1 << 20  # per_connection_buffer_limit_bytes left unset
# Where envoy.yaml keeps the gRPC transport's blocks: the `extauth` cluster's metadata.
GRPC_TRANSPORT_METADATA = "gateway.grpc_transport"
TRANSPORTS = ("http", "grpc")
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
# What envoy.yaml adds to everything it sends ext_authz (extauth/custody.py).
SECRET_VALUE = "%ENVIRONMENT(GATEWAY_EXTAUTH_SECRET)%"
EXTAUTH_CLUSTER = "extauth"
EXTAUTH_ADMIN_CLUSTER = "extauth_admin"
RUNPOD_CLUSTER = "runpod"
MANAGED_CLUSTER = "managed"


def _named(items: list[dict[str, Any]], name: str, what: str) -> dict[str, Any]:
    for item in items:
        if item.get("name") == name:
            return item
    raise SettingsError(f"envoy config has no {what} named {name!r}; the launcher finds it by that name")


def _socket(hp: HostPort) -> dict[str, Any]:
    return {"socket_address": {"address": hp.host, "port_value": hp.port}}


def _set_endpoints(cluster: dict[str, Any], addresses: list[HostPort]) -> None:
    cluster["load_assignment"]["endpoints"] = [
        {"lb_endpoints": [{"endpoint": {"address": _socket(a)}} for a in addresses]}
    ]


def _point_at(cluster: dict[str, Any], base_url: str, setting: str) -> None:
    """Aim an upstream cluster at a URL's host and port; https keeps TLS (SNI and SAN follow the host),
    http drops the transport socket."""
    url = urlsplit(base_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise SettingsError(f"{setting} must be an http:// or https:// URL, got {base_url!r}")
    port = url.port or (443 if url.scheme == "https" else 80)
    _set_endpoints(cluster, [HostPort(url.hostname, port)])
    if url.scheme == "http":
        cluster.pop("transport_socket", None)
    elif "transport_socket" in cluster:
        tls = cluster["transport_socket"]["typed_config"]
        tls["sni"] = url.hostname
        for matcher in tls["common_tls_context"].get("validation_context", {}).get(
            "match_typed_subject_alt_names", []
        ):
            matcher["matcher"] = {"exact": url.hostname}


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _http_filters(listener: dict[str, Any]) -> list[dict[str, Any]]:
    return [http_filter for chain in listener["filter_chains"] for network_filter in chain["filters"]
            for http_filter in network_filter.get("typed_config", {}).get("http_filters", [])]


def _ext_authz_filter(listener: dict[str, Any]) -> dict[str, Any]:
    for http_filter in _http_filters(listener):
        if http_filter.get("name") == EXTAUTH_FILTER:
            found: dict[str, Any] = http_filter["typed_config"]
            return found
    raise SettingsError(f"the {LISTENER!r} listener has no {EXTAUTH_FILTER} filter")


def _matched_filter(listener: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The own config of HTTP filter `name`, one wrapped in a matcher (envoy.yaml), if the file keeps it."""
    for http_filter in _http_filters(listener):
        if http_filter.get("name") == name:
            found: dict[str, Any] = http_filter["typed_config"]["extension_config"]["typed_config"]
            return found
    return None


def _precheck_filter(listener: dict[str, Any]) -> dict[str, Any] | None:
    """The pre-check's own ext_authz config, if the operator's file keeps the pre-check."""
    return _matched_filter(listener, PRECHECK_FILTER)


def select_transport(config: dict[str, Any], transport: str) -> dict[str, Any]:
    """The ext_authz transport Envoy uses. `http` is the file as it is; `grpc` swaps in the blocks the
    `extauth` cluster keeps in its metadata: the filter's `grpc_service` for `http_service` (with its
    `filter_fields` set beside it), the cluster's
    `grpc_health_check` for `http_health_check`, and HTTP/2 towards the replicas."""
    if transport not in TRANSPORTS:
        raise SettingsError(f"EXTAUTH_TRANSPORT must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
    resources = config["static_resources"]
    cluster = _named(resources["clusters"], EXTAUTH_CLUSTER, "cluster")
    blocks = cluster.get("metadata", {}).get("filter_metadata", {}).get(GRPC_TRANSPORT_METADATA)
    if transport == "http":
        return config
    if not blocks or "grpc_service" not in blocks or "grpc_health_check" not in blocks:
        raise SettingsError(f"the {EXTAUTH_CLUSTER!r} cluster has no metadata {GRPC_TRANSPORT_METADATA!r} with "
                            "grpc_service and grpc_health_check (README, \"The gRPC transport\")")
    listener = _named(resources["listeners"], LISTENER, "listener")
    authz = _ext_authz_filter(listener)
    authz.pop("http_service", None)
    authz["grpc_service"] = blocks["grpc_service"]
    authz.update(blocks.get("filter_fields", {}))
    precheck = _precheck_filter(listener)
    if precheck is not None:
        # The same service, marked as the pre-check (over HTTP it has its own path prefix instead).
        precheck.pop("http_service", None)
        service = copy.deepcopy(blocks["grpc_service"])
        service["initial_metadata"] = [*service.get("initial_metadata", []), {"key": PRECHECK_METADATA, "value": "1"}]
        precheck["grpc_service"] = service
    for check in cluster.get("health_checks", []):
        check.pop("http_health_check", None)
        check["grpc_health_check"] = blocks["grpc_health_check"]
    options = cluster.setdefault("typed_extension_protocol_options", {}).setdefault(
        _HTTP_OPTIONS, {"@type": f"type.googleapis.com/{_HTTP_OPTIONS}"})
    options["explicit_http_config"] = {"http2_protocol_options": {}}
    return config


def _sends_secret(block: Any) -> bool:
    return SECRET_VALUE in yaml.safe_dump(block)


def require_secret(config: dict[str, Any]) -> dict[str, Any]:
    """Refuse a config whose checks or health checks would reach ext_authz without the secret: every one
    would be refused, and the stack would never turn ready, for a reason far from the cause."""
    resources = config["static_resources"]
    listener = _named(resources["listeners"], LISTENER, "listener")
    clients = [("the ext_authz filter", _ext_authz_filter(listener))]
    precheck = _precheck_filter(listener)
    if precheck is not None:
        clients.append((f"the {PRECHECK_FILTER} filter", precheck))
    blocks: list[tuple[str, Any]] = [
        (what, authz.get("http_service", {}).get("authorization_request") or authz.get("grpc_service"))
        for what, authz in clients
    ]
    blocks.append((f"the {EXTAUTH_CLUSTER!r} health check",
                   _named(resources["clusters"], EXTAUTH_CLUSTER, "cluster").get("health_checks", [])))
    missing = [what for what, block in blocks if not _sends_secret(block)]
    if missing:
        raise SettingsError(f"{' and '.join(missing)} must send x-gateway-secret: {SECRET_VALUE} "
                            "(README, \"Key custody\")")
    return config


def _body_limits(listener: dict[str, Any]) -> list[tuple[str, int]]:
    """(where, bytes) of every request-body limit gateway.body_limit applies on the listener."""
    body_limit = _matched_filter(listener, BODY_LIMIT_FILTER)
    limits = [] if body_limit is None else [
        (f"the {BODY_LIMIT_FILTER} filter", int(body_limit.get("max_request_bytes", 0)))]
    for chain in listener["filter_chains"]:
        for network_filter in chain["filters"]:
            route_config = network_filter.get("typed_config", {}).get("route_config", {})
            for host in route_config.get("virtual_hosts", []):
                for route in host.get("routes", []):
                    per_route = route.get("typed_per_filter_config", {}).get(BODY_LIMIT_FILTER, {})
                    if "buffer" in per_route:
                        limits.append((f"route {route.get('name', '?')!r}",
                                       int(per_route["buffer"].get("max_request_bytes", 0))))
    return limits


def require_buffer_room(config: dict[str, Any]) -> dict[str, Any]:
    """Refuse a config whose listener holds less than some route's body limit: a body that arrives while
    the key is pre-checked pauses reading at the listener's limit, and a route that then raises the limit
    holds the bytes for good, so such an upload hangs until the idle timeout (envoy.yaml, the listener)."""
    listener = _named(config["static_resources"]["listeners"], LISTENER, "listener")
    room = int(listener.get("per_connection_buffer_limit_bytes", ENVOY_DEFAULT_BUFFER_LIMIT))
    over = [f"{where} ({limit})" for where, limit in _body_limits(listener) if limit > room]
    if over:
        verb = "is" if len(over) == 1 else "are"
        raise SettingsError(f"the {LISTENER!r} listener's per_connection_buffer_limit_bytes ({room}) must be at "
                            f"least every request-body limit, but {', '.join(over)} {verb} larger: raise the "
                            "listener's (README, \"Operators: limits at the edge\")")
    return config


def render(
    source: Path,
    *,
    listen: HostPort,
    admin: HostPort,
    stats: HostPort,
    extauth: list[HostPort],
    extauth_admin: list[HostPort],
    transport: str,
    runpod_inference_url: str,
    managed_url: str,
    access_log: Path,
) -> dict[str, Any]:
    if not _loopback(admin.host):
        # The admin stops Envoy and makes it log secrets; Prometheus has the stats listener instead.
        raise SettingsError(f"GATEWAY_ADMIN must be a loopback address, got {admin}; "
                            "scrape /stats/prometheus on GATEWAY_STATS_LISTEN instead")
    config: dict[str, Any] = yaml.safe_load(source.read_text(encoding="utf-8"))
    config["admin"]["address"] = _socket(admin)
    resources = config["static_resources"]
    listener = _named(resources["listeners"], LISTENER, "listener")
    listener["address"] = _socket(listen)
    _named(resources["listeners"], STATS_LISTENER, "listener")["address"] = _socket(stats)
    _set_endpoints(_named(resources["clusters"], ENVOY_ADMIN_CLUSTER, "cluster"), [admin])
    for chain in listener["filter_chains"]:
        for network_filter in chain["filters"]:
            for log in network_filter.get("typed_config", {}).get("access_log", []):
                if log["name"] == "envoy.access_loggers.file":
                    log["typed_config"]["path"] = str(access_log)

    _set_endpoints(_named(resources["clusters"], EXTAUTH_CLUSTER, "cluster"), extauth)
    _set_endpoints(_named(resources["clusters"], EXTAUTH_ADMIN_CLUSTER, "cluster"), extauth_admin)

    _point_at(_named(resources["clusters"], RUNPOD_CLUSTER, "cluster"), runpod_inference_url, "RUNPOD_INFERENCE_URL")
    _point_at(_named(resources["clusters"], MANAGED_CLUSTER, "cluster"), managed_url, "GATEWAY_MANAGED_URL")
    return require_buffer_room(require_secret(select_transport(config, transport)))


def write(config: dict[str, Any], target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    # As JSON (a YAML subset Envoy reads alike): PyYAML writes strings such as `n` bare, which Envoy's
    # YAML 1.1 parser then reads as booleans (the body field `n` in json_to_metadata's selectors).
    target.write_text(json.dumps(config, indent=1), encoding="utf-8")
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m control.envoy_config", description=__doc__)
    parser.add_argument("--transport", choices=TRANSPORTS, required=True)
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    args = parser.parse_args(argv)
    config = yaml.safe_load(args.source.read_text(encoding="utf-8"))
    write(select_transport(config, args.transport), args.target)


if __name__ == "__main__":
    main()
