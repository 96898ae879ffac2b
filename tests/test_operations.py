"""Operations under steady load: a rolling restart of the ext_authz replicas and a reload of an edited
envoy.yaml each lose no request; every service's metrics endpoint serves its documented series."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from control.env import SettingsError
from control.settings import ControlSettings, default_envoy_concurrency, read_runtime
from control.stack import extauth_hosts_healthy
from tests.conftest import Gateway, Simulator, Tenant, make_tenant, start_gateway
from tests.support import call, envoy_copy, wait_until


class SteadyLoad:
    """A few clients calling the gateway back to back, counting every status (and connection errors)."""

    def __init__(self, gateway: Gateway, tenant: Tenant, clients: int = 4) -> None:
        self.statuses: Counter[int | str] = Counter()
        self.headers: list[str | None] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(gateway, tenant)) for _ in range(clients)]

    def _run(self, gateway: Gateway, tenant: Tenant) -> None:
        body = {"model": tenant.chat_model, "messages": [{"role": "user", "content": "hi"}]}
        while not self._stop.is_set():
            try:
                reply = call("POST", f"{gateway.base_url}/chat/completions", body, key=tenant.api_key)
                self.statuses[reply.status] += 1
                self.headers.append(reply.headers.get("x-config-version"))
            except OSError as exc:
                self.statuses[type(exc).__name__] += 1

    def __enter__(self) -> SteadyLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def total(self) -> int:
        return sum(self.statuses.values())


@pytest.fixture(scope="module")
def operator_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return envoy_copy(tmp_path_factory.mktemp("operator"))


@pytest.fixture(scope="module")
def ops_gateway(
    tmp_path_factory: pytest.TempPathFactory, database_url: str, redis_url: str, simulator: Simulator,
    operator_config: Path,
) -> Iterator[Gateway]:
    yield from start_gateway(tmp_path_factory.mktemp("gw-ops"), database_url, redis_url, simulator.url,
                             {"EXTAUTH_REPLICAS": "2", "GATEWAY_ENVOY_CONFIG": str(operator_config),
                              # More workers than this machine's cores, so the figure can only be the setting's.
                              "GATEWAY_ENVOY_CONCURRENCY": "3"})


@pytest.fixture(scope="module")
def ops_tenant(ops_gateway: Gateway, simulator: Simulator) -> Tenant:
    t = make_tenant(ops_gateway, simulator, plan="team")
    # Enough that the steady load never meets the rate limit.
    ops_gateway.ctl_json("workspace", "set-plan", t.workspace_id, "enterprise",
                         "--rpm-default", "1000000", "--rpm-ceiling", "1000000")
    return t


def test_envoy_runs_the_configured_workers_and_one_per_core_by_default(
    ops_gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = call("GET", f"{ops_gateway.admin}/server_info").json()
    assert info["command_line_options"]["concurrency"] == 3

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3, 4, 5, 6, 7})
    assert default_envoy_concurrency() == 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set())
    assert default_envoy_concurrency() == 1  # never none
    monkeypatch.setenv("GATEWAY_ENVOY_CONCURRENCY", "4")
    assert ControlSettings.from_env(use_runtime=False).envoy_concurrency == 4
    monkeypatch.setenv("GATEWAY_ENVOY_CONCURRENCY", "0")
    with pytest.raises(SettingsError, match="GATEWAY_ENVOY_CONCURRENCY"):
        ControlSettings.from_env(use_runtime=False)


def test_rolling_restart_of_extauth_loses_no_request(ops_gateway: Gateway, ops_tenant: Tenant) -> None:
    with SteadyLoad(ops_gateway, ops_tenant) as load:
        time.sleep(0.5)
        for name in ("extauth-0", "extauth-1"):
            old = read_runtime(ops_gateway.state_dir)["pids"][name]
            os.kill(old, signal.SIGTERM)
            pids = lambda name=name: read_runtime(ops_gateway.state_dir)["pids"][name]  # noqa: E731
            wait_until(lambda old=old, pids=pids: pids() != old, 20, f"{name} restarted")
            # As an operator would: the next one goes only once Envoy sees every replica healthy again.
            wait_until(lambda: extauth_hosts_healthy(ops_gateway.admin, 2), 20, "every replica healthy")
        time.sleep(0.5)
    assert load.total() > 100
    assert set(load.statuses) == {200}, load.statuses


def test_edited_envoy_config_reloads_with_zero_failed_requests(
    ops_gateway: Gateway, ops_tenant: Tenant, operator_config: Path
) -> None:
    text = operator_config.read_text()
    edited = text.replace(
        "            - name: openai\n              domains: [\"*\"]\n",
        "            - name: openai\n              domains: [\"*\"]\n"
        "              response_headers_to_add:\n"
        "              - header: { key: x-config-version, value: \"2\" }\n",
    )
    assert edited != text
    with SteadyLoad(ops_gateway, ops_tenant) as load:
        time.sleep(0.5)
        # A broken edit is refused and the running config keeps serving.
        operator_config.write_text(edited.replace("cluster: runpod", "cluster: no-such-cluster", 1))
        refused = ops_gateway.ctl("reload", "--json")
        assert refused.returncode != 0 and "reload_refused" in refused.stderr
        operator_config.write_text(edited)
        assert ops_gateway.ctl_json("reload")["ok"] is True
        wait_until(lambda: load.headers[-1:] == ["2"], 15, "the edited config to serve")
        time.sleep(1)
    assert set(load.statuses) == {200}, load.statuses
    assert load.headers.count("2") > 10


def test_metrics_endpoints_serve_the_documented_series(ops_gateway: Gateway, ops_tenant: Tenant) -> None:
    runtime = read_runtime(ops_gateway.state_dir)
    call("GET", f"{ops_gateway.base_url}/models", key=ops_tenant.api_key)
    envoy = call("GET", f"{ops_gateway.admin}/stats/prometheus").body.decode()
    assert re.search(r"envoy_http_downstream_rq_xx\{[^}]*\} [1-9]", envoy)
    assert "envoy_cluster_ext_authz_ok" in envoy or "envoy_http_ext_authz_ok" in envoy
    for _ in range(10):
        call("GET", f"{ops_gateway.base_url}/models", key=ops_tenant.api_key)
    scraped = [call("GET", url).body.decode() for url in runtime["extauth_metrics_urls"]]
    for text in scraped:
        for series in ("gateway_extauth_decisions_total", "gateway_extauth_check_duration_seconds_bucket",
                       "gateway_extauth_cache_lookups_total"):
            assert series in text, series
    together = "\n".join(scraped)
    assert re.search(r'gateway_extauth_decisions_total\{[^}]*decision="local"[^}]*\} [1-9]', together)
    assert "gateway_extauth_ratelimit_utilization_bucket" in together
    assert re.search(rf'gateway_extauth_ratelimit_top_keys\{{[^}}]*key_id="{ops_tenant.key_id}"', together)
    call("POST", f"{ops_gateway.base_url}/chat/completions",
         {"model": ops_tenant.chat_model, "messages": [{"role": "user", "content": "count these"}]},
         key=ops_tenant.api_key)
    tokens = re.compile(r'gen_ai_client_token_usage_total\{[^}]*gen_ai_token_type="input"[^}]*\} [1-9]')
    wait_until(lambda: tokens.search(call("GET", runtime["meter_metrics_url"]).body.decode()) is not None,
               10, "the meter to record tokens")
    meter = call("GET", runtime["meter_metrics_url"]).body.decode()
    for series in ("gateway_meter_requests_total", "gateway_meter_lines_total", "gateway_meter_lag_bytes"):
        assert series in meter, series
