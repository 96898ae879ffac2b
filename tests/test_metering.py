"""Metering end to end: every request through Envoy becomes exactly one usage row whose tokens are what
the upstream reported, for JSON and streamed responses, through a meter crash and a log rotation."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import openai
import pytest

from control.settings import read_runtime
from tests.conftest import Gateway, Simulator, Tenant, make_tenant
from tests.support import call, wait_until


@pytest.fixture(scope="module")
def tenant(gateway: Gateway, simulator: Simulator) -> Tenant:
    t = make_tenant(gateway, simulator, plan="team")
    gateway.ctl_json("keys", "set-limit", t.key_id, "10000")
    return t


def rows(gateway: Gateway, workspace_id: str) -> dict[str, tuple[int, int, bool, int]]:
    with gateway.context() as ctx:
        found = ctx.db.execute(
            "SELECT request_id, prompt_tokens, completion_tokens, usage_estimated, status FROM usage_events"
            " WHERE workspace_id = %s", (workspace_id,)).fetchall()
    return {r[0]: (r[1], r[2], r[3], r[4]) for r in found}


def request_ids(gateway: Gateway, workspace_id: str) -> list[str]:
    return [line["request_id"] for line in gateway.access_log() if line.get("workspace_id") == workspace_id]


def sdk(gateway: Gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0)


def test_tokens_recorded_equal_what_the_upstream_sent(gateway: Gateway, tenant: Tenant) -> None:
    client = sdk(gateway, tenant.api_key)
    sent = []
    for i in range(5):
        words = " ".join(["w"] * (i + 1))
        reply = client.chat.completions.create(model=tenant.chat_model, messages=[{"role": "user", "content": words}])
        assert reply.usage is not None
        sent.append((reply.usage.prompt_tokens, reply.usage.completion_tokens))
        # Streamed, without asking for usage: the deployment forces it into the stream for the meter,
        # and the client gets the stream OpenAI would send (no usage, no `choices: []` chunk).
        content = words + " x"
        chunks = list(client.chat.completions.create(
            model=tenant.chat_model, messages=[{"role": "user", "content": content}], stream=True))
        assert not any(c.usage for c in chunks) and all(c.choices[0] for c in chunks)
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Echo: " + content
        sent.append((len(content.split()), len(content.split()) + 1))  # the simulator counts words
        # Asked for usage: exactly one usage chunk, the last, as OpenAI sends it.
        chunks = list(client.chat.completions.create(
            model=tenant.chat_model, messages=[{"role": "user", "content": words}], stream=True,
            stream_options={"include_usage": True}))
        [usage] = [c.usage for c in chunks if c.usage]
        assert chunks[-1].usage is usage and chunks[-1].choices == []
        assert all(c.choices for c in chunks[:-1])
        sent.append((usage.prompt_tokens, usage.completion_tokens))
    emb = client.embeddings.create(model=tenant.embedding_model, input=["a b c", "d"])
    sent.append((emb.usage.prompt_tokens, 0))

    wait_until(lambda: len(rows(gateway, tenant.workspace_id)) >= len(sent), 10, "the meter to catch up")
    recorded = rows(gateway, tenant.workspace_id)
    assert len(recorded) == len(sent) == len(set(request_ids(gateway, tenant.workspace_id)))
    assert sorted((p, c) for p, c, _est, _s in recorded.values()) == sorted(sent)
    assert not any(est for _p, _c, est, _s in recorded.values())


def test_aborted_stream_is_recorded_as_an_estimate(gateway: Gateway, simulator: Simulator) -> None:
    t = make_tenant(gateway, simulator)
    call("PATCH", f"{simulator.url}/_sim/endpoints/{t.deployments[t.chat_model]}", {"stream_delay_ms": 200})
    stream = sdk(gateway, t.api_key).chat.completions.create(
        model=t.chat_model, messages=[{"role": "user", "content": "one two three four five six"}], stream=True)
    next(iter(stream))
    stream.close()  # the client goes away mid-stream, before the usage chunk
    wait_until(lambda: len(rows(gateway, t.workspace_id)) == 1, 15, "the aborted request's row")
    [(_prompt, _completion, estimated, status)] = rows(gateway, t.workspace_id).values()
    assert estimated is True and status == 200


class Load:
    def __init__(self, gateway: Gateway, tenant: Tenant) -> None:
        self.count = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(gateway, tenant))

    def _run(self, gateway: Gateway, tenant: Tenant) -> None:
        body = {"model": tenant.chat_model, "messages": [{"role": "user", "content": "metered words"}]}
        # Paced under the key's 10,000/min (166/s once its burst is spent): a load that outruns its own
        # rate limit would count 429s as losses.
        while not self._stop.wait(0.01):
            reply = call("POST", f"{gateway.base_url}/chat/completions", body, key=tenant.api_key)
            self.count += 1
            self.failures += reply.status != 200

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture()
def fresh(gateway: Gateway, simulator: Simulator) -> Iterator[Tenant]:
    t = make_tenant(gateway, simulator, plan="team")
    gateway.ctl_json("keys", "set-limit", t.key_id, "10000")
    yield t


def all_metered(gateway: Gateway, t: Tenant) -> bool:
    ids = set(request_ids(gateway, t.workspace_id))
    return bool(ids) and ids == set(rows(gateway, t.workspace_id))


def test_kill_9_of_the_meter_mid_run_loses_nothing_and_counts_nothing_twice(
    gateway: Gateway, fresh: Tenant
) -> None:
    with Load(gateway, fresh) as load:
        time.sleep(1)
        for _ in range(2):
            pid = read_runtime(gateway.state_dir)["pids"]["meter"]
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda pid=pid: read_runtime(gateway.state_dir)["pids"]["meter"] != pid, 15, "meter restart")
            time.sleep(1)
    assert load.failures == 0 and load.count > 50
    # One row per request (request_id is the key, so none twice), and every request has its row.
    wait_until(lambda: len(rows(gateway, fresh.workspace_id)) == load.count, 20, "every request metered")
    wait_until(lambda: all_metered(gateway, fresh), 5, "the access log flushed")


def test_log_rotation_mid_run_loses_nothing(gateway: Gateway, fresh: Tenant) -> None:
    log = gateway.state_dir / "access.log"
    with Load(gateway, fresh) as load:
        time.sleep(1)
        os.rename(log, log.with_name("access.log.1"))
        assert call("POST", f"{gateway.admin}/reopen_logs").status == 200
        time.sleep(1.5)
    assert load.failures == 0
    rotated = [line for line in (log.with_name("access.log.1").read_text() + log.read_text()).splitlines() if line]
    assert rotated

    def metered() -> bool:
        return len(rows(gateway, fresh.workspace_id)) == load.count

    wait_until(metered, 20, "every request metered across the rotation")
