"""Settings of the control plane, the launcher (`gatewayctl up`) and the CLI, from the environment.

While `gatewayctl up` runs it records the addresses it actually uses (embedded PostgreSQL and Redis,
the RunPod simulator) in `$GATEWAY_STATE_DIR/runtime.json`; CLI commands fall back to that file, so
they work against a running stack with no extra setup. An explicit environment variable always wins.

REDIS_URL names one Redis or a Redis Cluster (`redis+cluster://host:port[,host:port...]`): the forms are
in control/redisconn.py; unset, `up` starts an embedded Redis.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from control.env import HostPort, env_choice, env_hostport, env_int, env_opt, env_str

REPO_ROOT = Path(__file__).resolve().parent.parent
RUNTIME_FILE = "runtime.json"


@dataclass(frozen=True)
class ControlSettings:
    state_dir: Path
    listen: HostPort
    admin: HostPort
    stats_listen: HostPort
    extauth_listen: HostPort
    extauth_transport: str
    extauth_replicas: int
    envoy_concurrency: int
    extauth_metrics_listen: HostPort
    meter_metrics_listen: HostPort
    database_url: str | None
    redis_url: str | None
    runpod_api_url: str
    runpod_inference_url: str
    runpod_urls_given: bool
    managed_url: str
    managed_api_key: str | None
    managed_hf_token: str | None = field(repr=False)
    master_key: str | None
    master_key_file: Path
    envoy_config: Path
    access_log: Path
    runtime: dict[str, Any]
    # Seconds ahead of the host's clock that plan changes reckon the billing period by: for tests and
    # drills of the boundary (a pending downgrade then takes effect that much sooner in real time).
    clock_offset_s: int = 0

    @classmethod
    def from_env(cls, use_runtime: bool = True) -> ControlSettings:
        """`use_runtime=False` is for the launcher itself, which must not inherit a previous run's
        addresses."""
        state_dir = Path(env_str("GATEWAY_STATE_DIR", ".gateway")).resolve()
        runtime = read_runtime(state_dir) if use_runtime else {}
        api_url = env_opt("RUNPOD_API_URL")
        inference_url = env_opt("RUNPOD_INFERENCE_URL")
        return cls(
            state_dir=state_dir,
            listen=env_hostport("GATEWAY_LISTEN", "127.0.0.1:8080"),
            admin=env_hostport("GATEWAY_ADMIN", "127.0.0.1:9901"),
            stats_listen=env_hostport("GATEWAY_STATS_LISTEN", "127.0.0.1:9902"),
            extauth_listen=env_hostport("EXTAUTH_LISTEN", "127.0.0.1:9001"),
            extauth_transport=env_choice("EXTAUTH_TRANSPORT", "http", ("http", "grpc")),
            extauth_replicas=env_int("EXTAUTH_REPLICAS", 1, minimum=1),
            envoy_concurrency=env_int("GATEWAY_ENVOY_CONCURRENCY", default_envoy_concurrency(), minimum=1),
            extauth_metrics_listen=env_hostport("EXTAUTH_METRICS_LISTEN", "127.0.0.1:9464"),
            meter_metrics_listen=env_hostport("METER_METRICS_LISTEN", "127.0.0.1:9470"),
            database_url=env_opt("DATABASE_URL") or runtime.get("database_url"),
            redis_url=env_opt("REDIS_URL") or runtime.get("redis_url"),
            runpod_api_url=(api_url or runtime.get("runpod_api_url") or "https://api.runpod.io").rstrip("/"),
            runpod_inference_url=(
                inference_url or runtime.get("runpod_inference_url") or "https://api.runpod.ai"
            ).rstrip("/"),
            runpod_urls_given=bool(api_url or inference_url),
            managed_url=(env_opt("GATEWAY_MANAGED_URL") or runtime.get("managed_url") or "https://api.runpod.ai").rstrip("/"),
            managed_api_key=env_opt("GATEWAY_MANAGED_API_KEY"),
            managed_hf_token=env_opt("GATEWAY_MANAGED_HF_TOKEN"),
            master_key=env_opt("GATEWAY_MASTER_KEY"),
            master_key_file=Path(env_str("GATEWAY_MASTER_KEY_FILE", str(state_dir / "master.key"))),
            envoy_config=Path(env_str("GATEWAY_ENVOY_CONFIG", str(REPO_ROOT / "envoy" / "envoy.yaml"))),
            access_log=Path(env_str("GATEWAY_ACCESS_LOG", str(state_dir / "access.log"))),
            runtime=runtime,
            clock_offset_s=env_int("GATEWAY_CLOCK_OFFSET_S", 0, minimum=-(10**9)),
        )


def default_envoy_concurrency() -> int:
    """Envoy's worker threads when `gatewayctl up` runs it: one per core this process may run on, as
    Envoy itself would choose, passed explicitly so /server_info and the benchmark report the figure.

    Fewer workers than cores spends less CPU per request when Envoy shares its cores with ext_authz,
    Redis and the meter (on the 2-core bench machine, one worker instead of two cut Envoy's CPU per
    request by ~15%), but caps throughput at what one worker can carry, and the queueing behind it
    raised the added p99 latency at 1,000 requests/s (interleaved runs: 4.7 and 5.9 ms with one
    worker, 4.0 and 4.2 ms with two). GATEWAY_ENVOY_CONCURRENCY lowers it where CPU matters more."""
    return max(1, len(os.sched_getaffinity(0)))


def settings_for(environ: Mapping[str, str]) -> ControlSettings:
    """The settings a process started with exactly `environ` would read: for tools and tests that drive
    a stack from outside it."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(environ)
    try:
        return ControlSettings.from_env()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def read_runtime(state_dir: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((state_dir / RUNTIME_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return {}
    return data


def write_runtime(state_dir: Path, data: dict[str, Any]) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / (RUNTIME_FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
    os.replace(tmp, state_dir / RUNTIME_FILE)
