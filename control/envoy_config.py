"""Derives the config Envoy actually runs from the shipped `envoy/envoy.yaml`, changing only the
documented settings: listener and admin addresses, ext_authz endpoints, the RunPod inference address
and its TLS, and the access-log path. Everything else an operator edits is taken as it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from control.env import HostPort, SettingsError

LISTENER = "gateway"
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


def render(
    source: Path,
    *,
    listen: HostPort,
    admin: HostPort,
    extauth: list[HostPort],
    extauth_admin: list[HostPort],
    runpod_inference_url: str,
    managed_url: str,
    access_log: Path,
) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(source.read_text(encoding="utf-8"))
    config["admin"]["address"] = _socket(admin)
    resources = config["static_resources"]
    listener = _named(resources["listeners"], LISTENER, "listener")
    listener["address"] = _socket(listen)
    for chain in listener["filter_chains"]:
        for network_filter in chain["filters"]:
            for log in network_filter.get("typed_config", {}).get("access_log", []):
                if log["name"] == "envoy.access_loggers.file":
                    log["typed_config"]["path"] = str(access_log)

    _set_endpoints(_named(resources["clusters"], EXTAUTH_CLUSTER, "cluster"), extauth)
    _set_endpoints(_named(resources["clusters"], EXTAUTH_ADMIN_CLUSTER, "cluster"), extauth_admin)

    _point_at(_named(resources["clusters"], RUNPOD_CLUSTER, "cluster"), runpod_inference_url, "RUNPOD_INFERENCE_URL")
    _point_at(_named(resources["clusters"], MANAGED_CLUSTER, "cluster"), managed_url, "GATEWAY_MANAGED_URL")
    return config


def write(config: dict[str, Any], target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    # As JSON (a YAML subset Envoy reads alike): PyYAML writes strings such as `n` bare, which Envoy's
    # YAML 1.1 parser then reads as booleans (the body field `n` in json_to_metadata's selectors).
    target.write_text(json.dumps(config, indent=1), encoding="utf-8")
    return target
