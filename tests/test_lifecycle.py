"""The RunPod lifecycle from the control plane: linking rules, master-key rotation, deploy retries after a
crash, status and teardown, against the RunPod simulator and the running gateway."""

from __future__ import annotations

import json
import secrets

import openai

from tests.conftest import Gateway, Simulator, make_tenant
from tests.support import call


def chat_ok(gateway: Gateway, key: str, model: str) -> bool:
    sdk = openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0)
    return bool(sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}]).choices)


def resources(simulator: Simulator, account_id: str) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    [account] = [a for a in simulator.state()["accounts"] if a["id"] == account_id]
    return account["templates"], account["endpoints"]


def test_linking_another_account_is_refused_while_deployments_live(gateway: Gateway, simulator: Simulator) -> None:
    t = make_tenant(gateway, simulator)
    other_key = "rpa_" + secrets.token_urlsafe(24)
    simulator.add_account("user_" + secrets.token_hex(6), other_key)
    refused = gateway.ctl("runpod", "link", t.workspace_id, "--json", stdin=other_key + "\n")
    error = json.loads(refused.stderr)["error"]
    assert error["code"] == "runpod_account_mismatch" and "live deployment" in error["message"]
    assert chat_ok(gateway, t.api_key, t.chat_model), "the stored key is untouched"
    for endpoint in list(t.deployments):
        dep_id = _deployment_id(gateway, t.workspace_id, endpoint)
        assert gateway.ctl_json("teardown", dep_id)["state"] == "deleted"
    assert gateway.ctl_json("runpod", "link", t.workspace_id, stdin=other_key + "\n")["rotated"] is True


def _deployment_id(gateway: Gateway, workspace_id: str, public_name: str) -> str:
    with gateway.context() as ctx:
        row = ctx.db.execute("SELECT id FROM deployments WHERE workspace_id = %s AND public_name = %s"
                             " AND state <> 'deleted'", (workspace_id, public_name)).fetchone()
    assert row is not None
    return str(row[0])


def test_invalid_key_stores_nothing(gateway: Gateway, simulator: Simulator) -> None:
    t = make_tenant(gateway, simulator)
    with gateway.context() as ctx:
        before = ctx.db.execute("SELECT ciphertext FROM runpod_credentials WHERE workspace_id = %s",
                                (t.workspace_id,)).fetchone()
    assert gateway.ctl("runpod", "link", t.workspace_id, stdin="rpa_wrong\n").returncode != 0
    with gateway.context() as ctx:
        after = ctx.db.execute("SELECT ciphertext FROM runpod_credentials WHERE workspace_id = %s",
                               (t.workspace_id,)).fetchone()
    assert before == after


def test_master_key_rotation_keeps_every_workspace_working(gateway: Gateway, simulator: Simulator) -> None:
    tenants = [make_tenant(gateway, simulator) for _ in range(2)]
    for t in tenants:
        assert chat_ok(gateway, t.api_key, t.chat_model)  # cached under the old version
    rotated = gateway.ctl_json("master-key", "rotate")
    assert rotated["resealed"] >= 2 and len(rotated["versions"]) >= 2
    for t in tenants:
        assert chat_ok(gateway, t.api_key, t.chat_model)
    retired = gateway.ctl_json("master-key", "rotate", "--retire-old")
    assert retired["versions"] == [retired["current_version"]]
    with gateway.context() as ctx:
        versions = {r[0] for r in ctx.db.execute("SELECT DISTINCT key_version FROM runpod_credentials")}
    assert versions == {retired["current_version"]}
    for t in tenants:
        assert chat_ok(gateway, t.api_key, t.chat_model)
    fresh = make_tenant(gateway, simulator)
    assert chat_ok(gateway, fresh.api_key, fresh.chat_model)


def test_deploy_retry_after_a_crash_leaves_exactly_one_of_each(gateway: Gateway, simulator: Simulator) -> None:
    t = make_tenant(gateway, simulator)
    # The endpoint create fails once, after the template was created: as if the deploy crashed there.
    call("POST", f"{simulator.url}/_sim/fail-next",
         {"path_contains": "/v2/serverless", "method": "POST", "status": 500})
    args = ("deploy", t.workspace_id, "--model", "org/other", "--modality", "llm", "--name", "retry-model",
            "--wait-timeout", "10")
    first = gateway.ctl(*args, "--json")
    assert first.returncode != 0
    templates, endpoints = resources(simulator, t.account_id)
    assert sum(1 for x in templates if "retry" not in json.dumps(x)) >= 0
    second = gateway.ctl_json(*args)
    assert second["state"] == "ready"
    templates, endpoints = resources(simulator, t.account_id)
    assert len(templates) == 3 and len(endpoints) == 3, "two from the tenant fixture, one from the retried deploy"
    assert chat_ok(gateway, t.api_key, "retry-model")


def test_status_reports_health_and_teardown_tolerates_gone_resources(gateway: Gateway, simulator: Simulator) -> None:
    t = make_tenant(gateway, simulator)
    dep_id = _deployment_id(gateway, t.workspace_id, t.chat_model)
    endpoint = t.deployments[t.chat_model]
    assert gateway.ctl_json("status", dep_id)["health"] == "ready"
    for knob, health in (("initializing", "initializing"), ("throttled", "throttled"), ("unhealthy", "unhealthy")):
        call("PATCH", f"{simulator.url}/_sim/endpoints/{endpoint}", {"health": knob})
        assert gateway.ctl_json("status", dep_id)["health"] == health
    # Deleted behind our back on RunPod: status says unreachable, teardown still succeeds.
    call("DELETE", f"{simulator.url}/v2/serverless/{endpoint}", key=t.runpod_key)
    assert gateway.ctl_json("status", dep_id)["health"] == "unreachable"
    assert gateway.ctl_json("teardown", dep_id)["state"] == "deleted"
    templates, endpoints = resources(simulator, t.account_id)
    assert all(e["id"] != endpoint for e in endpoints)
    assert len(templates) == 1  # only the embedding deployment's template is left


def test_dry_run_prints_the_plan_and_projected_cost_and_creates_nothing(
    gateway: Gateway, simulator: Simulator
) -> None:
    t = make_tenant(gateway, simulator)
    before = resources(simulator, t.account_id)
    plan = gateway.ctl_json("deploy", t.workspace_id, "--model", "org/big", "--modality", "llm", "--dry-run",
                            "--gpu", "ADA_24", "--gpu", "AMPERE_80", "--utilization", "0.25")
    assert plan["dry_run"] is True
    assert plan["template"]["env"]["MODEL_NAME"] == "org/big"
    assert plan["endpoint"]["workers"]["min"] == 0  # Flex: scales to zero
    # ADA_24 lists at $1.10 per hour in the simulator's catalog: per second, 30 days, a quarter of the time.
    # Money is a six-place decimal string; Flex carries no base fee, so the projection is the usage alone.
    assert plan["projected_monthly_usd"] == f"{round(1.10 / 3600 * 30 * 24 * 3600 * 0.25, 2):.6f}"
    assert [p["pool"] for p in plan["gpu_pools"]] == ["ADA_24", "AMPERE_80"]
    assert resources(simulator, t.account_id) == before
