"""Tests for control.runpod_simulator over real HTTP: the CLI in a subprocess, plus one embedded run."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from control import runpod_simulator
from tests.support import ROOT, Reply, call

FILE_ACCOUNT = {"id": "user_file", "email": "file@example.com", "keys": ["rpa_file"], "read_only_keys": []}


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("sim")
    accounts, port_file = tmp / "accounts.json", tmp / "port"
    accounts.write_text(json.dumps({"accounts": [FILE_ACCOUNT]}))
    command = [sys.executable, "-m", "control.runpod_simulator", "--port", "0", "--accounts", str(accounts),
               "--port-file", str(port_file)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True) as proc:
        try:
            deadline = time.monotonic() + 10
            while not port_file.exists():
                assert proc.poll() is None, "simulator exited early"
                assert time.monotonic() < deadline, "simulator did not start"
                time.sleep(0.02)
            port = int(port_file.read_text())
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == f"runpod-simulator listening on http://127.0.0.1:{port}"
            yield f"http://127.0.0.1:{port}"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=5) == 0  # SIGTERM is a clean stop
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def new_account(base: str, read_only: bool = False) -> tuple[str, str]:
    account_id, key = f"user_{uuid.uuid4().hex[:12]}", f"rpa_{uuid.uuid4().hex}"
    spec = {"id": account_id, "email": f"{account_id}@example.com",
            "keys": [] if read_only else [key], "read_only_keys": [key] if read_only else []}
    assert call("POST", f"{base}/_sim/accounts", spec).status == 201
    return account_id, key


def new_endpoint(base: str, key: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    tpl = call("POST", f"{base}/v2/templates", {"name": f"t-{uuid.uuid4().hex[:8]}", "image": "runpod/worker",
                                                 "serverless": True, "env": env or {"MODEL_NAME": "m"}}, key)
    assert tpl.status == 201, tpl.body
    ep = call("POST", f"{base}/v2/serverless", {"name": "e", "type": "QUEUE", "templateId": tpl.json()["id"],
                                                "gpu": {"pools": ["ADA_24"]},
                                                "scaling": {"type": "QUEUE_DELAY", "queueDelay": 4}}, key)
    assert ep.status == 201, ep.body
    return dict(ep.json())


def sse(reply: Reply) -> list[Any]:
    assert reply.status == 200 and reply.content_type == "text/event-stream"
    events = [e for e in reply.body.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    return [json.loads(e[len("data: "):]) for e in events[:-1]]


def test_cli_and_file_accounts(sim: str) -> None:
    assert call("GET", f"{sim}/_sim/healthz").body == b"ok"
    me = call("POST", f"{sim}/graphql", {"query": "query { myself { id email } }"}, "rpa_file")
    assert me.json() == {"data": {"myself": {"id": "user_file", "email": "file@example.com"}}}


def test_graphql(sim: str) -> None:
    account_id, key = new_account(sim)
    _, ro_key = new_account(sim, read_only=True)
    query = {"query": "query { myself { id email } }"}
    ok = call("POST", f"{sim}/graphql", query, key)
    assert ok.status == 200 and ok.json()["data"]["myself"]["id"] == account_id
    assert call("POST", f"{sim}/graphql?api_key={key}", query).json()["data"]["myself"]["id"] == account_id
    bad = call("POST", f"{sim}/graphql", query, "rpa_never_issued")
    assert (bad.status, bad.json()) == (401, {"errors": [{"message": "Unauthorized"}]})
    anon = call("POST", f"{sim}/graphql", query)
    assert (anon.status, anon.json()) == (200, {"data": {"myself": None}})
    mutation = call("POST", f"{sim}/graphql", {"query": 'mutation { deleteEndpoint(id: "x") }'}, ro_key)
    assert (mutation.status, mutation.json()) == (200, {"errors": [{"message": "Unauthorized"}]})
    other = call("POST", f"{sim}/graphql", {"query": "query { gpuTypes { id } }"}, key)
    assert other.status == 200 and other.json()["errors"]


def test_rest_auth(sim: str) -> None:
    _, ro_key = new_account(sim, read_only=True)
    missing = call("GET", f"{sim}/v2/templates")
    assert missing.status == 401 and missing.content_type == "application/problem+json"
    assert missing.json() == {"title": "Unauthorized", "status": 401, "detail": "missing bearer token"}
    assert call("GET", f"{sim}/v2/serverless", key="rpa_never_issued").status == 401
    assert call("GET", f"{sim}/v2/templates", key=ro_key).json() == {"templates": []}
    denied = call("POST", f"{sim}/v2/templates", {"name": "x", "image": "y"}, ro_key)
    assert denied.status == 403 and denied.json()["status"] == 403


def test_templates(sim: str) -> None:
    _, key = new_account(sim)
    _, other_key = new_account(sim)
    created = call("POST", f"{sim}/v2/templates", {"name": "vllm", "image": "runpod/worker"}, key)
    assert created.status == 201
    tpl = created.json()
    assert re.fullmatch(r"tpl_[a-z0-9]{10}", tpl.pop("id"))
    assert tpl == {"name": "vllm", "image": "runpod/worker", "args": "", "disk": 50, "mounts": {},
                   "ports": [], "env": {}, "registry": None, "serverless": False, "public": False,
                   "category": "NVIDIA", "startSsh": True, "startJupyter": True, "allowedCudaVersions": []}
    tid = created.json()["id"]
    dup = call("POST", f"{sim}/v2/templates", {"name": "vllm", "image": "x"}, key)
    assert dup.status == 400 and dup.content_type == "application/problem+json"
    assert call("POST", f"{sim}/v2/templates", {"name": "vllm", "image": "x"}, other_key).status == 201
    unknown = call("POST", f"{sim}/v2/templates", {"name": "n", "image": "x", "bogus": 1}, key)
    assert unknown.status == 422
    assert unknown.json()["errors"] == ["$: additional properties 'bogus' not allowed"]
    assert call("POST", f"{sim}/v2/templates", {"name": "n"}, key).status == 422
    assert call("POST", f"{sim}/v2/templates", raw=b"{nope", key=key).status == 400
    listed = call("GET", f"{sim}/v2/templates", key=key).json()
    assert [t["id"] for t in listed["templates"]] == [tid]
    assert call("GET", f"{sim}/v2/templates/{tid}", key=other_key).status == 404
    patched = call("PATCH", f"{sim}/v2/templates/{tid}", {"env": {"A": "1"}, "mounts": {}}, key)
    assert patched.status == 200 and patched.json()["env"] == {"A": "1"} and patched.json()["mounts"] == {}
    assert call("DELETE", f"{sim}/v2/templates/{tid}", key=other_key).status == 404
    deleted = call("DELETE", f"{sim}/v2/templates/{tid}", key=key)
    assert deleted.status == 204 and deleted.body == b""
    assert call("GET", f"{sim}/v2/templates/{tid}", key=key).status == 404


def test_endpoints(sim: str) -> None:
    account_id, key = new_account(sim)
    _, other_key = new_account(sim)
    tpl = call("POST", f"{sim}/v2/templates", {"name": "t", "image": "img", "serverless": True,
                                                "env": {"MODEL_NAME": "m", "A": "1"}}, key).json()
    pod_tpl = call("POST", f"{sim}/v2/templates", {"name": "pod", "image": "img"}, key).json()
    body = {"name": "ep", "type": "QUEUE", "templateId": tpl["id"], "env": {"A": "2", "B": "3"},
            "gpu": {"pools": ["ADA_24"], "count": 1}, "workers": {"max": 2},
            "scaling": {"type": "QUEUE_DELAY", "queueDelay": 4}}
    created = call("POST", f"{sim}/v2/serverless", body, key)
    assert created.status == 201, created.body
    ep = created.json()
    eid = ep["id"]
    assert re.fullmatch(r"ep_[a-z0-9]{11}", eid)
    assert ep["env"] == {"MODEL_NAME": "m", "A": "2", "B": "3"} and ep["image"] == "img"
    assert ep["gpu"] == {"pools": ["ADA_24"], "count": 1, "allowedCudaVersions": [], "minCudaVersion": None}
    assert ep["workers"] == {"min": 0, "max": 2, "idleTimeout": 10} and ep["templateId"] == tpl["id"]
    assert ep["requestUrls"]["runSync"] == f"{sim}/v2/{eid}/runsync"
    assert ep["requestUrls"]["status"] == f"{sim}/v2/{eid}/status/{{job_id}}"
    for field in ("dataCenterIds", "networkVolumes", "timeout", "flashboot", "createdAt", "scaling", "type"):
        assert field in ep
    problems = {
        "unknown template": ({**body, "templateId": "tpl_missing000"}, 404),
        "pod template": ({**body, "templateId": pod_tpl["id"]}, 422),
        "unknown property": ({**body, "gpuIds": "ADA_24"}, 422),
        "no image": ({k: v for k, v in body.items() if k != "templateId"}, 422),
        "no compute": ({k: v for k, v in body.items() if k != "gpu"}, 400),
    }
    for name, (bad, status) in problems.items():
        reply = call("POST", f"{sim}/v2/serverless", bad, key)
        assert (name, reply.status, reply.content_type) == (name, status, "application/problem+json")
    bound = call("DELETE", f"{sim}/v2/templates/{tpl['id']}", key=key)
    assert bound.status == 400 and bound.json()["detail"]
    assert [e["id"] for e in call("GET", f"{sim}/v2/serverless", key=key).json()["endpoints"]] == [eid]
    assert call("GET", f"{sim}/v2/serverless", key=other_key).json() == {"endpoints": []}
    assert call("GET", f"{sim}/v2/serverless/{eid}", key=key).json()["name"] == "ep"
    assert call("GET", f"{sim}/v2/serverless/{eid}", key=other_key).status == 404
    patched = call("PATCH", f"{sim}/v2/serverless/{eid}", {"name": "ep2", "workers": {"min": 1}}, key).json()
    assert patched["name"] == "ep2" and patched["workers"] == {"min": 1, "max": 2, "idleTimeout": 10}
    assert patched["env"] == ep["env"]
    assert call("PATCH", f"{sim}/v2/serverless/{eid}", {"type": "QUEUE"}, key).status == 422
    state = call("GET", f"{sim}/_sim/state").json()
    mine = next(a for a in state["accounts"] if a["id"] == account_id)
    assert (len(mine["templates"]), len(mine["endpoints"])) == (2, 1)
    assert state["knobs"][eid]["fail"] == "none"
    assert call("DELETE", f"{sim}/v2/serverless/{eid}", key=other_key).status == 404
    assert call("DELETE", f"{sim}/v2/serverless/{eid}", key=key).status == 204
    assert call("GET", f"{sim}/v2/serverless/{eid}", key=key).status == 404
    assert call("GET", f"{sim}/v2/templates/{tpl['id']}", key=key).status == 404  # bound template went too


def test_queue_routes_and_auth(sim: str) -> None:
    _, key = new_account(sim)
    _, other_key = new_account(sim)
    eid = new_endpoint(sim, key)["id"]
    base = f"{sim}/v2/{eid}"
    for bad_key in (None, "rpa_never_issued", other_key):
        reply = call("GET", f"{base}/health", key=bad_key)
        assert (reply.status, reply.json()) == (401, {"error": "Unauthorized"})
    assert call("GET", f"{sim}/v2/nosuchendpoint1/health", key=key).status == 404
    health = call("GET", f"{base}/health", key=key).json()
    # Scaled down: idle means the image is cached, no worker has loaded the model.
    assert health["workers"] == {"idle": 1, "running": 0, "initializing": 0, "ready": 0, "throttled": 0,
                                 "unhealthy": 0}
    assert set(health["jobs"]) == {"completed", "failed", "inProgress", "inQueue", "retried"}
    sync = call("POST", f"{base}/runsync", {"input": {"x": 1}}, key).json()
    assert sync["status"] == "COMPLETED" and sync["output"] == {"x": 1}
    assert call("GET", f"{base}/health", key=key).json()["workers"]["ready"] == 1
    queued = call("POST", f"{base}/run", {"input": {"y": 2}}, key).json()
    assert queued["status"] == "IN_QUEUE"
    assert call("GET", f"{base}/status/{queued['id']}", key=key).json()["output"] == {"y": 2}
    assert call("POST", f"{base}/cancel/{queued['id']}", key=key).json()["status"] == "CANCELLED"
    assert call("GET", f"{base}/status/nope", key=key).status == 404
    assert call("POST", f"{base}/purge-queue", key=key).json() == {"removed": 0, "status": "completed"}
    assert call("GET", f"{base}/health", key=key).json()["jobs"]["completed"] == 2


def test_chat_completions(sim: str) -> None:
    _, key = new_account(sim)
    url = f"{sim}/v2/{new_endpoint(sim, key)['id']}/openai/v1/chat/completions"
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "one two"},
                                             {"type": "text", "text": "three"}]}]
    reply = call("POST", url, {"model": "m", "messages": messages}, key).json()
    assert reply["object"] == "chat.completion" and reply["model"] == "m"
    assert reply["choices"] == [{"index": 0, "logprobs": None, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": "Echo: one two three"}}]
    assert reply["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    cut = call("POST", url, {"model": "m", "messages": messages, "max_tokens": 2}, key).json()
    assert cut["choices"][0]["message"]["content"] == "Echo: one"
    assert cut["choices"][0]["finish_reason"] == "length"
    assert cut["usage"]["completion_tokens"] == 2
    long = call("POST", url, {"model": "m", "messages": [{"role": "user", "content": "w " * 40}]}, key).json()
    assert long["usage"] == {"prompt_tokens": 40, "completion_tokens": 16, "total_tokens": 56}

    stream = {"model": "m", "messages": messages, "stream": True}
    chunks = sse(call("POST", url, stream, key))
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Echo:"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Echo: one two three"
    assert len(chunks) == 5 and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    with_usage = sse(call("POST", url, {**stream, "stream_options": {"include_usage": True}}, key))
    assert with_usage[-1]["choices"] == [] and with_usage[-1]["usage"]["total_tokens"] == 9

    forced_ep = new_endpoint(sim, key, {"MODEL_NAME": "m", "ENABLE_FORCE_INCLUDE_USAGE": "true"})
    forced = f"{sim}/v2/{forced_ep['id']}"
    chunks = sse(call("POST", f"{forced}/openai/v1/chat/completions", stream, key))
    assert chunks[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    # Forced usage (vllm/entrypoints/utils.py should_include_usage): cumulative in every chunk too.
    assert chunks[-1]["choices"] == [] and all("usage" in c for c in chunks)
    assert [c["usage"]["completion_tokens"] for c in chunks[:-1]] == [1, 2, 3, 4, 4]


def test_completions(sim: str) -> None:
    _, key = new_account(sim)
    url = f"{sim}/v2/{new_endpoint(sim, key)['id']}/openai/v1/completions"
    reply = call("POST", url, {"model": "m", "prompt": ["a b", "c"]}, key).json()
    assert reply["object"] == "text_completion"
    assert [c["text"] for c in reply["choices"]] == ["Echo: a b", "Echo: c"]
    assert reply["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    chunks = sse(call("POST", url, {"model": "m", "prompt": "x y z", "max_tokens": 3, "stream": True,
                                    "stream_options": {"include_usage": True}}, key))
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == "Echo: x y"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


def test_embeddings_models_and_errors(sim: str) -> None:
    # worker-infinity-embedding 1.1.4: floats whatever encoding_format says, errors as HTTP 200 objects.
    _, key = new_account(sim)
    eid = new_endpoint(sim, key, {'MODEL_NAMES': 'BAAI/bge-small;e5'})['id']
    base = f"{sim}/v2/{eid}/openai/v1"
    models = call("GET", f"{base}/models", key=key).json()
    assert [m["id"] for m in models["data"]] == ["BAAI/bge-small", "e5"]
    assert models["data"][0]["owned_by"] == "infinity"
    floats = call("POST", f"{base}/embeddings", {"model": "e5", "input": ["a b c", "d"]}, key).json()
    assert floats["object"] == "list" and floats["model"] == "e5"
    assert floats["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
    assert [d["index"] for d in floats["data"]] == [0, 1] and len(floats["data"][0]["embedding"]) == 8
    asked_base64 = call("POST", f"{base}/embeddings",
                        {"model": "e5", "input": "a b c", "encoding_format": "base64"}, key).json()
    assert asked_base64["data"][0]["embedding"] == floats["data"][0]["embedding"]
    unknown = call("POST", f"{base}/embeddings", {"model": "x", "input": "a"}, key)
    assert unknown.status == 200
    assert unknown.json()["object"] == "error" and unknown.json()["code"] == 400
    assert "`x` not found" in unknown.json()["message"]
    chat = call("POST", f"{base}/chat/completions", {"model": "e5", "messages": []}, key)
    assert chat.status == 200 and chat.json()["message"] == "Invalid OpenAI Route: /v1/chat/completions"
    invalid = call("POST", f"{base}/embeddings", raw=b"{not json", key=key)
    assert invalid.status == 400 and invalid.json()["error"]["message"]

    one = new_endpoint(sim, key, {'MODEL_NAMES': 'BAAI/bge-small'})['id']
    any_name = call("POST", f"{sim}/v2/{one}/openai/v1/embeddings", {"model": "whatever", "input": "a"}, key)
    assert any_name.json()["model"] == "whatever" and len(any_name.json()["data"]) == 1
    call("PATCH", f"{sim}/_sim/endpoints/{one}", {"embedding_dim": 3072})
    wide = call("POST", f"{sim}/v2/{one}/openai/v1/embeddings", {"model": "m", "input": ["a", "b"]}, key).json()
    assert [len(d["embedding"]) for d in wide["data"]] == [3072, 3072]


def test_vllm_errors_are_wrapped_by_the_worker(sim: str) -> None:
    _, key = new_account(sim)
    eid = new_endpoint(sim, key, {"MODEL_NAME": "org/m", "OPENAI_SERVED_MODEL_NAME_OVERRIDE": "m"})["id"]
    url, knobs = f"{sim}/v2/{eid}/openai/v1/chat/completions", f"{sim}/_sim/endpoints/{eid}"
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    unknown = call("POST", url, {**chat, "model": "nope"}, key)
    assert unknown.status == 200 and unknown.content_type == "application/json"
    error = unknown.json()["error"]
    assert (error["type"], error["code"]) == ("worker_error", None)
    prefix = "vLLM returned HTTP 404: "
    assert error["message"].startswith(prefix)
    assert json.loads(error["message"][len(prefix):]) == {"error": {
        "message": "The model `nope` does not exist.", "type": "NotFoundError", "param": None, "code": 404}}
    for fail, status in (("vllm_context_length", 400), ("vllm_bad_parameter", 400), ("vllm_unprocessable", 422),
                         ("vllm_internal", 500)):
        call("PATCH", knobs, {"fail": fail})
        reply = call("POST", url, chat, key)
        assert reply.status == 200 and reply.json()["error"]["message"].startswith(f"vLLM returned HTTP {status}: ")
        streamed = call("POST", url, {**chat, "stream": True}, key)  # one JSON object, not SSE
        assert streamed.json() == reply.json() and streamed.content_type == "application/json"
    call("PATCH", knobs, {"stream_error_content_type": "text/event-stream"})
    streamed = call("POST", url, {**chat, "stream": True}, key)
    assert streamed.content_type == "text/event-stream" and streamed.json()["error"]["type"] == "worker_error"


def test_openai_sdk(sim: str) -> None:
    openai = pytest.importorskip("openai")
    _, key = new_account(sim)
    env = {"MODEL_NAME": "org/llama", "OPENAI_SERVED_MODEL_NAME_OVERRIDE": "llama"}
    endpoint = new_endpoint(sim, key, env)
    client = openai.OpenAI(api_key=key, base_url=f"{sim}/v2/{endpoint['id']}/openai/v1", max_retries=0)
    try:
        assert [m.id for m in client.models.list()] == ["llama"]
        hi_there = [{"role": "user", "content": "hi there"}]
        chat = client.chat.completions.create(model="llama", messages=hi_there)
        assert chat.choices[0].message.content == "Echo: hi there" and chat.usage is not None
        assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (2, 3)
        stream = client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "hi"}],
                                                stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Echo: hi"
        assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 3
        emb = client.embeddings.create(model="llama", input="a b")  # the SDK asks for base64 by default
        assert len(emb.data[0].embedding) == 8 and emb.usage.prompt_tokens == 2
        assert all(isinstance(v, float) for v in emb.data[0].embedding)
        with openai.OpenAI(api_key="rpa_never_issued", base_url=client.base_url, max_retries=0) as stranger, \
                pytest.raises(openai.AuthenticationError):
            stranger.models.list()
    finally:
        client.close()


def test_recording(sim: str) -> None:
    account_id, key = new_account(sim)
    eid = new_endpoint(sim, key)["id"]
    assert call("DELETE", f"{sim}/_sim/requests").status == 204
    call("POST", f"{sim}/v2/{eid}/openai/v1/chat/completions?trace=1",
         {"model": "m", "messages": [{"role": "user", "content": "x"}]}, key)
    call("GET", f"{sim}/_sim/state")
    recorded = call("GET", f"{sim}/_sim/requests").json()["requests"]
    assert len(recorded) == 1
    rec = recorded[0]
    assert rec["method"] == "POST" and rec["path"] == f"/v2/{eid}/openai/v1/chat/completions?trace=1"
    assert rec["headers"]["authorization"] == f"Bearer {key}" and json.loads(rec["body"])["model"] == "m"
    assert (rec["endpoint_id"], rec["account_id"], rec["status"]) == (eid, account_id, 200)


def test_keys_can_be_added_and_revoked(sim: str) -> None:
    account_id, key = new_account(sim)
    eid = new_endpoint(sim, key)["id"]
    extra = f"rpa_{uuid.uuid4().hex}"
    assert call("POST", f"{sim}/_sim/accounts/{account_id}/keys", {"key": extra}).status == 201
    assert call("POST", f"{sim}/_sim/accounts/user_nobody/keys", {"key": "k"}).status == 404
    assert call("GET", f"{sim}/v2/{eid}/health", key=extra).status == 200
    assert call("DELETE", f"{sim}/_sim/keys/{extra}").status == 204
    assert call("GET", f"{sim}/v2/{eid}/health", key=extra).status == 401
    assert call("GET", f"{sim}/v2/serverless", key=extra).status == 401
    assert call("POST", f"{sim}/graphql", {"query": "{ myself { id } }"}, extra).status == 401


def test_knobs_and_fail_next(sim: str) -> None:
    _, key = new_account(sim)
    eid = new_endpoint(sim, key)["id"]
    base, knobs = f"{sim}/v2/{eid}", f"{sim}/_sim/endpoints/{eid}"
    chat = {"model": "m", "messages": [{"role": "user", "content": "a b c d"}], "stream": True}

    assert call("PATCH", knobs, {"health": "throttled"}).json()["health"] == "throttled"
    assert call("GET", f"{base}/health", key=key).json()["workers"]["throttled"] == 1
    # No worker gets a GPU: the job stays in the queue.
    assert call("POST", f"{base}/runsync?wait=100", {"input": {}}, key).json()["status"] == "IN_QUEUE"
    assert call("GET", f"{base}/health", key=key).json()["jobs"]["inQueue"] == 1
    assert call("PATCH", knobs, {"health": "sleepy"}).status == 400
    call("PATCH", knobs, {"health": "ready"})
    assert call("PATCH", f"{sim}/_sim/endpoints/nosuchendpoint1", {"fail": "none"}).status == 404

    call("PATCH", knobs, {"cold_start_ms": 300, "stream_delay_ms": 50})
    started = time.monotonic()
    sse(call("POST", f"{base}/openai/v1/chat/completions", chat, key))  # 300 ms cold start + 5 gaps of 50 ms
    assert time.monotonic() - started >= 0.5
    call("PATCH", knobs, {"stream_delay_ms": 0})
    started = time.monotonic()
    call("POST", f"{base}/runsync", {"input": {}}, key)
    assert time.monotonic() - started < 0.25  # warm now

    call("PATCH", knobs, {"fail": "http500"})
    assert call("POST", f"{base}/runsync", {"input": {}}, key).status == 500
    call("PATCH", knobs, {"fail": "worker_error_200"})
    crashed = call("POST", f"{base}/openai/v1/chat/completions", chat, key)
    assert (crashed.status, crashed.json()["error"]["type"]) == (200, "worker_error")
    assert call("GET", f"{base}/health", key=key).json()["jobs"]["failed"] == 1
    call("PATCH", knobs, {"fail": "unauthorized"})
    assert call("GET", f"{base}/health", key=key).status == 401
    call("PATCH", knobs, {"fail": "none"})

    rule = {"path_contains": f"/v2/{eid}/runsync", "status": 503}
    assert call("POST", f"{sim}/_sim/fail-next", rule).status == 201
    assert call("POST", f"{base}/runsync", {"input": {}}, key).status == 503
    assert call("POST", f"{base}/runsync", {"input": {}}, key).status == 200
    call("POST", f"{sim}/_sim/fail-next", {"path_contains": "/v2/serverless", "status": 500})
    failed = call("GET", f"{sim}/v2/serverless", key=key)
    assert failed.status == 500 and failed.content_type == "application/problem+json"


def test_embedded_serve() -> None:
    async def scenario() -> None:
        runner, port = await runpod_simulator.serve("127.0.0.1", 0, [FILE_ACCOUNT])
        try:
            reply = await asyncio.to_thread(call, "POST", f"http://127.0.0.1:{port}/graphql",
                                            {"query": "{ myself { id } }"}, "rpa_file")
            assert reply.json()["data"]["myself"]["id"] == "user_file"
        finally:
            await runner.cleanup()

    asyncio.run(scenario())


def test_state_file_keeps_templates_and_endpoints_across_a_restart(tmp_path: Any) -> None:
    """RunPod keeps an account's resources until they are deleted; `--state` lets a restarted simulator
    do the same (the demo relies on it), and a deletion is kept too. A file only the owner reads."""
    accounts, state = tmp_path / "accounts.json", tmp_path / "state.json"
    accounts.write_text(json.dumps({"accounts": [FILE_ACCOUNT]}))
    key = FILE_ACCOUNT["keys"][0]

    @contextmanager
    def started() -> Iterator[str]:
        port_file = tmp_path / "port"
        port_file.unlink(missing_ok=True)
        command = [sys.executable, "-m", "control.runpod_simulator", "--accounts", str(accounts),
                   "--port-file", str(port_file), "--state", str(state)]
        with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL) as proc:
            deadline = time.monotonic() + 10
            while not port_file.exists():
                assert proc.poll() is None and time.monotonic() < deadline, "simulator did not start"
                time.sleep(0.02)
            yield f"http://127.0.0.1:{int(port_file.read_text())}"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=5) == 0

    with started() as base:
        kept, dropped = new_endpoint(base, key), new_endpoint(base, key)
        assert call("DELETE", f"{base}/v2/serverless/{dropped['id']}", key=key).status == 204
    assert state.stat().st_mode & 0o077 == 0
    with started() as base:
        listed = call("GET", f"{base}/v2/serverless", key=key).json()["endpoints"]
        assert [e["id"] for e in listed] == [kept["id"]]
        assert listed[0]["requestUrls"]["health"] == f"{base}/v2/{kept['id']}/health"  # today's address
        assert [t["id"] for t in call("GET", f"{base}/v2/templates", key=key).json()["templates"]] == [
            kept["templateId"]]
        chat = call("POST", f"{base}/v2/{kept['id']}/openai/v1/chat/completions",
                    {"model": "m", "messages": [{"role": "user", "content": "again"}]}, key)
        assert chat.status == 200 and chat.json()["choices"][0]["message"]["content"] == "Echo: again"


def vllm_endpoint(base: str, key: str, env: dict[str, str], gpu: dict[str, Any]) -> str:
    tpl = call("POST", f"{base}/v2/templates", {"name": f"t-{uuid.uuid4().hex[:8]}", "serverless": True,
                                                 "image": "runpod/worker-v1-vllm:v2.25.2", "env": env}, key)
    assert tpl.status == 201, tpl.body
    ep = call("POST", f"{base}/v2/serverless", {"name": "e", "type": "QUEUE", "templateId": tpl.json()["id"],
                                                "gpu": {"pools": ["ADA_24"], **gpu}, "workers": {"idleTimeout": 1},
                                                "scaling": {"type": "QUEUE_DELAY", "queueDelay": 4}}, key)
    assert ep.status == 201, ep.body
    return str(ep.json()["id"])


def workers(base: str, eid: str, key: str) -> dict[str, int]:
    return {k: v for k, v in call("GET", f"{base}/v2/{eid}/health", key=key).json()["workers"].items() if v}


def test_worker_lifecycle_cold_start_and_scale_down(sim: str) -> None:
    _, key = new_account(sim)
    eid = vllm_endpoint(sim, key, {"MODEL_NAME": "org/m"}, {"allowedCudaVersions": ["13.0"]})
    base = f"{sim}/v2/{eid}"
    assert workers(sim, eid, key) == {"idle": 1}  # image cached, no model loaded
    call("PATCH", f"{sim}/_sim/endpoints/{eid}", {"cold_start_ms": 600})
    queued = call("POST", f"{base}/run", {"input": {"n": 1}}, key).json()
    assert queued["status"] == "IN_QUEUE"
    assert workers(sim, eid, key) == {"initializing": 1}
    health = call("GET", f"{base}/health", key=key).json()
    assert health["jobs"]["inQueue"] == 1
    assert call("GET", f"{base}/status/{queued['id']}", key=key).json()["status"] == "IN_QUEUE"
    time.sleep(0.7)
    assert workers(sim, eid, key) == {"idle": 1, "ready": 1}
    assert call("GET", f"{base}/status/{queued['id']}", key=key).json()["status"] == "COMPLETED"
    assert call("GET", f"{base}/health", key=key).json()["jobs"]["inQueue"] == 0
    time.sleep(1.2)  # idleTimeout 1 s: the worker scales down and the next job pays the cold start again
    assert workers(sim, eid, key) == {"idle": 1}
    started = time.monotonic()
    assert call("GET", f"{base}/openai/v1/models", key=key).status == 200
    assert time.monotonic() - started >= 0.55


def test_active_workers_start_without_a_job_and_never_scale_down(sim: str) -> None:
    _, key = new_account(sim)
    eid = vllm_endpoint(sim, key, {"MODEL_NAME": "org/m"}, {"allowedCudaVersions": ["13.0"]})
    call("PATCH", f"{sim}/_sim/endpoints/{eid}", {"cold_start_ms": 300})
    assert call("PATCH", f"{sim}/v2/serverless/{eid}", {"workers": {"min": 1}}, key).status == 200
    assert workers(sim, eid, key) == {"initializing": 1}  # warm from the start: its cold start runs now
    time.sleep(0.4)
    assert workers(sim, eid, key) == {"idle": 1, "ready": 1}
    time.sleep(1.2)  # past idleTimeout 1 s, with no job at all: still running
    assert workers(sim, eid, key) == {"idle": 1, "ready": 1}
    started = time.monotonic()
    assert call("GET", f"{sim}/v2/{eid}/openai/v1/models", key=key).status == 200
    assert time.monotonic() - started < 0.25  # no cold start


@pytest.mark.parametrize("env, gpu", [
    ({"MODEL_NAME": "org/m"}, {}),  # no CUDA constraint: lands on drivers below 13.0
    ({"MODEL_NAME": "org/m"}, {"allowedCudaVersions": ["13.0", "12.8"]}),
    ({"MODEL_NAME": "org/m"}, {"minCudaVersion": "12.4"}),
    ({"MODEL_NAME": "meta-llama/Llama-3.1-8B-Instruct"}, {"allowedCudaVersions": ["13.0"]}),  # gated, no token
])
def test_workers_that_never_start_leave_jobs_in_queue(sim: str, env: dict[str, str], gpu: dict[str, Any]) -> None:
    _, key = new_account(sim)
    eid = vllm_endpoint(sim, key, env, gpu)
    base = f"{sim}/v2/{eid}"
    assert call("POST", f"{base}/runsync?wait=200", {"input": {}}, key).json()["status"] == "IN_QUEUE"
    assert workers(sim, eid, key) == {"unhealthy": 1}
    # An OpenAI-route request hangs until its caller gives up; its job stays queued.
    with pytest.raises(OSError):
        import urllib.request
        req = urllib.request.Request(f"{base}/openai/v1/models", headers={"Authorization": f"Bearer {key}"})
        urllib.request.urlopen(req, timeout=0.5)
    time.sleep(0.1)
    assert call("GET", f"{base}/health", key=key).json()["jobs"]["inQueue"] == 2


def test_a_gated_model_with_a_token_and_cuda_13_starts(sim: str) -> None:
    _, key = new_account(sim)
    eid = vllm_endpoint(sim, key, {"MODEL_NAME": "meta-llama/Llama-3.1-8B-Instruct", "HF_TOKEN": "hf_x"},
                        {"minCudaVersion": "13.0"})
    assert call("GET", f"{sim}/v2/{eid}/openai/v1/models", key=key).status == 200


def test_init_timeout_and_scaled_down_endpoints(sim: str) -> None:
    _, key = new_account(sim)
    eid = vllm_endpoint(sim, key, {"MODEL_NAME": "org/m", "RUNPOD_INIT_TIMEOUT": "1"},
                        {"allowedCudaVersions": ["13.0"]})
    call("PATCH", f"{sim}/_sim/endpoints/{eid}", {"cold_start_ms": 5000})
    assert call("POST", f"{sim}/v2/{eid}/run", {"input": {}}, key).json()["status"] == "IN_QUEUE"
    assert workers(sim, eid, key) == {"initializing": 1}
    time.sleep(1.1)
    assert workers(sim, eid, key) == {"unhealthy": 1}  # cold start outlasted RUNPOD_INIT_TIMEOUT
    # RunPod scaled the endpoint down to 0 max workers: nothing starts, jobs wait.
    other = vllm_endpoint(sim, key, {"MODEL_NAME": "org/m"}, {"allowedCudaVersions": ["13.0"]})
    call("PATCH", f"{sim}/v2/serverless/{other}", {"workers": {"max": 0}}, key)
    assert call("POST", f"{sim}/v2/{other}/runsync?wait=100", {"input": {}}, key).json()["status"] == "IN_QUEUE"
    health = call("GET", f"{sim}/v2/{other}/health", key=key).json()
    assert (health["jobs"]["inQueue"], {k: v for k, v in health["workers"].items() if v}) == (1, {})


def test_cuda_versions_are_validated_as_the_openapi_says(sim: str) -> None:
    _, key = new_account(sim)
    bad = call("POST", f"{sim}/v2/templates", {"name": "c", "image": "i", "allowedCudaVersions": ["13"]}, key)
    assert bad.status == 422 and "allowedCudaVersions[0]" in bad.json()["detail"]
    tpl = call("POST", f"{sim}/v2/templates", {"name": "c", "image": "i", "serverless": True}, key).json()
    body = {"name": "e", "type": "QUEUE", "templateId": tpl["id"], "scaling": {"type": "QUEUE_DELAY", "queueDelay": 4}}
    for gpu in ({"pools": ["ADA_24"], "minCudaVersion": "v13"}, {"pools": ["ADA_24"], "allowedCudaVersions": [13]}):
        assert call("POST", f"{sim}/v2/serverless", {**body, "gpu": gpu}, key).status == 422
    both = {"pools": ["ADA_24"], "allowedCudaVersions": ["13.0"], "minCudaVersion": "12.0"}
    assert call("POST", f"{sim}/v2/serverless", {**body, "gpu": both}, key).status == 400


def test_responses_images_speech_and_audio_routes(sim: str) -> None:
    import io
    import wave

    _, key = new_account(sim)
    base = f"{sim}/v2/{new_endpoint(sim, key)['id']}/openai/v1"
    plain = call("POST", f"{base}/responses", {"model": "m", "input": "a b", "max_output_tokens": 2}, key).json()
    assert plain["status"] == "incomplete" and plain["output"][0]["content"][0]["text"] == "Echo: a"
    assert (plain["usage"]["input_tokens"], plain["usage"]["output_tokens"]) == (2, 2)
    streamed = call("POST", f"{base}/responses", {"model": "m", "input": "a b", "stream": True}, key)
    events = [e for e in streamed.body.decode().split("\n\n") if e]
    assert events[0].startswith("event: response.created\ndata: ") and "[DONE]" not in streamed.body.decode()
    done = json.loads(events[-1].split("data: ", 1)[1])
    assert done["type"] == "response.completed" and done["response"]["usage"]["output_tokens"] == 3
    images = call("POST", f"{base}/images/generations", {"model": "m", "prompt": "p", "n": 3}, key).json()
    assert len(images["data"]) == 3 and len({d["b64_json"] for d in images["data"]}) == 3
    assert call("POST", f"{base}/images/generations", {"model": "m", "prompt": "p", "n": 11}, key).status == 400
    speech = call("POST", f"{base}/audio/speech", {"model": "m", "input": "héllo", "voice": "alloy"}, key)
    assert speech.content_type == "audio/mpeg" and len(speech.body) == 5 * 64
    wav_file = io.BytesIO()
    with wave.open(wav_file, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\0" * 4 * 8000 * 3)
    boundary = "xyz"
    body = (b'--xyz\r\nContent-Disposition: form-data; name="model"\r\n\r\nm\r\n'
            b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
            + wav_file.getvalue() + b"\r\n--xyz--\r\n")
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    text = call("POST", f"{base}/audio/transcriptions", raw=body, key=key, headers=headers).json()
    assert text == {"text": "Transcribed 3 seconds of audio.", "usage": {"type": "duration", "seconds": 3.0}}
    other = body.replace(b"\r\n\r\nm\r\n", b"\r\n\r\nnot-served\r\n")
    refused = call("POST", f"{base}/audio/translations", raw=other, key=key, headers=headers).json()
    assert refused["error"]["type"] == "worker_error" and "404" in refused["error"]["message"]
    mp3 = body.replace(wav_file.getvalue(), b"\xff\xfb" * 100)
    assert call("POST", f"{base}/audio/transcriptions", raw=mp3, key=key, headers=headers).status == 400
