"""The README's quick start, run as written in a fresh clone: `make run` in one terminal, each command
it gives for the second terminal, then `make run` again on the same state directory, which reuses the
demo's workspace, models and key and leaves exactly one demo key active.

The clone is the checkout's tracked files (as `git clone` would bring them, with this working tree's
edits) and borrows the checkout's installed `.venv` through a symlink; `make -q install` proves the
clone would not reinstall into it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from control import demo
from control.net import free_port
from control.plans import PLANS
from control.settings import read_runtime
from extauth.ratelimit import burst
from tests.support import ROOT, wait_until


def quick_start_blocks() -> list[str]:
    """The README's quick-start commands: its indented blocks, in order."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    blocks: list[list[str]] = []
    current: list[str] | None = None
    previous_blank = True
    for line in section.splitlines():
        blank = not line.strip()
        if current is not None and (line.startswith("    ") or blank):
            current.append(line[4:])
        elif previous_blank and line.startswith("    "):
            current = [line[4:]]
            blocks.append(current)
        else:
            current = None
        previous_blank = blank
    return ["\n".join(b).strip("\n") + "\n" for b in blocks]


def fresh_clone(dest: Path) -> Path:
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in tracked.decode().split("\0"):
        source = ROOT / name
        if name and source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)  # keeps mtimes: make sees the install as up to date
    (dest / ".venv").symlink_to(ROOT / ".venv")
    return dest


def terminal_env() -> dict[str, str]:
    """A user's shell: none of this project's settings, except free ports through the documented ones."""
    prefixes = ("GATEWAY_", "EXTAUTH_", "METER_", "RUNPOD_", "RATELIMIT_")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(prefixes) and k not in ("DATABASE_URL", "REDIS_URL", "MAKEFLAGS", "MAKELEVEL")}
    for name in ("GATEWAY_LISTEN", "GATEWAY_ADMIN", "EXTAUTH_LISTEN", "EXTAUTH_METRICS_LISTEN",
                 "METER_METRICS_LISTEN"):
        env[name] = f"127.0.0.1:{free_port()}"
    return env


@contextmanager
def first_terminal(command: str, clone: Path, env: dict[str, str], console: Path) -> Iterator[str]:
    """`command` holding its terminal until Ctrl-C; yields its console once the stack is ready."""
    with console.open("wb") as out:
        proc = subprocess.Popen(["bash", "-c", command], cwd=clone, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    state_dir = clone / ".gateway"
    try:
        wait_until(lambda: read_runtime(state_dir).get("ready") or proc.poll() is not None, 60, "the demo")
        assert proc.poll() is None, console.read_text()
        yield console.read_text()
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        proc.wait(timeout=60)
    assert "stopped" in console.read_text()


def second_terminal(block: str, clone: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", block], cwd=clone, env=env, capture_output=True, text=True, timeout=60)


def gatewayctl(clone: Path, env: dict[str, str], *args: str) -> Any:
    done = subprocess.run([str(clone / ".venv" / "bin" / "gatewayctl"), *args, "--json"], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def demo_keys(clone: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    listed = gatewayctl(clone, env, "keys", "list", demo.WORKSPACE)["keys"]
    return [k for k in listed if k["name"] == demo.KEY_NAME and not k["revoked"]]


def test_the_quick_start_works_as_written_and_a_second_make_run_reuses_the_demo(tmp_path: Path) -> None:
    started = time.monotonic()
    os.chmod(tmp_path, 0o755)  # embedded PostgreSQL runs as its own user when the tests run as root
    clone = fresh_clone(tmp_path / "clone")
    env = terminal_env()
    assert subprocess.run(["make", "-q", "install"], cwd=clone, env=env).returncode == 0, \
        "the checkout's .venv is out of date: run `make install` first"

    run, *client_blocks = quick_start_blocks()
    assert re.fullmatch(r"make run\s*(#.*)?\n", run), run
    assert client_blocks and any("make demo-client" in b for b in client_blocks), client_blocks

    def run_clients() -> None:
        for block in client_blocks:
            done = second_terminal(block, clone, env)
            assert done.returncode == 0 and "Echo: Hello there" in done.stdout, (block, done.stdout, done.stderr)

    pro = PLANS[demo.PLAN]
    with first_terminal(run, clone, env, tmp_path / "run-1.out") as console:
        assert f"plan {demo.PLAN}" in console, console
        assert f"{pro.rpm_default} requests/min, bursts of {burst(pro.rpm_default)}" in console, console
        run_clients()
        [first_key] = demo_keys(clone, env)
        deployed = {d["name"]: d["id"] for d in gatewayctl(clone, env, "deployments", "list", "demo")["deployments"]}
        assert set(deployed) == {demo.CHAT_MODEL, demo.EMBEDDING_MODEL}
        # What earlier versions left behind: more active demo keys.
        leftover = gatewayctl(clone, env, "keys", "create", demo.WORKSPACE, "--name", demo.KEY_NAME)["id"]
    demo_env = (clone / ".gateway" / "demo.env").read_text()

    with first_terminal(run, clone, env, tmp_path / "run-2.out") as console:
        assert f"reusing key {first_key['id']}" in console, console
        assert f"revoked the earlier demo key {leftover}" in console, console
        assert [k["id"] for k in demo_keys(clone, env)] == [first_key["id"]], "exactly one active demo key"
        again = {d["name"]: d["id"] for d in gatewayctl(clone, env, "deployments", "list", "demo")["deployments"]}
        assert again == deployed, "the demo's deployments are reused, not re-created"
        assert [w["name"] for w in gatewayctl(clone, env, "workspace", "list")["workspaces"]] == [demo.WORKSPACE]
        run_clients()
    assert (clone / ".gateway" / "demo.env").read_text() == demo_env, "a configured client keeps working"

    # The simulator's endpoints lost (its state file gone): the demo replaces its deployments, same key.
    (clone / ".gateway" / "simulator-state.json").unlink()
    with first_terminal(run, clone, env, tmp_path / "run-3.out") as console:
        replaced = {d["name"]: d["id"] for d in gatewayctl(clone, env, "deployments", "list", "demo")["deployments"]}
        assert set(replaced) == set(deployed) and not set(replaced.values()) & set(deployed.values()), console
        assert [k["id"] for k in demo_keys(clone, env)] == [first_key["id"]]
        run_clients()

    stopped = second_terminal("make demo-client", clone, env)
    assert stopped.returncode != 0 and "is `make run` still running?" in stopped.stderr, stopped.stderr
    assert time.monotonic() - started < 90


def test_the_install_step_says_what_it_does(tmp_path: Path) -> None:
    """`make run`'s first install takes about a minute: it announces itself and pip shows its progress."""
    dry = subprocess.run(["make", "-n", "install", f"VENV={tmp_path / 'venv'}"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert "installing into" in dry and "about a minute" in dry, dry
    [project] = [line for line in dry.splitlines() if "-e '.[dev]'" in line]
    assert "--quiet" not in project and "-q" not in project.split(), project
