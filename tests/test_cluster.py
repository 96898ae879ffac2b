"""Beyond one machine: a real Redis Cluster of three masters (tests/redis_cluster.py) serving the whole
stack, and two complete gateway nodes (Envoy + ext_authz + meter, each on its own access log) on that one
Redis and one PostgreSQL with the same keys. The fleet admits what one node would, a revocation or plan
change is refused on both within a second, every request is metered once whichever node served it, and
a slot migration or a master failover in the middle of traffic is survived as extauth/redis_client.py
documents (redirections followed, nothing counted twice; an outage answered per RATELIMIT_FAILURE_MODE).
"""

from __future__ import annotations

import asyncio
import math
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from redis.crc import key_slot

from control import keys, workspaces
from extauth import hotstate
from extauth.redis_client import RedisUnavailable, ScriptClient
from tests.conftest import Gateway, Simulator, Tenant, make_tenant, start_gateway
from tests.redis_cluster import BUS_OFFSET, RedisClusterServers, cluster_port
from tests.support import wait_until

# A check's shape: several keys of one workspace, one counter taken per call.
COUNT_SCRIPT = "return {redis.call('INCR', KEYS[1]), redis.call('EXISTS', KEYS[2])}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    servers = RedisClusterServers(tmp_path_factory.mktemp("cluster"))
    try:
        servers.start(3)
        yield servers
    finally:
        servers.stop()


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, database_url: str, cluster: RedisClusterServers, simulator: Simulator
) -> Iterator[Gateway]:
    yield from start_gateway(tmp_path_factory.mktemp("gw-a"), database_url, cluster.url, simulator.url)


@pytest.fixture(scope="module")
def node_b(
    tmp_path_factory: pytest.TempPathFactory, gateway: Gateway, cluster: RedisClusterServers, simulator: Simulator
) -> Iterator[Gateway]:
    """A second complete node on the same cluster and database (its own Envoy, ext_authz and meter), with
    the fleet's one master keyring (a node with another could not open the stored RunPod keys) and the
    platform's one managed key."""
    yield from start_gateway(tmp_path_factory.mktemp("gw-b"), gateway.env["DATABASE_URL"], cluster.url, simulator.url,
                             {"GATEWAY_MASTER_KEY_FILE": str(gateway.state_dir / "master.key"),
                              "GATEWAY_MANAGED_API_KEY": gateway.env["GATEWAY_MANAGED_API_KEY"]})


@pytest.fixture(scope="module")
def tenant(gateway: Gateway, simulator: Simulator) -> Tenant:
    return make_tenant(gateway, simulator, plan="team")


def new_key(gateway: Gateway, tenant: Tenant, rpm: int) -> tuple[str, str]:
    with gateway.context() as ctx:
        key = keys.create(ctx, tenant.workspace_id, "cluster", rpm)
    return key["id"], key["key"]


def sdk(gw: Gateway, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.base_url, api_key=key, max_retries=0, timeout=10)


async def _chat(gw: Gateway, key: str, model: str) -> int:
    """One chat completion through the node's Envoy; its HTTP status."""
    try:
        async with sdk(gw, key) as client:
            await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
        return 200
    except openai.APIStatusError as err:
        return err.status_code


def burst(nodes: list[Gateway], key: str, model: str, n: int) -> tuple[list[int], float]:
    async def run() -> list[int]:
        return list(await asyncio.gather(*(_chat(nodes[i % len(nodes)], key, model) for i in range(n))))

    started = time.monotonic()
    statuses = asyncio.run(run())
    return statuses, time.monotonic() - started


def workspace_slot(workspace_id: str) -> int:
    return key_slot(workspace_id.encode())


def redirections(cluster: RedisClusterServers) -> dict[str, int]:
    """How many MOVED, ASK and TRYAGAIN replies the cluster's nodes have sent so far."""
    total = {"MOVED": 0, "ASK": 0, "TRYAGAIN": 0}
    for node in cluster.nodes:
        stats = node.client.info("errorstats")
        for kind in total:
            total[kind] += int(stats.get(f"errorstat_{kind}", {}).get("count", 0))
    return total


# The harness itself: a node counts as started only when it is up and it is ours.

@pytest.mark.parametrize("taken", ["bus port", "client port"])
def test_a_node_that_cannot_have_its_ports_is_not_counted_as_started(tmp_path: Path, taken: str) -> None:
    servers = RedisClusterServers(tmp_path)
    port = cluster_port()
    with socket.socket() as squatter:  # another test's server, accepting but never answering as Redis
        squatter.bind(("127.0.0.1", port + BUS_OFFSET if taken == "bus port" else port))
        squatter.listen()
        try:
            assert servers._start_on(port) is None
        finally:
            servers.stop()


def test_a_node_started_after_a_replicas_full_sync_starts_empty(tmp_path: Path) -> None:
    """The master writes an RDB file for the sync; a node started later in the same directory loaded it
    (another node's keys, and with them slots), and could not be made a replica."""
    servers = RedisClusterServers(tmp_path)
    try:
        servers.start(n_masters=1)
        master = servers.masters[0]
        master.client.set("some-key", "x")
        servers.add_replica(master)
        later = servers._start_node()
        assert later.client.dbsize() == 0
    finally:
        servers.stop()


# The hot-path client alone against the cluster.

def test_each_call_goes_to_its_slots_master_on_one_connection_per_master(cluster: RedisClusterServers) -> None:
    spaces = [f"ws_{i}" for i in range(30)]

    async def scenario() -> list[list[int]]:
        client = ScriptClient(cluster.url, COUNT_SCRIPT, 1.0)
        try:
            return list(await asyncio.gather(*(client.decide(hotstate.decide_keys("k", ws), []) for ws in spaces * 20)))
        finally:
            await client.close()

    replies = asyncio.run(scenario())
    assert sorted(r[0] for r in replies) == sorted(list(range(1, 21)) * 30)  # each counted once, in its slot
    served = {m.port: int(m.client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))
              + int(m.client.info("commandstats").get("cmdstat_eval", {}).get("calls", 0)) for m in cluster.masters}
    assert all(calls > 0 for calls in served.values()), served  # the workspaces spread over all three masters
    for ws in spaces:
        assert int(cluster.master_of(workspace_slot(ws)).client.get(hotstate.key_redis_key(ws, "k")) or 0) == 20


async def under_traffic(
    cluster: RedisClusterServers, keys_: Any, disrupt: Callable[[], Awaitable[None]]
) -> list[str]:
    """Four callers run the counting script on `keys_` while `disrupt` changes the cluster under them
    (0.3 s of traffic before and after); each call's outcome, "ok" or "unavailable"."""
    client = ScriptClient(cluster.url, COUNT_SCRIPT, 1.0)
    outcomes: list[str] = []
    done = asyncio.Event()
    stop = time.monotonic() + 60

    async def worker() -> None:
        while not done.is_set() and time.monotonic() < stop:
            try:
                await client.decide(keys_, [])
                outcomes.append("ok")
            except RedisUnavailable:
                outcomes.append("unavailable")
            await asyncio.sleep(0.002)

    tasks = [asyncio.ensure_future(worker()) for _ in range(4)]
    await asyncio.sleep(0.3)
    await disrupt()
    await asyncio.sleep(0.3)
    done.set()
    await asyncio.gather(*tasks)
    await client.close()
    return outcomes


def test_a_slot_migrating_under_traffic_loses_no_call_and_counts_none_twice(cluster: RedisClusterServers) -> None:
    ws = "ws_migrating"
    slot = workspace_slot(ws)
    keys_ = hotstate.decide_keys("k", ws)
    before = redirections(cluster)

    async def migrate() -> None:
        source = cluster.master_of(slot)
        target = next(m for m in cluster.masters if m is not source)
        await asyncio.to_thread(lambda: cluster.begin_migration(slot, target))
        await asyncio.sleep(0.05)  # checks meanwhile are sent on with ASK, or retried on TRYAGAIN
        await asyncio.to_thread(lambda: cluster.finish_migration(slot, source, target))
        # and then MOVED, then straight to the new owner

    outcomes = asyncio.run(under_traffic(cluster, keys_, migrate))
    # A migration shorter than EXTAUTH_REDIS_TIMEOUT_MS costs latency only, and every call ran once.
    assert outcomes.count("unavailable") == 0, outcomes.count("unavailable")
    after = redirections(cluster)
    assert after["ASK"] + after["TRYAGAIN"] > before["ASK"] + before["TRYAGAIN"]  # traffic met the migration
    assert after["MOVED"] > before["MOVED"]
    owner = cluster.master_of(slot)
    assert int(owner.client.get(keys_[0]) or 0) == outcomes.count("ok") > 0


def test_a_master_failover_under_traffic_is_followed(cluster: RedisClusterServers) -> None:
    ws = "ws_failover"
    slot = workspace_slot(ws)
    keys_ = hotstate.decide_keys("k", ws)
    replica = cluster.add_replica(cluster.master_of(slot))
    before = redirections(cluster)

    async def fail_over() -> None:
        await asyncio.to_thread(cluster.failover, replica)

    outcomes = asyncio.run(under_traffic(cluster, keys_, fail_over))
    assert cluster.master_of(slot).port == replica.port
    # A manual failover hands over without losing a write: the old master answers MOVED, never an error.
    assert outcomes.count("unavailable") == 0, outcomes.count("unavailable")
    assert int(replica.client.get(keys_[0]) or 0) == outcomes.count("ok") > 0
    assert redirections(cluster)["MOVED"] > before["MOVED"]  # the old master sent its callers on


# The whole stack on the cluster, two nodes.

def test_two_nodes_on_the_cluster_admit_exactly_what_one_would(
    gateway: Gateway, node_b: Gateway, tenant: Tenant
) -> None:
    rpm = 60  # burst 6, then one a second
    _key_id, key = new_key(gateway, tenant, rpm)
    statuses, elapsed = burst([gateway, node_b], key, tenant.chat_model, 30)
    admitted = statuses.count(200)
    assert set(statuses) == {200, 429}, statuses
    # Exactly the bucket's burst, plus what drained while the burst was sent.
    assert rpm // 10 <= admitted <= rpm // 10 + math.ceil(elapsed * rpm / 60), (admitted, elapsed)


def _refused_within(nodes: list[Gateway], key: str, model: str, statuses: set[int], within_s: float) -> float:
    """Seconds until every node refuses the request with one of `statuses` (asserting within `within_s`)."""
    started = time.monotonic()
    pending = list(nodes)
    while pending and time.monotonic() - started < within_s:
        pending = [gw for gw in pending if asyncio.run(_chat(gw, key, model)) not in statuses]
    assert not pending, f"still admitted on {len(pending)} node(s) after {within_s} s"
    return time.monotonic() - started


def test_a_revocation_and_a_plan_change_are_refused_on_both_nodes_within_a_second(
    gateway: Gateway, node_b: Gateway, simulator: Simulator
) -> None:
    t = make_tenant(gateway, simulator, plan="pro")
    other_key = new_key(gateway, t, 600)[1]
    for gw in (gateway, node_b):
        assert asyncio.run(_chat(gw, t.api_key, t.chat_model)) == 200
        assert asyncio.run(_chat(gw, other_key, t.chat_model)) == 200
    with gateway.context() as ctx:
        keys.revoke(ctx, t.key_id)
    _refused_within([gateway, node_b], t.api_key, t.chat_model, {401}, 1.0)
    with node_b.context() as ctx:  # the control plane may run anywhere; both nodes see it
        # starter: no bring-your-own-cloud deployments. Forced (--now): a downgrade otherwise waits for
        # the next billing period.
        workspaces.set_plan(ctx, t.workspace_id, "starter", now=True)
    _refused_within([gateway, node_b], other_key, t.chat_model, {403}, 1.0)


def test_usage_is_recorded_exactly_once_whichever_node_served_it(
    gateway: Gateway, node_b: Gateway, simulator: Simulator
) -> None:
    t = make_tenant(gateway, simulator, plan="team")
    statuses, _ = burst([gateway, node_b], t.api_key, t.chat_model, 20)
    assert statuses == [200] * 20

    def served() -> dict[str, set[str]]:
        return {gw.base_url: {line["request_id"] for line in gw.access_log()
                              if line.get("workspace_id") == t.workspace_id} for gw in (gateway, node_b)}

    wait_until(lambda: sum(map(len, served().values())) == 20, 10, "both access logs flushed")
    assert all(len(ids) == 10 for ids in served().values()), served()  # each node served its half, in its log
    every = set().union(*served().values())

    def recorded() -> list[str]:
        with gateway.context() as ctx:
            rows = ctx.db.execute("SELECT request_id FROM usage_events WHERE workspace_id = %s",
                                  (t.workspace_id,)).fetchall()
        return [r[0] for r in rows]

    wait_until(lambda: len(recorded()) >= 20, 15, "both meters recorded their node's requests")
    time.sleep(1)  # a second meter pass would have counted twice by now
    assert sorted(recorded()) == sorted(every)


def test_a_slot_migration_mid_traffic_keeps_the_bucket_exact(
    gateway: Gateway, node_b: Gateway, tenant: Tenant, cluster: RedisClusterServers
) -> None:
    rpm = 120  # burst 12, then two a second
    _key_id, key = new_key(gateway, tenant, rpm)
    slot = workspace_slot(tenant.workspace_id)
    source = cluster.master_of(slot)
    target = next(m for m in cluster.masters if m is not source)
    moved = threading.Event()

    def migrate() -> None:
        time.sleep(0.3)
        cluster.begin_migration(slot, target)
        cluster.finish_migration(slot, source, target)
        moved.set()

    mover = threading.Thread(target=migrate)
    mover.start()
    statuses, elapsed = burst([gateway, node_b], key, tenant.chat_model, 40)
    mover.join()
    assert moved.is_set() and cluster.master_of(slot).port == target.port
    # Closed failure mode: a check the migration outlasted would be a 503; none is, and none counted twice.
    assert set(statuses) <= {200, 429}, statuses
    admitted = statuses.count(200)
    assert rpm // 10 <= admitted <= rpm // 10 + math.ceil(elapsed * rpm / 60), (admitted, elapsed)
    # And the workspace's keys now live on the new owner, where the next checks go.
    assert asyncio.run(_chat(gateway, tenant.api_key, tenant.chat_model)) in (200, 429)
    assert target.client.exists(hotstate.workspace_redis_key(tenant.workspace_id))


def test_a_dead_master_fails_closed_until_its_replica_takes_over(
    gateway: Gateway, node_b: Gateway, simulator: Simulator, cluster: RedisClusterServers
) -> None:
    t = make_tenant(gateway, simulator, plan="team")
    slot = workspace_slot(t.workspace_id)
    master = cluster.master_of(slot)
    cluster.add_replica(master)
    for gw in (gateway, node_b):
        assert asyncio.run(_chat(gw, t.api_key, t.chat_model)) == 200
    cluster.kill(master, signal.SIGKILL)
    # RATELIMIT_FAILURE_MODE=closed (the default): while no master serves the slot, 503 on both nodes.
    assert {asyncio.run(_chat(gw, t.api_key, t.chat_model)) for gw in (gateway, node_b)} == {503}
    # Whichever of its replicas wins the election (an earlier test may have left it a second one).
    wait_until(lambda: cluster.master_of(slot) is not master and cluster.master_of(slot) in cluster.live, 30,
               "a replica promoted")
    for gw in (gateway, node_b):
        wait_until(lambda gw=gw: asyncio.run(_chat(gw, t.api_key, t.chat_model)) == 200, 10,  # type: ignore[misc]
                   "recovery on the promoted replica, without a restart")



def test_the_rotation_sidecar_keeps_the_log_bounded_and_loses_no_request(
    node_b: Gateway, gateway: Gateway, simulator: Simulator
) -> None:
    from control.settings import read_runtime
    from meter.rotate import rotate_once
    from meter.settings import RotateSettings

    t = make_tenant(gateway, simulator, plan="team")
    metrics_url = read_runtime(node_b.state_dir)["meter_metrics_url"]
    rotation = RotateSettings(node_b.state_dir / "access.log", 1, 1, metrics_url, node_b.admin)
    rotated = Path(str(rotation.access_log) + ".1")

    def recorded() -> int:
        with gateway.context() as ctx:
            row = ctx.db.execute("SELECT count(*) FROM usage_events WHERE workspace_id = %s",
                                 (t.workspace_id,)).fetchone()
        return int(row[0]) if row else 0

    assert burst([node_b], t.api_key, t.chat_model, 5)[0] == [200] * 5
    wait_until(lambda: recorded() == 5, 15, "the first requests metered")
    assert rotate_once(rotation) == ["rotated"] and rotated.exists()
    assert burst([node_b], t.api_key, t.chat_model, 5)[0] == [200] * 5  # into the reopened log
    wait_until(lambda: rotation.access_log.exists() and recorded() == 10, 15, "the requests after it metered")
    first = rotated.stat().st_ino
    wait_until(lambda: "deleted" in rotate_once(rotation), 15, "the read file deleted once the meter caught up")
    assert not rotated.exists() or rotated.stat().st_ino != first
    time.sleep(1)
    assert recorded() == 10  # nothing lost, nothing counted twice


def test_spend_reservations_hold_across_both_nodes_on_the_cluster(
    gateway: Gateway, node_b: Gateway, simulator: Simulator, cluster: RedisClusterServers
) -> None:
    from decimal import Decimal

    from tests.test_spend import COST, LIMIT, _one, make_spender, stream_delay, wait_recorded

    s = make_spender(gateway, simulator)
    stream_delay(simulator, s.endpoint_id, 60)  # ~1 s streams: all 30 overlap, half on each node

    async def run() -> list[str]:
        return list(await asyncio.gather(*(_one((gateway, node_b)[i % 2].base_url, s.keys[i % 3], s.model, True)
                                           for i in range(30))))

    outcomes = asyncio.run(run())
    admitted = outcomes.count("ok")
    assert 1 <= admitted <= 5 and set(outcomes) == {"ok", "plan_limit_exceeded"}, outcomes
    spent = wait_recorded(gateway, s.workspace_id, admitted)
    assert spent == Decimal(str(COST)) * admitted <= LIMIT
    spend_key = hotstate.spend_redis_keys(s.workspace_id)[0]
    owner = cluster.master_of(workspace_slot(s.workspace_id))
    wait_until(lambda: int(owner.client.hget(spend_key, "r") or 0) == 0, 10, "both meters settled on the cluster")
    assert int(owner.client.hget(spend_key, "p") or 0) == hotstate.uusd(spent)  # counted once
