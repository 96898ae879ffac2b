"""Small network helpers for starting local processes on free ports and waiting for them."""

from __future__ import annotations

import os
import random
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

# The exit status of a service that could not listen on its address (a port in use): the launcher
# stops the stack instead of restarting it. 98 is Linux's EADDRINUSE.
EXIT_CANNOT_LISTEN = 98


def port_taken(host: str, port: int) -> bool:
    """Whether something listens on host:port now. SO_REUSEADDR as the services themselves bind, so a
    port with only TIME_WAIT connections left counts as free."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def listens(pid: int, port: int) -> bool:
    """Whether process `pid` itself has a listening TCP socket on `port` (Linux: /proc). A port that is
    merely taken may be another process's, while the child that should hold it fails to bind and exits
    only a moment later."""
    sockets = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            sockets.add(target[8:-1])
    for table in ("tcp", "tcp6"):
        try:
            rows = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            # sl local_address rem_address st ... inode: st 0A is LISTEN
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port and fields[9] in sockets:
                return True
    return False


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Ports this process handed out: free again until whoever asked binds them, so not handed out twice
# (a stack's eight ports are picked before any is bound).
_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1", below: int = 0) -> int:
    """A port free now, chosen below the kernel's ephemeral range (by `below` more, for a server that
    also listens that much higher): a port the kernel handed out (bind to 0) is soon reused as the
    source port of some outgoing connection (Envoy opens many to ext_authz), and a listener started a
    moment later on it then fails with "address in use"."""
    floor = _ephemeral_floor() - below
    for _ in range(200):
        port = random.randrange(max(1024, floor - 12000), floor)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        if len(_handed_out) > 4000:  # bounded: the oldest picks are long bound or given up
            _handed_out.clear()
        _handed_out.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        fallback: int = sock.getsockname()[1]
        return fallback


def free_ports(count: int, host: str = "127.0.0.1") -> int:
    """The first of `count` consecutive ports that are free now (for replicas on consecutive ports)."""
    for _ in range(100):
        first = free_port(host)
        rest = range(first + 1, first + count)
        if any(port in _handed_out for port in rest):
            continue
        try:
            for port in rest:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.bind((host, port))
        except OSError:
            continue
        _handed_out.update(rest)
        return first
    raise OSError("no run of free ports")


def wait_for(check: Callable[[], bool], timeout_s: float, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)
    return True


def wait_for_port(host: str, port: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.02)
    return False


def wait_for_http(url: str, timeout_s: float, expect: bytes | None = None) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=0.5) as response:
                if expect is None or expect in response.read():
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.02)
    return False
