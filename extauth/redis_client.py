"""The hot path's Redis client: one connection, every check's script call pipelined onto it.

redis-py spent more of a check's time than the decision itself (a connection checkout, command packing
and a reply parse per call). Here concurrent checks write into one buffer that is flushed once per
event-loop turn, so N checks in flight cost one write and usually one read, and replies are parsed by
hiredis's C reader. Replies come back in order, so a reply that does not arrive in time means the
connection is stuck: every call waiting on it fails (RedisUnavailable, timeout) and the next call
reconnects. URL forms: redis://[[user]:password@]host[:port][/db] and rediss:// for TLS.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import hiredis

from control.env import SettingsError


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


def _command(*parts: bytes | str | int) -> bytes:
    return b"*%d\r\n%s" % (len(parts), _bulk(parts))


# Encoded `EVALSHA <sha> <numkeys> <keys...>` prefixes kept: a check's keys are its API key's and
# workspace's, the same on every call, and encoding them was a tenth of a check's Python time.
_PREFIXES_KEPT = 4096


class _Connection(asyncio.Protocol):
    def __init__(self, client: ScriptClient) -> None:
        self._client = client
        self._reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            self._client.replied(self, reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._client.lost(self, RedisUnavailable("connection to Redis lost"))


class ScriptClient:
    """Runs one Lua script (by its SHA, loading it whenever Redis does not know it) on one connection."""

    def __init__(self, url: str, script: str, timeout_s: float) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss") or not parts.hostname:
            raise SettingsError("REDIS_URL must look like redis://host:port/db (or rediss:// for TLS)")
        self._host = parts.hostname
        self._port = parts.port or 6379
        self._tls = parts.scheme == "rediss"
        self._user = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        db = parts.path.strip("/")
        self._db = int(db) if db.isdigit() else 0
        self._script = script.encode()
        self._sha = hashlib.sha1(self._script).hexdigest().encode()
        self._timeout_s = timeout_s
        self._conn: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None
        # Calls written and not yet answered, oldest first: (future, deadline).
        self._pending: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._watchdog: asyncio.TimerHandle | None = None
        self._prefixes: dict[tuple[str, ...], bytes] = {}

    async def decide(self, keys: Sequence[str], args: list[Any]) -> list[int]:
        fixed = tuple(keys)
        prefix = self._prefixes.get(fixed)
        if prefix is None:
            if len(self._prefixes) >= _PREFIXES_KEPT:
                self._prefixes.clear()
            prefix = self._prefixes[fixed] = _bulk((b"EVALSHA", self._sha, len(fixed), *fixed))
        reply = await self._call(b"*%d\r\n%s%s" % (3 + len(fixed) + len(args), prefix, _bulk(args)))
        if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT"):
            # Redis restarted or its scripts were flushed: EVAL loads the script again.
            reply = await self._call(_command(b"EVAL", self._script, len(keys), *keys, *args))
        if isinstance(reply, hiredis.ReplyError):
            raise RedisUnavailable(f"Redis refused the script: {str(reply)[:200]}")
        if not isinstance(reply, list):
            raise RedisUnavailable("unexpected reply from Redis")
        return reply

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._conn is not None and self._conn.transport is not None:
            self._conn.transport.close()

    async def _call(self, command: bytes) -> Any:
        conn = self._conn if self._conn is not None else await self._connect()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((future, time.monotonic() + self._timeout_s))
        self._out.append(command)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush, conn)
        return await future

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
        try:
            _transport, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Connection(self),
                    self._host,
                    self._port,
                    ssl=ssl.create_default_context() if self._tls else None,
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
        if self._password is not None:
            auth = (self._user, self._password) if self._user else (self._password,)
            setup.append(self._call(_command(b"AUTH", *auth)))
        if self._db:
            setup.append(self._call(_command(b"SELECT", self._db)))
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
