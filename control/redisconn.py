"""How `REDIS_URL` names the Redis every service shares, and the control plane's (and the meter's)
redis-py client for it.

  redis://[[user]:password@]host[:port][/db]        one server (rediss:// for TLS)
  redis+cluster://[[user]:password@]host:port[,host:port...]   a Redis Cluster (rediss+cluster:// for TLS)

A cluster URL lists seed nodes: any one reachable is enough, the slot map (CLUSTER SLOTS) names the rest.
A cluster has only database 0, so its URL takes no /db. Every key one check, one publish or one settle
touches carries its workspace as a hash tag (extauth/hotstate.py), so each call stays on one slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
import redis.cluster

from control.env import SettingsError

_SCHEMES = {"redis": (False, False), "rediss": (False, True),
            "redis+cluster": (True, False), "rediss+cluster": (True, True)}
_FORMS = ("REDIS_URL must look like redis://host:port/db, or redis+cluster://host:port[,host:port...] for a "
          "Redis Cluster (rediss:// and rediss+cluster:// for TLS)")


@dataclass(frozen=True)
class RedisTarget:
    seeds: tuple[tuple[str, int], ...]
    cluster: bool
    tls: bool
    user: str | None
    password: str | None
    db: int


def parse(url: str) -> RedisTarget:
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in _SCHEMES:
        raise SettingsError(_FORMS)
    cluster, tls = _SCHEMES[scheme]
    netloc, _, path = rest.partition("/")
    userinfo, _, hosts = netloc.rpartition("@")
    seeds = []
    for host_port in hosts.split(","):
        # urlsplit per seed: it knows IPv6 brackets and rejects a bad port.
        try:
            parts = urlsplit("redis://" + host_port)
            port = parts.port or 6379
        except ValueError:
            raise SettingsError(_FORMS) from None
        if not parts.hostname:
            raise SettingsError(_FORMS)
        seeds.append((parts.hostname, port))
    if len(seeds) > 1 and not cluster:
        raise SettingsError(_FORMS)
    db_text = path.partition("?")[0].strip("/")
    if db_text and not db_text.isdigit():
        raise SettingsError(_FORMS)
    db = int(db_text or 0)
    if cluster and db:
        raise SettingsError("a Redis Cluster has only database 0: leave the /db off a redis+cluster:// URL")
    user, has_password, password = userinfo.partition(":")
    return RedisTarget(tuple(seeds), cluster, tls, unquote(user) or None,
                       unquote(password) if has_password else None, db)


SyncRedis = redis.Redis | redis.RedisCluster
# What either client raises when Redis cannot serve a call (redis-py's cluster errors such as "no node
# serves this slot" are not RedisErrors).
ERRORS = (redis.RedisError, redis.exceptions.RedisClusterException)


def client(url: str, timeout_s: float = 2) -> SyncRedis:
    """redis.Redis for one server, redis.RedisCluster for a cluster (both take the calls made here:
    EVAL routed by its first key, pipelines without MULTI)."""
    target = parse(url)
    common: dict[str, Any] = {"username": target.user, "password": target.password, "ssl": target.tls,
                              "socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if target.cluster:
        seeds = [redis.cluster.ClusterNode(h, p) for h, p in target.seeds]  # type: ignore[no-untyped-call]
        return redis.RedisCluster(startup_nodes=seeds, **common)
    host, port = target.seeds[0]
    return redis.Redis(host=host, port=port, db=target.db, **common)
