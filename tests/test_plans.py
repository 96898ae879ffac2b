"""Plan rules over time and the Active tier (issue 18, items 3 to 5).

Plan changes on the billing cycle: the switch a running ext_authz makes at a pending downgrade's moment,
through fakes of its store and Redis (no reload, one script call) and in the script on a real Redis;
then through the real stack with the OpenAI SDK: a downgrade that takes effect at the billing boundary
on a running gateway, one forced with --now, an upgrade at once, a cancelled one. The clock is driven by
GATEWAY_CLOCK_OFFSET_S (the control plane believes it is a few seconds before the month's end), never by
sleeping to it. Starter workspaces can neither mint keys nor deploy. The Active tier: warm workers on the
managed destination only, its dry-run cost and its base fee in the usage report."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
import redis

from control import apikeys, usage, usage_html
from control.net import free_port, wait_for_port
from control.plans import PLANS, in_force
from control.settings import read_runtime
from control.spend import billing_month
from extauth import hotstate
from extauth.decision import ALLOW
from tests.conftest import Gateway, Simulator, Tenant, make_tenant, start_gateway
from tests.support import ROOT, call, decide_once, wait_until
from tests.test_deploy import posted, validate
from tests.test_redis_client import start_redis
from tests.test_spend_checks import TOKEN, WORKSPACE, FakeHot, FakeStore, check, checker, now_us

# The ext_authz side, through fakes.


@pytest.fixture()
def known_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(apikeys, "digest", lambda token: b"digest" if token == TOKEN else None)


class CountingStore(FakeStore):
    def __init__(self, workspace: Any) -> None:
        super().__init__(workspace)
        self.reloads = 0

    async def reload_workspace(self, workspace_id: str) -> Any:
        self.reloads += 1
        return self.ws


def test_the_plan_in_force_is_picked_by_comparing_the_time() -> None:
    assert in_force("pro", None, 0, 10**18) == "pro"
    assert in_force("pro", "starter", 1_000, 999) == "pro"
    assert in_force("pro", "starter", 1_000, 1_000) == "starter"


@pytest.mark.usefixtures("known_token")
def test_a_running_checker_switches_at_the_moment_without_reloading() -> None:
    switch = hotstate.PlanSwitch(now_us() + 600_000, 60, 60)
    store = CountingStore(replace(WORKSPACE, pending_plan="starter", switch=switch))
    hot = FakeHot()
    c = checker(hot, store)
    assert check(c, "own-chat").kind == ALLOW  # before the moment: pro's rules
    time.sleep(0.7)
    after = check(c, "own-chat")
    assert (after.status, after.error_code) == (403, "byoc_plan_required")
    assert "starter" in after.body
    # Managed traffic is not a bring-your-own rule: still served on starter.
    assert check(c, "managed-chat").kind == ALLOW
    assert store.reloads == 0 and len(hot.calls) == 3  # one script call a check, no database read


@pytest.mark.usefixtures("known_token")
def test_a_refresh_publishes_both_plans_limits_and_the_switch_time() -> None:
    switch = hotstate.PlanSwitch(now_us() + 10**9, 60, 60)
    raw: list[list[Any]] = []

    class Recording(FakeHot):
        async def decide(self, keys: Any, args: list[Any]) -> list[int]:
            raw.append(args)
            return await super().decide(keys, args)

    hot = Recording([hotstate.UNKNOWN, 0, 0, 0, 0, now_us(), 0])
    check(checker(hot, FakeStore(replace(WORKSPACE, pending_plan="starter", switch=switch))), "own-chat")
    refreshed = raw[1][len(hotstate.DECIDE_ARGS) + hot.calls[1]["key_fields_n"]:]
    published = dict(zip(refreshed[::2], refreshed[1::2], strict=True))
    assert (published["d"], published["c"]) == (500, 1000)
    assert (published["s"], published["sd"], published["sc"]) == (switch.at_us, 60, 60)


# The script on a real Redis: the hash carries both plans' limits and picks by Redis's clock.


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    port = free_port()
    with start_redis(tmp_path_factory.mktemp("plan-script"), port):
        assert wait_for_port("127.0.0.1", port, 10)
        yield port


def decide(port: int, ws: str, key_rpm: int | None, switch: hotstate.PlanSwitch | None) -> hotstate.Verdict:
    keys = hotstate.decide_keys("key_1", ws)
    refresh = switch is not None
    args = hotstate.decide_args(0, 1, 1, 202612, key_fields=hotstate.key_fields(1, False, key_rpm) if refresh else (),
                                workspace_fields=hotstate.workspace_fields(1, 500, 1000, None, switch)
                                if switch else ())

    return decide_once(port, keys, args)


def test_the_script_switches_limits_at_the_moment_on_redis_time(redis_port: int) -> None:
    first = decide(redis_port, "ws_plan_0", None, hotstate.NO_SWITCH)
    assert first.limit == 500  # no switch pending: the plan's default
    soon = hotstate.PlanSwitch(first.now_us + 400_000, 60, 60)
    assert decide(redis_port, "ws_plan_1", 800, soon).limit == 800  # the key's own limit, under pro's ceiling
    assert decide(redis_port, "ws_plan_2", None, soon).limit == 500
    time.sleep(0.5)
    assert decide(redis_port, "ws_plan_1", 800, None).limit == 60  # clamped to the lower plan's ceiling
    assert decide(redis_port, "ws_plan_2", None, None).limit == 60  # and its default
    # A cancelled switch (every field rewritten by a newer generation) is gone.
    keys = hotstate.decide_keys("key_1", "ws_plan_2")
    client = redis.Redis(port=redis_port)
    client.eval(hotstate.PUT_SCRIPT, 1, keys[1], *hotstate.workspace_fields(2, 500, 1000, None))
    assert client.hget(keys[1], "s") == b"0"
    client.close()


# Through the real stack: two ext_authz replicas behind Envoy, so "every running ext_authz" is two.


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, database_url: str, redis_url: str, simulator: Simulator
) -> Iterator[Gateway]:
    yield from start_gateway(tmp_path_factory.mktemp("gw-plans"), database_url, redis_url, simulator.url,
                             {"EXTAUTH_REPLICAS": "2"})


def refusals_by_replica(gateway: Gateway, code: str) -> list[int]:
    counts = []
    for url in read_runtime(gateway.state_dir)["extauth_metrics_urls"]:
        text = call("GET", url).body.decode()
        found = re.findall(rf'gateway_extauth_decisions_total\{{[^}}]*code="{code}"[^}}]*\}} (\d+)', text)
        counts.append(sum(int(n) for n in found))
    return counts


def ctl_at(gateway: Gateway, offset_s: int, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**gateway.env, "GATEWAY_CLOCK_OFFSET_S": str(offset_s)}
    return subprocess.run([sys.executable, "-m", "control.cli", *args, "--json"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def before_the_boundary(seconds: int) -> tuple[int, datetime]:
    """A clock offset that puts the control plane `seconds` before the month's end, and that end."""
    now = datetime.now(UTC)
    _start, end = billing_month(now)
    return int((end - now).total_seconds()) - seconds, end


def sdk(gateway: Gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0)


def rpm(gateway: Gateway, key: str) -> int:
    return int(sdk(gateway, key).models.with_raw_response.list().headers["x-ratelimit-limit"])


def byoc_refused(gateway: Gateway, t: Tenant) -> str | None:
    try:
        sdk(gateway, t.api_key).chat.completions.create(model=t.chat_model, messages=[{"role": "user",
                                                                                        "content": "hi"}])
    except openai.PermissionDeniedError as exc:
        return str(exc.code)
    return None


def error_code(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode != 0, done.stdout
    return str(json.loads(done.stderr)["error"]["code"])


def test_a_downgrade_takes_effect_at_the_billing_boundary_on_the_running_gateway(
    gateway: Gateway, simulator: Simulator
) -> None:
    t = make_tenant(gateway, simulator)
    gateway.ctl_json("keys", "set-limit", t.key_id, "800")
    assert rpm(gateway, t.api_key) == 800 and byoc_refused(gateway, t) is None
    pids = read_runtime(gateway.state_dir)["pids"]

    offset, end = before_the_boundary(6)
    effective = end.timestamp() - offset  # the boundary in real time: about 6 s from now
    done = ctl_at(gateway, offset, "workspace", "set-plan", t.workspace_id, "starter")
    assert done.returncode == 0, done.stderr
    pending = json.loads(done.stdout)
    assert (pending["plan"], pending["pending_plan"]) == ("pro", "starter")
    assert datetime.fromisoformat(pending["pending_plan_effective_at"]) == end  # the 1st, 00:00 UTC
    shown = json.loads(ctl_at(gateway, offset, "workspace", "show", t.workspace_id).stdout)
    assert (shown["plan"], shown["pending_plan"], shown["pending_plan_effective_at"]) == (
        "pro", "starter", pending["pending_plan_effective_at"])
    text = subprocess.run([sys.executable, "-m", "control.cli", "workspace", "show", t.workspace_id],
                          env={**gateway.env, "GATEWAY_CLOCK_OFFSET_S": str(offset)}, cwd=ROOT,
                          capture_output=True, text=True, timeout=60).stdout
    assert f"pending_plan_effective_at: {end.isoformat()}" in text

    # Until the boundary: pro's rules.
    assert rpm(gateway, t.api_key) == 800 and byoc_refused(gateway, t) is None
    assert time.time() < effective, "the machine was too slow to check before the boundary"

    # From the boundary on, with no further command: the lower plan's rules on the same processes.
    def switched() -> bool:
        time.sleep(0.25)  # paced well under either plan's rate limit
        return byoc_refused(gateway, t) == "byoc_plan_required"

    wait_until(switched, 15, "the downgrade to take effect")
    assert time.time() >= effective
    # Whichever replica decides: Envoy picks one per check at random (least request among two random
    # hosts), so four checks all went to one replica one time in eight; asked until both have answered.
    for _ in range(40):
        time.sleep(0.25)
        assert byoc_refused(gateway, t) == "byoc_plan_required"
        if all(refusals_by_replica(gateway, "byoc_plan_required")):
            break
    assert all(refusals_by_replica(gateway, "byoc_plan_required")), "each replica applied the downgrade"
    assert rpm(gateway, t.api_key) == PLANS["starter"].rpm_ceiling  # the key's 800 clamped
    assert read_runtime(gateway.state_dir)["pids"] == pids, "nothing was restarted"
    # Redis losing its data now (before any command has folded the change into the plan) changes
    # nothing: the hash is rebuilt from ext_authz's view, which carries the switch.
    flushed = redis.Redis.from_url(gateway.env["REDIS_URL"])
    flushed.flushall()
    flushed.close()
    assert rpm(gateway, t.api_key) == 60 and byoc_refused(gateway, t) == "byoc_plan_required"

    listed = {w["id"]: w for w in gateway.ctl_json("workspace", "list")["workspaces"]}
    assert listed[t.workspace_id]["plan"] == "starter"  # in force, before anything folded it in
    after = gateway.ctl_json("workspace", "show", t.workspace_id)
    assert (after["plan"], after["pending_plan"], after["can_mint_keys"]) == ("starter", None, False)
    assert error_code(gateway.ctl("keys", "create", t.workspace_id, "--json")) == "plan_required"
    assert [k["rpm_limit"] for k in gateway.ctl_json("keys", "list", t.workspace_id)["keys"]] == [60]


def test_a_downgrade_forced_with_now_and_an_upgrade_apply_at_once(gateway: Gateway, simulator: Simulator) -> None:
    t = make_tenant(gateway, simulator)
    assert rpm(gateway, t.api_key) == 500
    up = gateway.ctl_json("workspace", "set-plan", t.workspace_id, "team")
    assert (up["plan"], up["pending_plan"]) == ("team", None)
    assert rpm(gateway, t.api_key) == 5000

    # An upgrade drops a pending downgrade.
    assert gateway.ctl_json("workspace", "set-plan", t.workspace_id, "pro")["pending_plan"] == "pro"
    assert rpm(gateway, t.api_key) == 5000
    assert gateway.ctl_json("workspace", "set-plan", t.workspace_id, "enterprise")["pending_plan"] is None

    forced = gateway.ctl_json("workspace", "set-plan", t.workspace_id, "starter", "--now")
    assert (forced["plan"], forced["pending_plan"]) == ("starter", None)
    assert byoc_refused(gateway, t) == "byoc_plan_required" and rpm(gateway, t.api_key) == 60


def test_a_cancelled_downgrade_never_takes_effect(gateway: Gateway, simulator: Simulator) -> None:
    t = make_tenant(gateway, simulator)
    offset, end = before_the_boundary(3)
    effective = end.timestamp() - offset
    assert json.loads(ctl_at(gateway, offset, "workspace", "set-plan", t.workspace_id, "starter").stdout)[
        "pending_plan"] == "starter"
    cancelled = json.loads(ctl_at(gateway, offset, "workspace", "cancel-plan-change", t.workspace_id).stdout)
    assert (cancelled["plan"], cancelled["pending_plan"], cancelled["pending_plan_effective_at"]) == (
        "pro", None, None)
    wait_until(lambda: time.time() > effective + 0.5, 10, "the boundary to pass")
    assert byoc_refused(gateway, t) is None and rpm(gateway, t.api_key) == 500
    assert gateway.ctl_json("workspace", "show", t.workspace_id)["plan"] == "pro"
    again = gateway.ctl("workspace", "cancel-plan-change", t.workspace_id, "--json")
    assert error_code(again) == "no_pending_plan_change"


def test_a_starter_workspace_can_neither_mint_keys_nor_deploy(gateway: Gateway, simulator: Simulator) -> None:
    gateway.ctl_json("workspace", "create", "plans-starter", "--plan", "starter")
    keys = gateway.ctl("keys", "create", "plans-starter", "--json")
    assert error_code(keys) == "plan_required" and "upgrade to pro" in keys.stderr
    own = gateway.ctl("deploy", "plans-starter", "--model", "org/m", "--modality", "llm", "--json")
    assert error_code(own) == "byoc_plan_required" and "pro or above" in own.stderr
    for dry in ((), ("--dry-run",)):
        managed = gateway.ctl("deploy", "plans-starter", "--model", "org/m", "--modality", "llm", "--destination",
                              "managed", "--price-input", "1", "--price-output", "1", *dry, "--json")
        assert error_code(managed) == "plan_required" and "upgrade to pro" in managed.stderr
    assert gateway.ctl_json("deployments", "list", "plans-starter")["deployments"] == []


def test_active_tier_warm_workers_dry_run_cost_and_base_fee(
    gateway: Gateway, simulator: Simulator, tmp_path: Path
) -> None:
    t = make_tenant(gateway, simulator)
    managed = ("--destination", "managed", "--price-input", "1", "--price-output", "1")
    own = gateway.ctl("deploy", t.workspace_id, "--model", "org/m", "--modality", "llm", "--tier", "active",
                      "--json")
    assert error_code(own) == "active_tier_managed_only" and "--destination managed" in own.stderr
    flex = gateway.ctl("deploy", t.workspace_id, "--model", "org/m", "--modality", "llm", "--min-workers", "2",
                       *managed, "--json")
    assert error_code(flex) == "invalid_min_workers"
    too_many = gateway.ctl("deploy", t.workspace_id, "--model", "org/m", "--modality", "llm", "--tier", "active",
                           "--min-workers", "4", *managed, "--json")
    assert error_code(too_many) == "invalid_min_workers"

    simulator.clear()
    plan = gateway.ctl_json("deploy", t.workspace_id, "--model", "org/m", "--modality", "image", "--tier", "active",
                            "--min-workers", "2", "--gpu", "ADA_24", "--gpu", "AMPERE_16", *managed, "--dry-run")
    validate({**plan["endpoint"], "templateId": "t"}, "CreateEndpointRequest")
    assert plan["endpoint"]["workers"]["min"] == 2 and plan["tier"] == "active"
    # The dearest listed pool's fee (control/tier_fees.json), per warm worker.
    assert (plan["base_fee_usd_per_worker_month"], plan["base_fee_usd_month"]) == ("569.000000", "1138.000000")
    usage_estimate = Decimal(plan["usage_estimate_usd_month"])
    assert usage_estimate > 0
    assert Decimal(plan["projected_monthly_usd"]) == Decimal("1138") + usage_estimate
    text = gateway.ctl("deploy", t.workspace_id, "--model", "org/m", "--modality", "image", "--tier", "active",
                       "--min-workers", "2", "--gpu", "ADA_24", *managed, "--dry-run")
    assert "2 warm worker(s), base fee $569.00/month each" in text.stdout
    assert f"projected cost: ~${1138 + usage_estimate:.2f}/month = base fee $1138.00 + usage estimate" in text.stdout
    assert not [r for r in simulator.requests() if r["method"] == "POST"], "a dry run creates nothing"

    dep = gateway.ctl_json("deploy", t.workspace_id, "--model", "org/warm", "--modality", "llm", "--tier", "active",
                           "--name", "warm-chat", "--wait-timeout", "10", *managed)
    platform = [r["account_id"] for r in simulator.requests() if r["path"] == "/v2/serverless"][-1]
    [endpoint] = posted(simulator, platform, "/v2/serverless")
    validate(endpoint, "CreateEndpointRequest")
    assert endpoint["workers"]["min"] == 1 and dep["tier"] == "active" and dep["base_fee_usd_month"] == "569.000000"
    listed = {d["name"]: d for d in gateway.ctl_json("deployments", "list", t.workspace_id)["deployments"]}
    assert (listed["warm-chat"]["tier"], listed["warm-chat"]["min_workers"]) == ("active", 1)
    assert (listed[t.chat_model]["tier"], listed[t.chat_model]["min_workers"]) == ("flex", 0)
    reply = sdk(gateway, t.api_key).chat.completions.create(model="warm-chat", messages=[{"role": "user",
                                                                                          "content": "a b"}])
    assert reply.choices

    # Prorated per day from the day it first served: 20 to 24 November, at $569 / 30 a day.
    with gateway.context() as ctx:
        ctx.db.execute("UPDATE deployments SET billed_from = '2026-11-20T10:00:00Z' WHERE id = %s", (dep["id"],))
        result = usage.report(ctx, t.workspace_id, tmp_path, now=datetime(2026, 11, 24, 12, 0, tzinfo=UTC))
    nov, oct_, _sep = result["periods"]
    [fee] = nov["base_fees"]
    assert (fee["deployment_id"], fee["days"], fee["min_workers"], fee["monthly_usd"]) == (
        dep["id"], 5, 1, "569.000000")
    daily = {d["date"]: d for d in nov["daily"]}
    assert daily["2026-11-19"]["base_fee_usd"] == "0.000000" and daily["2026-11-25"]["base_fee_usd"] == "0.000000"
    assert {daily[f"2026-11-{n}"]["base_fee_usd"] for n in range(20, 25)} == {"18.966667"}
    assert fee["base_fee_usd"] == nov["base_fee_usd"] == "94.833335"
    assert Decimal(nov["total_usd"]) == Decimal(nov["cost_usd"]) + Decimal("94.833335")
    assert sum(Decimal(d["base_fee_usd"]) for d in nov["daily"]) == Decimal(nov["base_fee_usd"])
    assert (oct_["base_fee_usd"], oct_["base_fees"]) == ("0.000000", [])
    text_report = usage.render_text(result)
    assert f"base fee warm-chat ({dep['id']}, 1 warm): $94.833335 for 5 days at $569.00/month" in text_report
    page = usage_html.render(result, t.workspace_id)  # the HTML view charts the same figures
    assert "Active tier base fees (prorated per day)" in page and dep["id"] in page
    # The CLI's JSON carries it for the current period too.
    current = gateway.ctl_json("usage", t.workspace_id)["periods"][0]
    assert [f["deployment_id"] for f in current["base_fees"]] == [dep["id"]]
    assert Decimal(current["base_fee_usd"]) > 0
    # Torn down on the 22nd: charged to that day, included, and no further.
    gateway.ctl_json("teardown", dep["id"])
    with gateway.context() as ctx:
        ctx.db.execute("UPDATE deployments SET deleted_at = '2026-11-22T05:00:00Z' WHERE id = %s", (dep["id"],))
        gone = usage.report(ctx, t.workspace_id, tmp_path, now=datetime(2026, 11, 24, 12, 0, tzinfo=UTC))
    [fee] = gone["periods"][0]["base_fees"]
    assert (fee["days"], fee["base_fee_usd"]) == (3, "56.900001")


def test_migration_0006_keeps_every_deployment_flex_and_holds_its_rules(postgres_server: str) -> None:
    import psycopg

    from control.migrate import apply_migrations
    from tests.conftest import fresh_database

    url = fresh_database(postgres_server)
    assert any(name.startswith("0006") for name in apply_migrations(url))
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO workspaces (id, name, plan) VALUES ('ws_m', 'm', 'pro')")
        conn.execute("INSERT INTO deployments (id, workspace_id, public_name, model, modality, destination, state)"
                     " VALUES ('dep_old', 'ws_m', 'chat', 'org/m', 'llm', 'runpod', 'ready')")
        assert conn.execute("SELECT tier, min_workers, base_fee_usd_month FROM deployments").fetchone() == (
            "flex", 0, Decimal(0))
        with pytest.raises(psycopg.errors.CheckViolation):  # Active on a customer's own RunPod
            conn.execute("UPDATE deployments SET tier = 'active' WHERE id = 'dep_old'")
        with pytest.raises(psycopg.errors.CheckViolation):  # a pending plan without its moment
            conn.execute("UPDATE workspaces SET pending_plan = 'starter' WHERE id = 'ws_m'")
