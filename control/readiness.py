"""Whether a deployment serves, in words `deploy` and `status` share.

RunPod's health route counts workers (idle, initializing, ready, running, throttled, unhealthy) and jobs
(inQueue, …). Idle only means a worker's image is cached (runpod/docs `serverless/workers/overview.mdx`),
not that the model loads, so health alone never proves an endpoint serves: `deploy` waits until a real
inference-route request through RunPod (GET /openai/v1/models with the account's key) succeeds, and
reads health meanwhile to say what RunPod sees.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from control.errors import ControlError
from control.runpod_client import RunPodClient, RunPodError

READY = "ready"
SCALED_TO_ZERO = "scaled to zero"
INITIALIZING = "initializing"
THROTTLED = "throttled"
UNHEALTHY = "unhealthy"
INIT_TIMEOUT = "init timeout"
STUCK_IN_QUEUE = "stuck in queue"
UNREACHABLE = "unreachable"
# States in which the next request is served, at worst after a cold start.
SERVING = frozenset({READY, SCALED_TO_ZERO})
PROBE_ROUTE = "GET /openai/v1/models"


@dataclass(frozen=True)
class Health:
    state: str
    detail: str
    workers: dict[str, int] = field(default_factory=dict)
    in_queue: int = 0

    def line(self) -> str:
        return f"{self.state}: {self.detail}"


def read(client: RunPodClient, endpoint_id: str) -> Health:
    """RunPod's view of the endpoint, from its health route."""
    try:
        report = client.health(endpoint_id)
    except RunPodError as exc:
        return Health(UNREACHABLE, f"RunPod's health route did not answer ({exc})")
    raw = report.get("workers") if isinstance(report.get("workers"), dict) else {}
    workers = {k: int(v or 0) for k, v in (raw or {}).items() if isinstance(v, int | float)}
    jobs = report.get("jobs") if isinstance(report.get("jobs"), dict) else {}
    in_queue = int((jobs or {}).get("inQueue") or 0)
    count: Callable[[str], int] = lambda name: workers.get(name, 0)  # noqa: E731
    queued = f"; {in_queue} job(s) in queue" if in_queue else ""
    if count("ready") + count("running") > 0:
        state, detail = READY, f"{count('ready') + count('running')} worker(s) have loaded the model"
    elif count("unhealthy") > 0:
        state, detail = UNHEALTHY, (
            "workers crash at start and RunPod keeps retrying them; read the worker logs in the RunPod "
            "console (a driver below the image's CUDA version, a gated model without a Hugging Face "
            "token, or a model that does not fit the GPU are common causes)")
    elif count("initializing") > 0:
        state, detail = INITIALIZING, "a worker is starting: pulling the image, downloading and loading the model"
    elif count("throttled") > 0:
        state, detail = THROTTLED, "RunPod has no free GPU in the endpoint's pools; add pools with --gpu or wait"
    elif in_queue > 0:
        state, detail = STUCK_IN_QUEUE, (
            "jobs wait and no worker is starting; check the endpoint's max workers in the RunPod console "
            "(RunPod scales an endpoint down after repeated crashes)")
    else:
        state, detail = SCALED_TO_ZERO, (
            "no worker is up (idle only means the image is cached); the next request starts one and "
            "waits for its cold start")
    return Health(state, detail + queued, workers, in_queue)


@dataclass
class _Probe:
    """One inference request through RunPod, in a thread so progress can be read while it waits (a
    cold start holds it for minutes; a new request per poll would queue a job each time)."""

    client: RunPodClient
    endpoint_id: str
    timeout_s: float
    outcome: tuple[int, Any] | RunPodError | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def start(self) -> _Probe:
        threading.Thread(target=self._run, name=f"probe-{self.endpoint_id}", daemon=True).start()
        return self

    def _run(self) -> None:
        try:
            self.outcome = self.client.openai_models(self.endpoint_id, self.timeout_s)
        except RunPodError as exc:
            self.outcome = exc
        self.done.set()


def _served(outcome: tuple[int, Any] | RunPodError | None) -> tuple[bool, str | None]:
    """(served, why not if it never will)."""
    if isinstance(outcome, RunPodError) or outcome is None:
        return False, None  # unreachable or timed out: RunPod's health says why
    status, payload = outcome
    if status in (401, 403):
        return False, f"RunPod refused the account's key on the inference route ({status})"
    if status == 404:
        return False, "RunPod does not know the endpoint (404)"
    if status == 200 and isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        message = str(payload["error"].get("message") or "no detail")[:300]
        return False, f"the worker answered an error: {message}"
    served = status == 200 and isinstance(payload, dict) and isinstance(payload.get("data"), list)
    return served, None


def wait_until_serving(client: RunPodClient, endpoint_id: str, timeout_s: float, init_timeout_s: int,
                       say: Callable[[str], None], hint: str, poll_s: float = 2.0) -> float:
    """Returns the seconds it took for a request to be served; raises with RunPod's view otherwise."""
    started = time.monotonic()
    deadline = started + timeout_s
    probe = _Probe(client, endpoint_id, timeout_s).start()
    last, last_said, initializing_since, unhealthy_since = "", started, None, None
    # One crashed worker among several may be replaced; a crash loop stays unhealthy.
    unhealthy_grace_s = min(10.0, timeout_s / 4)
    say(f"endpoint {endpoint_id}: waiting for a served request ({PROBE_ROUTE}), up to {timeout_s:.0f} s")
    while True:
        if probe.done.is_set():
            served, fatal = _served(probe.outcome)
            elapsed = time.monotonic() - started
            if served:
                say(f"endpoint {endpoint_id}: {READY}: served {PROBE_ROUTE} after {elapsed:.1f} s")
                return elapsed
            if fatal:
                raise ControlError("deploy_failed", f"endpoint {endpoint_id} does not serve: {fatal}; {hint}")
            remaining = deadline - time.monotonic()
            if remaining > poll_s:
                time.sleep(min(poll_s, 1.0))
                probe = _Probe(client, endpoint_id, deadline - time.monotonic()).start()
        health = read(client, endpoint_id)
        now = time.monotonic()
        if health.state == INITIALIZING:
            initializing_since = initializing_since or now
        unhealthy_since = (unhealthy_since or now) if health.state == UNHEALTHY else None
        if unhealthy_since is not None and (now - unhealthy_since >= unhealthy_grace_s or now >= deadline):
            # Seen initializing for the whole allowance (give or take one poll), then unhealthy: RunPod's
            # init timeout (runpod/docs `serverless/development/optimization.mdx`).
            initialized_s = unhealthy_since - initializing_since if initializing_since is not None else 0.0
            if initialized_s >= init_timeout_s - poll_s:
                raise ControlError("deploy_init_timeout", (
                    f"endpoint {endpoint_id}: {INIT_TIMEOUT}: the worker initialized for "
                    f"{initialized_s:.0f} s and RunPod marked it unhealthy (RUNPOD_INIT_TIMEOUT "
                    f"is {init_timeout_s} s); deploy with a longer --init-timeout; {hint}"))
            raise ControlError("deploy_unhealthy", f"endpoint {endpoint_id}: {health.line()}; {hint}")
        if health.state != last or now - last_said >= 15:
            prefix = "still " if health.state == last else ""
            say(f"endpoint {endpoint_id}: {prefix}{health.line()} ({now - started:.0f} s)")
            last, last_said = health.state, now
        if now >= deadline:
            raise ControlError("deploy_timeout", (
                f"endpoint {endpoint_id} served no request within {timeout_s:.0f} s; RunPod reports "
                f"{health.line()}; run the same deploy again to keep waiting, or {hint}"))
        pause = max(0.01, min(poll_s, deadline - now))
        if probe.done.is_set():
            time.sleep(pause)  # no time left for another request: keep reading health until the deadline
        else:
            probe.done.wait(pause)
