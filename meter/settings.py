"""Settings of the meter (`python -m meter`), from the environment:

- DATABASE_URL (required)
- GATEWAY_ACCESS_LOG: the log to follow, default `$GATEWAY_STATE_DIR/access.log` (state dir `.gateway`)
- METER_LOG_NAME: the name its read position is stored under in PostgreSQL, default the log's absolute
  path. Nodes whose logs share one path (Kubernetes pods) each need their own: the pod's name
- METER_BATCH_LINES: most lines recorded per transaction, default 5000 (a batch also stops at about
  8 MiB). Each row costs the database far more than the batch does, but a catching-up meter with
  small batches pays the per-batch round trips many times over: 500 ran at two thirds the speed.
- METER_POLL_MS: wait for new lines once the log is consumed, default 200
- METER_METRICS_LISTEN: HOST:PORT of the Prometheus endpoint; none if unset
- REDIS_URL: where spend reservations are settled (see meter.spend_settle); not settled if unset. One
  Redis or a Redis Cluster (redis+cluster://host:port[,host:port...]; control/redisconn.py)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from control.env import HostPort, SettingsError, env_int, env_opt, env_str


@dataclass(frozen=True)
class MeterSettings:
    database_url: str
    access_log: Path
    batch_lines: int
    poll_seconds: float
    metrics_listen: HostPort | None
    redis_url: str | None = None
    log_name: str = ""  # empty: the access log's path

    @property
    def position_key(self) -> str:
        """What the log's read position is stored under."""
        return self.log_name or str(self.access_log)

    @classmethod
    def from_env(cls) -> MeterSettings:
        database_url = env_opt("DATABASE_URL")
        if database_url is None:
            raise SettingsError("DATABASE_URL is required")
        state_dir = Path(env_str("GATEWAY_STATE_DIR", ".gateway"))
        metrics_listen = env_opt("METER_METRICS_LISTEN")
        # Absolute, because the path is the default key of the stored read position.
        access_log = Path(env_str("GATEWAY_ACCESS_LOG", str(state_dir / "access.log"))).absolute()
        return cls(
            database_url=database_url,
            access_log=access_log,
            log_name=env_str("METER_LOG_NAME", ""),
            batch_lines=env_int("METER_BATCH_LINES", 5000, minimum=1),
            poll_seconds=env_int("METER_POLL_MS", 200, minimum=1) / 1000,
            metrics_listen=HostPort.parse(metrics_listen, "METER_METRICS_LISTEN") if metrics_listen else None,
            redis_url=env_opt("REDIS_URL"),
        )


@dataclass(frozen=True)
class RotateSettings:
    """`python -m meter.rotate` (meter/rotate.py), from the environment:

    - GATEWAY_ACCESS_LOG: the log, as for the meter
    - METER_ROTATE_BYTES: rotate the log once it is past this size, default 268435456 (256 MiB)
    - METER_ROTATE_CHECK_S: how often to look, default 10
    - METER_METRICS_URL: the meter's /metrics, default http://127.0.0.1:9470/metrics
    - ENVOY_ADMIN_URL: Envoy's admin, default http://127.0.0.1:9901 (both on the pod's loopback)
    """

    access_log: Path
    rotate_bytes: int
    check_s: float
    meter_metrics_url: str
    envoy_admin_url: str

    @classmethod
    def from_env(cls) -> RotateSettings:
        state_dir = Path(env_str("GATEWAY_STATE_DIR", ".gateway"))
        return cls(
            access_log=Path(env_str("GATEWAY_ACCESS_LOG", str(state_dir / "access.log"))).absolute(),
            rotate_bytes=env_int("METER_ROTATE_BYTES", 256 * 1024 * 1024, minimum=1),
            check_s=env_int("METER_ROTATE_CHECK_S", 10, minimum=1),
            meter_metrics_url=env_str("METER_METRICS_URL", "http://127.0.0.1:9470/metrics"),
            envoy_admin_url=env_str("ENVOY_ADMIN_URL", "http://127.0.0.1:9901"),
        )
