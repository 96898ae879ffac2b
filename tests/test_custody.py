"""Key custody, tried as an attacker on the internal network (or any local user) would: with a valid
gateway key, straight at ext_authz's ports, at Envoy's admin through the stats listener, and by starting
a second stack on the first one's ports. Only Envoy gets a decision that carries a credential."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import yaml

from control import envoy_config
from control.env import HostPort, SettingsError
from control.net import free_port, free_ports, wait_for_port
from control.settings import read_runtime
from control.stack import envoy_binary
from tests.conftest import Gateway, Simulator, Tenant, make_tenant
from tests.support import ROOT, call, render_on_placeholders, running, wait_until

SECRET_HEADER = "x-gateway-secret"


def process_env(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def stack_secret(gateway: Gateway) -> str:
    """The secret this start gave Envoy and ext_authz, read as only the stack's own user can."""
    return process_env(read_runtime(gateway.state_dir)["pids"]["extauth-0"])["GATEWAY_EXTAUTH_SECRET"]


def raw_request(address: str, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, str]:
    host, _, port = address.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers)
        reply = conn.getresponse()
        text = reply.read().decode(errors="replace") + "".join(f"\n{k}: {v}" for k, v in reply.getheaders())
        return reply.status, text
    finally:
        conn.close()


@pytest.fixture(scope="module")
def victim(gateway: Gateway, simulator: Simulator) -> Tenant:
    return make_tenant(gateway, simulator)


def check_headers(tenant: Tenant, **extra: str) -> dict[str, str]:
    return {"authorization": f"Bearer {tenant.api_key}", "x-gateway-body": f'9 {{"model":"{tenant.chat_model}"}}',
            **extra}


def test_the_check_port_refuses_a_caller_with_a_valid_key_but_without_envoys_secret(
    gateway: Gateway, victim: Tenant
) -> None:
    extauth = gateway.env["EXTAUTH_LISTEN"]
    managed_key = gateway.env["GATEWAY_MANAGED_API_KEY"]
    secret = stack_secret(gateway)
    # The control: with Envoy's secret the very same request is a decision carrying the RunPod key.
    status, text = raw_request(extauth, "POST", "/check/v1/chat/completions",
                               check_headers(victim, **{SECRET_HEADER: secret}))
    assert status == 200 and f"Bearer {victim.runpod_key}" in text
    attempts = [
        ("POST", "/check/v1/chat/completions", check_headers(victim)),
        ("POST", "/check/v1/chat/completions", check_headers(victim, **{SECRET_HEADER: "x" * len(secret)})),
        ("POST", "/check/v1/chat/completions", check_headers(victim, **{SECRET_HEADER: secret[:-1]})),
        ("POST", "/check/v1/chat/completions", check_headers(victim, **{SECRET_HEADER: "-"})),
        ("POST", "/check/v1/chat/completions", check_headers(victim, **{SECRET_HEADER: f"{secret}x"})),
        ("GET", "/check/v1/models", check_headers(victim)),
        ("GET", f"/_gateway/models/{victim.workspace_id}", check_headers(victim)),
        ("GET", f"/_gateway/models/{victim.workspace_id}/{victim.chat_model}", check_headers(victim)),
        ("GET", "/health", {}),
    ]
    for method, path, headers in attempts:
        status, text = raw_request(extauth, method, path, headers)
        assert status == 403, (path, status, text)
        assert victim.runpod_key not in text and managed_key not in text and victim.chat_model not in text
        assert secret not in text
        assert '"code": "forbidden"' in text
    # Envoy's own requests still carry it: the gateway serves as before.
    reply = call("POST", f"{gateway.base_url}/chat/completions",
                 {"model": victim.chat_model, "messages": [{"role": "user", "content": "hi"}]}, key=victim.api_key)
    assert reply.status == 200, reply.body
    assert call("GET", f"{gateway.base_url}/models", key=victim.api_key).status == 200


def test_a_client_cannot_hand_envoys_secret_header_to_ext_authz(gateway: Gateway, victim: Tenant) -> None:
    """A client's own x-gateway-secret is removed before anything else: it neither reaches ext_authz
    (where it could only break its own check) nor the upstream."""
    reply = call("POST", f"{gateway.base_url}/chat/completions",
                 {"model": victim.chat_model, "messages": [{"role": "user", "content": "hi"}]}, key=victim.api_key,
                 headers={SECRET_HEADER: "forged"})
    assert reply.status == 200, reply.body


def test_the_internal_credential_route_refuses_a_caller_without_envoys_secret(
    gateway: Gateway, victim: Tenant
) -> None:
    admin = gateway.env["EXTAUTH_METRICS_LISTEN"]
    for headers in ({}, {SECRET_HEADER: "wrong"}):
        status, text = raw_request(admin, "POST", "/internal/credential-rejected",
                                   {"content-type": "text/plain", **headers}, victim.workspace_id.encode())
        assert status == 403, text
    # The workspace was not marked: its requests still go through.
    reply = call("POST", f"{gateway.base_url}/chat/completions",
                 {"model": victim.chat_model, "messages": [{"role": "user", "content": "hi"}]}, key=victim.api_key)
    assert reply.status == 200, reply.body
    # What carries no credential stays open for Prometheus and orchestration.
    assert raw_request(admin, "GET", "/metrics", {})[0] == 200
    assert raw_request(admin, "GET", "/ready", {})[0] == 200


def test_the_secret_is_in_no_log_file_or_config_dump(gateway: Gateway, victim: Tenant) -> None:
    secret = stack_secret(gateway)
    raw_request(gateway.env["EXTAUTH_LISTEN"], "POST", "/check/v1/chat/completions", check_headers(victim))
    dump = call("GET", f"{gateway.admin}/config_dump").body.decode()
    assert "%ENVIRONMENT(GATEWAY_EXTAUTH_SECRET)%" in dump and secret not in dump
    assert secret not in gateway.all_output()
    for path in gateway.state_dir.rglob("*"):
        if path.is_file() and path.stat().st_size < 10_000_000:
            assert secret.encode() not in path.read_bytes(), path
    meter = read_runtime(gateway.state_dir)["pids"]["meter"]
    assert "GATEWAY_EXTAUTH_SECRET" not in process_env(meter), "the meter has no use for it"


# ---- Envoy's admin and the stats listener ----


def test_the_stats_listener_serves_prometheus_and_nothing_else(gateway: Gateway) -> None:
    stats = gateway.env["GATEWAY_STATS_LISTEN"]
    scraped = call("GET", f"{gateway.stats_url}/stats/prometheus")
    assert scraped.status == 200 and "envoy_cluster_membership_healthy" in scraped.body.decode()
    assert call("GET", f"{gateway.stats_url}/stats/prometheus?usedonly").status == 200
    for method, path in [
        ("POST", "/quitquitquit"), ("GET", "/quitquitquit"), ("POST", "/logging?http=trace"), ("POST", "/logging"),
        ("GET", "/config_dump"), ("GET", "/clusters"), ("GET", "/server_info"), ("POST", "/reopen_logs"),
        ("GET", "/stats"), ("GET", "/ready"), ("POST", "/stats/prometheus"), ("GET", "/stats/prometheus/"),
        ("GET", "/STATS/PROMETHEUS"), ("GET", "/stats/prometheus/../config_dump"),
        ("GET", "/stats/prometheus/%2e%2e/quitquitquit"), ("POST", "/healthcheck/fail"), ("POST", "/drain_listeners"),
    ]:
        status, text = raw_request(stats, method, path, {})
        assert status == 404, (method, path, status, text)
        assert "config_dump" not in text[:200] or path.endswith("config_dump")
    # Envoy is still up, still logging at its own level, and still serving.
    assert call("GET", f"{gateway.admin}/ready").body == b"LIVE\n"
    levels = call("POST", f"{gateway.admin}/logging").body.decode()
    assert "http: warning" in levels, levels


def non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.123", 9))  # no packet is sent: this only picks the outgoing interface
        except OSError:
            return None
        address: str = sock.getsockname()[0]
    return None if address.startswith("127.") else address


def test_the_admin_is_unreachable_on_the_network_interface(gateway: Gateway) -> None:
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback interface")
    admin_port = int(gateway.admin.rpartition(":")[2])
    with pytest.raises(OSError):
        socket.create_connection((address, admin_port), timeout=1).close()
    # The shipped file binds the admin to loopback, and the launcher refuses anything else.
    shipped = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())
    assert shipped["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    for admin in ("0.0.0.0", address, "::"):
        with pytest.raises(SettingsError, match="GATEWAY_ADMIN must be a loopback address"):
            envoy_config.render(ROOT / "envoy" / "envoy.yaml", listen=HostPort("127.0.0.1", 1),
                                admin=HostPort(admin, 2), stats=HostPort("127.0.0.1", 3), extauth=[], extauth_admin=[],
                                transport="http", runpod_inference_url="http://x", managed_url="http://x",
                                access_log=Path("/tmp/x"))


# ---- two stacks on one host ----


def test_a_second_stack_on_the_same_ports_refuses_to_start_and_names_the_address(
    gateway: Gateway, victim: Tenant, tmp_path: Path
) -> None:
    os.chmod(tmp_path, 0o755)
    # Everything of its own, except ext_authz's and the meter's ports, which are the first stack's.
    env = {**gateway.env, "GATEWAY_STATE_DIR": str(tmp_path / "state"), "GATEWAY_LISTEN": f"127.0.0.1:{free_port()}",
           "GATEWAY_ADMIN": f"127.0.0.1:{free_port()}", "GATEWAY_STATS_LISTEN": f"127.0.0.1:{free_port()}"}
    done = subprocess.run([sys.executable, "-m", "control.cli", "up"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert f"{gateway.env['EXTAUTH_LISTEN']} (EXTAUTH_LISTEN)" in output, output
    assert f"{gateway.env['METER_METRICS_LISTEN']} (METER_METRICS_LISTEN)" in output, output
    assert not (tmp_path / "state" / "logs" / "envoy.log").exists(), "nothing was started"
    reply = call("POST", f"{gateway.base_url}/chat/completions",
                 {"model": victim.chat_model, "messages": [{"role": "user", "content": "hi"}]}, key=victim.api_key)
    assert reply.status == 200, reply.body


def another_stacks_envoy(
    gateway: Gateway, tmp_path: Path, listen: HostPort, admin: HostPort, extauth: HostPort, extauth_admin: HostPort
) -> AbstractContextManager[subprocess.Popen[bytes]]:
    """Another stack's Envoy (its own secret) on these addresses, started: the shipped file, rendered as
    `gatewayctl up` does. Its log is tmp_path/envoy.log."""
    config = envoy_config.render(
        ROOT / "envoy" / "envoy.yaml", listen=listen, admin=admin, stats=HostPort("127.0.0.1", free_port()),
        extauth=[extauth], extauth_admin=[extauth_admin], transport="http",
        runpod_inference_url=gateway.env["RUNPOD_INFERENCE_URL"], managed_url=gateway.env["GATEWAY_MANAGED_URL"],
        access_log=tmp_path / "access.log")
    path = envoy_config.write(config, tmp_path / "envoy.yaml")
    env = {"PATH": os.environ["PATH"], "GATEWAY_EXTAUTH_SECRET": "another-stacks-secret-" + "s" * 32}
    return running([envoy_binary(), "-c", str(path), "--disable-hot-restart", "--log-level", "warning"], env,
                   tmp_path / "envoy.log")


@pytest.fixture
def stranger_envoy(gateway: Gateway, tmp_path: Path) -> Iterator[str]:
    """Another stack's Envoy whose `extauth` cluster points at the first stack's replica, as a crossed
    port would leave it."""
    listen, admin = free_port(), free_port()
    replica = HostPort.parse(gateway.env["EXTAUTH_LISTEN"], "EXTAUTH_LISTEN")
    metrics = HostPort.parse(gateway.env["EXTAUTH_METRICS_LISTEN"], "EXTAUTH_METRICS_LISTEN")
    with another_stacks_envoy(gateway, tmp_path, HostPort("127.0.0.1", listen), HostPort("127.0.0.1", admin),
                              replica, metrics):
        assert wait_for_port("127.0.0.1", listen, 20)
        yield f"http://127.0.0.1:{listen}"
        clusters = call("GET", f"http://127.0.0.1:{admin}/clusters").body.decode()
        assert f"extauth::{replica}::health_flags::/failed_active_hc" in clusters, clusters


def test_a_second_envoy_on_the_gateways_port_fails_instead_of_taking_half_its_clients(
    gateway: Gateway, victim: Tenant, tmp_path: Path
) -> None:
    """Envoy's default (SO_REUSEPORT) let a second Envoy of the same user bind the same port, and the
    kernel then split new connections between the two: measured 6 of 8 to the newcomer."""
    listen = HostPort.parse(gateway.env["GATEWAY_LISTEN"], "GATEWAY_LISTEN")
    elsewhere = [HostPort("127.0.0.1", free_port()) for _ in range(3)]
    with another_stacks_envoy(gateway, tmp_path, listen, *elsewhere) as proc:
        wait_until(lambda: proc.poll() is not None, 20, "the second Envoy to give up")
        for _ in range(8):
            reply = call("POST", f"{gateway.base_url}/chat/completions",
                         {"model": victim.chat_model, "messages": [{"role": "user", "content": "hi"}]},
                         key=victim.api_key)
            assert reply.status == 200, reply.body
    assert proc.returncode != 0
    assert "Address already in use" in (tmp_path / "envoy.log").read_text()


def test_a_replica_that_is_not_its_own_is_never_used(
    stranger_envoy: str, gateway: Gateway, simulator: Simulator, victim: Tenant
) -> None:
    simulator.clear()
    body = {"model": victim.chat_model, "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(20):
        reply = call("POST", f"{stranger_envoy}/v1/chat/completions", body, key=victim.api_key)
        assert reply.status == 503, reply.body
        assert reply.json()["error"]["code"] == "gateway_unavailable"
        assert "x-ratelimit-limit" not in {k.lower() for k in reply.headers}, "no decision was made"
    assert not [r for r in simulator.requests() if "/openai/" in r["path"]], "nothing was signed with its keys"


def test_a_port_counts_as_a_childs_only_when_its_own_process_listens_and_none_is_handed_out_twice() -> None:
    from control.net import listens, port_taken

    picked = [free_port() for _ in range(300)] + [free_ports(3) + i for _ in range(50) for i in range(3)]
    assert len(set(picked)) == len(picked), "a stack picks all its ports before it binds any"
    mine, theirs = free_port(), free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", mine))
        assert not listens(os.getpid(), mine), "bound is not listening"
        sock.listen()
        assert listens(os.getpid(), mine)
        squatter = subprocess.Popen([sys.executable, "-c", f"import socket, time; s = socket.socket(); "
                                     f"s.bind(('127.0.0.1', {theirs})); s.listen(); print(1, flush=True); "
                                     "time.sleep(30)"], stdout=subprocess.PIPE)
        try:
            assert squatter.stdout is not None and squatter.stdout.readline()
            assert port_taken("127.0.0.1", theirs) and not listens(os.getpid(), theirs)
            assert listens(squatter.pid, theirs)
        finally:
            squatter.kill()
            squatter.wait()


@pytest.mark.parametrize(("child", "setting"), [("extauth-0", "EXTAUTH_METRICS_LISTEN"),
                                               ("meter", "METER_METRICS_LISTEN")])
def test_a_child_that_cannot_listen_stops_the_stack_before_it_says_ready(
    gateway: Gateway, tmp_path: Path, child: str, setting: str
) -> None:
    """The port is free at the preflight and taken by the time the child binds: a fatal start error,
    not a restart loop, and never "ready" first (the meter was not waited for: `up` said ready, then
    stopped, and CI's tests were handed a stack that was going away)."""
    os.chmod(tmp_path, 0o755)
    env = {**gateway.env, "GATEWAY_STATE_DIR": str(tmp_path / "state"), "GATEWAY_LISTEN": f"127.0.0.1:{free_port()}",
           "GATEWAY_ADMIN": f"127.0.0.1:{free_port()}", "GATEWAY_STATS_LISTEN": f"127.0.0.1:{free_port()}",
           "EXTAUTH_LISTEN": f"127.0.0.1:{free_port()}", "EXTAUTH_METRICS_LISTEN": f"127.0.0.1:{free_ports(1)}",
           "METER_METRICS_LISTEN": f"127.0.0.1:{free_port()}"}
    port = int(env[setting].rsplit(":", 1)[1])
    # A listener that appears on the child's port right after the preflight: bound by a process
    # started alongside, which waits for the launcher's state directory to appear.
    squatter = (f"import socket, time, pathlib\n"
                f"p = pathlib.Path({str(tmp_path / 'state' / 'logs')!r})\n"
                f"while not p.exists(): time.sleep(0.001)\n"
                f"s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                f"s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(60)\n")
    with running([sys.executable, "-c", squatter], dict(os.environ), tmp_path / "squatter.log"):
        done = subprocess.run([sys.executable, "-m", "control.cli", "up"], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=90)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert f"{child} cannot listen on its address" in output, output
    assert "ready in" not in output, output
    log = (tmp_path / "state" / "logs" / f"{child}.log").read_text()
    assert log.count("cannot listen on") == 1, "started once, never restarted"
    wait_until(lambda: read_runtime(tmp_path / "state") == {}, 5, "the stack to clean up")


def test_ext_authz_will_not_start_without_a_secret_and_never_echoes_one(monkeypatch: pytest.MonkeyPatch) -> None:
    from extauth.settings import ExtauthSettings

    monkeypatch.setenv("DATABASE_URL", "postgresql://x/y")
    monkeypatch.setenv("REDIS_URL", "redis://x:1/0")
    monkeypatch.delenv("GATEWAY_EXTAUTH_SECRET", raising=False)
    with pytest.raises(SettingsError, match="GATEWAY_EXTAUTH_SECRET"):
        ExtauthSettings.from_env()
    monkeypatch.setenv("GATEWAY_EXTAUTH_SECRET", "short-but-secret")
    with pytest.raises(SettingsError) as info:
        ExtauthSettings.from_env()
    assert "short-but-secret" not in str(info.value)
    monkeypatch.setenv("GATEWAY_EXTAUTH_SECRET", "s" * 32)
    assert ExtauthSettings.from_env().envoy_secret == "s" * 32


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_an_edited_config_that_would_not_send_the_secret_is_refused_by_name(tmp_path: Path, transport: str) -> None:
    """Every check would be refused and the stack never turn ready: say why, at render time."""
    from tests.support import envoy_copy

    path = envoy_copy(tmp_path)
    text = path.read_text()
    key = "health check" if transport == "http" else "ext_authz filter"
    edited = text.replace("""        path: /health
        request_headers_to_add:
        - header: { key: x-gateway-secret, value: "%ENVIRONMENT(GATEWAY_EXTAUTH_SECRET)%" }
""", "        path: /health\n") if transport == "http" else text.replace(
        """            initial_metadata:
            - { key: x-gateway-secret, value: "%ENVIRONMENT(GATEWAY_EXTAUTH_SECRET)%" }
""", "")
    assert edited != text
    path.write_text(edited)
    with pytest.raises(SettingsError, match=f"{key}.*must send x-gateway-secret"):
        render_on_placeholders(path, transport)


def test_the_meter_that_cannot_listen_exits_with_the_status_the_launcher_treats_as_fatal(tmp_path: Path) -> None:
    """As ext_authz does (test above, under `up`): a taken port is not retried."""
    from control.net import EXIT_CANNOT_LISTEN

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "DATABASE_URL": "postgresql://127.0.0.1:1/none", "GATEWAY_STATE_DIR": str(tmp_path),
               "METER_METRICS_LISTEN": f"127.0.0.1:{port}"}
        done = subprocess.run([sys.executable, "-m", "meter"], env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=30)
    assert done.returncode == EXIT_CANNOT_LISTEN, done.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
