"""An open-loop load generator: requests leave on a fixed schedule whatever the responses do, and each
latency is counted from the request's scheduled send time, so a stall shows up in every request it
delays (no coordinated omission, as in wrk2).

Run as its own process (`python -m bench.openloop SPEC.json`, prints one JSON line) so the harness's
own work never steals its interpreter. The schedule is kept by a thread sleeping with nanosleep, which
hands each due request to the event loop: the loop's own timers (libuv, and epoll's timeout) have a
whole-millisecond granularity, as coarse as the 1 ms interval being measured. How late requests left
their slot is reported too (`send_lag_*`), so a generator that cannot keep up is visible rather than
silently folded into the gateway's figures.

HTTP/1.1 keep-alive on a fixed pool of connections, one request in flight per connection; a request
due while every connection is busy waits for the first free one, and that wait is part of its latency.
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import threading
import time
from array import array
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, cast

import uvloop

DRAIN_S = 5.0


def response_end(buf: bytearray) -> tuple[int, int] | None:
    """(status, bytes) of the first complete response in `buf`, or None if it is not complete yet."""
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    head = bytes(buf[:head_end]).lower()
    status = int(head[9:12])
    body = head_end + 4
    at = head.find(b"\r\ncontent-length:")
    if at >= 0:
        line_end = head.find(b"\r\n", at + 2)
        end = body + int(head[at + 17 : line_end if line_end >= 0 else None])
        return (status, end) if len(buf) >= end else None
    if b"\r\ntransfer-encoding: chunked" in head:
        pos = body
        while True:
            line_end = buf.find(b"\r\n", pos)
            if line_end < 0:
                return None
            size = int(bytes(buf[pos:line_end]).split(b";")[0], 16)
            if size == 0:
                end = line_end + 4  # no trailers: the empty line right after the last chunk
                return (status, end) if len(buf) >= end else None
            pos = line_end + 2 + size + 2
            if len(buf) < pos:
                return None
    return status, body


@dataclass(frozen=True)
class Spec:
    host: str
    port: int
    path: str
    headers: dict[str, str]
    body: str
    rate: float
    seconds: float
    connections: int

    def request(self) -> bytes:
        body = self.body.encode()
        lines = [f"POST {self.path} HTTP/1.1", f"Host: {self.host}:{self.port}",
                 *(f"{k}: {v}" for k, v in self.headers.items()), f"Content-Length: {len(body)}"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class _Conn(asyncio.Protocol):
    def __init__(self, gen: Generator) -> None:
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.scheduled = 0.0
        self.sent = 0.0
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        self.buf += data
        while self.busy:
            done = response_end(self.buf)
            if done is None:
                return
            status, end = done
            del self.buf[:end]
            self.gen.completed(self, status, now)

    def connection_lost(self, exc: Exception | None) -> None:
        self.gen.lost(self)


class Generator:
    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.request = spec.request()
        self.idle: deque[_Conn] = deque()
        self.backlog: deque[float] = deque()
        self.latency = array("d")  # from the scheduled send time
        self.service = array("d")  # from the actual send time
        self.send_lag = array("d")
        self.statuses: Counter[int] = Counter()
        self.sent = 0
        self.errors = 0
        self.first_fire = 0.0
        self.last_fire = 0.0
        self.last_done = 0.0
        self._tasks: set[asyncio.Task[None]] = set()

    async def connect(self, count: int) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(count):
            _, proto = await loop.create_connection(lambda: _Conn(self), self.spec.host, self.spec.port)
            self.idle.append(proto)

    def fire(self, scheduled: float) -> None:
        now = time.perf_counter()
        if not self.sent:
            self.first_fire = now
        self.last_fire = now
        self.sent += 1
        self.send_lag.append(now - scheduled)
        if self.idle:
            self._send(self.idle.popleft(), scheduled, now)
        else:
            self.backlog.append(scheduled)

    def _send(self, conn: _Conn, scheduled: float, now: float) -> None:
        assert conn.transport is not None
        conn.scheduled, conn.sent, conn.busy = scheduled, now, True
        conn.transport.write(self.request)

    def completed(self, conn: _Conn, status: int, now: float) -> None:
        self.latency.append(now - conn.scheduled)
        self.service.append(now - conn.sent)
        self.statuses[status] += 1
        self.last_done = now
        conn.busy = False
        if self.backlog:
            self._send(conn, self.backlog.popleft(), now)
        else:
            self.idle.append(conn)

    def lost(self, conn: _Conn) -> None:
        if conn.busy:
            self.errors += 1
        if conn in self.idle:
            self.idle.remove(conn)
        task = asyncio.get_running_loop().create_task(self._replace())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _replace(self) -> None:
        try:
            await self.connect(1)
        except OSError:
            self.errors += 1
            return
        if self.backlog:
            self._send(self.idle.popleft(), self.backlog.popleft(), time.perf_counter())

    @property
    def outstanding(self) -> int:
        return self.sent - len(self.latency) - self.errors


def _tick(loop: asyncio.AbstractEventLoop, gen: Generator, start: float, interval: float, count: int) -> None:
    for i in range(count):
        due = start + i * interval
        wait = due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        loop.call_soon_threadsafe(gen.fire, due)


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return 0.0
    rank = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return sorted_values[rank]


def summary_ms(values: array[float], prefix: str) -> dict[str, float]:
    ordered = sorted(values)
    out = {f"{prefix}_p{label}_ms": percentile(ordered, q) * 1000
           for label, q in (("50", 0.5), ("90", 0.9), ("99", 0.99), ("999", 0.999))}
    out[f"{prefix}_max_ms"] = (ordered[-1] if ordered else 0.0) * 1000
    return out


async def run(spec: Spec) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    failures: list[str] = []

    def on_error(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        failures.append(str(context.get("exception") or context.get("message")))

    # A bug in a callback would otherwise only be logged, and its requests counted as the server's errors.
    loop.set_exception_handler(on_error)
    gen = Generator(spec)
    await gen.connect(spec.connections)
    count = max(1, int(spec.rate * spec.seconds))
    start = time.perf_counter() + 0.05
    # Collection pauses would land in the latencies; the hot path allocates no cycles.
    gc.disable()
    ticker = threading.Thread(target=_tick, args=(loop, gen, start, 1 / spec.rate, count), daemon=True)
    ticker.start()
    while ticker.is_alive():
        await asyncio.sleep(0.05)
    deadline = time.perf_counter() + DRAIN_S
    while gen.outstanding > 0 and time.perf_counter() < deadline:
        await asyncio.sleep(0.005)
    gc.enable()
    if failures:
        raise RuntimeError(f"the load generator failed: {failures[:3]}")
    completed = len(gen.latency)
    span = gen.last_done - start
    non_2xx = sum(n for status, n in gen.statuses.items() if not 200 <= status < 300)
    return {
        "offered_rps": spec.rate,
        "scheduled": count,
        "sent": gen.sent,
        "completed": completed,
        "errors": gen.errors + gen.outstanding,
        "non_2xx": non_2xx,
        "statuses": {str(k): v for k, v in sorted(gen.statuses.items())},
        "send_rps": (gen.sent - 1) / (gen.last_fire - gen.first_fire) if gen.sent > 1 else 0.0,
        "achieved_rps": completed / span if span > 0 else 0.0,
        **summary_ms(gen.latency, "latency"),
        **summary_ms(gen.service, "service"),
        **summary_ms(gen.send_lag, "send_lag"),
    }


def main(argv: list[str]) -> int:
    with open(argv[0], encoding="utf-8") as fh:
        spec = Spec(**json.load(fh))
    # The ticker thread must get the interpreter promptly when its sleep ends.
    sys.setswitchinterval(0.0002)
    result = uvloop.run(run(spec))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
