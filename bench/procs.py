"""The processes the harness starts, and what it reads about them from /proc.

Every child runs in its own session, so a terminal's Ctrl-C reaches only the harness, which then stops
them itself in reverse start order. `gatewayctl up` also puts each of its own children in a session of
their own: stopping it with SIGKILL would orphan them, so whatever is left of its process tree after it
exits is killed one by one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class HarnessError(Exception):
    """The harness itself cannot go on (as opposed to a figure missing its target)."""


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path


class Processes:
    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.children: list[Child] = []

    def spawn(self, name: str, argv: list[str], env: dict[str, str], cwd: Path = ROOT) -> Child:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        child = Child(name, proc, log)
        self.children.append(child)
        return child

    def run(self, name: str, argv: list[str], env: dict[str, str], timeout_s: float) -> str:
        """Run to completion (still stoppable by `stop_all`) and return its output."""
        log = self.logs / f"{name}.log"
        start = log.stat().st_size if log.exists() else 0
        child = self.spawn(name, argv, env)
        try:
            code = child.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.stop(child)
            raise HarnessError(f"{name} did not finish within {timeout_s:.0f} s; see {child.log}") from None
        finally:
            if child in self.children and child.proc.poll() is not None:
                self.children.remove(child)
        with child.log.open("rb") as fh:
            fh.seek(start)
            output = fh.read().decode(errors="replace")
        if code != 0:
            raise HarnessError(f"{name} exited with {code}:\n{tail(output)}")
        return output

    def stop(self, child: Child, grace_s: float = 20) -> None:
        tree = [(pid, _start_time(pid)) for pid in descendants(child.proc.pid)]
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
            try:
                child.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                _kill(child.proc.pid)
                child.proc.wait()
        for pid, started in tree:
            # Same start time, same process: a pid freed meanwhile may belong to someone else now.
            if started is not None and _start_time(pid) == started:
                _kill(pid)
        if child in self.children:
            self.children.remove(child)

    def stop_all(self) -> None:
        for child in reversed(list(self.children)):
            self.stop(child)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


def _start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def children_of(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    frontier = [pid]
    while frontier:
        nxt: list[int] = []
        for parent in frontier:
            nxt += children_of(parent)
        out += nxt
        frontier = nxt
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of one process so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may hold spaces and parentheses: count fields after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise HarnessError(f"no VmRSS for pid {pid}")


def wait_for_port(port: int, timeout_s: float, child: Child | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child is not None and child.proc.poll() is not None:
            raise HarnessError(f"{child.name} exited with {child.proc.returncode}:\n{tail(child.log.read_text())}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise HarnessError(f"nothing listened on port {port} within {timeout_s:.0f} s")


def tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:])
