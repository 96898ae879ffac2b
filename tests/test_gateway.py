"""The foundation end to end: real Envoy, ext_authz, PostgreSQL, Redis and the RunPod simulator, driven
with the real OpenAI SDK."""

from __future__ import annotations

import json
import subprocess

import openai
import pytest

from tests.conftest import Gateway, Simulator, Tenant, make_tenant
from tests.support import ROOT, call


def client(gateway: Gateway, key: str, **kwargs: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0, **kwargs)  # type: ignore[arg-type]


def test_chat_completion_plain(gateway: Gateway, tenant: Tenant) -> None:
    reply = client(gateway, tenant.api_key).chat.completions.create(
        model=tenant.chat_model, messages=[{"role": "user", "content": "tell me a story"}]
    )
    assert reply.choices[0].message.content == "Echo: tell me a story"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (4, 5, 9)


def test_chat_completion_streaming(gateway: Gateway, tenant: Tenant) -> None:
    stream = client(gateway, tenant.api_key).chat.completions.create(
        model=tenant.chat_model, messages=[{"role": "user", "content": "one two three"}], stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Echo: one two three"
    usage = [c.usage for c in chunks if c.usage]
    assert len(usage) == 1 and usage[0].total_tokens == 3 + 4


def test_completions(gateway: Gateway, tenant: Tenant) -> None:
    reply = client(gateway, tenant.api_key).completions.create(model=tenant.chat_model, prompt="a b", max_tokens=2)
    assert reply.choices[0].text == "Echo: a"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.prompt_tokens == 2


def test_embeddings(gateway: Gateway, tenant: Tenant) -> None:
    reply = client(gateway, tenant.api_key).embeddings.create(model=tenant.embedding_model, input=["x y", "z"])
    assert len(reply.data) == 2 and len(reply.data[0].embedding) == 8
    assert reply.usage.prompt_tokens == 3


def test_models_lists_only_the_workspace_deployments(gateway: Gateway, simulator: Simulator, tenant: Tenant) -> None:
    other = make_tenant(gateway, simulator)
    ids = sorted(m.id for m in client(gateway, tenant.api_key).models.list())
    assert ids == sorted([tenant.chat_model, tenant.embedding_model])
    assert client(gateway, tenant.api_key).models.retrieve(tenant.chat_model).id == tenant.chat_model
    with pytest.raises(openai.NotFoundError):
        client(gateway, tenant.api_key).models.retrieve(other.chat_model)


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer sk-gw-short", "Basic dXNlcjpwYXNz", "Bearer sk-gw-" + "A" * 43,
     "Bearer a b", "bearer,Bearer x"],
    ids=["missing", "empty", "no-token", "malformed", "basic", "unknown", "spaces", "repeated"],
)
def test_bad_keys_get_401_invalid_api_key(gateway: Gateway, tenant: Tenant, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    reply = call("POST", f"{gateway.base_url}/chat/completions",
                 {"model": tenant.chat_model, "messages": []}, headers=headers)
    assert reply.status == 401
    assert reply.content_type == "application/json"
    assert reply.json()["error"]["code"] == "invalid_api_key"
    assert set(reply.json()["error"]) >= {"message", "type", "code"}


def test_duplicate_authorization_headers_are_refused(gateway: Gateway, tenant: Tenant) -> None:
    done = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{gateway.base_url}/models",
         "-H", f"Authorization: Bearer {tenant.api_key}", "-H", f"Authorization: Bearer {tenant.api_key}"],
        capture_output=True, text=True, check=True,
    )
    assert done.stdout == "401"


def test_revoked_key_gets_401_on_the_next_request(gateway: Gateway, simulator: Simulator) -> None:
    t = make_tenant(gateway, simulator)
    sdk = client(gateway, t.api_key)
    assert sdk.models.list().data  # cached in ext_authz now
    revoked = gateway.ctl_json("keys", "revoke", t.key_id)
    assert revoked == {"id": t.key_id, "revoked": True}
    with pytest.raises(openai.AuthenticationError) as info:
        sdk.models.list()
    assert info.value.code == "invalid_api_key"


def test_unknown_model_gets_404_model_not_found(gateway: Gateway, tenant: Tenant) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client(gateway, tenant.api_key).chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )
    assert info.value.code == "model_not_found"


def test_unknown_paths_get_openai_shaped_404(gateway: Gateway, tenant: Tenant) -> None:
    for path in ("/v1/files", "/", "/v2/serverless", "/v1/chat/completions/extra"):
        reply = call("GET", gateway.url + path, key=tenant.api_key)
        assert reply.status == 404, path
        assert reply.json()["error"]["code"] == "unknown_url"


def test_upstream_sees_only_the_runpod_key_and_no_forged_header(
    gateway: Gateway, simulator: Simulator, tenant: Tenant
) -> None:
    simulator.clear()
    forged = {
        "x-gateway-destination": "managed",
        "x-envoy-upstream-rq-timeout-ms": "1",
        "x-envoy-original-path": "/v2/other/run",
        "x-forwarded-for": "10.0.0.1",
        "x-request-id": "forged-request-id",
        "x-runpod-endpoint": "other",
        "cookie": "session=1",
    }
    sdk = client(gateway, tenant.api_key, default_headers=forged)
    raw = sdk.chat.completions.with_raw_response.create(
        model=tenant.chat_model, messages=[{"role": "user", "content": "hi"}]
    )
    assert tenant.runpod_key not in raw.text + json.dumps(dict(raw.headers))
    [seen] = [r for r in simulator.requests() if "/openai/" in r["path"]]
    assert seen["path"] == f"/v2/{tenant.deployments[tenant.chat_model]}/openai/v1/chat/completions"
    assert seen["headers"]["authorization"] == f"Bearer {tenant.runpod_key}"
    assert tenant.api_key not in json.dumps(seen)
    for name, value in forged.items():
        assert seen["headers"].get(name) != value, name
    assert not any(h.startswith("x-envoy-") or h.startswith("x-stainless") for h in seen["headers"])


def test_request_ids_are_generated_by_the_gateway(gateway: Gateway, tenant: Tenant, simulator: Simulator) -> None:
    simulator.clear()
    sdk = client(gateway, tenant.api_key, default_headers={"x-request-id": "same"})
    for _ in range(2):
        sdk.chat.completions.create(model=tenant.chat_model, messages=[{"role": "user", "content": "hi"}])
    ids = [r["headers"].get("x-request-id") for r in simulator.requests() if "/openai/" in r["path"]]
    assert len(set(ids)) == 2 and "same" not in ids


def test_cli_prints_one_json_object_and_errors_on_stderr(gateway: Gateway) -> None:
    ws = gateway.ctl_json("workspace", "create", "cli-ws", "--plan", "pro")
    assert ws["plan"] == "pro" and ws["id"].startswith("ws_")
    key = gateway.ctl_json("keys", "create", ws["id"], "--name", "ci")
    assert key["key"].startswith("sk-gw-")
    listed = gateway.ctl_json("keys", "list", "cli-ws")
    assert [k["id"] for k in listed["keys"]] == [key["id"]]
    assert key["key"] not in json.dumps(listed)  # shown once, never listed
    again = gateway.ctl("workspace", "create", "cli-ws", "--plan", "pro", "--json")
    assert again.returncode != 0 and again.stdout == ""
    assert json.loads(again.stderr)["error"]["code"] == "workspace_exists"


def test_runpod_link_validates_live_and_never_echoes(gateway: Gateway, simulator: Simulator) -> None:
    gateway.ctl_json("workspace", "create", "link-ws", "--plan", "pro")
    bad = gateway.ctl("runpod", "link", "link-ws", "--json", stdin="rpa_not_a_real_key\n")
    assert bad.returncode != 0 and json.loads(bad.stderr)["error"]["code"] == "runpod_key_invalid"
    assert "rpa_not_a_real_key" not in bad.stdout + bad.stderr
    simulator.add_account("user_linkws", "rpa_linkws_secret")
    good = gateway.ctl("runpod", "link", "link-ws", "--json", stdin="rpa_linkws_secret\n")
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["account_id"] == "user_linkws"
    assert "rpa_linkws_secret" not in good.stdout + good.stderr
    with gateway.context() as ctx:
        stored = ctx.db.execute("SELECT ciphertext FROM runpod_credentials rc JOIN workspaces w"
                                " ON w.id = rc.workspace_id WHERE w.name = 'link-ws'").fetchone()
    assert stored is not None and b"rpa_linkws_secret" not in bytes(stored[0])


def test_envoy_validates_the_shipped_config(tmp_path: object) -> None:
    # The shipped file logs to /var/log/gateway; give it a private, empty /var/log to validate in.
    script = ("mount -t tmpfs none /var/log && mkdir -p /var/log/gateway && "
              f"{ROOT / '.venv/bin/envoy'} --mode validate -c {ROOT / 'envoy/envoy.yaml'}")
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK" in done.stdout


def test_secrets_never_appear_in_logs_or_output(gateway: Gateway, simulator: Simulator, tenant: Tenant) -> None:
    # Exercise error paths too, then look everywhere the stack writes.
    sdk = client(gateway, tenant.api_key)
    sdk.chat.completions.create(model=tenant.chat_model, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        sdk.embeddings.create(model="nope", input="x")
    import time

    time.sleep(1.2)  # Envoy flushes the access log every 500 ms
    output = gateway.all_output()
    assert tenant.runpod_key not in output
    assert tenant.api_key not in output
    assert gateway.access_log(), "the access log is written"
    master = (gateway.state_dir / "master.key").read_text().split(":", 1)[1].strip()
    assert master not in output
