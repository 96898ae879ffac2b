"""What an operator finds with `gatewayctl` alone: workspaces, their deployments and keys listed, a
deployment named by the model name clients send (an ambiguous one refused with its candidates), and a
--help page with examples on every subcommand."""

from __future__ import annotations

import argparse
import re

import openai

from control import deployments
from control.cli import build_parser
from control.plans import PLANS
from extauth.ratelimit import burst
from tests.conftest import Gateway, Simulator, make_tenant
from tests.support import wait_until


def test_workspace_list_and_show_by_name(gateway: Gateway, simulator: Simulator) -> None:
    t = make_tenant(gateway, simulator, name="lists-acme")
    gateway.ctl_json("workspace", "set-spend-limit", "lists-acme", "25")
    listed = {w["name"]: w for w in gateway.ctl_json("workspace", "list")["workspaces"]}
    assert listed["lists-acme"]["id"] == t.workspace_id
    assert (listed["lists-acme"]["plan"], listed["lists-acme"]["active_keys"],
            listed["lists-acme"]["live_deployments"]) == ("pro", 1, 2)

    shown = gateway.ctl_json("workspace", "show", "lists-acme")
    pro = PLANS["pro"]
    assert (shown["id"], shown["plan"], shown["rpm_default"], shown["rpm_ceiling"]) == (
        t.workspace_id, "pro", pro.rpm_default, pro.rpm_ceiling)
    assert shown["burst_default"] == burst(pro.rpm_default)
    assert shown["spend_limit_usd"] == "25.000000"
    assert shown["runpod_account_id"] == t.account_id and shown["runpod_key_rejected"] is False
    assert t.runpod_key not in str(shown)
    text = gateway.ctl("workspace", "show", t.workspace_id)
    assert text.returncode == 0 and "plan: pro" in text.stdout, text.stdout

    table = gateway.ctl("workspace", "list").stdout.splitlines()
    assert table[0].split()[:3] == ["id", "name", "plan"], table
    assert any(line.split()[:2] == [t.workspace_id, "lists-acme"] for line in table[1:]), table


def test_deployments_list_and_status_teardown_by_public_name(gateway: Gateway, simulator: Simulator) -> None:
    t = make_tenant(gateway, simulator, name="lists-names")
    listed = gateway.ctl_json("deployments", "list", "lists-names")["deployments"]
    by_name = {d["name"]: d for d in listed}
    assert set(by_name) == {t.chat_model, t.embedding_model}
    chat = by_name[t.chat_model]
    assert (chat["modality"], chat["state"], chat["endpoint_id"]) == ("llm", "ready", t.deployments[t.chat_model])

    # Idle past its idle timeout (5 s, as deployed) an endpoint scales to zero, as RunPod's do; on a
    # loaded machine the calls above can take that long. A job just before keeps it ready to be read.
    openai.OpenAI(base_url=gateway.base_url, api_key=t.api_key, max_retries=0).chat.completions.create(
        model=t.chat_model, messages=[{"role": "user", "content": "hi"}])
    by_workspace = gateway.ctl_json("status", t.chat_model, "--workspace", "lists-names")
    assert (by_workspace["id"], by_workspace["health"]) == (chat["id"], "ready")
    assert gateway.ctl_json("status", t.chat_model)["id"] == chat["id"]  # unique: no --workspace needed
    assert gateway.ctl_json("status", chat["id"])["id"] == chat["id"]  # the id still works

    missing = gateway.ctl("status", t.chat_model, "--workspace", "no-such-workspace")
    assert missing.returncode == 1 and "workspace_not_found" in missing.stderr
    unknown = gateway.ctl("status", "no-such-model", "--workspace", "lists-names")
    assert unknown.returncode == 1 and "deployments list" in unknown.stderr, unknown.stderr

    gone = gateway.ctl_json("teardown", t.embedding_model, "-w", "lists-names")
    assert gone == {"id": by_name[t.embedding_model]["id"], "state": "deleted"}
    assert [d["name"] for d in gateway.ctl_json("deployments", "list", "lists-names")["deployments"]] == [
        t.chat_model]
    everything = gateway.ctl_json("deployments", "list", "lists-names", "--all")["deployments"]
    assert {d["name"]: d["state"] for d in everything}[t.embedding_model] == "deleted"
    assert gateway.ctl("status", t.embedding_model, "-w", "lists-names").returncode == 1


def test_a_name_live_in_two_workspaces_is_refused_with_its_candidates(
    gateway: Gateway, simulator: Simulator
) -> None:
    a = make_tenant(gateway, simulator, name="lists-twin-a")
    b = make_tenant(gateway, simulator, name="lists-twin-b")
    ids = {}
    with gateway.context() as ctx:
        for t in (a, b):
            opts = deployments.DeployOptions("org/chat-model", "llm", "lists-twin-chat", wait_timeout_s=10)
            ids[t.workspace_id] = deployments.deploy(ctx, t.workspace_id, opts, progress=lambda _m: None)["id"]
    refused = gateway.ctl("status", "lists-twin-chat")
    assert refused.returncode == 1
    assert "deployment_ambiguous" in refused.stderr
    for name, dep_id in (("lists-twin-a", ids[a.workspace_id]), ("lists-twin-b", ids[b.workspace_id])):
        assert f"{name} ({dep_id})" in refused.stderr, refused.stderr
    assert "--workspace" in refused.stderr
    teardown = gateway.ctl("teardown", "lists-twin-chat", "--json")
    assert teardown.returncode == 1 and '"deployment_ambiguous"' in teardown.stderr
    assert gateway.ctl_json("status", "lists-twin-chat", "-w", "lists-twin-b")["id"] == ids[b.workspace_id]
    # Nothing was torn down by the refused teardown.
    assert gateway.ctl_json("status", "lists-twin-chat", "-w", "lists-twin-a")["state"] == "ready"


def test_keys_list_shows_limit_and_last_use(gateway: Gateway, simulator: Simulator) -> None:
    t = make_tenant(gateway, simulator, name="lists-keys")
    spare = gateway.ctl_json("keys", "create", "lists-keys", "--name", "spare", "--rpm", "120")
    [used] = [k for k in gateway.ctl_json("keys", "list", "lists-keys")["keys"] if k["id"] == t.key_id]
    assert (used["rpm_limit"], used["burst"], used["last_used_at"]) == (
        PLANS["pro"].rpm_default, burst(PLANS["pro"].rpm_default), None)

    sdk = openai.OpenAI(base_url=gateway.base_url, api_key=t.api_key, max_retries=0)
    sdk.chat.completions.create(model=t.chat_model, messages=[{"role": "user", "content": "hi"}])

    def listed() -> dict[str, dict[str, object]]:
        return {k["id"]: k for k in gateway.ctl_json("keys", "list", "lists-keys")["keys"]}

    wait_until(lambda: listed()[t.key_id]["last_used_at"] is not None, 20, "the meter to record the request")
    keys = listed()
    assert keys[spare["id"]]["last_used_at"] is None
    assert (keys[spare["id"]]["rpm_limit"], keys[spare["id"]]["burst"]) == (120, 12)
    text = gateway.ctl("keys", "list", "lists-keys").stdout.splitlines()
    header = text[0].split()
    assert {"rpm_limit", "burst", "last_used_at", "revoked"} <= set(header), text
    assert len(text) == 3  # a header and one line per key


def _subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[
        tuple[tuple[str, ...], str | None, argparse.ArgumentParser]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, child in action.choices.items():
                found.append(((*path, name), helps.get(name), child))
                found += _subcommands(child, (*path, name))
    return found


def test_every_subcommand_has_help_and_examples() -> None:
    commands = _subcommands(build_parser())
    for must in [("workspace", "list"), ("workspace", "show"), ("deployments", "list"), ("status",)]:
        assert must in [path for path, _, _ in commands]
    for path, summary, parser in commands:
        assert summary, f"`gatewayctl {' '.join(path)}` has no one-line help"
        assert parser.description, f"`gatewayctl {' '.join(path)} --help` has no description"
        leaf = not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)
        if leaf:
            page = parser.format_help()
            examples = page.partition("\nexamples:\n")[2]
            assert re.search(rf"^  .*gatewayctl {' '.join(path)}\b", examples, re.M), page
            for action in parser._actions:
                if action.option_strings and action.dest not in ("help", "json"):
                    assert action.help, f"`gatewayctl {' '.join(path)}` option {action.option_strings} has no help"
