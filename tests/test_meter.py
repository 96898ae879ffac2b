"""Tests for the meter against a real (embedded) PostgreSQL: in-process through `run_once` and `Meter`,
and as `python -m meter` subprocesses for kill -9, graceful stop and the metrics endpoint."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from control.migrate import apply_migrations
from control.net import free_port, wait_for_http
from extauth import hotstate
from meter import Meter, MeterSettings, run_once
from meter.metrics import OTHER, UsageLabels
from meter.parse import MAX_LINE_BYTES
from meter.tail import BATCH_BYTES, LogTailer
from tests.conftest import fresh_database
from tests.support import ROOT, wait_until


@pytest.fixture
def db(postgres_server: str) -> str:
    url = fresh_database(postgres_server)
    apply_migrations(url)
    return url


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "access.log"


def settings(db: str, log_path: Path, batch_lines: int = 500) -> MeterSettings:
    return MeterSettings(
        database_url=db, access_log=log_path, batch_lines=batch_lines, poll_seconds=0.02, metrics_listen=None
    )


AUTHZ_FIELDS = ("route", "decision", "error_code", "workspace_id", "key_id", "deployment_id", "destination", "model")
# Line fields of older formats, by their names in the `usage` object.
USAGE_FIELDS = {"response_model": "model", "prompt_tokens": "prompt_tokens", "completion_tokens": "completion_tokens",
                "usage_source": "source"}


def entry(request_id: str | None = None, **fields: Any) -> dict[str, Any]:
    line: dict[str, Any] = {
        "request_id": request_id or str(uuid.uuid4()),
        "start_time": "2026-11-24T11:25:01.123456Z",
        "method": "POST",
        "route": "/v1/chat/completions",
        "status": 200,
        "flags": "-",
        "decision": "allow",
        "error_code": None,
        "workspace_id": "ws_abc",
        "key_id": "key_abc",
        "deployment_id": "dep_abc",
        "destination": "runpod",
        "model": "demo-chat",
        "response_model": "demo-chat",
        "prompt_tokens": 12,
        "completion_tokens": 7,
        "usage_source": "final",
        "upstream_host": "127.0.0.1:5000",
        "duration_ms": 15,
        "ttfb_ms": 9,
        "bytes_received": 120,
        "bytes_sent": 640,
    }
    line.update(fields)
    # As envoy/envoy.yaml writes it: ext_authz's facts in one JSON object, absent ones left out; and
    # gateway.lua's metadata namespace in another (`usage`, null when gateway.lua set nothing).
    facts = {k: line.pop(k) for k in AUTHZ_FIELDS if k in line}
    line["authz"] = json.dumps({k: v for k, v in facts.items() if v is not None})
    figures = {name: line.pop(k) for k, name in USAGE_FIELDS.items() if k in line}
    namespace = {"usage": {k: v for k, v in figures.items() if v is not None}, "units": line.pop("units", None)}
    line["usage"] = {k: v for k, v in namespace.items() if v} or None
    return line


def append(path: Path, *lines: dict[str, Any] | bytes) -> None:
    with path.open("ab") as out:
        for line in lines:
            out.write(line if isinstance(line, bytes) else json.dumps(line).encode() + b"\n")


def numbered_entries(count: int, prefix: str) -> list[dict[str, Any]]:
    return [
        entry(f"{prefix}-{i}", prompt_tokens=i % 97, completion_tokens=i % 31, workspace_id=f"ws_{i % 3}")
        for i in range(count)
    ]


def query(db: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(db) as conn:
        return conn.execute(sql, params).fetchall()


def totals(db: str) -> tuple[int, int, int]:
    count, prompt, completion = query(
        db, "SELECT count(*), coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0) FROM usage_events"
    )[0]
    return count, prompt, completion


def expected_totals(entries: list[dict[str, Any]]) -> tuple[int, int, int]:
    return (
        len(entries),
        sum(((e["usage"] or {}).get("usage") or {}).get("prompt_tokens") or 0 for e in entries),
        sum(((e["usage"] or {}).get("usage") or {}).get("completion_tokens") or 0 for e in entries),
    )


def start_meter(db: str, log_path: Path, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "meter"],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": db, "GATEWAY_ACCESS_LOG": str(log_path), "METER_POLL_MS": "20", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_token_totals_are_exact(db: str, log_path: Path) -> None:
    entries = numbered_entries(2000, "req")
    aborted = entry("aborted-stream", flags="DC", prompt_tokens=None, completion_tokens=None, usage_source=None)
    failed = entry("upstream-error", status=503, flags="UF", prompt_tokens=None, completion_tokens=None)
    denied = entry("denied", status=429, decision="deny", prompt_tokens="-", completion_tokens="-")
    append(log_path, *entries, aborted, failed, denied)

    assert run_once(settings(db, log_path)) == 2003

    # The stream cut before any figure arrived is estimated from its body (120 bytes / 4), not zero.
    count, prompt, completion = expected_totals(entries)
    assert totals(db) == (count + 3, prompt + 30, completion)
    flagged = query(db, "SELECT request_id FROM usage_events WHERE usage_estimated")
    assert flagged == [("aborted-stream",)]
    assert query(db, "SELECT count(*) FROM meter_rejects") == [(0,)]
    (row,) = query(db, "SELECT start_time, status, flags, bytes_sent FROM usage_events WHERE request_id = 'req-5'")
    assert row[0].isoformat() == "2026-11-24T11:25:01.123456+00:00"
    assert row[1:] == (200, None, 640)


def test_replay_counts_nothing_twice(db: str, log_path: Path) -> None:
    entries = numbered_entries(300, "req")
    append(log_path, *entries, entries[7])  # the same request twice in the log
    config = settings(db, log_path, batch_lines=64)

    assert run_once(config) == 301
    assert run_once(config) == 0  # resumes at the stored offset
    with psycopg.connect(db) as conn:
        conn.execute("DELETE FROM meter_offsets")
    assert run_once(config) == 301  # every line read again...

    assert totals(db) == expected_totals(entries)  # ...and nothing counted twice


def test_sigterm_then_kill_9_mid_run_then_restart_records_each_request_once(
    db: str, log_path: Path, processes: list[subprocess.Popen[str]]
) -> None:
    entries = numbered_entries(50_000, "req")
    append(log_path, *entries)
    content = log_path.read_bytes()

    def recorded() -> int:
        count: int = query(db, "SELECT count(*) FROM usage_events")[0][0]
        return count

    def run_until(rows: int) -> subprocess.Popen[str]:
        meter = start_meter(db, log_path)
        processes.append(meter)
        wait_until(lambda: recorded() >= rows, 30, f"{rows} rows")
        return meter

    drained = run_until(5000)
    drained.send_signal(signal.SIGTERM)
    assert drained.wait(10) == 0
    # The batch under way was committed with its offset: the rows are exactly the lines before it.
    (offset,) = query(db, 'SELECT "offset" FROM meter_offsets')[0]
    assert recorded() == content[:offset].count(b"\n") < len(entries)

    killed = run_until(recorded() + 5000)
    killed.kill()
    killed.wait()
    assert recorded() < len(entries), "the meter finished before it was killed; the test proved nothing"

    finisher = start_meter(db, log_path)
    processes.append(finisher)
    wait_until(lambda: query(db, 'SELECT "offset" FROM meter_offsets') == [(len(content),)], 30, "the whole log")
    finisher.send_signal(signal.SIGTERM)
    assert finisher.wait(10) == 0

    assert totals(db) == expected_totals(entries)
    missing = {e["request_id"] for e in entries} - {r[0] for r in query(db, "SELECT request_id FROM usage_events")}
    assert not missing
    assert query(db, "SELECT count(*) FROM meter_rejects") == [(0,)]


def test_rotation_mid_run_loses_nothing(db: str, log_path: Path) -> None:
    rotated = log_path.with_name(log_path.name + ".1")
    before, late, after = numbered_entries(100, "old"), numbered_entries(50, "late"), numbered_entries(70, "new")
    with Meter.open(settings(db, log_path, batch_lines=32)) as meter:
        append(log_path, *before)
        assert meter.consume_available() == 100
        log_path.rename(rotated)
        append(rotated, *late)  # Envoy writes the old file until it reopens its log
        assert meter.consume_available() == 50
        append(log_path, *after)
        assert meter.consume_available() == 70

    assert totals(db) == expected_totals(before + late + after)
    (position,) = query(db, 'SELECT inode, "offset" FROM meter_offsets')
    assert position == (log_path.stat().st_ino, log_path.stat().st_size)


def test_a_failed_batch_stops_the_batches_after_it_and_nothing_is_lost(db: str, log_path: Path) -> None:
    """The next batch is parsed while one is written: when that write fails, the parsed batch after it
    must not be written either, and the stored position must match the rows on record."""
    entries = numbered_entries(200, "line")
    append(log_path, *entries)
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION refuse_line_130() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.request_id = 'line-130' THEN RAISE EXCEPTION 'refused for the test'; END IF; RETURN NEW; END $$"
        )
        conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON usage_events FOR EACH ROW EXECUTE FUNCTION refuse_line_130()"
        )
    with pytest.raises(psycopg.errors.RaiseException), Meter.open(settings(db, log_path, batch_lines=20)) as meter:
        meter.consume_available()
    # Batches 0-5 (lines 0-119) committed; the failed one (120-139) and all after it did not.
    assert totals(db) == expected_totals(entries[:120])
    offset = sum(len(json.dumps(e)) + 1 for e in entries[:120])
    assert query(db, 'SELECT "offset" FROM meter_offsets') == [(offset,)]

    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("DROP TRIGGER refuse ON usage_events")
    assert run_once(settings(db, log_path, batch_lines=20)) == 80
    assert totals(db) == expected_totals(entries)


def test_a_batch_of_long_lines_is_bounded_in_bytes(db: str, log_path: Path) -> None:
    long_entries = [entry(f"long-{i}", model="m" * 60_000) for i in range(300)]  # about 18 MiB
    append(log_path, *long_entries)
    tailer = LogTailer(log_path, None)
    try:
        sizes = []
        while (batch := tailer.next_batch(5000)) is not None:
            sizes.append(sum(len(line) + 1 for line in batch.lines))
    finally:
        tailer.close()
    assert len(sizes) > 1
    assert max(sizes) <= BATCH_BYTES + (1 << 20)
    assert sum(sizes) == log_path.stat().st_size


def test_rotation_while_stopped_finishes_the_rotated_file(db: str, log_path: Path) -> None:
    rotated = log_path.with_name(log_path.name + ".1")
    before, unread, after = numbered_entries(100, "old"), numbered_entries(20, "unread"), numbered_entries(30, "new")
    append(log_path, *before)
    assert run_once(settings(db, log_path)) == 100
    append(log_path, *unread)
    log_path.rename(rotated)
    append(log_path, *after)

    assert run_once(settings(db, log_path)) == 50

    assert totals(db) == expected_totals(before + unread + after)


def test_truncation_restarts_at_zero(db: str, log_path: Path) -> None:
    first, second, third = numbered_entries(100, "a"), numbered_entries(10, "b"), numbered_entries(5, "c")
    config = settings(db, log_path)
    with Meter.open(config) as meter:
        append(log_path, *first)
        assert meter.consume_available() == 100
        log_path.write_bytes(b"")  # copytruncate
        append(log_path, *second)
        assert meter.consume_available() == 10
    # And when the truncation happened while the meter was not running:
    log_path.write_bytes(b"")
    append(log_path, *third)
    assert run_once(config) == 5

    assert totals(db) == expected_totals(first + second + third)


def test_malformed_lines_are_kept_aside(db: str, log_path: Path) -> None:
    good = numbered_entries(4, "good")
    bad = [
        b"garbage\n",
        b'{"request_id": "cut", "status": 2\n',
        json.dumps(entry(None) | {"request_id": None}).encode() + b"\n",
        b"[1, 2]\n",
        json.dumps(entry("bad-tokens", prompt_tokens="lots")).encode() + b"\n",
        json.dumps(entry("huge-tokens", completion_tokens=2**40)).encode() + b"\n",
        json.dumps(entry("nul", model="demo\x00chat")).encode() + b"\n",
        b'{"request_id": "latin1", "model": "caf\xe9"}\n',
        json.dumps(entry("bad-time", start_time="yesterday")).encode() + b"\n",
        json.dumps(entry("bad-authz") | {"authz": "[1]"}).encode() + b"\n",
        json.dumps(entry("cut-authz") | {"authz": '{"workspace_id": "ws'}).encode() + b"\n",
    ]
    append(log_path, good[0], *bad[:5], good[1], good[2], *bad[5:], good[3])

    assert run_once(settings(db, log_path, batch_lines=4)) == len(good) + len(bad)

    assert totals(db) == expected_totals(good)
    rejects = query(db, 'SELECT "offset", line, reason FROM meter_rejects ORDER BY id')
    assert len(rejects) == len(bad)
    content = log_path.read_bytes()
    for (offset, line, _reason), raw in zip(rejects, bad, strict=True):
        assert content[offset : offset + len(raw)] == raw
        assert "\x00" not in line
    reasons = [reason for _offset, _line, reason in rejects]
    assert reasons[0].startswith("not JSON")
    assert reasons[2] == "missing request_id"
    assert reasons[3] == "not a JSON object"
    assert reasons[4].startswith("prompt_tokens:")
    assert reasons[5].startswith("completion_tokens:")
    assert "NUL" in reasons[6]
    assert reasons[7] == "not UTF-8"
    assert reasons[8].startswith("start_time:")
    assert reasons[9] == reasons[10] == "authz is not a JSON object"


def test_endless_line_is_rejected_in_pieces(db: str, log_path: Path) -> None:
    after = entry("after")
    append(log_path, b"x" * (MAX_LINE_BYTES + MAX_LINE_BYTES // 2) + b"\n", after)

    assert run_once(settings(db, log_path)) == 3

    reasons = query(db, 'SELECT "offset", length(line), reason FROM meter_rejects ORDER BY id')
    assert reasons[0] == (0, 8192, f"line longer than {MAX_LINE_BYTES} bytes")
    assert reasons[1][0] == MAX_LINE_BYTES and reasons[1][2].startswith("not JSON")
    assert totals(db) == expected_totals([after])


def test_partial_trailing_line_waits_for_its_newline(db: str, log_path: Path) -> None:
    done = numbered_entries(2, "done")
    pending = json.dumps(entry("pending")).encode() + b"\n"
    append(log_path, *done, pending[:40])
    config = settings(db, log_path)

    assert run_once(config) == 2
    assert run_once(config) == 0
    append(log_path, pending[40:])
    assert run_once(config) == 1

    assert query(db, "SELECT count(*) FROM meter_rejects") == [(0,)]
    assert totals(db) == expected_totals([*done, entry("pending")])


def _managed_deployments(conn: psycopg.Connection[Any]) -> None:
    """Two workspaces with a managed deployment of the same public name, priced apart, and one unpriced."""
    conn.execute("INSERT INTO workspaces (id, name, plan) VALUES ('ws_abc', 'abc', 'pro'), ('ws_other', 'o', 'pro')")
    conn.execute(
        "INSERT INTO deployments (id, workspace_id, public_name, model, modality, destination, state) VALUES"
        " ('dep_abc', 'ws_abc', 'demo-chat', 'org/a', 'llm', 'managed', 'ready'),"
        " ('dep_other', 'ws_other', 'demo-chat', 'org/b', 'llm', 'managed', 'ready'),"
        " ('dep_unpriced', 'ws_abc', 'other-model', 'org/c', 'llm', 'managed', 'ready')"
    )
    conn.execute("INSERT INTO deployment_prices (deployment_id, input_usd_per_mtok, output_usd_per_mtok) VALUES"
                 " ('dep_abc', 0.50, 1.50), ('dep_other', 2, 4)")


def test_cost_of_managed_rows_is_their_deployments_price(db: str, log_path: Path) -> None:
    with psycopg.connect(db) as conn:
        _managed_deployments(conn)
    managed = {"destination": "managed", "prompt_tokens": 1000, "completion_tokens": 3}
    append(
        log_path,
        entry("abc", **managed),
        entry("other", workspace_id="ws_other", deployment_id="dep_other", **managed),
        entry("byo", **(managed | {"destination": "runpod"})),
        entry("unpriced", model="other-model", deployment_id="dep_unpriced", **managed),
    )

    run_once(settings(db, log_path))

    costs = dict(query(db, "SELECT request_id, cost_usd FROM usage_events"))
    assert costs == {
        "abc": Decimal("0.000504500"),  # 1000 * 0.5 / 1e6 + 3 * 1.5 / 1e6
        "other": Decimal("0.002012000"),  # the same public name in another workspace: its own price
        "byo": Decimal("0"),
        "unpriced": Decimal("0"),
    }
    # The month's managed spend, kept with the rows (the start time's month, UTC).
    assert query(db, "SELECT workspace_id, month, spent_usd FROM workspace_spend ORDER BY 1") == [
        ("ws_abc", 202611, Decimal("0.000504500")), ("ws_other", 202611, Decimal("0.002012000"))]


def test_settling_releases_reservations_and_raises_the_spend_once(db: str, log_path: Path, redis_url: str) -> None:
    with psycopg.connect(db) as conn:
        _managed_deployments(conn)
        conn.execute("UPDATE workspaces SET spend_limit_usd = 1")
    client = redis.Redis.from_url(redis_url)
    spend, amounts, expiry = hotstate.spend_redis_keys("ws_abc")
    month = hotstate.month_tag(datetime.now(UTC))
    # Two reservations ext_authz made (and one of a request still running), as DECIDE_SCRIPT leaves them.
    client.hset(spend, mapping={"m": month, "p": 0, "r": 300})
    client.hset(amounts, mapping={"req-1": 100, "req-2": 100, "running": 100})
    client.zadd(expiry, {"req-1": 1, "req-2": 1, "running": 1})
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    managed = {"destination": "managed", "start_time": now, "prompt_tokens": 1000, "completion_tokens": 0}
    byo = entry("byo", **(managed | {"destination": "runpod"}))
    lines = [entry("req-1", **managed), entry("req-2", **managed), byo]
    append(log_path, *lines)
    config = dataclasses.replace(settings(db, log_path), redis_url=redis_url)

    run_once(config)
    state = {k.decode(): int(v) for k, v in client.hgetall(spend).items()}
    assert state == {"m": month, "p": 1000, "r": 100}  # 2 x 1000 tokens at $0.50/M = 1000 micro-USD
    assert client.hkeys(amounts) == [b"running"] and client.zrange(expiry, 0, -1) == [b"running"]

    # A replay (the log read again from the start) and a second meter change nothing.
    with psycopg.connect(db) as conn:
        conn.execute("DELETE FROM meter_offsets")
    run_once(config)
    append(log_path.with_name("other.log"), *lines)
    run_once(dataclasses.replace(config, access_log=log_path.with_name("other.log")))
    assert {k.decode(): int(v) for k, v in client.hgetall(spend).items()} == state
    assert query(db, "SELECT spent_usd FROM workspace_spend WHERE workspace_id = 'ws_abc'") == [(Decimal("0.001"),)]


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus text format to {(name, labels): value}."""
    with urllib.request.urlopen(url, timeout=5) as response:
        body = response.read().decode()
    series = {}
    for line in body.splitlines():
        if line.startswith("#") or not line:
            continue
        key, value = line.rsplit(" ", 1)
        name, _, labels = key.partition("{")
        pairs = (pair.split("=", 1) for pair in labels.rstrip("}").split(",") if pair)
        scoped = frozenset((k, v.strip('"')) for k, v in pairs if not k.startswith("otel_scope_"))
        series[(name, scoped)] = float(value)
    return series


def test_metrics_endpoint_and_graceful_stop(
    db: str, log_path: Path, processes: list[subprocess.Popen[str]]
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    meter = start_meter(db, log_path, METER_METRICS_LISTEN=f"127.0.0.1:{port}")
    processes.append(meter)
    assert meter.stdout is not None
    assert meter.stdout.readline().strip() == f"meter following {log_path}"
    assert wait_for_http(url, 10)
    append(
        log_path,
        entry("a", prompt_tokens=10, completion_tokens=5),
        entry("b", prompt_tokens=1, completion_tokens=2, model="other"),
        entry("c", status=503, prompt_tokens=None, completion_tokens=None),
        b"not json\n",
    )
    size = log_path.stat().st_size
    wait_until(lambda: query(db, 'SELECT "offset" FROM meter_offsets') == [(size,)], 10, "the lines to be recorded")
    lag = ("gateway_meter_lag_bytes", frozenset[tuple[str, str]]())
    wait_until(lambda: scrape(url).get(lag) == 0, 10, "the lag to reach 0")

    series = scrape(url)

    def usage(model: str, kind: str) -> float:
        labels = {"gen_ai_request_model": model, "gen_ai_token_type": kind, "workspace_id": "ws_abc"}
        return series[("gen_ai_client_token_usage_total", frozenset(labels.items()))]

    def requests(status_class: str) -> float:
        return series[("gateway_meter_requests_total", frozenset({("http_response_status_code", status_class)}))]

    assert (usage("demo-chat", "input"), usage("demo-chat", "output"), usage("other", "input")) == (10, 5, 1)
    assert (requests("2xx"), requests("5xx")) == (2, 1)
    assert series[("gateway_meter_lines_total", frozenset())] == 4
    assert series[("gateway_meter_malformed_lines_total", frozenset())] == 1

    meter.send_signal(signal.SIGTERM)
    assert meter.wait(10) == 0


def test_missing_tables_fail_with_a_clear_message(
    postgres_server: str, log_path: Path, processes: list[subprocess.Popen[str]]
) -> None:
    meter = start_meter(fresh_database(postgres_server), log_path)
    processes.append(meter)
    _out, err = meter.communicate(timeout=20)
    assert meter.returncode == 2
    assert "usage_events" in err and "migrations" in err


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("GATEWAY_ACCESS_LOG", "METER_BATCH_LINES", "METER_POLL_MS", "METER_METRICS_LISTEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATABASE_URL", "postgresql:///x")
    monkeypatch.setenv("GATEWAY_STATE_DIR", str(tmp_path))

    defaults = MeterSettings.from_env()
    assert (defaults.access_log, defaults.batch_lines, defaults.poll_seconds) == (tmp_path / "access.log", 5000, 0.2)
    assert defaults.metrics_listen is None

    monkeypatch.setenv("METER_METRICS_LISTEN", "127.0.0.1:9464")
    assert str(MeterSettings.from_env().metrics_listen) == "127.0.0.1:9464"


def test_usage_labels_fold_pairs_beyond_the_limit() -> None:
    labels = UsageLabels(limit=2)
    assert labels("ws_1", "m") == ("ws_1", "m")
    assert labels("ws_2", None) == ("ws_2", "unknown")
    assert labels("ws_3", "m") == (OTHER, OTHER)
    assert labels("ws_1", "m") == ("ws_1", "m")


@pytest.mark.parametrize("source", ["final", "partial", None])
def test_packed_facts_and_older_flat_lines_parse_alike(source: str | None) -> None:
    from meter.parse import UsageRecord, parse_line

    packed = entry("same-id", usage_source=source)
    figures = packed["usage"]["usage"]
    flat = {k: v for k, v in packed.items() if k not in ("authz", "usage")} | json.loads(packed["authz"]) | {
        k: figures.get(name) for k, name in USAGE_FIELDS.items()}
    records = [parse_line(json.dumps(line).encode()) for line in (packed, flat)]
    assert all(isinstance(r, UsageRecord) for r in records)
    assert records[0] == records[1]
    assert records[0].workspace_id == "ws_abc" and records[0].deployment_id == "dep_abc"


def test_every_fact_of_a_line_lands_in_its_own_column() -> None:
    """The record is built positionally (meter/parse.py): each value must sit under its own field name."""
    from meter.parse import UsageRecord, parse_line

    line = entry("req-1", destination="managed", model="asked", response_model="answered", status=201,
                 flags="DC", prompt_tokens=11, completion_tokens=22, usage_source="partial", duration_ms=33,
                 ttfb_ms=44, bytes_received=55, bytes_sent=66, units={"unit": "image", "quantity": 2,
                                                                       "detail": "512x512"})
    record = parse_line(json.dumps(line).encode())
    assert isinstance(record, UsageRecord)
    assert record._asdict() == {
        "request_id": "req-1", "start_time": datetime(2026, 11, 24, 11, 25, 1, 123456, tzinfo=UTC),
        "workspace_id": "ws_abc", "key_id": "key_abc", "deployment_id": "dep_abc", "destination": "managed",
        "route": "/v1/chat/completions", "model": "asked", "response_model": "answered", "status": 201,
        "flags": "DC", "prompt_tokens": 11, "completion_tokens": 22, "usage_estimated": False, "unit": "image",
        "quantity": 2.0, "unit_detail": "512x512", "duration_ms": 33, "ttfb_ms": 44, "bytes_received": 55,
        "bytes_sent": 66}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        # The upstream's final figures: exact, whatever the flags say.
        ({"usage_source": "final", "flags": "DC"}, (12, 7, False)),
        # Its cumulative figures as of a cut (client reset, HTTP/2 DR): kept, marked estimated.
        ({"usage_source": "partial", "flags": "DR"}, (12, 7, True)),
        # Content events counted, no prompt figure: the prompt from the body size (120 bytes / 4).
        ({"usage_source": "counted", "prompt_tokens": None, "completion_tokens": 3, "flags": "DC"}, (30, 3, True)),
        # Gone before the first byte (status 0) after reaching the endpoint: the prompt was still read.
        ({"usage_source": None, "status": 0, "prompt_tokens": None, "completion_tokens": None, "flags": "DC"},
         (30, 0, True)),
        # Never reached an endpoint, or answered with an error: a real zero.
        ({"usage_source": None, "status": 0, "upstream_host": None, "prompt_tokens": None,
          "completion_tokens": None}, (0, 0, False)),
        ({"usage_source": None, "status": 504, "flags": "UT", "prompt_tokens": None, "completion_tokens": None},
         (0, 0, False)),
        ({"usage_source": None, "destination": "local", "prompt_tokens": None, "completion_tokens": None},
         (0, 0, False)),
    ],
    ids=["final", "partial", "counted", "before-first-byte", "never-reached", "timed-out", "local"],
)
def test_best_figures_for_every_way_a_request_ends(fields: dict[str, Any], expected: tuple[int, int, bool]) -> None:
    from meter.parse import UsageRecord, parse_line

    record = parse_line(json.dumps(entry(**fields)).encode())
    assert isinstance(record, UsageRecord)
    assert (record.prompt_tokens, record.completion_tokens, record.usage_estimated) == expected


@pytest.mark.parametrize(("source", "expected"), [("partial", 41), ("counted", 41), ("final", 7)])
def test_a_streams_growing_count_written_beside_its_figures_is_the_one_billed(source: str, expected: int) -> None:
    """gateway.lua writes a stream's figures whole once, then only the count as it grows (cheaper for
    Envoy): a cut stream is billed the count its last chunk reached; the upstream's final figures win."""
    from meter.parse import UsageRecord, parse_line

    line = entry(usage_source=source, flags="DR")
    line["usage"]["completion_tokens"] = 41
    record = parse_line(json.dumps(line).encode())
    assert isinstance(record, UsageRecord)
    assert record.completion_tokens == expected and record.usage_estimated == (source != "final")


def test_releases_redis_could_not_take_are_retried_until_it_answers(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch whose spend releases fail (Redis restarting, a Cluster failover that outlasts redis-py's
    retry) keeps them and releases them on a later call, not only when the workspace's next batch comes."""
    from meter.parse import UsageRecord
    from meter.spend_settle import SpendSettlement

    calls: list[list[tuple[str, str]]] = []
    failures = [redis.ConnectionError("Redis is restarting")] * 3

    clients: list[Any] = []

    class FlakySettler:
        def __init__(self, client: Any) -> None:
            clients.append(client)

        def settle(self, db: Any, managed: list[tuple[str, str]]) -> None:
            calls.append(list(managed))
            if failures:
                raise failures.pop()

    def row(request_id: str, destination: str) -> UsageRecord:
        fields = dict.fromkeys(UsageRecord._fields)
        fields.update(request_id=request_id, workspace_id="ws_a", destination=destination, prompt_tokens=1,
                      completion_tokens=1, usage_estimated=False)
        return UsageRecord(**fields)

    from control import spend

    monkeypatch.setattr(spend, "Settler", FlakySettler)
    settlement = SpendSettlement(redis_url)
    try:
        settlement.settle(None, [row("r1", "managed"), row("r2", "runpod")])  # type: ignore[arg-type]
        assert settlement.unsettled == 1 and calls == [[("ws_a", "r1")]] * 2
        assert len(clients) == 2 and clients[0] is not clients[1]  # the next try starts on a new client
        settlement.retry(None)  # type: ignore[arg-type]  # the third failure, then an idle poll succeeds
        assert settlement.unsettled == 0 and calls[-1] == [("ws_a", "r1")] and len(calls) == 4
        settlement.retry(None)  # type: ignore[arg-type]  # nothing left: no call
        assert len(calls) == 4
    finally:
        settlement.close()


@pytest.mark.parametrize("usage", ["12", [12], {"usage": "12"}, {"usage": [12]}])
def test_a_usage_field_that_is_not_gateway_luas_object_is_rejected(usage: Any) -> None:
    from meter.parse import Reject, parse_line

    line = entry("odd-usage")
    line["usage"] = usage
    rejected = parse_line(json.dumps(line).encode())
    assert isinstance(rejected, Reject) and "usage is not a JSON object" in rejected.reason
