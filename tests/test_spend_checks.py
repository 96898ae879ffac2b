"""The spend limit's pieces without the stack: the Checker's decision order through fakes of HotState
and StateStore (what it asks the script for, what it answers), and the hot-state script itself against a
real Redis (reserve, refuse, expire, settle, deadline)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any, cast

import pytest
from opentelemetry.metrics import NoOpMeterProvider

from control import apikeys
from control.net import free_port, wait_for_port
from extauth import body_facts, hotstate
from extauth.checker import Checker
from extauth.decision import ALLOW, DENY
from extauth.metrics import ExtauthMetrics
from extauth.redis_client import RedisUnavailable
from extauth.reservation import ReservationPolicy
from extauth.state import CredentialEntry, DeploymentEntry, KeyEntry, WorkspaceEntry
from tests.support import decide_once
from tests.test_redis_client import start_redis

TOKEN = "gw-test-token"
KEY = KeyEntry("key_1", "ws_1", 1, False, None)
MANAGED = DeploymentEntry("dep_m", "managed-chat", "llm", "managed", "abc123", None, 0, 10.0, 1000.0)
UNPRICED = DeploymentEntry("dep_u", "unpriced", "llm", "managed", "abc124", None, 0)
BYOC = DeploymentEntry("dep_b", "own-chat", "llm", "runpod", "abc125", "acct", 0)
WORKSPACE = WorkspaceEntry(
    "ws_1", "pro", 1, 500, 1000, {d.public_name: d for d in (MANAGED, UNPRICED, BYOC)},
    CredentialEntry("acct", "rpa_secret", False), "{}", spend_limit_uusd=100_000, spent_uusd=0, month=202612,
)


class FakeStore:
    def __init__(self, workspace: WorkspaceEntry = WORKSPACE) -> None:
        self.ws = workspace

    async def key(self, key_hash: bytes) -> KeyEntry | None:
        return KEY

    async def reload_key(self, key_hash: bytes) -> KeyEntry | None:
        return KEY

    async def workspace(self, workspace_id: str) -> WorkspaceEntry | None:
        return self.ws

    async def reload_workspace(self, workspace_id: str) -> WorkspaceEntry | None:
        return self.ws


class FakeHot:
    """Answers each decide() with the next scripted reply (or raises it); keeps what it was asked."""

    def __init__(self, *replies: list[int] | Exception) -> None:
        self.replies = list(replies)
        self.calls: list[dict[str, Any]] = []
        self.sent: list[list[Any]] = []

    async def decide(self, keys: Sequence[str], args: list[Any]) -> list[int]:
        self.sent.append(args)
        self.calls.append({**hotstate.DECIDE_ARG_DEFAULTS, **dict(zip(hotstate.DECIDE_ARGS, args, strict=False))})
        reply = self.replies.pop(0) if self.replies else [hotstate.ALLOW, 500, 49, 0, 0, now_us(), 0]
        if isinstance(reply, Exception):
            raise reply
        return reply


def now_us() -> int:
    return time.time_ns() // 1000


def checker(hot: FakeHot, store: FakeStore | None = None, failure_mode: str = "closed") -> Checker:
    store = store or FakeStore()
    metrics = ExtauthMetrics(NoOpMeterProvider().get_meter("test"), cast(Any, store))
    return Checker(cast(Any, store), hot, failure_mode, metrics, "platform-key", ReservationPolicy(4096, 32768, 60))


def check(c: Checker, model: str, bytes: str = "", **facts: str) -> Any:
    """One check of a JSON body with this `model`, size and these other facts (`max_tokens`, `n`), as
    Envoy states them (extauth/body_facts.py)."""
    namespace = json.dumps({"model": model, **{name: int(value) for name, value in facts.items()}})
    all_headers = {"authorization": f"Bearer {TOKEN}", body_facts.HEADER: f"{bytes} {namespace}",
                   "content-type": "application/json", "x-request-id": "req-1"}
    return asyncio.run(c.check("POST", "/v1/chat/completions", all_headers))


@pytest.fixture(autouse=True)
def _known_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(apikeys, "digest", lambda token: b"digest" if token == TOKEN else None)


def test_a_managed_request_of_a_limited_workspace_reserves_its_estimate() -> None:
    hot = FakeHot()
    decision = check(checker(hot), "managed-chat", bytes="200", max_tokens="16")
    assert decision.kind == ALLOW
    [asked] = hot.calls
    # 200 body bytes at $10/M + 16 completion tokens at $1,000/M, in micro-USD.
    assert asked["reserve_uusd"] == 200 * 10 + 16 * 1000 and asked["request_id"] == "req-1"
    assert asked["reservation_ttl_s"] == 60 and asked["deadline_us"] > now_us()


def test_without_a_budget_the_default_completion_is_reserved() -> None:
    hot = FakeHot()
    check(checker(hot), "managed-chat", bytes="100")
    assert hot.calls[0]["reserve_uusd"] == 100 * 10 + 4096 * 1000


@pytest.mark.parametrize("model", ["own-chat", "missing", "unpriced"])
def test_nothing_is_reserved_for_requests_that_would_not_be_served_managed(model: str) -> None:
    hot = FakeHot()
    check(checker(hot), model, bytes="100")
    assert hot.calls[0]["reserve_uusd"] == 0 and hot.calls[0]["request_id"] == ""


def test_an_unlimited_workspace_reserves_nothing() -> None:
    hot = FakeHot()
    check(checker(hot, FakeStore(replace(WORKSPACE, spend_limit_uusd=None))), "managed-chat")
    assert hot.calls[0]["reserve_uusd"] == 0


def test_refused_by_the_limit_after_the_rate_limit_and_model_checks() -> None:
    refused = [hotstate.ALLOW, 500, 49, 0, 0, now_us(), hotstate.SPEND_REFUSED]
    decision = check(checker(FakeHot(refused)), "managed-chat")
    assert (decision.kind, decision.status, decision.error_code) == (DENY, 403, "plan_limit_exceeded")
    over_rate = [hotstate.OVER_LIMIT, 500, 0, 0, 1_000_000, now_us(), hotstate.SPEND_NONE]
    assert check(checker(FakeHot(over_rate)), "managed-chat").error_code == "rate_limit_exceeded"


def test_an_unpriced_managed_model_is_refused_with_how_to_price_it() -> None:
    decision = check(checker(FakeHot()), "unpriced")
    assert (decision.status, decision.error_code) == (403, "model_not_priced")
    assert "gatewayctl prices set" in decision.body


def test_missing_spend_state_is_rebuilt_from_the_database_view() -> None:
    hot = FakeHot([hotstate.UNKNOWN, 0, 0, 0, 0, now_us(), 0])
    assert check(checker(hot), "managed-chat").kind == ALLOW
    first, second = hot.calls
    assert first["spent_uusd"] == -1 and second["spent_uusd"] == WORKSPACE.spent_uusd
    assert second["month"] == WORKSPACE.month and second["key_fields_n"] == 6


def test_an_expired_reply_in_time_corrects_the_clock_and_retries_once() -> None:
    # Redis's clock is 10 s ahead of this host's: the first deadline looks past to it.
    ahead = now_us() + 10_000_000
    hot = FakeHot([hotstate.EXPIRED, 0, 0, 0, 0, ahead, 0])
    assert check(checker(hot), "own-chat").kind == ALLOW
    assert len(hot.calls) == 2 and hot.calls[1]["deadline_us"] > ahead
    twice = FakeHot(*[[hotstate.EXPIRED, 0, 0, 0, 0, now_us() + 10**9, 0]] * 2)
    assert check(checker(twice), "own-chat").error_code == "gateway_unavailable"


def test_failing_open_never_admits_past_a_spend_limit() -> None:
    down = RedisUnavailable("down")
    assert check(checker(FakeHot(down), failure_mode="open"), "own-chat").kind == ALLOW
    assert check(checker(FakeHot(down), failure_mode="open"), "managed-chat").error_code == "gateway_unavailable"


# The script itself, on a real Redis.


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int]]:
    port = free_port()
    with start_redis(tmp_path_factory.mktemp("spend-script"), port):
        assert wait_for_port("127.0.0.1", port, 10)
        yield port, port


def decide(port: int, ws: str, reserve: int, request_id: str, deadline_us: int = 0, ttl_s: int = 60,
           refresh: bool = False, spent: int = 0) -> hotstate.Verdict:
    keys = hotstate.decide_keys("key_1", ws)
    args = hotstate.decide_args(deadline_us, 1, 1, 202612, reserve, request_id, ttl_s,
                                spent if refresh else -1,
                                hotstate.key_fields(1, False, 6000) if refresh else (),
                                hotstate.workspace_fields(1, 6000, 6000, 1000) if refresh else ())

    return decide_once(port, keys, args)


def test_the_script_reserves_up_to_the_limit_and_settles_by_request_id(script: tuple[int, int]) -> None:
    import redis

    port, client = script
    ws = "ws_script_1"
    assert decide(client, ws, 400, "a").status == hotstate.UNKNOWN  # nothing published yet
    assert decide(client, ws, 400, "a", refresh=True, spent=100).spend == hotstate.SPEND_RESERVED
    assert decide(client, ws, 400, "b").spend == hotstate.SPEND_RESERVED  # 100 + 800 <= 1000
    assert decide(client, ws, 400, "c").spend == hotstate.SPEND_REFUSED  # 100 + 800 + 400 > 1000
    assert decide(client, ws, 0, "").spend == hotstate.SPEND_NONE  # not managed: untouched
    settle = redis.Redis(port=port).register_script(hotstate.SETTLE_SCRIPT)
    for _ in range(2):  # a replayed settle changes nothing more
        settle(keys=hotstate.spend_redis_keys(ws), args=[202612, 600, "a", "unknown-id"])
    spend_key = hotstate.spend_redis_keys(ws)[0]
    assert redis.Redis(port=port).hgetall(spend_key) == {b"m": b"202612", b"p": b"600", b"r": b"400"}
    # The figure only rises within a month: an older, lower sum does not undo it.
    settle(keys=hotstate.spend_redis_keys(ws), args=[202612, 300])
    assert redis.Redis(port=port).hget(spend_key, "p") == b"600"
    assert decide(client, ws, 400, "c").spend == hotstate.SPEND_REFUSED  # 600 + 400 + 400 > 1000
    settle(keys=hotstate.spend_redis_keys(ws), args=[202612, -1, "b"])
    assert decide(client, ws, 400, "c").spend == hotstate.SPEND_RESERVED  # 600 + 0 + 400 <= 1000


def test_a_lost_reservation_expires(script: tuple[int, int]) -> None:
    _port, client = script
    ws = "ws_script_2"
    assert decide(client, ws, 900, "lost", refresh=True, ttl_s=1).spend == hotstate.SPEND_RESERVED
    assert decide(client, ws, 900, "next").spend == hotstate.SPEND_REFUSED
    time.sleep(1.1)
    assert decide(client, ws, 900, "next").spend == hotstate.SPEND_RESERVED


def test_past_its_deadline_the_script_changes_nothing(script: tuple[int, int]) -> None:
    _port, client = script
    ws = "ws_script_3"
    fresh = decide(client, ws, 900, "x", refresh=True)
    late = decide(client, ws, 900, "y", deadline_us=fresh.now_us - 1)
    assert late.status == hotstate.EXPIRED and late.now_us >= fresh.now_us
    after = decide(client, ws, 0, "")
    assert after.remaining == fresh.remaining - 1  # the expired call took nothing from the bucket


def test_migration_0003_prices_each_live_managed_deployment_as_it_was_charged(postgres_server: str) -> None:
    import importlib.resources

    import psycopg

    from control.migrate import apply_migrations
    from tests.conftest import fresh_database

    url = fresh_database(postgres_server)
    files = importlib.resources.files("control.migrations")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
                     " applied_at timestamptz NOT NULL DEFAULT now())")
        for version, name in ((1, "0001_init.sql"), (2, "0002_usage.sql")):
            conn.execute(files.joinpath(name).read_text().encode())
            conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (version, name))
        conn.execute("INSERT INTO workspaces (id, name, plan) VALUES ('ws_a', 'a', 'pro'), ('ws_b', 'b', 'pro')")
        conn.execute(
            "INSERT INTO deployments (id, workspace_id, public_name, model, modality, destination, state) VALUES"
            " ('dep_named', 'ws_a', 'chat', 'org/a', 'llm', 'managed', 'ready'),"
            " ('dep_own', 'ws_b', 'chat', 'org/b', 'llm', 'managed', 'ready'),"
            " ('dep_none', 'ws_a', 'other', 'org/c', 'llm', 'managed', 'ready'),"
            " ('dep_byo', 'ws_a', 'mine', 'org/d', 'llm', 'runpod', 'ready')"
        )
        conn.execute("INSERT INTO model_prices VALUES ('model', 'chat', 1, 2), ('deployment', 'dep_own', 3, 4),"
                     " ('model', 'mine', 5, 6)")
        conn.execute(
            "INSERT INTO usage_events (request_id, start_time, workspace_id, destination, cost_usd) VALUES"
            " ('r1', '2026-11-30T23:59:59Z', 'ws_a', 'managed', 0.5), ('r2', '2026-12-01T00:00:01Z', 'ws_a',"
            " 'managed', 0.25), ('r3', '2026-12-01T00:00:02Z', 'ws_a', 'runpod', 0)"
        )
    assert any(name.startswith("0003") for name in apply_migrations(url))
    with psycopg.connect(url) as conn:
        prices = conn.execute("SELECT deployment_id, input_usd_per_mtok, output_usd_per_mtok FROM deployment_prices"
                              " ORDER BY 1").fetchall()
        spend = conn.execute("SELECT workspace_id, month, spent_usd FROM workspace_spend ORDER BY 2").fetchall()
        gone = conn.execute("SELECT to_regclass('model_prices')").fetchone()
    # Each deployment keeps what it was charged: its own price first, else its name's; unpriced stays so.
    assert [(d, int(i), int(o)) for d, i, o in prices] == [("dep_named", 1, 2), ("dep_own", 3, 4)]
    assert [(w, m, float(s)) for w, m, s in spend] == [("ws_a", 202611, 0.5), ("ws_a", 202612, 0.25)]
    assert gone == (None,)


@pytest.mark.parametrize("model", ["own-chat", "unpriced", "missing"])
def test_a_steady_check_that_reserves_nothing_sends_four_arguments(model: str) -> None:
    """What the Checker sends, not only what decide_args can send: a reservation's lifetime travels only
    with a reservation."""
    hot = FakeHot()
    check(checker(hot), model, bytes="100")
    assert [len(args) for args in hot.sent] == [4]


def test_a_check_that_neither_reserves_nor_refreshes_sends_four_arguments() -> None:
    """The script reads the others as DECIDE_ARG_DEFAULTS; every argument is encoded and parsed per check."""
    assert hotstate.decide_args(1, 2, 3, 202612) == [1, 2, 3, 202612]
    assert hotstate.decide_args(1, 2, 3, 202612, 0, "req", 3600) == [1, 2, 3, 202612]
    full = hotstate.decide_args(1, 2, 3, 202612, reserve_uusd=5, request_id="r", reservation_ttl_s=60)
    assert dict(zip(hotstate.DECIDE_ARGS, full, strict=True)) == {
        "deadline_us": 1, "key_generation": 2, "workspace_generation": 3, "month": 202612, "reserve_uusd": 5,
        "request_id": "r", "reservation_ttl_s": 60, "spent_uusd": -1, "key_fields_n": 0}
    assert len(hotstate.decide_args(1, 2, 3, 202612, spent_uusd=0)) == len(hotstate.DECIDE_ARGS)
