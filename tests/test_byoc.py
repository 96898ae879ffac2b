"""Bring-your-own-RunPod at inference time: every documented error, RunPod refusing a key, unreachable
endpoints, worker errors hidden in 200s, and the path tricks that must never get a request signed."""

from __future__ import annotations

import http.client
import json
import secrets
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import openai
import pytest

from control import credentials
from tests.conftest import Gateway, Simulator, Tenant, make_tenant, start_gateway
from tests.support import call, envoy_copy, wait_until


def chat(gateway: Gateway, key: str, model: str) -> openai.types.chat.ChatCompletion:
    sdk = openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0)
    return sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])


def openai_paths(simulator: Simulator) -> list[str]:
    return [r["path"] for r in simulator.requests() if r["path"].startswith("/v2/")
            and not r["path"].startswith(("/v2/serverless", "/v2/templates"))]


def test_unlinked_workspace_gets_byoc_runpod_not_linked(gateway: Gateway, simulator: Simulator) -> None:
    t = make_tenant(gateway, simulator)
    gateway.ctl_json("runpod", "unlink", t.workspace_id)
    with pytest.raises(openai.PermissionDeniedError) as info:
        chat(gateway, t.api_key, t.chat_model)
    assert info.value.code == "byoc_runpod_not_linked"


def test_plan_below_pro_suspends_byoc_inference(gateway: Gateway, simulator: Simulator) -> None:
    t = make_tenant(gateway, simulator)
    gateway.ctl_json("workspace", "set-plan", t.workspace_id, "starter", "--now")
    with pytest.raises(openai.PermissionDeniedError) as info:
        chat(gateway, t.api_key, t.chat_model)
    assert info.value.code == "byoc_plan_required"
    gateway.ctl_json("workspace", "set-plan", t.workspace_id, "pro")
    assert chat(gateway, t.api_key, t.chat_model).choices


def test_deploy_refusals_in_documented_order(gateway: Gateway, simulator: Simulator) -> None:
    t = make_tenant(gateway, simulator)
    image = gateway.ctl("deploy", t.workspace_id, "--model", "sdxl", "--modality", "image", "--json")
    error = json.loads(image.stderr)["error"]
    assert error["code"] == "byoc_modality_unsupported" and "--destination managed" in error["message"]
    gateway.ctl_json("workspace", "create", "starter-byoc", "--plan", "starter")
    starter = gateway.ctl("deploy", "starter-byoc", "--model", "m", "--modality", "llm", "--json")
    assert json.loads(starter.stderr)["error"]["code"] == "byoc_plan_required"
    gateway.ctl_json("workspace", "create", "unlinked-byoc", "--plan", "pro")
    unlinked = gateway.ctl("deploy", "unlinked-byoc", "--model", "m", "--modality", "llm", "--json")
    assert json.loads(unlinked.stderr)["error"]["code"] == "byoc_runpod_not_linked"


def test_unsupported_modality_row_is_refused_at_inference(gateway: Gateway, simulator: Simulator) -> None:
    t = make_tenant(gateway, simulator)
    with gateway.context() as ctx:  # a row the deploy command would never write, e.g. from an old version
        ctx.db.execute("UPDATE deployments SET modality = 'image' WHERE workspace_id = %s AND public_name = %s",
                       (t.workspace_id, t.embedding_model))
        from control import hotsync

        with hotsync.changing(ctx) as change:
            change.workspace(t.workspace_id)
    reply = call("POST", f"{gateway.base_url}/embeddings", {"model": t.embedding_model, "input": "x"},
                 key=t.api_key)
    assert reply.status == 400 and reply.json()["error"]["code"] == "byoc_modality_unsupported"


def test_rejected_runpod_key_fails_fast_until_relinked(gateway: Gateway, simulator: Simulator) -> None:
    t = make_tenant(gateway, simulator)
    assert chat(gateway, t.api_key, t.chat_model).choices
    call("DELETE", f"{simulator.url}/_sim/keys/{t.runpod_key}")  # revoked on RunPod's side
    with pytest.raises(openai.PermissionDeniedError) as info:
        chat(gateway, t.api_key, t.chat_model)
    assert info.value.code == "byoc_runpod_key_rejected"
    assert "Reconnect RunPod in Settings" in str(info.value.message)

    simulator.clear()
    with pytest.raises(openai.PermissionDeniedError) as again:
        chat(gateway, t.api_key, t.chat_model)
    assert again.value.code == "byoc_runpod_key_rejected"
    assert openai_paths(simulator) == [], "failed fast, without calling RunPod"

    # Re-linking a key of the same account rotates it: the next request uses the new key.
    new_key = "rpa_" + secrets.token_urlsafe(24)
    call("POST", f"{simulator.url}/_sim/accounts/{t.account_id}/keys", {"key": new_key})
    linked = gateway.ctl_json("runpod", "link", t.workspace_id, stdin=new_key + "\n")
    assert linked["rotated"] is True
    simulator.clear()
    assert chat(gateway, t.api_key, t.chat_model).choices
    [seen] = [r for r in simulator.requests() if "/openai/" in r["path"]]
    assert seen["headers"]["authorization"] == f"Bearer {new_key}"


def test_endpoint_failures_point_to_the_runpod_console(gateway: Gateway, simulator: Simulator) -> None:
    t = make_tenant(gateway, simulator)
    endpoint = t.deployments[t.chat_model]
    for fail, status, code in (("http500", 500, "upstream_unavailable"), ("worker_error_200", 502, "worker_error")):
        call("PATCH", f"{simulator.url}/_sim/endpoints/{endpoint}", {"fail": fail})
        reply = call("POST", f"{gateway.base_url}/chat/completions",
                     {"model": t.chat_model, "messages": [{"role": "user", "content": "x"}]}, key=t.api_key)
        assert reply.status == status, (fail, reply.body)
        assert reply.json()["error"]["code"] == code
        if code == "upstream_unavailable":
            assert "Check the endpoint in your RunPod console" in reply.json()["error"]["message"]
    call("PATCH", f"{simulator.url}/_sim/endpoints/{endpoint}", {"fail": "none"})
    assert chat(gateway, t.api_key, t.chat_model).choices


@pytest.fixture(scope="module")
def unreachable(
    tmp_path_factory: pytest.TempPathFactory, database_url: str, redis_url: str, simulator: Simulator,
    gateway: Gateway,
) -> Iterator[Gateway]:
    from control.net import free_port

    # Same database and simulator for the control plane, but inference goes to a port nobody listens on.
    yield from start_gateway(tmp_path_factory.mktemp("gw-unreachable"), database_url, redis_url, simulator.url,
                             {"RUNPOD_INFERENCE_URL": f"http://127.0.0.1:{free_port()}",
                              "GATEWAY_MASTER_KEY_FILE": str(gateway.state_dir / "master.key")})


def test_unreachable_endpoint_gets_a_clear_error(unreachable: Gateway, gateway: Gateway, tenant: Tenant) -> None:
    reply = call("POST", f"{unreachable.base_url}/chat/completions",
                 {"model": tenant.chat_model, "messages": [{"role": "user", "content": "x"}]}, key=tenant.api_key)
    assert reply.status in (502, 503), reply.body
    error = reply.json()["error"]
    assert error["code"] == "upstream_unavailable"
    assert "Check the endpoint in your RunPod console" in error["message"]


def raw_request(gateway: Gateway, method: str, path: str, key: str, body: bytes = b"",
                extra: list[tuple[str, str]] | None = None) -> int:
    """Send the path byte for byte (no client-side normalisation) and return the status."""
    url = urlsplit(gateway.url)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=10)
    conn.putrequest(method, path, skip_accept_encoding=True)
    conn.putheader("Authorization", f"Bearer {key}")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(len(body)))
    for name, value in extra or []:
        conn.putheader(name, value)
    conn.endheaders(body)
    status = conn.getresponse().status
    conn.close()
    return status


def test_path_tricks_never_get_a_request_signed(gateway: Gateway, simulator: Simulator) -> None:
    mine = make_tenant(gateway, simulator)
    other = make_tenant(gateway, simulator)
    ep, theirs = mine.deployments[mine.chat_model], other.deployments[other.chat_model]
    body = json.dumps({"model": mine.chat_model, "messages": [{"role": "user", "content": "x"}]}).encode()
    tricks = [
        ("POST", f"/v2/{ep}/run"), ("POST", f"/v2/{ep}/runsync"), ("POST", f"/v2/{ep}/purge-queue"),
        ("GET", f"/v2/{ep}/health"), ("POST", "/graphql"), ("GET", "/v2/serverless"), ("POST", "/v2/templates"),
        ("POST", f"/v2/{theirs}/openai/v1/chat/completions"), ("POST", f"/v2/{ep}/openai/v1/chat/completions"),
        ("POST", f"/v1/chat/completions/../../v2/{ep}/run"), ("POST", f"/v1/../v2/{ep}/runsync"),
        ("POST", f"/v1/chat/completions%2F..%2F..%2Fv2%2F{ep}%2Frun"), ("POST", "/v1/chat%2fcompletions"),
        ("POST", f"/v1/chat/completions/%2e%2e/%2e%2e/v2/{ep}/run"), ("GET", f"/v1/models/..%2f..%2fv2%2f{ep}"),
        ("POST", f"/v1/embeddings;/../../v2/{ep}/run"), ("POST", "/v1/chat/completions?/../../run"),
        ("GET", f"/v1/models/../../v2/{ep}/health"), ("POST", "/V1/chat/completions"),
        ("POST", f"/v1/chat/completions\\..\\..\\v2\\{ep}\\run"),
    ]
    simulator.clear()
    statuses = {}
    for method, path in tricks:
        statuses[path] = raw_request(gateway, method, path, mine.api_key, body)
    forged = [("x-gateway-destination", "runpod"), ("x-envoy-original-path", f"/v2/{ep}/run"),
              ("x-original-url", f"/v2/{ep}/run"), ("x-rewrite-url", f"/v2/{ep}/run"), ("host", "api.runpod.io")]
    statuses["forged headers"] = raw_request(gateway, "POST", f"/v2/{ep}/run", mine.api_key, body, forged)
    other_model = json.dumps({"model": other.chat_model, "messages": []}).encode()
    statuses["other's model"] = raw_request(gateway, "POST", "/v1/chat/completions", mine.api_key, other_model)
    dotted = json.dumps({"model": f"../../{ep}/run", "messages": []}).encode()
    statuses["model path"] = raw_request(gateway, "POST", "/v1/chat/completions", mine.api_key, dotted)

    signed = openai_paths(simulator)
    allowed = {f"/v2/{ep}/openai/v1/chat/completions"}
    assert set(signed) <= allowed, f"signed requests escaped: {set(signed) - allowed}"
    # Whatever was signed went to this workspace's own chat route; everything else was refused.
    refused = {k: v for k, v in statuses.items() if v >= 400}
    assert len(refused) >= len(statuses) - len(signed), statuses
    assert all(v < 500 for v in statuses.values()), {k: v for k, v in statuses.items() if v >= 500}


def test_ciphertext_moved_to_another_workspace_does_not_decrypt(gateway: Gateway, simulator: Simulator) -> None:
    a = make_tenant(gateway, simulator)
    b = make_tenant(gateway, simulator)
    with gateway.context() as ctx:
        ctx.db.execute(
            "UPDATE runpod_credentials SET nonce = src.nonce, ciphertext = src.ciphertext, account_id = src.account_id"
            " FROM runpod_credentials src WHERE src.workspace_id = %s AND runpod_credentials.workspace_id = %s",
            (a.workspace_id, b.workspace_id),
        )
        from control import hotsync
        from control.crypto import CryptoError

        with hotsync.changing(ctx) as change:
            change.workspace(b.workspace_id)
        with pytest.raises(CryptoError) as info:
            credentials.runpod_key(ctx, b.workspace_id)
        assert a.runpod_key not in str(info.value)
    simulator.clear()
    reply = call("POST", f"{gateway.base_url}/chat/completions",
                 {"model": b.chat_model, "messages": [{"role": "user", "content": "x"}]}, key=b.api_key)
    assert reply.status >= 400
    assert openai_paths(simulator) == []


@pytest.fixture(scope="module")
def short_cold_start(
    tmp_path_factory: pytest.TempPathFactory, database_url: str, redis_url: str, simulator: Simulator,
    gateway: Gateway,
) -> Iterator[Gateway]:
    # An operator's copy of envoy/ with the cold-start allowance (the runpod route's time to first byte)
    # cut to 1 s.
    root = tmp_path_factory.mktemp("cold-start")
    config = envoy_copy(root)
    text = config.read_text()
    assert text.count("per_try_timeout: 600s") == 2 and text.count("idle_timeout: 300s") == 2
    config.write_text(text.replace("per_try_timeout: 600s", "per_try_timeout: 1s", 1)
                      .replace("idle_timeout: 300s", "idle_timeout: 2s", 1))
    (root / "gw").mkdir()
    yield from start_gateway(root / "gw", database_url, redis_url, simulator.url,
                             {"GATEWAY_ENVOY_CONFIG": str(config),
                              "GATEWAY_MASTER_KEY_FILE": str(gateway.state_dir / "master.key")})


def test_cold_start_past_the_allowance_points_to_the_runpod_console(
    short_cold_start: Gateway, simulator: Simulator, gateway: Gateway
) -> None:
    t = make_tenant(gateway, simulator)
    call("PATCH", f"{simulator.url}/_sim/endpoints/{t.deployments[t.chat_model]}", {"cold_start_ms": 3000})
    reply = call("POST", f"{short_cold_start.base_url}/chat/completions",
                 {"model": t.chat_model, "messages": [{"role": "user", "content": "x"}]}, key=t.api_key)
    assert reply.status == 504, reply.body
    error = reply.json()["error"]
    assert error["code"] == "upstream_unavailable"
    assert "Check the endpoint in your RunPod console" in error["message"]


def test_a_stream_longer_than_the_allowance_completes(
    short_cold_start: Gateway, simulator: Simulator, gateway: Gateway
) -> None:
    t = make_tenant(gateway, simulator)
    # 9 events 300 ms apart: 2.4 s of streaming against a 1 s allowance, each silence far below idle_timeout.
    call("PATCH", f"{simulator.url}/_sim/endpoints/{t.deployments[t.chat_model]}", {"stream_delay_ms": 300})
    sdk = openai.OpenAI(base_url=short_cold_start.base_url, api_key=t.api_key, max_retries=0)
    started = time.monotonic()
    chunks = list(sdk.chat.completions.create(
        model=t.chat_model, messages=[{"role": "user", "content": "a b c d e f g"}], stream=True))
    assert time.monotonic() - started > 2
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Echo: a b c d e f g"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_stream_silent_past_the_idle_timeout_is_cut_and_still_metered(
    short_cold_start: Gateway, simulator: Simulator, gateway: Gateway
) -> None:
    t = make_tenant(gateway, simulator)
    call("PATCH", f"{simulator.url}/_sim/endpoints/{t.deployments[t.chat_model]}", {"stream_delay_ms": 2500})
    sdk = openai.OpenAI(base_url=short_cold_start.base_url, api_key=t.api_key, max_retries=0)
    received = []
    with pytest.raises(openai.APIError):  # the stream breaks while it is read
        for chunk in sdk.chat.completions.create(
                model=t.chat_model, messages=[{"role": "user", "content": "a b c"}], stream=True):
            received.append(chunk)
    assert len(received) == 1  # cut in the first silence

    def row() -> tuple[int, int, bool] | None:
        with gateway.context() as ctx:
            found = ctx.db.execute("SELECT prompt_tokens, completion_tokens, usage_estimated FROM usage_events"
                                   " WHERE workspace_id = %s", (t.workspace_id,)).fetchall()
        return found[0] if found else None

    wait_until(lambda: row() is not None, 20, "the cut stream's row")
    assert row() == (3, 1, True)  # the upstream's own count as far as it got, marked estimated


def test_a_refusal_is_confirmed_before_a_working_key_is_taken_out(gateway: Gateway, simulator: Simulator) -> None:
    t = make_tenant(gateway, simulator)
    endpoint = t.deployments[t.chat_model]
    # The inference front refuses (as a WAF or a scoped key might) while the key itself is fine.
    call("PATCH", f"{simulator.url}/_sim/endpoints/{endpoint}", {"fail": "unauthorized"})
    with pytest.raises(openai.PermissionDeniedError) as info:
        chat(gateway, t.api_key, t.chat_model)
    assert info.value.code == "byoc_runpod_key_rejected"
    call("PATCH", f"{simulator.url}/_sim/endpoints/{endpoint}", {"fail": "none"})
    assert chat(gateway, t.api_key, t.chat_model).choices, "the key was not marked"
    # Nor can anyone on the internal network take it out by calling the route directly: only Envoy
    # (with the secret it adds) is answered at all.
    from control.settings import read_runtime

    admin = read_runtime(gateway.state_dir)["extauth_metrics_urls"][0].removesuffix("/metrics")
    assert call("POST", f"{admin}/internal/credential-rejected", raw=t.workspace_id.encode()).status == 403
    assert chat(gateway, t.api_key, t.chat_model).choices
