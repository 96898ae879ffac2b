"""The edge against hostile clients and bad input, on the shipped envoy/envoy.yaml under `gatewayctl up`:
timeouts, request-body limits, the key checked before a large body is read, Envoy's memory under a
half-sent-body attack, error bodies in OpenAI's exact shape, and requests with very many headers.
Every attack targets the test's own loopback gateway and is bounded in count and time."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from tests.conftest import Gateway, Simulator, Tenant, make_tenant, start_gateway
from tests.support import ROOT, call, checks_paused, envoy_copy, render_on_placeholders

# The shipped limits (envoy/envoy.yaml; README, "Operators: limits at the edge").
HEADERS_TIMEOUT_S = 10
IDLE_TIMEOUT_S = 10
MIB = 1024 * 1024
CHAT_LIMIT = 32 * MIB
EMBEDDINGS_LIMIT = 8 * MIB
# Envoy's resident memory may exceed its idle size by this much once an attack is over.
RSS_BOUND_MIB = 64


def sdk(gateway: Gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0, timeout=30)


def envoy_rss_mib(gateway: Gateway) -> float:
    from control.settings import read_runtime

    pid = read_runtime(gateway.state_dir)["pids"]["envoy"]
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def address(gateway: Gateway) -> tuple[str, int]:
    host, port = gateway.url.removeprefix("http://").split(":")
    return host, int(port)


def head(path: str, length: int, key: str | None = None, content_type: str = "application/json") -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: gateway", f"Content-Type: {content_type}", f"Content-Length: {length}"]
    if key:
        lines.append(f"Authorization: Bearer {key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_answer(sock: socket.socket, deadline_s: float) -> tuple[bytes, float]:
    """Everything the gateway sends until it closes the connection (or the deadline), and when it closed."""
    started, data = time.monotonic(), b""
    sock.settimeout(0.5)
    while time.monotonic() - started < deadline_s:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data, time.monotonic() - started


def status_and_error(answer: bytes) -> tuple[int, dict[str, Any]]:
    head_part, _, body = answer.partition(b"\r\n\r\n")
    status = int(head_part.split(b" ", 2)[1]) if head_part else 0
    return status, json.loads(body)["error"] if body.startswith(b"{") else {}


def assert_openai_shape(error: dict[str, Any]) -> None:
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]


@pytest.fixture(scope="module")
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def test_half_sent_large_bodies_without_a_key_are_refused_before_they_are_read(
    gateway: Gateway, sockets: list[socket.socket]
) -> None:
    """30 half-sent 15 MiB bodies with a wrong key: each is refused with 401 as soon as its headers are
    in, and Envoy's memory stays within RSS_BOUND_MIB of its idle size."""
    before = envoy_rss_mib(gateway)
    attackers = half_send(gateway, sockets, "sk-gw-" + "A" * 43)
    peak = envoy_rss_mib(gateway)
    for sock in attackers:
        answer, took = read_answer(sock, 5)
        status, error = status_and_error(answer)
        assert status == 401 and error["code"] == "invalid_api_key", answer[:300]
        assert took < 5
    time.sleep(1.5)  # freed memory goes back to the OS at 32 MiB a second
    after = envoy_rss_mib(gateway)
    print(f"envoy RSS: {before:.0f} MiB idle, {peak:.0f} MiB under attack, {after:.0f} MiB after")
    assert after - before < RSS_BOUND_MIB, (before, peak, after)


def half_send(gateway: Gateway, sockets: list[socket.socket], key: str, count: int = 30) -> list[socket.socket]:
    """The issue's attack: connections announcing 15 MiB JSON bodies, each sending up to 8 MiB (as far as
    the gateway reads it) and then stalling."""
    chunk = b'{"model": "m", "messages": "' + b"A" * MIB
    attackers = []
    for _ in range(count):
        sock = socket.create_connection(address(gateway))
        sockets.append(sock)
        sock.sendall(head("/v1/chat/completions", 15 * MIB, key))
        sock.settimeout(0.2)
        try:
            for _ in range(8):
                sock.sendall(chunk)
        except (TimeoutError, OSError):
            pass
        attackers.append(sock)
    return attackers


def test_slow_headers_and_stalled_bodies_are_cut_and_their_memory_freed_but_a_slow_model_is_not(
    gateway: Gateway, tenant: Tenant, simulator: Simulator, sockets: list[socket.socket]
) -> None:
    """All at once, to pay the timeouts once. With a valid key the stalled 15 MiB bodies are read (up to
    the route's 32 MiB), then the idle timeout cuts them and frees what they held. Envoy's allocator
    keeps freed pages mapped until the overload manager's shrink_heap (90% of the 1 GiB heap) hands
    them back, so what is bounded is the memory in use, and the resident size by the attack's peak."""
    results: dict[str, tuple[bytes, float]] = {}

    def slow_headers() -> None:  # one header byte a second: trickling does not extend the deadline
        sock = socket.create_connection(address(gateway))
        sockets.append(sock)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n")
        started = time.monotonic()
        try:
            for byte in b"X-Slow: " + b"a" * 30:
                sock.sendall(bytes([byte]))
                time.sleep(1)
                if time.monotonic() - started > HEADERS_TIMEOUT_S + 3:
                    break
        except OSError:
            pass
        answer, _ = read_answer(sock, 1)
        results["headers"] = (answer, time.monotonic() - started)

    def stalled_body() -> None:  # under the pre-check's size: cut by the idle timeout alike
        sock = socket.create_connection(address(gateway))
        sockets.append(sock)
        sock.sendall(head("/v1/chat/completions", 90_000, tenant.api_key) + b'{"model": "' + b"x" * 1000)
        results["body"] = read_answer(sock, IDLE_TIMEOUT_S + 5)

    def slow_model() -> None:  # a cold start longer than the idle timeout still answers
        endpoint = tenant.deployments[tenant.chat_model]
        call("PATCH", f"{simulator.url}/_sim/endpoints/{endpoint}", {"cold_start_ms": (IDLE_TIMEOUT_S + 1) * 1000})
        started = time.monotonic()
        try:
            reply = sdk(gateway, tenant.api_key).chat.completions.create(
                model=tenant.chat_model, messages=[{"role": "user", "content": "slow"}]
            )
            results["model"] = (reply.choices[0].message.content or "").encode(), time.monotonic() - started
        finally:
            call("PATCH", f"{simulator.url}/_sim/endpoints/{endpoint}", {"cold_start_ms": 0})

    threads = [threading.Thread(target=f) for f in (slow_headers, stalled_body, slow_model)]
    for t in threads:
        t.start()
    attackers = half_send(gateway, sockets, tenant.api_key)
    peak = envoy_rss_mib(gateway)
    for sock in attackers:
        answer, took = read_answer(sock, IDLE_TIMEOUT_S + 5)
        status, error = status_and_error(answer)
        assert status == 408 and error["code"] == "request_timeout", answer[:300]
    for t in threads:
        t.join(30)

    answer, took = results["headers"]
    status, error = status_and_error(answer)
    assert status == 408 and error["code"] == "request_timeout", answer
    assert HEADERS_TIMEOUT_S - 1 <= took <= HEADERS_TIMEOUT_S + 2.5, took
    answer, took = results["body"]
    status, error = status_and_error(answer)
    assert status == 408 and error["code"] == "request_timeout", answer
    assert_openai_shape(error)
    assert IDLE_TIMEOUT_S - 1 <= took <= IDLE_TIMEOUT_S + 2.5, took
    text, took = results["model"]
    assert text == b"Echo: slow" and took > IDLE_TIMEOUT_S
    memory = call("GET", gateway.admin + "/memory").json()
    allocated = int(memory["allocated"]) / MIB
    print(f"envoy RSS: {peak:.0f} MiB under attack, {envoy_rss_mib(gateway):.0f} MiB after; {allocated:.0f} MiB in use")
    assert allocated < 32, memory
    assert envoy_rss_mib(gateway) <= peak + 16


SMALL_HEAP_MIB = 128
FEW_CONNECTIONS = 30
SHORT_REQUEST_TIMEOUT_S = 3


@pytest.fixture(scope="module")
def small_edge(
    tmp_path_factory: pytest.TempPathFactory, database_url: str, redis_url: str, simulator: Simulator
) -> Iterator[Gateway]:
    """An operator's copy with the edge's limits cut down so tests reach them quickly: the heap to
    SMALL_HEAP_MIB, the connections to FEW_CONNECTIONS, the whole-request timeout to
    SHORT_REQUEST_TIMEOUT_S."""
    root = tmp_path_factory.mktemp("small-edge")
    path = envoy_copy(root)
    config = yaml.safe_load(path.read_text())
    monitors = {m["name"].rsplit(".", 1)[1]: m["typed_config"] for m in config["overload_manager"]["resource_monitors"]}
    monitors["fixed_heap"]["max_heap_size_bytes"] = SMALL_HEAP_MIB * MIB
    monitors["global_downstream_max_connections"]["max_active_downstream_connections"] = FEW_CONNECTIONS
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["request_timeout"] = f"{SHORT_REQUEST_TIMEOUT_S}s"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    yield from start_gateway(root, database_url, redis_url, simulator.url, {"GATEWAY_ENVOY_CONFIG": str(path)})


def test_a_trickled_body_is_cut_by_the_request_timeout(small_edge: Gateway, sockets: list[socket.socket]) -> None:
    sock = socket.create_connection(address(small_edge))
    sockets.append(sock)
    sock.sendall(head("/v1/chat/completions", 50_000, "sk-gw-" + "D" * 43))
    started = time.monotonic()
    try:
        while time.monotonic() - started < SHORT_REQUEST_TIMEOUT_S + 3:  # never idle long enough to be cut
            sock.sendall(b"x")
            time.sleep(0.5)
    except OSError:
        pass
    answer, _ = read_answer(sock, 2)
    took = time.monotonic() - started
    status, error = status_and_error(answer)
    assert (status, error["code"]) == (408, "request_timeout"), answer
    assert "request_overall_timeout" in error["message"] and took < SHORT_REQUEST_TIMEOUT_S + 2.5


def test_connections_past_the_limit_are_closed(small_edge: Gateway) -> None:
    opened = [socket.create_connection(address(small_edge)) for _ in range(FEW_CONNECTIONS + 5)]
    try:
        time.sleep(0.3)
        closed = 0
        for sock in opened:
            sock.settimeout(0.02)
            try:
                closed += sock.recv(1) == b""
            except TimeoutError:
                pass
            except ConnectionResetError:
                closed += 1
        assert closed >= 5, closed
    finally:
        for sock in opened:
            sock.close()
    time.sleep(0.3)
    assert call("GET", f"{small_edge.url}/v1/models", key="sk-gw-" + "E" * 43).status == 401  # served again


def test_at_its_heap_limit_envoy_sheds_new_requests_and_recovers(
    small_edge: Gateway, simulator: Simulator, sockets: list[socket.socket]
) -> None:
    t = make_tenant(small_edge, simulator)  # this stack's own master key seals its RunPod key
    before = envoy_rss_mib(small_edge)
    attackers = half_send(small_edge, sockets, t.api_key, count=20)  # ~160 MiB held, over the heap
    time.sleep(0.5)  # the overload manager looks every 0.25 s
    with pytest.raises(openai.APIStatusError) as info:
        sdk(small_edge, t.api_key).chat.completions.create(
            model=t.chat_model, messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 503 and info.value.code == "gateway_overloaded"
    assert info.value.response.headers["retry-after"] == "1"
    assert isinstance(info.value.body, dict)
    assert_openai_shape(info.value.body)
    peak = envoy_rss_mib(small_edge)
    for sock in attackers:
        read_answer(sock, SHORT_REQUEST_TIMEOUT_S + 5)
    time.sleep(0.5)
    after = envoy_rss_mib(small_edge)
    allocated = int(call("GET", small_edge.admin + "/memory").json()["allocated"]) / MIB
    print(f"envoy RSS: {before:.0f} MiB idle, {peak:.0f} MiB at the limit, {after:.0f} MiB after,"
          f" {allocated:.0f} MiB in use")
    assert allocated < 32 and after <= peak + 16, (before, peak, after, allocated)
    reply = sdk(small_edge, t.api_key).chat.completions.create(
        model=t.chat_model, messages=[{"role": "user", "content": "back"}])
    assert reply.choices[0].message.content == "Echo: back"


def data_url_image(size: int) -> str:
    return "data:image/png;base64," + base64.b64encode(b"\x89PNG" + b"\x00" * (size - 4)).decode()


def test_a_chat_with_a_10_mb_image_and_2048_embedding_inputs_pass(gateway: Gateway, tenant: Tenant) -> None:
    client = sdk(gateway, tenant.api_key)
    reply = client.chat.completions.create(model=tenant.chat_model, messages=[{"role": "user", "content": [
        {"type": "text", "text": "describe"},
        {"type": "image_url", "image_url": {"url": data_url_image(10 * 1000 * 1000)}},
    ]}])
    assert reply.choices[0].message.content == "Echo: describe"
    # The pre-check's record of the key gives way to the full decision's: the meter bills from this.
    time.sleep(1.2)  # Envoy flushes the access log every 500 ms
    [line] = [entry for entry in gateway.access_log() if entry.get("bytes_received", 0) > 10_000_000]
    assert line["decision"] == "allow" and line["deployment_id"].startswith("dep_")
    assert line["model"] == tenant.chat_model and isinstance(line["prompt_tokens"], int)
    inputs = [f"passage {i} " + "word " * 200 for i in range(2048)]  # ~2.1 MB of text
    embedded = client.embeddings.create(model=tenant.embedding_model, input=inputs)
    assert len(embedded.data) == 2048
    # Refused by the pre-check before the body is read, yet the SDK still reads the 401 (not a reset).
    with pytest.raises(openai.AuthenticationError):
        sdk(gateway, "sk-gw-" + "B" * 43).embeddings.create(model=tenant.embedding_model, input=inputs)


def test_a_large_body_sent_while_the_checks_are_slow_is_not_stalled_and_one_past_its_limit_not_forwarded(
    gateway: Gateway, tenant: Tenant, sockets: list[socket.socket]
) -> None:
    """While the key's pre-check is in flight Envoy holds what arrives, up to the listener's limit. When
    that was 16 MiB, below the route's, a body past it stopped being read and never resumed: the client
    got a 408 after 10 s (measured: 19.2 MB with the checks paused for 0.2 s; CI's 25 MB upload)."""
    client = sdk(gateway, tenant.api_key)
    image = data_url_image(15 * 1000 * 1000)  # 20 MB of base64
    with checks_paused(gateway.state_dir, 0.3):
        started = time.monotonic()
        reply = client.chat.completions.create(model=tenant.chat_model, messages=[{"role": "user", "content": [
            {"type": "text", "text": "describe"}, {"type": "image_url", "image_url": {"url": image}}]}])
        took = time.monotonic() - started
    assert reply.choices[0].message.content == "Echo: describe"
    assert took < IDLE_TIMEOUT_S / 2, took
    # Of unknown length and past the route's limit, all of it sent while the key is checked: Envoy
    # stops reading at its limit and, since no more bytes arrive to be measured against the route's,
    # only the idle timeout ends it (408). Bounded in time and memory, and never forwarded.
    sock = socket.create_connection(address(gateway))
    sockets.append(sock)
    with checks_paused(gateway.state_dir, 0.3):
        sock.sendall(chunked("/v1/chat/completions", tenant.api_key))
        send_chunks_past(sock, CHAT_LIMIT)
    answer, took = read_answer(sock, IDLE_TIMEOUT_S + 5)
    assert took < IDLE_TIMEOUT_S + 3
    assert status_and_error(answer)[0] in (0, 408, 413), answer[:200]  # 0: reset while still sending
    time.sleep(1.2)  # Envoy flushes the access log every 500 ms
    [line] = [e for e in gateway.access_log() if e.get("bytes_received", 0) > CHAT_LIMIT]
    assert line["status"] in (408, 413) and not line["upstream_host"], line


@pytest.mark.parametrize(
    ("path", "limit"), [("/chat/completions", CHAT_LIMIT), ("/embeddings", EMBEDDINGS_LIMIT)],
    ids=["chat", "embeddings"],
)
def test_a_body_over_the_route_limit_gets_the_gateways_413(
    gateway: Gateway, tenant: Tenant, path: str, limit: int
) -> None:
    body = json.dumps({"model": tenant.chat_model, "input": "x" * limit}).encode()
    with pytest.raises(openai.APIStatusError) as info:
        sdk(gateway, tenant.api_key).post(path, cast_to=object, content=body,
                                          options={"headers": {"Content-Type": "application/json"}})
    assert info.value.status_code == 413
    error = info.value.body
    assert isinstance(error, dict) and error["code"] == "request_too_large", error
    assert_openai_shape(error)
    assert "gateway" in error["message"] and "RunPod" not in error["message"]


def raw_post(gateway: Gateway, key: str, body: bytes, content_type: str = "application/json") -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        sdk(gateway, key).post("/chat/completions", cast_to=object, content=body,
                               options={"headers": {"Content-Type": content_type}})
    return info.value


@pytest.mark.parametrize(
    ("body", "content_type", "code", "param", "says"),
    [
        (b'{"model": "m", "messages": [', "application/json", "invalid_json", None, "not valid JSON"),
        (b'{"model": "\xff\xfe", "messages": []}', "application/json", "invalid_json", None, "UTF-8"),
        (b'[{"model": "m"}]', "application/json", "invalid_json", None, "JSON object"),
        (b'"just a string"', "application/json", "invalid_json", None, "JSON object"),
        (b'{"model": 42, "messages": []}', "application/json", "invalid_type", "model", "expected a string"),
        (b'{"model": true, "messages": []}', "application/json", "invalid_type", "model", "expected a string"),
        (b'{"model": ["m"], "messages": []}', "application/json", "invalid_type", "model", "expected a string"),
        (b'{"model": null, "messages": []}', "application/json", "invalid_type", "model", "expected a string"),
        (b'{"messages": []}', "application/json", "missing_model", None, "model parameter"),
        (b'{"model": "m"}', "text/plain", "invalid_json", None, "Content-Type: application/json"),
    ],
    ids=["truncated", "not-utf8", "array", "bare-string", "number", "bool", "list", "null", "no-model", "text"],
)
def test_bad_bodies_get_400_saying_what_is_wrong(
    gateway: Gateway, tenant: Tenant, body: bytes, content_type: str, code: str, param: str | None, says: str
) -> None:
    error = raw_post(gateway, tenant.api_key, body, content_type)
    assert isinstance(error, openai.BadRequestError), (error.status_code, error.body)
    assert (error.code, error.param, error.type) == (code, param, "invalid_request_error")
    assert isinstance(error.body, dict)
    assert_openai_shape(error.body)
    assert says in error.body["message"], error.body


def test_envoys_own_replies_have_the_exact_openai_shape(gateway: Gateway, tenant: Tenant) -> None:
    not_found = call("POST", f"{gateway.url}/v1/files", {"x": 1}, key=tenant.api_key)
    assert not_found.status == 404
    assert_openai_shape(not_found.json()["error"])
    assert not_found.json()["error"]["param"] is None
    with socket.create_connection(address(gateway)) as sock:  # Envoy's own 400: a malformed request line
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Length: x\r\n\r\n")
        status, error = status_and_error(read_answer(sock, 5)[0])
    assert status == 400
    assert_openai_shape(error)


def test_a_large_body_to_an_unknown_url_gets_404_at_once(gateway: Gateway, sockets: list[socket.socket]) -> None:
    sock = socket.create_connection(address(gateway))
    sockets.append(sock)
    sock.sendall(head("/v1/files", 100 * MIB) + b"{")
    answer, took = read_answer(sock, 5)
    status, error = status_and_error(answer)
    assert status == 404 and error["code"] == "unknown_url" and took < 2


def chunked(path: str, key: str) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
            f"Transfer-Encoding: chunked\r\nAuthorization: Bearer {key}\r\n\r\n").encode()


def send_chunks_past(sock: socket.socket, limit: int) -> None:
    """64 KiB chunks until a megabyte past `limit`, or until the gateway closes the connection."""
    piece = b"x" * 65536
    try:
        for _ in range(limit // len(piece) + 16):
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
    except OSError:
        pass


def test_bodies_of_unknown_length_are_checked_and_limited_alike(
    gateway: Gateway, tenant: Tenant, sockets: list[socket.socket]
) -> None:
    sock = socket.create_connection(address(gateway))
    sockets.append(sock)
    sock.sendall(chunked("/v1/chat/completions", "sk-gw-" + "C" * 43) + b"10\r\n{\"model\": \"m\", \"x\r\n")
    answer, took = read_answer(sock, 5)
    assert status_and_error(answer)[1]["code"] == "invalid_api_key" and took < 2
    sock = socket.create_connection(address(gateway))
    sockets.append(sock)
    sock.sendall(chunked("/v1/embeddings", tenant.api_key))
    time.sleep(0.3)  # the limit applies from the key check on (before, the listener's 32 MiB bounds it)
    send_chunks_past(sock, EMBEDDINGS_LIMIT)
    status, error = status_and_error(read_answer(sock, 5)[0])
    assert (status, error["code"]) == (413, "request_too_large")


@pytest.mark.parametrize(
    ("count", "name_len", "value_len", "allowed"),
    [(81, 8, 8, True), (92, 8, 8, True), (200, 8, 8, False), (1, 8, 59_000, True), (1, 8, 61_000, True),
     (1, 8, 70_000, False), (80, 745, 8, True), (80, 8, 745, True), (2, 30_300, 1, True)],
    ids=["many", "near-envoys-count", "over-envoys-count", "large", "near-envoys-size", "over-envoys-size",
         "long-names", "long-values", "two-huge-names"],
)
def test_many_or_large_headers_get_a_real_answer(
    gateway: Gateway, tenant: Tenant, count: int, name_len: int, value_len: int, allowed: bool
) -> None:
    """Headers outside the edge's allowlist are removed before anything copies them (control/
    header_allowlist.py): up to Envoy's own limits (100 headers, 60 KiB, counting the 7 urllib adds)
    they cost the request nothing; past them Envoy answers 431 itself. Never an empty 500."""
    headers = {f"x-{i:03d}" + "n" * max(0, name_len - 5): "v" * value_len for i in range(count)}
    reply = call("POST", f"{gateway.base_url}/chat/completions",
                 {"model": tenant.chat_model, "messages": [{"role": "user", "content": "hi"}]},
                 key=tenant.api_key, headers=headers)
    if allowed:
        assert reply.status == 200, reply.body
        assert reply.json()["choices"][0]["message"]["content"] == "Echo: hi"
    else:
        assert reply.status == 431, (reply.status, reply.body)
        error = reply.json()["error"]
        assert_openai_shape(error)
        assert error["code"] in ("request_headers_too_large", "bad_request")


@pytest.mark.parametrize(("size", "allowed"), [(58_000, True), (60_800, False)], ids=["fits", "too-large"])
def test_a_forwarded_header_near_envoys_size_limit_gets_a_real_answer(
    gateway: Gateway, tenant: Tenant, size: int, allowed: bool
) -> None:
    """A header that is forwarded (here `user-agent`) stays, and ext_authz's answer adds the credential
    and the path to it: near Envoy's 60 KiB that used to end in an empty 500. Refused with 431 instead,
    by ext_authz, which sees every forwarded header (extauth/upstream.py)."""
    reply = call("POST", f"{gateway.base_url}/chat/completions",
                 {"model": tenant.chat_model, "messages": [{"role": "user", "content": "hi"}]},
                 key=tenant.api_key, headers={"user-agent": "u" * size})
    if allowed:
        # Forwarded: what the endpoint makes of it is its own (the simulator's HTTP server refuses a
        # header line over 8 KiB with 400).
        assert reply.status not in (431, 500), reply.body
    else:
        assert reply.status == 431, (reply.status, reply.body)
        assert reply.json()["error"]["code"] == "request_headers_too_large"
        assert_openai_shape(reply.json()["error"])


def test_the_edge_allowlist_in_envoy_yaml_is_the_one_control_states() -> None:
    """envoy.yaml holds the expression control/header_allowlist.py builds for its list (Envoy cannot
    negate a match, so the expression is generated), and it removes exactly the names outside it."""
    import re

    from control.header_allowlist import EDGE_ALLOWLIST, keep_only_regex

    config = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())
    [listener] = [li for li in config["static_resources"]["listeners"] if li["name"] == "gateway"]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    [mutation] = hcm["early_header_mutation_extensions"][0]["typed_config"]["mutations"]
    shipped = mutation["remove_on_match"]["key_matcher"]["safe_regex"]["regex"]
    assert shipped == keep_only_regex(EDGE_ALLOWLIST)
    # ext_authz holds the forwarded headers to Envoy's limits (extauth/upstream.py): it must be sent each
    # one the edge lets through, bar what Envoy itself frames, routes on or rewrites.
    [authz] = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_authz"]
    sent = {pattern["exact"] for pattern in authz["typed_config"]["allowed_headers"]["patterns"]}
    framing = {"connection", "content-length", "expect", "host", "transfer-encoding"}
    assert set(EDGE_ALLOWLIST) - framing <= sent
    removed = [name for name in (*EDGE_ALLOWLIST, ":path", ":authority", ":method") if re.fullmatch(shipped, name)]
    assert removed == []
    for name in ("x-gateway-destination", "x-gateway-body", "x-gateway-form", "x-gateway-secret", "cookie",
                 "x-forwarded-for", "forwarded", "accept-encoding", "te", "upgrade", "acceptx", "accep",
                 "x-request-idx", "content-", "a", "x-envoy-retry-on", "authorization2", "hos"):
        assert re.fullmatch(shipped, name), name


def test_an_upstream_sees_only_the_allowlisted_headers_and_what_the_gateway_sets(
    gateway: Gateway, simulator: Simulator, tenant: Tenant
) -> None:
    before = len(simulator.requests())
    forged = {"cookie": "a=1", "x-forwarded-for": "1.2.3.4", "forwarded": "for=1.2.3.4", "x-real-ip": "1.2.3.4",
              "accept-encoding": "gzip", "te": "trailers", "openai-organization": "org", "x-custom": "1",
              "user-agent": "ua", "accept": "*/*"}
    reply = call("POST", f"{gateway.base_url}/chat/completions",
                 {"model": tenant.chat_model, "messages": [{"role": "user", "content": "hi"}]},
                 key=tenant.api_key, headers=forged)
    assert reply.status == 200, reply.body
    [seen] = [r for r in simulator.requests()[before:] if "/openai/" in r["path"]]
    assert sorted(k.lower() for k in seen["headers"]) == [
        "accept", "authorization", "content-length", "content-type", "host", "user-agent", "x-forwarded-proto",
        "x-request-id"]
    assert seen["headers"]["authorization"] == f"Bearer {tenant.runpod_key}"


def test_an_edited_config_whose_route_holds_more_than_the_listener_is_refused_by_name(tmp_path: Path) -> None:
    """Such a route hangs a body over the listener's limit that arrives during the key's pre-check (see
    test_a_large_body_sent_while_the_checks_are_slow_...): said when the stack renders the config, not
    as 408s later."""
    from control.env import SettingsError

    path = envoy_copy(tmp_path)
    text = path.read_text()
    edited = text.replace("buffer: { max_request_bytes: 27262976 }", "buffer: { max_request_bytes: 40000000 }")
    assert edited != text
    path.write_text(edited)
    with pytest.raises(SettingsError, match=r"per_connection_buffer_limit_bytes \(33554432\).*route 'voice' "
                                            r"\(40000000\) is larger"):
        render_on_placeholders(path)
