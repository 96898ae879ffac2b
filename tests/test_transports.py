"""The ext_authz transports: the shipped HTTP one (how the body's model and the decision travel as
headers, and what a client cannot forge there) and the gRPC one, selected by EXTAUTH_TRANSPORT=grpc alone."""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal

import openai
import pytest
import yaml

from control import deployments, pricing
from control.settings import read_runtime
from tests.conftest import Gateway, Simulator, Tenant, make_tenant, start_gateway
from tests.support import ROOT, call, wait_until


def chat_body(model: str) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    "model",
    ["a\nb\r\nx-injected: 1", "nul\x00char", "模型-über", "100%-sure", "quote\"and\\slash", " ",
     # The body's facts travel as JSON (extauth/body_facts.py), a voice form's as `name=value&...`: a
     # name holding their separators, quotes or an escape is taken whole, never as another model or fact.
     "x&model={chat}", "{chat}&bytes=0&max_tokens=1", "=x&model={chat}", "%26model={chat}", "{chat}%",
     '{chat}","model":"{chat}', '{chat}\\","n":9', "{chat} {{}}"],
)
def test_any_model_string_gets_model_not_found_with_the_name_echoed(
    gateway: Gateway, tenant: Tenant, model: str
) -> None:
    model = model.format(chat=tenant.chat_model)
    reply = call("POST", f"{gateway.base_url}/chat/completions", chat_body(model), key=tenant.api_key)
    assert reply.status == 404, reply.body
    error = reply.json()["error"]
    assert error["code"] == "model_not_found"
    assert f"`{model}`" in error["message"]
    assert "x-injected" not in {k.lower() for k in reply.headers}


def test_a_model_with_a_del_character_is_refused_as_invalid_not_as_an_outage(gateway: Gateway, tenant: Tenant) -> None:
    """DEL is the one character JSON leaves unescaped that Envoy never sends in a header (the check's
    facts travel in one): the check cannot be asked, and the client is told why, in OpenAI's shape."""
    for key in (tenant.api_key, "sk-not-a-key"):
        reply = call("POST", f"{gateway.base_url}/chat/completions", chat_body("del\x7fchar"), key=key)
        assert reply.status == 400, reply.body
        error = reply.json()["error"]
        assert (error["code"], error["type"], error["param"]) == ("invalid_value", "invalid_request_error", None)
        assert "DEL" in error["message"]
        assert "retry-after" not in {k.lower() for k in reply.headers}


def test_a_model_that_is_not_a_string_is_refused_as_such(gateway: Gateway, tenant: Tenant) -> None:
    for model in (None, 5, ["x"], {"x": 1}):
        body = {"messages": []} if model is None else {"model": model, "messages": []}
        reply = call("POST", f"{gateway.base_url}/chat/completions", body, key=tenant.api_key)
        assert reply.status == 400, (model, reply.body)
        assert reply.json()["error"]["code"] == ("missing_model" if model is None else "invalid_type")


def test_forged_transport_headers_change_nothing(gateway: Gateway, simulator: Simulator, tenant: Tenant) -> None:
    """A client sending the headers ext_authz and gateway.lua use among themselves gets nothing from it."""
    other = make_tenant(gateway, simulator)
    forged = {
        "x-gateway-body": f'1 {{"model":"{other.chat_model}"}}',
        "x-gateway-form": f"model={other.chat_model}&bytes=1",
        "x-gateway-path": f"/v2/{other.deployments[other.chat_model]}/openai/v1/chat/completions",
        "x-gateway-destination": "managed",
        "x-gw-log": json.dumps({"decision": "allow", "workspace_id": other.workspace_id}),
        "x-envoy-auth-headers-to-remove": "authorization",
    }
    before = len(simulator.requests())
    # Without a body model the forged model header is not taken.
    reply = call("POST", f"{gateway.base_url}/chat/completions", {"messages": []}, key=tenant.api_key, headers=forged)
    assert reply.status == 400 and reply.json()["error"]["code"] == "missing_model"
    # With one, the request goes where the body's model says, and the forged headers are gone.
    reply = call("POST", f"{gateway.base_url}/chat/completions", chat_body(tenant.chat_model), key=tenant.api_key,
                 headers=forged)
    assert reply.status == 200, reply.body
    [seen] = [r for r in simulator.requests()[before:] if "/openai/" in r["path"]]
    assert seen["path"] == f"/v2/{tenant.deployments[tenant.chat_model]}/openai/v1/chat/completions"
    assert seen["headers"]["authorization"] == f"Bearer {tenant.runpod_key}"
    assert not {name.lower() for name in seen["headers"]} & set(forged), seen["headers"]
    # The access log holds ext_authz's own record, not the forged one.
    request_id = seen["headers"]["x-request-id"]
    wait_until(lambda: any(line["request_id"] == request_id for line in gateway.access_log()), 5, "the log line")
    [logged] = [line for line in gateway.access_log() if line["request_id"] == request_id]
    assert logged["workspace_id"] == tenant.workspace_id and logged["decision"] == "allow"


def test_the_models_route_is_not_reachable_by_a_client(gateway: Gateway, simulator: Simulator, tenant: Tenant) -> None:
    """/v1/models is served by ext_authz through a route only ext_authz's own answer selects."""
    for path in (f"/_gateway/models/{tenant.workspace_id}", f"/_gateway/models/{tenant.workspace_id}/x"):
        reply = call("GET", f"{gateway.url}{path}", key=tenant.api_key, headers={"x-gateway-destination": "local"})
        assert reply.status == 404, reply.body
        assert tenant.chat_model not in reply.body.decode()


def test_the_body_check_route_is_only_what_ext_authz_sends_there(gateway: Gateway, tenant: Tenant) -> None:
    """The admin port's body check is reached only through ext_authz's answer, and only Envoy may ask it."""
    reply = call("POST", f"{gateway.url}/internal/body-check", [1], key=tenant.api_key,
                 headers={"x-gateway-destination": "body_check"})
    assert reply.status == 404 and reply.json()["error"]["code"] == "unknown_url", reply.body
    admin = gateway.env["EXTAUTH_METRICS_LISTEN"]
    direct = call("POST", f"http://{admin}/internal/body-check", [1], headers={"x-gateway-secret": "guess"})
    assert direct.status == 403 and "JSON object" not in direct.body.decode(), direct.body


# --- the gRPC transport, one setting away ---------------------------------------------------------------


@pytest.fixture(scope="module")
def grpc_gateway(
    tmp_path_factory: pytest.TempPathFactory, database_url: str, redis_url: str, simulator: Simulator,
    gateway: Gateway,
) -> Iterator[Gateway]:
    """The same shipped envoy/envoy.yaml, with EXTAUTH_TRANSPORT=grpc and nothing else changed; a node
    of the same fleet as `gateway` (one master keyring, one platform key for the managed destination)."""
    root = tmp_path_factory.mktemp("grpc")
    yield from start_gateway(root, database_url, redis_url, simulator.url,
                             {"EXTAUTH_TRANSPORT": "grpc",
                              "GATEWAY_MASTER_KEY_FILE": str(gateway.state_dir / "master.key"),
                              "GATEWAY_MANAGED_API_KEY": gateway.env["GATEWAY_MANAGED_API_KEY"]})


def test_the_grpc_setting_renders_the_grpc_blocks_of_the_shipped_file(grpc_gateway: Gateway) -> None:
    [effective] = sorted(grpc_gateway.state_dir.glob("envoy.effective.*.yaml"))
    config = yaml.safe_load(effective.read_text())
    shipped = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())
    [cluster] = [c for c in config["static_resources"]["clusters"] if c["name"] == "extauth"]
    blocks = cluster["metadata"]["filter_metadata"]["gateway.grpc_transport"]
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    [authz] = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_authz"]
    assert "http_service" not in authz["typed_config"]
    assert authz["typed_config"]["grpc_service"] == blocks["grpc_service"]
    # The pre-check of large bodies is the same service, marked as the pre-check, with the secret too.
    [precheck] = [f for f in hcm["http_filters"] if f["name"] == "gateway.key_precheck"]
    precheck_authz = precheck["typed_config"]["extension_config"]["typed_config"]
    assert "http_service" not in precheck_authz
    metadata = {m["key"]: m["value"] for m in precheck_authz["grpc_service"]["initial_metadata"]}
    assert metadata == {"x-gateway-secret": "%ENVIRONMENT(GATEWAY_EXTAUTH_SECRET)%", "x-gateway-precheck": "1"}
    assert cluster["health_checks"][0]["grpc_health_check"] == blocks["grpc_health_check"]
    assert "http_health_check" not in cluster["health_checks"][0]
    [shipped_cluster] = [c for c in shipped["static_resources"]["clusters"] if c["name"] == "extauth"]
    assert shipped_cluster["metadata"] == cluster["metadata"], "the blocks come from the shipped file as they are"


def test_the_grpc_transport_decides_the_same(grpc_gateway: Gateway, gateway: Gateway, simulator: Simulator) -> None:
    t = make_tenant(gateway, simulator)
    sdk = openai.OpenAI(base_url=grpc_gateway.base_url, api_key=t.api_key, max_retries=0)
    raw = sdk.chat.completions.with_raw_response.create(
        model=t.chat_model, messages=[{"role": "user", "content": "one two"}])
    assert raw.parse().usage is not None and raw.parse().usage.completion_tokens > 0
    assert raw.headers["x-ratelimit-limit"] == "500"
    chunks = list(sdk.chat.completions.create(model=t.chat_model, messages=[{"role": "user", "content": "a b"}],
                                              stream=True))
    assert chunks
    assert sorted(m.id for m in sdk.models.list()) == sorted([t.chat_model, t.embedding_model])
    assert sdk.models.retrieve(t.embedding_model).id == t.embedding_model
    long = [{"role": "system", "content": "x" * 200_000}, {"role": "user", "content": "long"}]  # pre-checked
    assert sdk.chat.completions.create(model=t.chat_model, messages=long).choices[0].message.content == "Echo: long"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=grpc_gateway.base_url, api_key="sk-gw-wrong", max_retries=0).chat.completions.create(
            model=t.chat_model, messages=long)
    with pytest.raises(openai.NotFoundError) as info:
        sdk.chat.completions.create(model="nope\x7f", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=grpc_gateway.base_url, api_key="sk-gw-wrong", max_retries=0).models.list()
    seen = [r for r in simulator.requests() if r["path"].startswith(f"/v2/{t.deployments[t.chat_model]}/openai/")]
    assert seen and all(r["headers"]["authorization"] == f"Bearer {t.runpod_key}" for r in seen)
    assert all("x-gateway-path" not in {k.lower() for k in r["headers"]} for r in seen)

    def logged() -> list[dict[str, object]]:
        return [line for line in grpc_gateway.access_log() if line.get("workspace_id") == t.workspace_id]

    # Every line the test expects, not just the first ones: the access log is flushed in batches.
    wait_until(lambda: {line.get("decision") for line in logged()} >= {"allow", "local"}
               and {line.get("error_code") for line in logged()} >= {"model_not_found"}, 10, "the log lines")
    assert any(line.get("prompt_tokens") for line in logged())


def test_over_grpc_the_bodys_budget_sizes_the_spend_reservation_too(
    grpc_gateway: Gateway, gateway: Gateway, simulator: Simulator
) -> None:
    """The body's facts reach the gRPC check in the same header as the HTTP one: a managed request that
    states a small completion budget fits what is left of the limit, the same request without one
    reserves the 4,096-token default and is refused before it costs anything."""
    t = make_tenant(gateway, simulator)
    with gateway.context() as ctx:
        opts = deployments.DeployOptions("org/llm", "llm", "g-llm", wait_timeout_s=10, destination="managed")
        deployments.deploy(ctx, t.workspace_id, opts, progress=lambda _m: None,
                           price=pricing.Price(Decimal(10), Decimal(20)))  # USD per million tokens
    gateway.ctl_json("workspace", "set-spend-limit", t.workspace_id, "0.01")  # 4,096 x $20/M = $0.08 > $0.01
    sdk = openai.OpenAI(base_url=grpc_gateway.base_url, api_key=t.api_key, max_retries=0)
    ask = [{"role": "user", "content": "a b"}]

    def refused() -> bool:
        try:
            sdk.chat.completions.create(model="g-llm", messages=ask)
        except openai.PermissionDeniedError as exc:
            return exc.code == "plan_limit_exceeded"
        return False

    wait_until(refused, 10, "the limit known to the gRPC gateway")
    answer = sdk.chat.completions.create(model="g-llm", messages=ask, max_tokens=16)
    assert answer.choices[0].message.content == "Echo: a b"
    assert refused()


def test_the_grpc_check_port_refuses_a_caller_without_envoys_secret(
    grpc_gateway: Gateway, gateway: Gateway, simulator: Simulator
) -> None:
    """An attacker on the internal network with a valid gateway key, speaking Envoy's own gRPC API."""
    import grpc
    from envoy.config.core.v3 import base_pb2 as base
    from envoy.service.auth.v3 import attribute_context_pb2 as attributes
    from envoy.service.auth.v3 import external_auth_pb2 as authz
    from envoy.service.auth.v3 import external_auth_pb2_grpc as authz_grpc
    from google.protobuf.struct_pb2 import Struct, Value
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tests.test_custody import process_env

    t = make_tenant(gateway, simulator)
    secret = process_env(read_runtime(grpc_gateway.state_dir)["pids"]["extauth-0"])["GATEWAY_EXTAUTH_SECRET"]
    request = authz.CheckRequest(attributes=attributes.AttributeContext(request=attributes.AttributeContext.Request(
        http=attributes.AttributeContext.HttpRequest(
            method="POST", path="/v1/chat/completions",
            headers={"authorization": f"Bearer {t.api_key}",
                     # Where a client's own headers travel: never taken as the secret.
                     "x-gateway-secret": secret})),
        # The body's facts, as Envoy sends them (json_to_metadata's namespace).
        metadata_context=base.Metadata(filter_metadata={"envoy.filters.http.json_to_metadata": Struct(
            fields={"model": Value(string_value=t.chat_model)})})))
    with grpc.insecure_channel(grpc_gateway.env["EXTAUTH_LISTEN"]) as channel:
        check = authz_grpc.AuthorizationStub(channel).Check
        # The control: with Envoy's metadata the same request is a decision carrying the RunPod key.
        allowed = check(request, metadata=[("x-gateway-secret", secret)], timeout=5)
        assert f"Bearer {t.runpod_key}" in str(allowed)
        for metadata in ([], [("x-gateway-secret", "wrong")], [("x-gateway-secret", secret[:-1])]):
            with pytest.raises(grpc.RpcError) as refused:
                check(request, metadata=metadata, timeout=5)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert t.runpod_key not in str(refused.value) and secret not in str(refused.value)
        health = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        served = health.Check(health_pb2.HealthCheckRequest(), metadata=[("x-gateway-secret", secret)], timeout=5)
        assert served.status == health_pb2.HealthCheckResponse.SERVING
