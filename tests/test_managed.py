"""The managed destination: deployed on the platform's account, signed with the platform's key, priced
per token, and refused with 403 plan_limit_exceeded once a workspace reaches its monthly spend limit
(tests/test_spend.py holds the limit's bound under concurrency and outages)."""

from __future__ import annotations

import time

import openai
import pytest

from tests.conftest import Gateway, Simulator, make_tenant
from tests.support import wait_until


def test_managed_deploy_serves_every_modality_and_signs_with_the_platform_key(
    gateway: Gateway, simulator: Simulator
) -> None:
    t = make_tenant(gateway, simulator)
    for modality in ("llm", "embedding", "image", "speech", "voice"):
        # Tokens for llm and embedding; a price per image, character or audio second for the others.
        price = (["--price-input", "1", "--price-output", "1"] if modality in ("llm", "embedding")
                 else ["--price-per-unit", "0.01"])
        dep = gateway.ctl_json("deploy", t.workspace_id, "--model", f"org/{modality}", "--modality", modality,
                               "--name", f"managed-{modality}", "--destination", "managed", "--wait-timeout", "10",
                               *price)
        assert dep["state"] == "ready"
    simulator.clear()
    sdk = openai.OpenAI(base_url=gateway.base_url, api_key=t.api_key, max_retries=0)
    reply = sdk.chat.completions.create(model="managed-llm", messages=[{"role": "user", "content": "a b"}])
    assert reply.choices[0].message.content == "Echo: a b"
    [seen] = [r for r in simulator.requests() if "/openai/" in r["path"]]
    assert seen["headers"]["authorization"] == f"Bearer {gateway.env['GATEWAY_MANAGED_API_KEY']}"
    assert t.runpod_key not in str(seen)


def test_spend_limit_stops_managed_traffic_but_not_byoc(gateway: Gateway, simulator: Simulator) -> None:
    t = make_tenant(gateway, simulator)
    # $10 per million tokens both ways; each call below costs 7 tokens = $0.00007, and reserves its body's
    # bytes plus max_tokens at that price (~$0.001) while it runs.
    dep = gateway.ctl_json("deploy", t.workspace_id, "--model", "org/priced", "--modality", "llm",
                           "--name", "priced-chat", "--destination", "managed", "--wait-timeout", "10",
                           "--price-input", "1", "--price-output", "1")
    gateway.ctl_json("prices", "set", dep["id"], "--input", "10", "--output", "10")
    limit = gateway.ctl_json("workspace", "set-spend-limit", t.workspace_id, "0.0013")
    assert limit["at_limit"] is False
    sdk = openai.OpenAI(base_url=gateway.base_url, api_key=t.api_key, max_retries=0)

    def call_managed() -> None:
        sdk.chat.completions.create(model="priced-chat", messages=[{"role": "user", "content": "a b c"}],
                                    max_tokens=20)

    call_managed()  # the limit has room for one request's reservation at a time

    def refused() -> bool:
        try:
            call_managed()
        except openai.PermissionDeniedError as exc:
            assert exc.code == "plan_limit_exceeded"
            return True
        time.sleep(0.2)
        return False

    wait_until(refused, 30, "the spend to reach the limit")
    # Bring-your-own traffic is the customer's own RunPod bill: never capped here.
    assert sdk.chat.completions.create(model=t.chat_model, messages=[{"role": "user", "content": "x"}]).choices
    assert gateway.ctl_json("workspace", "set-spend-limit", t.workspace_id, "none")["at_limit"] is False
    call_managed()


@pytest.mark.parametrize("plan", ["starter"])
def test_byoc_plan_gate_does_not_apply_to_managed(gateway: Gateway, simulator: Simulator, plan: str) -> None:
    t = make_tenant(gateway, simulator)
    gateway.ctl_json("deploy", t.workspace_id, "--model", "org/m", "--modality", "llm", "--name", "managed-any",
                     "--destination", "managed", "--wait-timeout", "10", "--price-input", "1", "--price-output", "1")
    gateway.ctl_json("workspace", "set-plan", t.workspace_id, plan, "--now")
    sdk = openai.OpenAI(base_url=gateway.base_url, api_key=t.api_key, max_retries=0)
    assert sdk.chat.completions.create(model="managed-any", messages=[{"role": "user", "content": "x"}]).choices
