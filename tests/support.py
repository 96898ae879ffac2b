"""Helpers the tests share: HTTP calls, free ports, and the processes a test starts for itself."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from control.net import wait_for

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Reply:
    status: int
    headers: Any
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def content_type(self) -> str:
        return str(self.headers.get("Content-Type", "")).split(";")[0]


def call(
    method: str,
    url: str,
    body: Any = None,
    key: str | None = None,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    for name, value in (headers or {}).items():
        req.add_header(name, value)
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return Reply(resp.status, resp.headers, resp.read())
    except urllib.error.HTTPError as err:
        with err:
            return Reply(err.code, err.headers, err.read())


def wait_until(predicate: Any, timeout_s: float = 10, what: str = "condition") -> None:
    if not wait_for(predicate, timeout_s, interval_s=0.02):
        raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def running(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A child process for the length of a block, stopped with SIGTERM (then SIGKILL) afterwards."""
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def envoy_copy(root: Path) -> Path:
    """An operator's editable copy of envoy/ (config and Lua side by side, as shipped); its envoy.yaml."""
    shutil.copytree(ROOT / "envoy", root / "envoy")
    return root / "envoy" / "envoy.yaml"


def decide_once(port: int, keys: Any, args: list[Any]) -> Any:
    """One call of the check's Redis script (extauth/hotstate.py) on the Redis at `port`, as ext_authz
    makes it; the parsed verdict."""
    import asyncio

    from extauth import hotstate
    from extauth.redis_client import ScriptClient

    async def run() -> list[int]:
        client = ScriptClient(f"redis://127.0.0.1:{port}/0", hotstate.DECIDE_SCRIPT, 1.0)
        try:
            return await client.decide(keys, args)
        finally:
            await client.close()

    return hotstate.parse_verdict(asyncio.run(run()))


@contextmanager
def checks_paused(state_dir: Path, seconds: float) -> Iterator[None]:
    """The stack's ext_authz replicas stopped (SIGSTOP) for `seconds` from now, as a loaded host or a
    long pause of theirs would leave them, while the body of the `with` runs; resumed whatever happens."""
    from control.settings import read_runtime

    pids = [pid for name, pid in read_runtime(state_dir)["pids"].items() if name.startswith("extauth-")]
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    resume = threading.Timer(seconds, lambda: [os.kill(pid, signal.SIGCONT) for pid in pids])
    resume.start()
    try:
        yield
    finally:
        resume.cancel()
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def render_on_placeholders(path: Path, transport: str = "http") -> Any:
    """`path` rendered as `gatewayctl up` would, on placeholder addresses: for the checks render makes."""
    from control import envoy_config
    from control.env import HostPort

    return envoy_config.render(path, listen=HostPort("127.0.0.1", 1), admin=HostPort("127.0.0.1", 2),
                               stats=HostPort("127.0.0.1", 3), extauth=[HostPort("127.0.0.1", 4)],
                               extauth_admin=[HostPort("127.0.0.1", 5)], transport=transport,
                               runpod_inference_url="http://x", managed_url="http://x",
                               access_log=path.parent / "access.log")
