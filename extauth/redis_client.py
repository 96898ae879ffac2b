"""The hot path's Redis client: one connection per server, every check's script call pipelined onto it.

redis-py spent more of a check's time than the decision itself (a connection checkout, command packing
and a reply parse per call). Here concurrent checks write into one buffer per server that is flushed once
per event-loop turn, so N checks in flight cost one write and usually one read, and replies are parsed by
hiredis's C reader. Replies come back in order, so a reply that does not arrive in time means the
connection is stuck: every call waiting on it fails (RedisUnavailable, timeout) and the next call
reconnects. URL forms: control/redisconn.py.

Against a Redis Cluster each call goes to the master of its keys' slot (all of one check's keys share
it), on that master's one pipelined connection, so steady state stays one round trip. The slot map comes
from CLUSTER SLOTS, asked of any known node. A MOVED reply (resharding done, failover) points the slot at
the new master, resends there, and refreshes the whole map in the background; ASK (the slot is being
migrated and a key is not on the source) resends to the target after ASKING. While a slot migrates, a
check whose keys are not all on one side (a check always names its spend keys, which most workspaces never
create) is answered TRYAGAIN: it is resent every few milliseconds until EXTAUTH_REDIS_TIMEOUT_MS, then
fails like any Redis outage (RATELIMIT_FAILURE_MODE); a reshard that moves a slot within that time costs
its workspaces latency only. None of these replies ran the script, so resending never takes twice. A lost
connection or CLUSTERDOWN fails the call (RATELIMIT_FAILURE_MODE decides) and refreshes the map, so the
checks after a master's death reach its promoted replica.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Iterable, Sequence
from typing import Any, cast

import hiredis
from redis.crc import key_slot

from control.redisconn import RedisTarget, parse

SLOTS = 16384
# A call follows at most this many MOVED redirections before it gives up (a map changing under it).
_MAX_MOVED = 5
_TRYAGAIN_PAUSE_S = 0.005


class RedisUnavailable(Exception):
    """Redis could not answer: unreachable, timed out, or refused the command. Never carries a secret."""

    def __init__(self, reason: str, timeout: bool = False) -> None:
        super().__init__(reason)
        self.timeout = timeout


def _bulk(parts: Iterable[bytes | str | int]) -> bytes:
    out = []
    for part in parts:
        raw = part if isinstance(part, bytes) else str(part).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


def _arguments(args: Sequence[str | int]) -> bytes:
    """A script call's arguments (integers, and text that is ASCII but for a client's request id) as
    _bulk encodes them: formatted as one str and encoded once, a quarter less than encoding each."""
    out = []
    for arg in args:
        text = str(arg)
        out.append(f"${len(text)}\r\n{text}\r\n")
    joined = "".join(out)
    # A length above counts characters; it is the byte count only for ASCII.
    return joined.encode() if joined.isascii() else _bulk(args)


def _command(*parts: bytes | str | int) -> bytes:
    return b"*%d\r\n%s" % (len(parts), _bulk(parts))


_ASKING = _command(b"ASKING")
_CLUSTER_SLOTS = _command(b"CLUSTER", b"SLOTS")

# Encoded `EVALSHA <sha> <numkeys> <keys...>` prefixes kept (with the keys' slot): a check's keys are its
# API key's and workspace's, the same on every call, and encoding them was a tenth of a check's Python time.
_PREFIXES_KEPT = 4096


class _Connection(asyncio.Protocol):
    def __init__(self, node: _Node, loop: asyncio.AbstractEventLoop) -> None:
        self._node = node
        # Kept: asyncio.get_running_loop() makes a getpid() system call each time (fork safety), and a
        # check would make one per call.
        self.loop = loop
        self._reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            self._node.replied(self, reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._node.lost(self, RedisUnavailable("connection to Redis lost"))


class _Node:
    """One server: one connection, calls pipelined onto it, replies matched in order."""

    def __init__(self, host: str, port: int, target: RedisTarget, timeout_s: float) -> None:
        self.host, self.port = host, port
        self._target = target
        self._timeout_s = timeout_s
        self._conn: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None
        # Calls written and not yet answered, oldest first: (future, deadline).
        self._pending: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._watchdog: asyncio.TimerHandle | None = None

    def call(self, command: bytes) -> Awaitable[Any]:
        # Connected (steady state): the reply's future itself, without a coroutine around it per call.
        conn = self._conn
        return self._enqueue(conn, command) if conn is not None else self._call_connecting(command)

    async def _call_connecting(self, command: bytes) -> Any:
        return await self._enqueue(await self._connect(), command)

    async def call_asking(self, command: bytes) -> Any:
        """ASKING then the command, in one write: the server takes the command for a slot it imports."""
        conn = self._conn if self._conn is not None else await self._connect()
        results: tuple[Any, ...] = await asyncio.gather(self._enqueue(conn, _ASKING), self._enqueue(conn, command),
                                                  return_exceptions=True)
        # A reply error (hiredis.ReplyError) is a reply; only a failed call is raised.
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, hiredis.ReplyError):
                raise result
        return results[1]

    def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._conn is not None and self._conn.transport is not None:
            self._conn.transport.close()

    def _enqueue(self, conn: _Connection, command: bytes) -> asyncio.Future[Any]:
        loop = conn.loop
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((future, time.monotonic() + self._timeout_s))
        self._out.append(command)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush, conn)
        return future

    def _flush(self, conn: _Connection) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, []
        if conn is self._conn and conn.transport is not None and not conn.transport.is_closing():
            conn.transport.write(b"".join(out))
        # Otherwise the connection was lost since: lost() has already failed these calls.

    async def _connect(self) -> _Connection:
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        finally:
            if self._connecting is connecting and connecting.done():
                self._connecting = None

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        target = self._target
        try:
            _transport, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Connection(self, loop),
                    self.host,
                    self.port,
                    ssl=ssl.create_default_context() if target.tls else None,
                ),
                self._timeout_s,
            )
        except TimeoutError:
            raise RedisUnavailable("connecting to Redis timed out", timeout=True) from None
        except OSError as exc:
            raise RedisUnavailable(f"cannot connect to Redis ({exc.strerror or type(exc).__name__})") from None
        self._conn = conn
        self._arm_watchdog()
        setup = []
        if target.password is not None:
            auth = (target.user, target.password) if target.user else (target.password,)
            setup.append(self._enqueue(conn, _command(b"AUTH", *auth)))
        if target.db:
            setup.append(self._enqueue(conn, _command(b"SELECT", target.db)))
        for reply in await asyncio.gather(*setup):
            if isinstance(reply, hiredis.ReplyError):
                assert conn.transport is not None
                conn.transport.close()
                raise RedisUnavailable("Redis refused the connection's AUTH or SELECT")
        return conn

    def replied(self, conn: _Connection, reply: Any) -> None:
        if conn is not self._conn or not self._pending:
            return
        future, _deadline = self._pending.popleft()
        if not future.done():
            future.set_result(reply)

    def lost(self, conn: _Connection, error: RedisUnavailable) -> None:
        if conn is not self._conn:
            return
        self._conn = None
        pending, self._pending = self._pending, deque()
        for future, _deadline in pending:
            if not future.done():
                future.set_exception(error)

    def _arm_watchdog(self) -> None:
        # One timer for every call in flight: replies are in order, so only the oldest call's deadline
        # matters, checked a few times per timeout.
        loop = asyncio.get_running_loop()

        def check() -> None:
            conn = self._conn
            if conn is None:
                self._watchdog = None
                return
            if self._pending and self._pending[0][1] < time.monotonic():
                self.lost(conn, RedisUnavailable("Redis did not answer in time", timeout=True))
                if conn.transport is not None:
                    conn.transport.abort()
                self._watchdog = None
                return
            self._watchdog = loop.call_later(self._timeout_s / 4, check)

        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watchdog = loop.call_later(self._timeout_s / 4, check)


def _redirect(reply: hiredis.ReplyError) -> tuple[str, str, int] | None:
    """A MOVED or ASK error as (kind, host, port); None for any other error."""
    kind, _, rest = str(reply).partition(" ")
    if kind not in ("MOVED", "ASK"):
        return None
    host, _, port = rest.partition(" ")[2].rpartition(":")
    return kind, host, int(port)


def _consume(future: asyncio.Future[None]) -> None:
    # A background map refresh's outcome is the map itself; a failure leaves the old one to retry.
    if not future.cancelled():
        future.exception()


class ScriptClient:
    """Runs one Lua script (by its SHA, loading it whenever Redis does not know it) on one server, or on
    the slot's master of a Redis Cluster."""

    def __init__(self, url: str, script: str, timeout_s: float) -> None:
        self._target = parse(url)
        self._script = script.encode()
        self._sha = hashlib.sha1(self._script).hexdigest().encode()
        self._timeout_s = timeout_s
        self._nodes: dict[tuple[str, int], _Node] = {}
        host, port = self._target.seeds[0]
        self._single = None if self._target.cluster else self._node(host, port)
        # Cluster only: each slot's master (None until the first map, or for a slot no master serves).
        self._slots: list[_Node | None] = [None] * SLOTS
        self._mapping: asyncio.Future[None] | None = None
        self._prefixes: dict[tuple[str, ...], tuple[bytes, int]] = {}

    async def decide(self, keys: Sequence[str], args: list[Any]) -> list[int]:
        fixed = tuple(keys)
        entry = self._prefixes.get(fixed)
        if entry is None:
            if len(self._prefixes) >= _PREFIXES_KEPT:
                self._prefixes.clear()
            # The first key's slot is the call's: the hash tags put every other key in it too.
            slot = key_slot(fixed[0].encode()) if self._single is None else 0
            entry = self._prefixes[fixed] = (_bulk((b"EVALSHA", self._sha, len(fixed), *fixed)), slot)
        prefix, slot = entry
        command = b"*%d\r\n%s%s" % (3 + len(fixed) + len(args), prefix, _arguments(args))
        reply = await self._single.call(command) if self._single is not None else await self._routed(slot, command)
        if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT"):
            # Redis restarted or its scripts were flushed (or a master never saw it): EVAL loads it again.
            command = _command(b"EVAL", self._script, len(keys), *keys, *args)
            reply = await self._single.call(command) if self._single is not None else await self._routed(slot, command)
        if isinstance(reply, hiredis.ReplyError):
            raise RedisUnavailable(f"Redis refused the script: {str(reply)[:200]}")
        if not isinstance(reply, list):
            raise RedisUnavailable("unexpected reply from Redis")
        return reply

    async def close(self) -> None:
        if self._mapping is not None:
            self._mapping.cancel()
        for node in self._nodes.values():
            node.close()

    def _node(self, host: str, port: int) -> _Node:
        node = self._nodes.get((host, port))
        if node is None:
            node = self._nodes[(host, port)] = _Node(host, port, self._target, self._timeout_s)
        return node

    async def _routed(self, slot: int, command: bytes) -> Any:
        """One call on a cluster: to the slot's master, following redirections (none ran the script)."""
        node = self._slots[slot]
        if node is None:
            await asyncio.shield(self._remap())
            node = self._slots[slot]
            if node is None:
                raise RedisUnavailable("no Redis Cluster master serves this slot")
        asking: _Node | None = None
        moved = 0
        give_up = time.monotonic() + self._timeout_s
        while True:
            try:
                reply = await asking.call_asking(command) if asking is not None else await node.call(command)
            except RedisUnavailable:
                # The master may have died: the next calls find its replica once the map says so.
                self._remap()
                raise
            asking = None
            if not isinstance(reply, hiredis.ReplyError):
                return reply
            redirect = _redirect(reply)
            if redirect is not None:
                kind, host, port = redirect
                target = self._node(host or node.host, port)
                if kind == "ASK":
                    asking = target
                    continue
                moved += 1
                if moved > _MAX_MOVED:
                    raise RedisUnavailable("Redis Cluster redirected the call too many times")
                self._slots[slot] = node = target
                self._remap()
                continue
            message = str(reply)
            if message.startswith("TRYAGAIN"):
                if time.monotonic() + _TRYAGAIN_PAUSE_S > give_up:
                    raise RedisUnavailable("Redis Cluster is migrating this slot", timeout=True)
                await asyncio.sleep(_TRYAGAIN_PAUSE_S)
                continue
            if message.startswith(("CLUSTERDOWN", "MASTERDOWN")):
                self._remap()
                raise RedisUnavailable(f"Redis Cluster unavailable: {message[:100]}")
            return reply

    def _remap(self) -> asyncio.Future[None]:
        """The slot map's refresh under way, or a new one: one at a time, however many calls ask."""
        if self._mapping is None or self._mapping.done():
            self._mapping = asyncio.ensure_future(self._load_map())
            self._mapping.add_done_callback(_consume)
        return self._mapping

    async def _load_map(self) -> None:
        # Known masters first, then the URL's seeds: any node that answers knows the whole map.
        candidates = [*dict.fromkeys(n for n in self._slots if n is not None)]
        candidates += [self._node(h, p) for h, p in self._target.seeds if self._node(h, p) not in candidates]
        candidates += [n for n in self._nodes.values() if n not in candidates]
        for asked in candidates:
            try:
                reply = await asked.call(_CLUSTER_SLOTS)
            except RedisUnavailable:
                continue
            if not isinstance(reply, list):
                continue
            slots: list[_Node | None] = [None] * SLOTS
            for start, end, master, *_replicas in reply:
                # An empty host means "the address you asked me on".
                host = master[0].decode() if master[0] else asked.host
                node = self._node(host, int(master[1]))
                slots[int(start):int(end) + 1] = [node] * (int(end) - int(start) + 1)
            self._slots = slots
            return
        raise RedisUnavailable("no Redis Cluster node answered CLUSTER SLOTS")
