"""ext_authz settings, from the environment (documented in README, "Settings").

REDIS_URL names one Redis (redis://[[user]:password@]host[:port][/db], rediss:// for TLS) or a Redis
Cluster (redis+cluster://host:port[,host:port...], rediss+cluster:// for TLS): control/redisconn.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from control.env import HostPort, SettingsError, env_choice, env_hostport, env_int, env_opt, env_str
from extauth.custody import MIN_SECRET_CHARS
from extauth.reservation import ReservationPolicy


@dataclass(frozen=True)
class ExtauthSettings:
    listen: HostPort
    transport: str
    database_url: str
    redis_url: str
    master_key: str | None
    master_key_file: Path
    cache_size: int
    cache_ttl_s: int
    redis_timeout_ms: int
    redis_failure_mode: str
    metrics_listen: HostPort | None
    managed_api_key: str | None
    drain_s: float
    envoy_secret: str
    spend: ReservationPolicy
    check_budget_s: float

    @classmethod
    def from_env(cls) -> ExtauthSettings:
        database_url = env_opt("DATABASE_URL")
        redis_url = env_opt("REDIS_URL")
        if not database_url or not redis_url:
            raise SettingsError("ext_authz needs DATABASE_URL and REDIS_URL")
        state_dir = Path(env_str("GATEWAY_STATE_DIR", ".gateway"))
        metrics = env_opt("EXTAUTH_METRICS_LISTEN")
        secret = env_opt("GATEWAY_EXTAUTH_SECRET")
        # Never echoed: the error names the setting only.
        if secret is None or len(secret) < MIN_SECRET_CHARS:
            raise SettingsError(f"ext_authz needs GATEWAY_EXTAUTH_SECRET, at least {MIN_SECRET_CHARS} characters, "
                                "the same value Envoy has in its environment (README, \"Key custody\")")
        return cls(
            listen=env_hostport("EXTAUTH_LISTEN", "127.0.0.1:9001"),
            transport=env_choice("EXTAUTH_TRANSPORT", "http", ("http", "grpc")),
            database_url=database_url,
            redis_url=redis_url,
            master_key=env_opt("GATEWAY_MASTER_KEY"),
            master_key_file=Path(env_str("GATEWAY_MASTER_KEY_FILE", str(state_dir / "master.key"))),
            cache_size=env_int("EXTAUTH_CACHE_SIZE", 10_000, minimum=1),
            cache_ttl_s=env_int("EXTAUTH_CACHE_TTL_S", 300, minimum=1),
            redis_timeout_ms=env_int("EXTAUTH_REDIS_TIMEOUT_MS", 250, minimum=1),
            redis_failure_mode=env_choice("RATELIMIT_FAILURE_MODE", "closed", ("closed", "open")),
            metrics_listen=HostPort.parse(metrics, "EXTAUTH_METRICS_LISTEN") if metrics else None,
            managed_api_key=env_opt("GATEWAY_MANAGED_API_KEY"),
            drain_s=env_int("EXTAUTH_DRAIN_MS", 2000) / 1000,
            envoy_secret=secret,
            spend=ReservationPolicy(
                default_completion_tokens=env_int("EXTAUTH_SPEND_DEFAULT_COMPLETION_TOKENS", 4096, minimum=0),
                unsized_prompt_tokens=env_int("EXTAUTH_SPEND_UNSIZED_PROMPT_TOKENS", 32768, minimum=0),
                ttl_s=env_int("EXTAUTH_SPEND_RESERVATION_TTL_S", 3600, minimum=1),
            ),
            # envoy/envoy.yaml's per-try timeout of a check (its retry_back_off max_interval).
            check_budget_s=env_int("EXTAUTH_CHECK_BUDGET_MS", 500, minimum=1) / 1000,
        )
