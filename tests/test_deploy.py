"""Deploys that would start on RunPod: the settings the worker images need, checked against RunPod's
published OpenAPI document; readiness that means a request was served; each failure in RunPod's words,
the same in `deploy` and `status`; a Hugging Face token that never shows; endpoint ids that cannot change
a path. Against the real stack and the RunPod simulator."""

from __future__ import annotations

import json
import secrets
from typing import Any

import jsonschema
import openai
import pytest
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from control import deployments, hf_tokens
from control.errors import ControlError
from extauth import routes
from tests.conftest import Gateway, Simulator
from tests.support import ROOT, call

# RunPod's published REST v2 OpenAPI document, in the shared reference folder beside the checkout.
_OPENAPI_PATHS = [base / "shared" / "reference" / "runpod-rest-v2.openapi.json" for base in ROOT.parents]
OPENAPI_PATH = next((p for p in _OPENAPI_PATHS if p.exists()), None)
_OPENAPI_URI = "urn:runpod:rest-v2-openapi"


def validate(body: dict[str, Any], schema: str) -> None:
    """Validates a request body against a component schema of RunPod's REST v2 OpenAPI document."""
    assert OPENAPI_PATH is not None, "runpod-rest-v2.openapi.json is not in ../shared/reference"
    resource = DRAFT202012.create_resource(json.loads(OPENAPI_PATH.read_text()))
    registry: Registry[Any] = Registry().with_resource(_OPENAPI_URI, resource)
    validator = jsonschema.Draft202012Validator({"$ref": f"{_OPENAPI_URI}#/components/schemas/{schema}"},
                                                registry=registry, format_checker=jsonschema.FormatChecker())
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(body)]
    assert not errors, errors


def workspace(gateway: Gateway, simulator: Simulator, knobs: dict[str, Any] | None = None) -> tuple[str, str]:
    """A pro workspace linked to a fresh RunPod account whose endpoints start with `knobs`."""
    account_id, key = "user_" + secrets.token_hex(6), "rpa_" + secrets.token_urlsafe(24)
    spec = {"id": account_id, "email": "d@example.com", "keys": [key], "endpoint_knobs": knobs or {}}
    assert call("POST", f"{simulator.url}/_sim/accounts", spec).status == 201
    name = "ws-" + secrets.token_hex(4)
    gateway.ctl_json("workspace", "create", name, "--plan", "pro")
    gateway.ctl_json("runpod", "link", name, stdin=key + "\n")
    return name, account_id


def posted(simulator: Simulator, account_id: str, path: str) -> list[dict[str, Any]]:
    return [json.loads(r["body"]) for r in simulator.requests()
            if r["account_id"] == account_id and r["method"] == "POST" and r["path"] == path]


def test_a_deploy_carries_what_the_workers_need_and_is_ready_only_once_served(
    gateway: Gateway, simulator: Simulator
) -> None:
    ws, account_id = workspace(gateway, simulator, {"cold_start_ms": 1500})
    token = "hf_" + secrets.token_urlsafe(24)
    stored = gateway.ctl("hf-token", "set", ws, stdin=token + "\n")
    assert stored.returncode == 0 and token not in stored.stdout + stored.stderr
    model = "meta-llama/Llama-3.1-8B-Instruct"  # gated: its workers crash without the token
    done = gateway.ctl("deploy", ws, "--model", model, "--modality", "llm", "--name", "llama", "--json",
                       "--wait-timeout", "20")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    outputs = [done.stdout, done.stderr, stored.stdout, stored.stderr]

    with pytest.raises(AssertionError):  # the validator is live: RunPod refuses unknown fields
        validate({"name": "x", "image": "i", "containerDiskInGb": 150}, "CreateTemplateRequest")
    [template] = posted(simulator, account_id, "/v2/templates")
    [endpoint] = posted(simulator, account_id, "/v2/serverless")
    validate(template, "CreateTemplateRequest")
    validate(endpoint, "CreateEndpointRequest")
    env = template["env"]
    assert template["image"] == "runpod/worker-v1-vllm:v2.25.2" and template["serverless"] is True
    assert template["allowedCudaVersions"] == ["13.0"] and endpoint["gpu"]["allowedCudaVersions"] == ["13.0"]
    # 8B at bf16 is 16 GB of weights; on a 24 GB GPU ~5.8 GB remain, room for 44k tokens at 128 KiB each:
    # the 24 GB pool's default context of 8192 fits.
    assert env["MAX_MODEL_LEN"] == "8192" and result["max_model_len"] == 8192
    assert template["disk"] >= 150 and int(env["RUNPOD_INIT_TIMEOUT"]) >= 800
    assert env["HF_TOKEN"] == token and env["MODEL_NAME"] == model
    assert env["ENABLE_FORCE_INCLUDE_USAGE"] == "true" and env["OPENAI_SERVED_MODEL_NAME_OVERRIDE"] == "llama"

    # Ready only after a request was served through RunPod's inference route, past the cold start.
    probes = [r for r in simulator.requests() if r["path"] == f"/v2/{result['endpoint_id']}/openai/v1/models"]
    assert probes and probes[-1]["status"] == 200
    assert result["state"] == "ready" and result["served_after_s"] >= 1.4
    assert "initializing" in done.stderr and "ready: served GET /openai/v1/models" in done.stderr

    # Through the real stack, on an id in the API reference's shape (`ep_…`).
    assert "_" in result["endpoint_id"]
    key = gateway.ctl_json("keys", "create", ws)["key"]
    sdk = openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0)
    assert sdk.chat.completions.create(model="llama", messages=[{"role": "user", "content": "hi"}]).choices
    status = gateway.ctl("status", result["id"], "--json")
    outputs += [status.stdout, status.stderr]
    assert json.loads(status.stdout)["health"] == "ready"

    # The embedding worker gets its own image's CUDA set and disk, valid too.
    embed = gateway.ctl_json("deploy", ws, "--model", "BAAI/bge-small-en-v1.5", "--modality", "embedding",
                             "--name", "bge", "--wait-timeout", "20")
    tpl = posted(simulator, account_id, "/v2/templates")[-1]
    validate(tpl, "CreateTemplateRequest")
    validate(posted(simulator, account_id, "/v2/serverless")[-1], "CreateEndpointRequest")
    assert tpl["allowedCudaVersions"] == ["12.7", "12.6", "12.5", "12.4"] and tpl["env"]["HF_TOKEN"] == token
    outputs.append(json.dumps(embed))

    # A master-key rotation re-seals the token with the RunPod keys.
    assert gateway.ctl_json("master-key", "rotate", "--retire-old")["resealed"] >= 2
    with gateway.context() as ctx:
        assert hf_tokens.for_deploy(ctx, json.loads(status.stdout)["workspace_id"], "runpod") == token
        sealed = ctx.db.execute("SELECT ciphertext FROM hf_credentials").fetchall()
    assert all(token.encode() not in bytes(row[0]) for row in sealed)

    # The token is in the template env RunPod must carry, and nowhere else.
    elsewhere = [r for r in simulator.requests() if not (r["method"] == "POST" and r["path"] == "/v2/templates")]
    assert token not in json.dumps(elsewhere)
    assert all(token not in text for text in outputs)
    assert token not in gateway.all_output()


def test_dry_run_reads_as_text_warns_and_masks_the_token(gateway: Gateway, simulator: Simulator) -> None:
    ws, account_id = workspace(gateway, simulator)
    token = "hf_" + secrets.token_urlsafe(24)
    gateway.ctl_json("hf-token", "set", ws, stdin=token + "\n")
    simulator.clear()
    text = gateway.ctl("deploy", ws, "--model", "meta-llama/Llama-3.1-70B-Instruct", "--modality", "llm",
                       "--dry-run")
    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert out.startswith("Dry run, nothing was created.") and "{'" not in out
    assert "MAX_MODEL_LEN=" in out and "CUDA 13.0" in out and "RUNPOD_INIT_TIMEOUT=" in out
    assert f"HF_TOKEN={hf_tokens.MASK}" in out and token not in out + text.stderr
    assert "warning: meta-llama/Llama-3.1-70B-Instruct will not fit" in out and "--gpu" in out
    assert "weights 140.0 GB (70B parameters x 2 bytes)" in out
    assert "model cache: not offered by RunPod's REST v2 API" in out

    plan = gateway.ctl_json("deploy", ws, "--model", "org/Model-8B", "--modality", "llm", "--dry-run",
                            "--max-model-len", "131072")
    assert plan["template"]["env"]["MAX_MODEL_LEN"] == "131072" and plan["template"]["env"]["HF_TOKEN"] == "********"
    assert any("plus the KV cache for 131072 tokens" in w for w in plan["warnings"])
    validate({**plan["template"], "name": "x"}, "CreateTemplateRequest")
    fits = gateway.ctl_json("deploy", ws, "--model", "org/Model-8B", "--modality", "llm", "--dry-run",
                            "--gpu", "AMPERE_80")
    assert fits["warnings"] == [] and fits["template"]["env"]["MAX_MODEL_LEN"] == "32768"

    wrong = gateway.ctl("deploy", ws, "--model", "m", "--modality", "llm", "--dry-run", "--gpu", "ADA_25")
    assert wrong.returncode != 0
    assert "valid pools: ADA_24 (24 GB, $1.10/h)" in wrong.stderr and "AMPERE_80 (80 GB" in wrong.stderr
    assert not posted(simulator, account_id, "/v2/templates"), "a dry run creates nothing"
    assert token not in json.dumps(simulator.requests())


def deploy_failing(gateway: Gateway, ws: str, **options: Any) -> tuple[ControlError, list[str], str]:
    lines: list[str] = []
    name = "m-" + secrets.token_hex(3)
    opts = deployments.DeployOptions(options.pop("model", "org/chat"), "llm", name, **options)
    with gateway.context() as ctx, pytest.raises(ControlError) as info:
        deployments.deploy(ctx, ws, opts, progress=lines.append)
    with gateway.context() as ctx:
        row = ctx.db.execute("SELECT id FROM deployments WHERE public_name = %s", (name,)).fetchone()
    assert row is not None
    return info.value, lines, str(row[0])


@pytest.mark.parametrize("knobs, options, word, code", [
    ({"health": "unhealthy"}, {}, "unhealthy", "deploy_unhealthy"),
    ({"health": "throttled"}, {}, "throttled", "deploy_timeout"),
    ({"health": "initializing"}, {}, "initializing", "deploy_timeout"),
    ({}, {"workers_max": 0}, "stuck in queue", "deploy_timeout"),
    ({"cold_start_ms": 60000}, {"init_timeout_s": 1}, "init timeout", "deploy_init_timeout"),
    ({}, {"model": "meta-llama/Llama-3.2-1B"}, "unhealthy", "deploy_unhealthy"),  # gated, no token
])
def test_each_failure_is_reported_in_runpods_words_by_deploy_and_status(
    gateway: Gateway, simulator: Simulator, knobs: dict[str, Any], options: dict[str, Any], word: str, code: str
) -> None:
    ws, _account = workspace(gateway, simulator, knobs)
    error, lines, dep_id = deploy_failing(gateway, ws, wait_timeout_s=3, **options)
    assert error.code == code and f"{word}:" in str(error), str(error)
    assert f"gatewayctl status {dep_id}" in str(error)
    assert not any("ready: served" in line for line in lines)
    status = gateway.ctl_json("status", dep_id)
    assert status["serves"] is False
    expected = "unhealthy" if word == "init timeout" else word  # health alone cannot tell the cause
    assert status["health"] == expected
    if word != "init timeout":  # the same sentence in both
        assert status["detail"].split(";")[0] in str(error)


def test_endpoint_ids_that_could_change_a_path_are_refused(gateway: Gateway, simulator: Simulator) -> None:
    for good in ("ep_abc123", "jpnw0v75y3qoql", "EP-1"):
        assert routes.upstream_path(good, routes.ROUTES["/v1/models"]) == f"/v2/{good}/openai/v1/models"
    bad = ("ep/x", "ep.x", "..", "ep%2fx", "ep?x", "ep#x", "ep\\x", "", "e" * 65)
    assert all(routes.upstream_path(b, routes.ROUTES["/v1/models"]) is None for b in bad)
    # A stored id with a dot-segment never reaches RunPod through the real stack.
    ws, account_id = workspace(gateway, simulator)
    dep = gateway.ctl_json("deploy", ws, "--model", "org/chat", "--modality", "llm", "--name", "safe",
                           "--wait-timeout", "10")
    key = gateway.ctl_json("keys", "create", ws)["key"]
    from control import hotsync

    with gateway.context() as ctx, hotsync.changing(ctx) as change:
        ctx.db.execute("UPDATE deployments SET endpoint_id = %s WHERE id = %s", ("ep_x/../../serverless", dep["id"]))
        change.workspace(dep["workspace_id"])
    simulator.clear()
    sdk = openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0)
    with pytest.raises(openai.APIStatusError):
        sdk.chat.completions.create(model="safe", messages=[{"role": "user", "content": "x"}])
    assert not [r for r in simulator.requests() if r["account_id"] == account_id]


def test_the_memory_estimate_reads_the_model_name() -> None:
    from control import sizing

    assert sizing.params_from_name("Qwen/Qwen2.5-0.5B-Instruct") == 0.5
    assert sizing.params_from_name("mistralai/Mixtral-8x7B-Instruct-v0.1") == 56
    assert sizing.params_from_name("google/gemma-2-9b-it") == 9
    assert sizing.params_from_name("BAAI/bge-small-en-v1.5") is None
    assert sizing.bytes_per_param("TheBloke/Llama-2-13B-chat-AWQ") == 0.5
    assert sizing.bytes_per_param("neuralmagic/Meta-Llama-3.1-8B-Instruct-FP8") == 1
    on_16 = sizing.size("meta-llama/Llama-3.1-8B-Instruct", True, 16)
    assert on_16.warnings and "its weights plus the KV cache" in on_16.warnings[0]
    small = sizing.size("Qwen/Qwen2.5-0.5B-Instruct", True, 24)
    assert (small.max_model_len, small.disk_gb, small.init_timeout_s, small.warnings) == (8192, 150, 800, ())
    big = sizing.size("meta-llama/Llama-3.1-70B-Instruct", True, 80)
    assert big.disk_gb == 210 and big.init_timeout_s == 2000 and big.warnings  # 140 GB of weights
    unknown = sizing.size("org/chat", True, 48)
    assert unknown.max_model_len == 16384 and unknown.weights_gb is None and "--params" in unknown.estimate()
    assert sizing.size("BAAI/bge-small-en-v1.5", False, 16).max_model_len is None


def test_a_sealed_runpod_key_does_not_open_as_a_hugging_face_token() -> None:
    from control.crypto import HF_TOKEN, CryptoError, Keyring

    keyring = Keyring({1: secrets.token_bytes(32)})
    runpod_key = keyring.seal("rpa_secret", "ws_a")  # the default purpose: a RunPod credential
    assert keyring.open(runpod_key, "ws_a") == "rpa_secret"
    with pytest.raises(CryptoError):
        keyring.open(runpod_key, "ws_a", HF_TOKEN)
    with pytest.raises(CryptoError):
        keyring.open(keyring.seal("hf_x", "ws_a", HF_TOKEN), "ws_b", HF_TOKEN)
