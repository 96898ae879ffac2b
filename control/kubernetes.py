"""The gateway on Kubernetes, in production shape, rendered as plain manifests (no Helm or kustomize
needed to apply them; tests/test_kubernetes.py checks every one against the Kubernetes schemas):

  python -m control.kubernetes [--namespace gateway] [--image inference-gateway:latest] \
      [--secrets deploy/secrets] > gateway.yaml
  kubectl apply -f gateway.yaml

What it holds, following Envoy-based gateways' conventions:
- ConfigMap `envoy-config`: the files of envoy/ as they are (envoy.yaml and its Lua). In the pod they sit
  where compose puts them (/srv/gateway/envoy), so the config's relative Lua paths resolve the same.
- Deployment `gateway`: Envoy, and beside it the meter (a sidecar) reading Envoy's access log from the
  pod's shared `access-log` volume, and `log-rotate` (meter/rotate.py) keeping that volume bounded; each
  pod is one gateway node. Envoy's admin stays on the pod's
  loopback (its readiness probe asks it from inside); Prometheus scrapes the `stats` listener (9902).
  Service `gateway` (LoadBalancer, client addresses kept: envoy.yaml uses the remote address).
- Deployment `extauth` (ext_authz replicas) and its headless Service `extauth`: Envoy's `extauth` and
  `extauth_admin` clusters resolve that name (STRICT_DNS) to every ready replica, as in compose.
- Job `gateway-migrate`: `gatewayctl migrate` (under an advisory lock, so a rerun is harmless).
- Secrets: `gateway-secrets` (database-url, redis-url, extauth-secret, managed-api-key) and
  `gateway-keyring` (master.key, mounted as a directory so that a rotation reaches running replicas).
  Rendered only from --secrets DIR (the layout deploy/init-secrets.sh writes, plus `database_url` and
  `redis_url` files); otherwise create them yourself (README, "Kubernetes") and nothing here overwrites them.
- A PodDisruptionBudget and a HorizontalPodAutoscaler (CPU) for each Deployment; requests and limits.
PostgreSQL and Redis (one server or a Redis Cluster, see control/redisconn.py) are the operator's.
"""

from __future__ import annotations

import argparse
import base64
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
ENVOY_DIR = ROOT / "envoy"
ENVOY_IMAGE = "envoyproxy/envoy:v1.40.0"
ENVOY_MOUNT = "/srv/gateway/envoy"
ACCESS_LOG_DIR = "/var/log/gateway"  # envoy.yaml's access log path is in here
KEYRING_DIR = "/run/gateway/keyring"
# envoy.yaml's ports: the listener, the stats listener; the admin (9901) is loopback-only and never exposed.
GATEWAY_PORT, STATS_PORT, ENVOY_ADMIN_PORT = 8080, 9902, 9901
# ext_authz's check and admin ports: the `extauth` and `extauth_admin` clusters of envoy.yaml.
EXTAUTH_PORT, EXTAUTH_ADMIN_PORT = 9001, 9464
METER_METRICS_PORT = 9470
# The log volume holds the log and one rotated file at most: twice this, with room to spare.
ROTATE_BYTES = 256 * 1024 * 1024
LOG_VOLUME = "2Gi"
ENVOY_UID = 101  # the official image's `envoy` user
GATEWAY_UID = 10001  # the Dockerfile's `gateway` user

SECRETS = "gateway-secrets"
KEYRING = "gateway-keyring"
# Secret key -> the file under --secrets DIR it is read from.
SECRET_FILES = {"database-url": "database_url", "redis-url": "redis_url", "extauth-secret": "extauth_secret",
                "managed-api-key": "managed_api_key"}


def _meta(name: str, namespace: str, app: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/name": app,
                                                             "app.kubernetes.io/part-of": "inference-gateway"},
            **extra}


def _selector(app: str) -> dict[str, Any]:
    return {"matchLabels": {"app.kubernetes.io/name": app}}


def _secret_env(name: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": SECRETS, "key": key}}}


def _env(values: dict[str, str]) -> list[dict[str, Any]]:
    return [{"name": k, "value": v} for k, v in values.items()]


_HARDENED = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
             "capabilities": {"drop": ["ALL"]}}


def _resources(cpu: str, memory: str, memory_limit: str) -> dict[str, Any]:
    return {"requests": {"cpu": cpu, "memory": memory}, "limits": {"memory": memory_limit}}


def _http_probe(port: int, path: str, period_s: int = 10) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period_s, "timeoutSeconds": 3,
            "failureThreshold": 3}


def _database_and_redis() -> list[dict[str, Any]]:
    return [_secret_env("DATABASE_URL", "database-url"), _secret_env("REDIS_URL", "redis-url")]


def _gateway_image_container(name: str, image: str, command: list[str]) -> dict[str, Any]:
    return {"name": name, "image": image, "command": command, "securityContext": {**_HARDENED,
            "runAsUser": GATEWAY_UID, "runAsGroup": GATEWAY_UID}}


def envoy_config(namespace: str) -> dict[str, Any]:
    files = {p.name: p.read_text() for p in sorted(ENVOY_DIR.iterdir()) if p.is_file()}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta("envoy-config", namespace, "gateway"),
            "data": files}


def secrets(namespace: str, source: Path) -> list[dict[str, Any]]:
    def read(name: str) -> str:
        path = source / name
        if not path.is_file():
            raise SystemExit(f"{path} is missing (see control/kubernetes.py: the files --secrets reads)")
        return path.read_text().strip()

    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    data = {key: b64(read(file)) for key, file in SECRET_FILES.items()}
    return [
        {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": _meta(SECRETS, namespace, "gateway"),
         "data": data},
        {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": _meta(KEYRING, namespace, "gateway"),
         "data": {"master.key": b64(read("keyring/master.key"))}},
    ]


def migrate_job(namespace: str, image: str) -> dict[str, Any]:
    container = {**_gateway_image_container("migrate", image, ["gatewayctl", "migrate"]),
                 "env": [_secret_env("DATABASE_URL", "database-url"), *_env({"GATEWAY_STATE_DIR": "/tmp/gateway"})],
                 "resources": _resources("100m", "128Mi", "256Mi"),
                 "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": _meta("gateway-migrate", namespace, "migrate"),
            "spec": {"backoffLimit": 6, "ttlSecondsAfterFinished": 3600, "template": {
                "metadata": {"labels": {"app.kubernetes.io/name": "migrate"}},
                "spec": {"restartPolicy": "OnFailure", "containers": [container],
                         "volumes": [{"name": "tmp", "emptyDir": {}}]}}}}


def extauth(namespace: str, image: str, replicas: int) -> list[dict[str, Any]]:
    container = {
        **_gateway_image_container("extauth", image, ["python", "-m", "extauth.server"]),
        "ports": [{"name": "check", "containerPort": EXTAUTH_PORT},
                  {"name": "admin", "containerPort": EXTAUTH_ADMIN_PORT}],
        "env": [*_database_and_redis(),
                _secret_env("GATEWAY_EXTAUTH_SECRET", "extauth-secret"),
                _secret_env("GATEWAY_MANAGED_API_KEY", "managed-api-key"),
                *_env({"GATEWAY_STATE_DIR": "/tmp/gateway",
                       "EXTAUTH_LISTEN": f"0.0.0.0:{EXTAUTH_PORT}",
                       "EXTAUTH_METRICS_LISTEN": f"0.0.0.0:{EXTAUTH_ADMIN_PORT}",
                       "GATEWAY_MASTER_KEY_FILE": f"{KEYRING_DIR}/master.key"})],
        # /ready turns 503 while draining (EXTAUTH_DRAIN_MS), which takes the pod off the headless
        # Service: Envoy's DNS then stops resolving it. Liveness asks only whether the process answers.
        "readinessProbe": _http_probe(EXTAUTH_ADMIN_PORT, "/ready", 5),
        "livenessProbe": {"tcpSocket": {"port": EXTAUTH_PORT}, "periodSeconds": 10, "failureThreshold": 3},
        "resources": _resources("500m", "256Mi", "512Mi"),
        "volumeMounts": [{"name": "keyring", "mountPath": KEYRING_DIR, "readOnly": True},
                         {"name": "tmp", "mountPath": "/tmp"}],
    }
    deployment = _deployment(namespace, "extauth", replicas, (EXTAUTH_ADMIN_PORT, "/metrics"), 15, [container],
                             [{"name": "keyring", "secret": {"secretName": KEYRING}}, {"name": "tmp", "emptyDir": {}}])
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": _meta("extauth", namespace, "extauth"),
        # Headless: the name resolves to every ready replica, which Envoy's STRICT_DNS cluster balances.
        "spec": {"clusterIP": "None", "selector": {"app.kubernetes.io/name": "extauth"},
                 "ports": [{"name": "check", "port": EXTAUTH_PORT, "targetPort": "check"},
                           {"name": "admin", "port": EXTAUTH_ADMIN_PORT, "targetPort": "admin"}]},
    }
    return [deployment, service, *_availability(namespace, "extauth", replicas, 2 * replicas + 4)]


def gateway(namespace: str, image: str, replicas: int) -> list[dict[str, Any]]:
    envoy = {
        "name": "envoy", "image": ENVOY_IMAGE, "workingDir": "/srv/gateway",
        "command": ["envoy", "-c", f"{ENVOY_MOUNT}/envoy.yaml", "--log-level", "warning",
                    # Access-log flush interval: bounds how far the meter lags behind (as compose).
                    "--file-flush-interval-msec", "500"],
        "ports": [{"name": "http", "containerPort": GATEWAY_PORT}, {"name": "stats", "containerPort": STATS_PORT}],
        "env": [_secret_env("GATEWAY_EXTAUTH_SECRET", "extauth-secret")],
        # The admin listens on the pod's loopback only: the probe asks it from inside the container.
        "readinessProbe": {"exec": {"command": [
            "bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{ENVOY_ADMIN_PORT}"
            " && printf 'GET /ready HTTP/1.0\\r\\n\\r\\n' >&3 && grep -q LIVE <&3"]},
            "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 2},
        "livenessProbe": {"tcpSocket": {"port": GATEWAY_PORT}, "periodSeconds": 10, "failureThreshold": 3},
        "resources": _resources("1", "256Mi", "1Gi"),
        "securityContext": {**_HARDENED, "runAsUser": ENVOY_UID, "runAsGroup": ENVOY_UID},
        "volumeMounts": [{"name": "envoy-config", "mountPath": ENVOY_MOUNT, "readOnly": True},
                         {"name": "access-log", "mountPath": ACCESS_LOG_DIR}],
    }
    meter = {
        **_gateway_image_container("meter", image, ["python", "-m", "meter"]),
        "ports": [{"name": "meter-metrics", "containerPort": METER_METRICS_PORT}],
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                *_database_and_redis(),
                *_env({"GATEWAY_STATE_DIR": "/tmp/gateway",
                       "GATEWAY_ACCESS_LOG": f"{ACCESS_LOG_DIR}/access.log",
                       # Every pod's log has the same path: its read position is stored under the pod's name.
                       "METER_LOG_NAME": f"$(POD_NAME){ACCESS_LOG_DIR}/access.log",
                       "METER_METRICS_LISTEN": f"0.0.0.0:{METER_METRICS_PORT}"})],
        "livenessProbe": _http_probe(METER_METRICS_PORT, "/metrics", 15),
        "resources": _resources("250m", "128Mi", "512Mi"),
        "volumeMounts": [{"name": "access-log", "mountPath": ACCESS_LOG_DIR, "readOnly": True},
                         {"name": "tmp", "mountPath": "/tmp"}],
    }
    # Rename rotation of the log volume (meter/rotate.py): the meter's lag says when the old file is read.
    rotate = {
        **_gateway_image_container("log-rotate", image, ["python", "-m", "meter.rotate"]),
        "env": _env({"GATEWAY_ACCESS_LOG": f"{ACCESS_LOG_DIR}/access.log",
                     "METER_ROTATE_BYTES": str(ROTATE_BYTES),
                     "METER_METRICS_URL": f"http://127.0.0.1:{METER_METRICS_PORT}/metrics",
                     "ENVOY_ADMIN_URL": f"http://127.0.0.1:{ENVOY_ADMIN_PORT}"}),
        "resources": _resources("10m", "32Mi", "128Mi"),
        "volumeMounts": [{"name": "access-log", "mountPath": ACCESS_LOG_DIR}],
    }
    # The meter commits its batch under way before it exits: a longer grace than ext_authz's.
    deployment = _deployment(namespace, "gateway", replicas, (STATS_PORT, "/stats/prometheus"), 30,
                             [envoy, meter, rotate],
                             [{"name": "envoy-config", "configMap": {"name": "envoy-config"}},
                              {"name": "access-log", "emptyDir": {"sizeLimit": LOG_VOLUME}},
                              {"name": "tmp", "emptyDir": {}}])
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": _meta("gateway", namespace, "gateway"),
        "spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                 "selector": {"app.kubernetes.io/name": "gateway"},
                 "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
    }
    return [deployment, service, *_availability(namespace, "gateway", replicas, 4 * replicas)]


def _deployment(
    namespace: str, app: str, replicas: int, scrape: tuple[int, str], grace_s: int,
    containers: list[dict[str, Any]], volumes: list[dict[str, Any]],
) -> dict[str, Any]:
    """A rolling Deployment (one pod more at a time, none fewer) that Prometheus scrapes at `scrape`."""
    port, path = scrape
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(app, namespace, app),
        "spec": {"replicas": replicas, "selector": _selector(app),
                 "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
                 "template": {
                     "metadata": {"labels": {"app.kubernetes.io/name": app},
                                  "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(port),
                                                  "prometheus.io/path": path}},
                     "spec": {"terminationGracePeriodSeconds": grace_s,
                              # fsGroup: in the gateway pod, Envoy (uid 101) writes the log volume the meter
                              # (uid 10001) reads.
                              "securityContext": {"runAsNonRoot": True, "fsGroup": GATEWAY_UID,
                                                  "seccompProfile": {"type": "RuntimeDefault"}},
                              "containers": containers,
                              "volumes": volumes}}},
    }


def _availability(namespace: str, app: str, replicas: int, most: int) -> list[dict[str, Any]]:
    pdb = {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": _meta(app, namespace, app),
           "spec": {"maxUnavailable": 1, "selector": _selector(app)}}
    hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": _meta(app, namespace, app),
           "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": app},
                    "minReplicas": replicas, "maxReplicas": max(most, replicas),
                    "metrics": [{"type": "Resource", "resource": {
                        "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}]}}
    return [pdb, hpa]


def render(namespace: str = "gateway", image: str = "inference-gateway:latest", secrets_dir: Path | None = None,
           gateway_replicas: int = 2, extauth_replicas: int = 3) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}]
    if secrets_dir is not None:
        docs += secrets(namespace, secrets_dir)
    docs += [envoy_config(namespace), migrate_job(namespace, image), *extauth(namespace, image, extauth_replicas),
             *gateway(namespace, image, gateway_replicas)]
    return docs


class _Dumper(yaml.SafeDumper):
    pass


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    # Files (envoy.yaml, Lua) as literal blocks, so the ConfigMap reads like the files themselves.
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _text)


def dump(docs: list[dict[str, Any]]) -> str:
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m control.kubernetes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--namespace", default="gateway")
    parser.add_argument("--image", default="inference-gateway:latest", help="the Dockerfile's image")
    parser.add_argument("--secrets", type=Path, help="render the Secrets from this directory's files")
    parser.add_argument("--gateway-replicas", type=int, default=2, help="gateway nodes (Envoy + meter) at least")
    parser.add_argument("--extauth-replicas", type=int, default=3, help="ext_authz replicas at least")
    args = parser.parse_args(argv)
    sys.stdout.write(dump(render(args.namespace, args.image, args.secrets, args.gateway_replicas,
                                 args.extauth_replicas)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
