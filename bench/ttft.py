"""Streamed time to first token: from sending a `stream: true` chat completion to the first SSE `data:`
event, through the gateway and straight to the upstream, alternating so that drift in the box's load
hits both alike. The connection is opened before the clock starts: TTFT is about the request, not TCP."""

from __future__ import annotations

import socket
import statistics
import time
from dataclasses import dataclass

from bench.procs import HarnessError


def request(port: int, path: str, bearer: str, body: str) -> bytes:
    data = body.encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {bearer}\r\n"
            f"Content-Type: application/json\r\nAccept: text/event-stream\r\nConnection: close\r\n"
            f"Content-Length: {len(data)}\r\n\r\n")
    return head.encode() + data


def first_event_seconds(port: int, raw: bytes) -> float:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.perf_counter()
        sock.sendall(raw)
        buf = b""
        first: float | None = None
        while True:
            data = sock.recv(65536)
            if not data:
                break
            buf += data
            if first is None:
                head_end = buf.find(b"\r\n\r\n")
                if head_end >= 0 and b"data:" in buf[head_end:]:
                    first = time.perf_counter()
    if not buf.startswith(b"HTTP/1.1 200") or first is None or b"[DONE]" not in buf:
        raise HarnessError(f"the stream on port {port} did not complete:\n{buf[:2000]!r}")
    return first - started


@dataclass(frozen=True)
class Ttft:
    direct_ms: float
    gateway_ms: float
    direct_p90_ms: float
    gateway_p90_ms: float
    samples: int


def measure(gateway: tuple[int, bytes], direct: tuple[int, bytes], samples: int, warmup: int = 3) -> Ttft:
    for _ in range(warmup):
        first_event_seconds(*gateway)
        first_event_seconds(*direct)
    through: list[float] = []
    straight: list[float] = []
    for _ in range(samples):
        through.append(first_event_seconds(*gateway))
        straight.append(first_event_seconds(*direct))
    through.sort()
    straight.sort()

    def p90(values: list[float]) -> float:
        return values[min(len(values) - 1, int(0.9 * len(values)))] * 1000

    return Ttft(statistics.median(straight) * 1000, statistics.median(through) * 1000, p90(straight), p90(through),
                samples)
