"""The Kubernetes deployment (control/kubernetes.py), offline: every rendered manifest is valid against
the Kubernetes schemas (kubernetes-validate, a dev dependency `make install` brings), and the pieces fit
together the way envoy/envoy.yaml and the services expect."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from control import kubernetes
from tests.support import ROOT

KUBERNETES_VERSION = "1.33.0"


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    secrets = tmp_path_factory.mktemp("secrets")
    (secrets / "keyring").mkdir()
    for name, value in (("keyring/master.key", "1:" + "A" * 43 + "="), ("database_url", "postgresql://g@pg/gateway"),
                        ("redis_url", "redis+cluster://redis-0.redis:6379,redis-1.redis:6379"),
                        ("extauth_secret", "s" * 32), ("managed_api_key", "")):
        (secrets / name).write_text(value)
    # As an operator runs it: the text, parsed back.
    text = kubernetes.dump(kubernetes.render(secrets_dir=secrets))
    return [d for d in yaml.safe_load_all(text) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_specs(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Deployment", "Job")}


def test_every_manifest_is_valid_against_the_kubernetes_schemas(docs: list[dict[str, Any]]) -> None:
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "Secret", "ConfigMap", "Job", "Deployment", "Service", "PodDisruptionBudget",
            "HorizontalPodAutoscaler"} <= kinds
    for doc in docs:
        # strict: an unknown or misspelt field is an error, not silently dropped by the API server.
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_a_broken_manifest_is_caught(docs: list[dict[str, Any]]) -> None:
    broken = yaml.safe_load(yaml.safe_dump(by_kind(docs, "Deployment")["extauth"]))
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "9001"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_envoy_runs_the_shipped_config_as_it_is(docs: list[dict[str, Any]]) -> None:
    config = by_kind(docs, "ConfigMap")["envoy-config"]["data"]
    for path in (ROOT / "envoy").iterdir():
        assert config[path.name] == path.read_text()
    envoy = next(c for c in pod_specs(docs)["gateway"]["containers"] if c["name"] == "envoy")
    assert f"{kubernetes.ENVOY_MOUNT}/envoy.yaml" in envoy["command"]
    assert envoy["workingDir"] + "/envoy" == kubernetes.ENVOY_MOUNT  # the config's relative Lua paths


def test_the_extauth_clusters_resolve_the_headless_service(docs: list[dict[str, Any]]) -> None:
    envoy = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())
    service = by_kind(docs, "Service")["extauth"]
    assert service["spec"]["clusterIP"] == "None"
    ports = {p["port"] for p in service["spec"]["ports"]}
    for cluster in envoy["static_resources"]["clusters"]:
        if cluster["name"] in ("extauth", "extauth_admin"):
            assert cluster["type"] == "STRICT_DNS"
            address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
            assert address["socket_address"]["address"] == service["metadata"]["name"]
            assert address["socket_address"]["port_value"] in ports
    extauth = pod_specs(docs)["extauth"]["containers"][0]
    assert {p["containerPort"] for p in extauth["ports"]} == ports


def test_admin_stays_on_loopback_and_prometheus_scrapes_the_stats_listener(docs: list[dict[str, Any]]) -> None:
    envoy_yaml = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())
    assert envoy_yaml["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    for spec in pod_specs(docs).values():
        for container in spec["containers"]:
            assert kubernetes.ENVOY_ADMIN_PORT not in {p["containerPort"] for p in container.get("ports", [])}
    for service in by_kind(docs, "Service").values():
        assert kubernetes.ENVOY_ADMIN_PORT not in {p["port"] for p in service["spec"]["ports"]}
    annotations = by_kind(docs, "Deployment")["gateway"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(kubernetes.STATS_PORT) == "9902"
    assert annotations["prometheus.io/path"] == "/stats/prometheus"


def test_the_meter_is_a_sidecar_on_the_shared_log_under_its_own_position(docs: list[dict[str, Any]]) -> None:
    spec = pod_specs(docs)["gateway"]
    envoy, meter = (next(c for c in spec["containers"] if c["name"] == name) for name in ("envoy", "meter"))
    envoy_yaml = (ROOT / "envoy" / "envoy.yaml").read_text()
    assert f"path: {kubernetes.ACCESS_LOG_DIR}/access.log" in envoy_yaml
    assert {"name": "access-log", "mountPath": kubernetes.ACCESS_LOG_DIR} in envoy["volumeMounts"]
    assert {"name": "access-log", "mountPath": kubernetes.ACCESS_LOG_DIR, "readOnly": True} in meter["volumeMounts"]
    env = {e["name"]: e.get("value") for e in meter["env"]}
    assert env["GATEWAY_ACCESS_LOG"] == f"{kubernetes.ACCESS_LOG_DIR}/access.log"
    assert env["METER_LOG_NAME"].startswith("$(POD_NAME)")  # pods share the path, not the read position
    rotate = next(c for c in spec["containers"] if c["name"] == "log-rotate")
    rotate_env = {e["name"]: e["value"] for e in rotate["env"]}
    assert rotate_env["GATEWAY_ACCESS_LOG"] == env["GATEWAY_ACCESS_LOG"]
    # The log and one rotated file fit the volume.
    volume = next(v for v in spec["volumes"] if v["name"] == "access-log")
    assert volume["emptyDir"]["sizeLimit"] == "2Gi" and 2 * int(rotate_env["METER_ROTATE_BYTES"]) < 2 * 1024**3


def test_secrets_come_from_secrets_and_every_reference_resolves(docs: list[dict[str, Any]]) -> None:
    secrets = by_kind(docs, "Secret")
    configmaps = by_kind(docs, "ConfigMap")
    for spec in pod_specs(docs).values():
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps
        for container in spec["containers"]:
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]]["data"]
                # A secret's value is never written into a manifest in the clear.
                assert not any(word in var["name"] for word in ("SECRET", "DATABASE_URL", "REDIS_URL", "API_KEY")) \
                    or "valueFrom" in var, var["name"]
    extauth = pod_specs(docs)["extauth"]["containers"][0]
    assert {"name": "keyring", "mountPath": kubernetes.KEYRING_DIR, "readOnly": True} in extauth["volumeMounts"]


def test_probes_resources_disruption_budgets_and_autoscalers(docs: list[dict[str, Any]]) -> None:
    deployments = by_kind(docs, "Deployment")
    for name, spec in pod_specs(docs).items():
        for container in spec["containers"]:
            assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
            if name != "gateway-migrate" and container["name"] != "log-rotate":
                assert "livenessProbe" in container
    for name in ("extauth", "gateway"):
        assert "readinessProbe" in pod_specs(docs)[name]["containers"][0]
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        pdb = by_kind(docs, "PodDisruptionBudget")[name]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        hpa = by_kind(docs, "HorizontalPodAutoscaler")[name]
        assert hpa["spec"]["scaleTargetRef"]["name"] == name
        assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["minReplicas"] >= pdb["spec"]["maxUnavailable"] + 1
    job = by_kind(docs, "Job")["gateway-migrate"]
    assert job["spec"]["template"]["spec"]["containers"][0]["command"] == ["gatewayctl", "migrate"]


def test_without_secrets_the_render_leaves_the_operators_own_alone(tmp_path: Path) -> None:
    assert not [d for d in kubernetes.render() if d["kind"] == "Secret"]
    with pytest.raises(SystemExit, match="missing"):
        kubernetes.render(secrets_dir=tmp_path)


def test_the_gateway_images_containers_run_what_the_package_has(docs: list[dict[str, Any]]) -> None:
    import importlib.util
    import shutil

    for spec in pod_specs(docs).values():
        for container in spec["containers"]:
            command = container["command"]
            if container["image"] == kubernetes.ENVOY_IMAGE:
                continue
            if command[:2] == ["python", "-m"]:
                assert importlib.util.find_spec(command[2]) is not None, command
            else:
                assert shutil.which(command[0], path=str(Path(sys.executable).parent)), command
