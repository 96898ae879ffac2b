"""Dependencies dying under `gatewayctl up`: the embedded Redis and PostgreSQL are restarted like any
other child, the failure policy answers meanwhile (503 gateway_unavailable), and the stack recovers by
itself: no restart of Envoy, ext_authz or the launcher."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import psycopg
import pytest

from control.settings import read_runtime
from tests.conftest import Gateway, Simulator, Tenant, make_tenant, start_gateway
from tests.support import Reply, call, wait_until


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory, simulator: Simulator) -> Iterator[Gateway]:
    """A stack with its own embedded Redis and PostgreSQL (DATABASE_URL and REDIS_URL unset)."""
    yield from start_gateway(tmp_path_factory.mktemp("embedded"), "", "", simulator.url)


@pytest.fixture(scope="module")
def tenant_e(embedded: Gateway, simulator: Simulator) -> Tenant:
    return make_tenant(embedded, simulator)


def chat(gateway: Gateway, tenant: Tenant) -> Reply:
    return call("POST", f"{gateway.base_url}/chat/completions",
                {"model": tenant.chat_model, "messages": [{"role": "user", "content": "hi"}]}, key=tenant.api_key)


def accepts_connections(database_url: str) -> bool:
    try:
        psycopg.connect(database_url, connect_timeout=1).close()
    except psycopg.OperationalError:
        return False
    return True


def pids(gateway: Gateway) -> dict[str, int]:
    return dict(read_runtime(gateway.state_dir)["pids"])


def test_redis_killed_under_up_comes_back_without_a_restart_of_the_stack(embedded: Gateway, tenant_e: Tenant) -> None:
    assert chat(embedded, tenant_e).status == 200
    before = pids(embedded)
    os.kill(before["redis"], signal.SIGKILL)
    # Meanwhile the failure policy answers (RATELIMIT_FAILURE_MODE=closed): never an allowed request
    # without a rate limit, never an empty error.
    statuses = set()
    for _ in range(5):
        reply = chat(embedded, tenant_e)
        statuses.add(reply.status)
        if reply.status != 200:
            assert reply.status == 503 and reply.json()["error"]["code"] == "gateway_unavailable", reply.body
    wait_until(lambda: pids(embedded)["redis"] != before["redis"], 10, "Redis restarted")
    wait_until(lambda: chat(embedded, tenant_e).status == 200, 15, "requests to succeed again")
    after = pids(embedded)
    assert embedded.proc.poll() is None
    assert {k: v for k, v in after.items() if k != "redis"} == {k: v for k, v in before.items() if k != "redis"}
    assert chat(embedded, tenant_e).headers["x-ratelimit-limit"] == "500"
    assert "redis exited with -9; restarting it" in embedded.all_output()


def test_postgres_killed_under_up_comes_back_without_a_restart_of_the_stack(
    embedded: Gateway, tenant_e: Tenant, simulator: Simulator
) -> None:
    assert chat(embedded, tenant_e).status == 200
    before = pids(embedded)
    pid_file = embedded.state_dir / "postgres" / "data" / "postmaster.pid"
    postmaster_pid = int(pid_file.read_text().split()[0])
    os.kill(postmaster_pid, signal.SIGKILL)
    # Cached decisions keep serving while it is down; uncached ones get the failure policy.
    reply = chat(embedded, tenant_e)
    assert reply.status == 200 or reply.json()["error"]["code"] == "gateway_unavailable", reply.body
    wait_until(lambda: accepts_connections(read_runtime(embedded.state_dir)["database_url"]), 30,
               "PostgreSQL restarted")
    # The control plane works again (a new tenant needs the database), and so does its traffic.
    fresh = make_tenant(embedded, simulator)
    wait_until(lambda: chat(embedded, fresh).status == 200, 15, "a new workspace's requests to succeed")
    assert embedded.proc.poll() is None
    assert pids(embedded) == before
    assert "postgres exited; restarting it" in embedded.all_output()
