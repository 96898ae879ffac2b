"""A local imitation of RunPod (GraphQL, REST v2, serverless queue + OpenAI routes) on one aiohttp server.

The gateway's tests and demo point both RUNPOD_API_URL and RUNPOD_INFERENCE_URL at it. Shapes follow
`runpod-rest-v2.openapi.json` and `runpod.md` in the shared reference folder.

Served routes
    POST /graphql                                  `myself { id email }`; Bearer or `?api_key=`
    GET|POST /v2/templates, GET|PATCH|DELETE /v2/templates/{id}
    GET|POST /v2/serverless, GET|PATCH|DELETE /v2/serverless/{id}
    GET /v2/catalog/gpus                           a fixed GPU catalog with serverless list prices
    GET /v2/{endpoint}/health, POST /v2/{endpoint}/run|runsync|purge-queue,
    * /v2/{endpoint}/status|cancel|retry|stream/{job}
    GET /v2/{endpoint}/openai/v1/models, POST .../chat/completions|completions|embeddings|responses|
        images/generations|audio/speech|audio/transcriptions|audio/translations

Control routes (no auth, never recorded)
    GET    /_sim/healthz                 200 "ok"
    GET    /_sim/requests                {"requests": [{method, path, headers, body, endpoint_id, account_id,
                                          status, time}]}  (last 10,000; header names lower-cased)
    DELETE /_sim/requests                forget recorded requests (204)
    POST   /_sim/accounts                {"id","email","keys":[...],"read_only_keys":[...],
                                          "endpoint_knobs"?: {knobs}}; upserts (201)
    POST   /_sim/accounts/{id}/keys      {"key": "...", "read_only": false} (201)
    DELETE /_sim/keys/{key}              revoke: the key then gets 401 everywhere (204)
    GET    /_sim/state                   {"accounts": [{..., "templates": [...], "endpoints": [...]}],
                                          "knobs": {endpoint_id: {...}}}
    PATCH  /_sim/endpoints/{id}          knobs: health ready|initializing|throttled|unhealthy (what a
                                          started worker does: `ready` = starts and serves after its cold
                                          start; the others = never gets there), cold_start_ms,
                                          stream_delay_ms, stream_split_bytes, embedding_dim,
                                          fail none|http500|worker_error_200|unauthorized|
                                               vllm_context_length|vllm_unknown_model|vllm_bad_parameter|
                                               vllm_unprocessable|vllm_internal|vllm_unreachable|
                                               infinity_error,
                                          stream_error_content_type application/json|text/event-stream
    POST   /_sim/fail-next               {"path_contains": "...", "status": 500, "method"?, "times"?: 1}
                                          the next matching request(s) fail with that status, before auth

Simulated behaviour worth knowing
    Token count = number of whitespace-separated words. Replies are "Echo: " + the last user message (chat)
    or the prompt (completions), at most 16 words, or `max_tokens`/`max_completion_tokens` words with
    finish_reason "length" when that limit cut the reply. An endpoint whose env names no model accepts any
    `model`. `worker_error_200` hits worker-served routes (runsync, run, openai); `http500` and
    `unauthorized` hit every inference route.

Worker lifecycle (see "the serverless worker lifecycle" below for the published file each rule follows)
    A new endpoint's worker is scaled down: health shows it `idle` (image cached, model not loaded). The
    first job wakes it: `initializing` for `cold_start_ms`, then it serves (`idle` + `ready`) until it
    has had no job for the endpoint's `workers.idleTimeout`, when it scales down again and the next job
    pays the cold start again. An endpoint with `workers.min` > 0 (Active workers) starts its worker
    without a job and never scales it down. Jobs wait IN_QUEUE until a worker has initialized: an OpenAI-route
    request hangs until its caller gives up, `/runsync` answers IN_QUEUE after `?wait` ms, `/run` jobs
    stay IN_QUEUE. A worker of `runpod/worker-v1-vllm:v2.25.2` crash-loops (`unhealthy`) when the
    endpoint's CUDA constraint admits drivers below 13.0, or when its `MODEL_NAME` is a gated model and the
    env has no `HF_TOKEN`. Any worker whose cold start is longer than `RUNPOD_INIT_TIMEOUT` (default 420 s)
    turns unhealthy when that time is up. An endpoint whose `workers.max` is 0 starts no worker.
    `endpoint_knobs` on an account (POST /_sim/accounts) are the knobs its endpoints are created with.

The OpenAI route, worker by worker (re-read these files when a pinned tag changes)
    An endpoint whose env has MODEL_NAMES and no MODEL_NAME runs worker-infinity-embedding 1.1.4; any other
    runs worker-vllm v2.25.2 (vLLM v0.27.1, `Dockerfile` ARG VLLM_VERSION).
    worker-vllm (`src/handler.py`): the route is proxied to vLLM; when vLLM answers >= 400 the handler
        yields `{"error": {"message": "vLLM returned HTTP <status>: <vLLM's body>", "type": "worker_error",
        "code": null}}` and RunPod delivers it as HTTP 200 (worker-vllm issue #57). It is yielded before any
        stream chunk, so a streamed request gets that one JSON object, not SSE. Its content type under
        `stream: true` is not published: the knob `stream_error_content_type` picks it (default
        application/json). vLLM's own body is `{"error": {"message", "type", "param", "code": <status>}}`
        (`vllm/entrypoints/utils.py` create_error_response). The `vllm_*` fail knobs provoke each one.
    vLLM streams (`vllm/entrypoints/utils.py` should_include_usage, PR #37923): with
        ENABLE_FORCE_INCLUDE_USAGE on, usage (cumulative) is in every chunk and a final `choices: []` chunk
        carries it, whatever the client asked; otherwise only with `stream_options.include_usage`.
    The Responses API (`/v1/responses`): worker-vllm's handler proxies any route to vLLM, and its README
        lists Responses among vLLM's served APIs (runpod-workers.md). Shapes follow OpenAI's API reference
        (the `openai` SDK's `Response` and `ResponseStreamEvent` types, which vLLM's serving_responses
        produces): a `response` object with `output: [{"type": "message", "content": [{"type":
        "output_text", "text"}]}]` and `usage: {input_tokens, output_tokens, total_tokens}`; streamed as
        vLLM's `vllm/entrypoints/openai/responses/api_router.py` `_convert_stream_to_sse_events` writes
        them: `event: <type>\ndata: <compact json>\n\n` (the event's fields in the SDK type's order,
        `type` last), response.created ... response.output_text.delta ... response.completed, the last
        one carrying the usage, and no `[DONE]`. Usage is counted as for chat.
    Images, speech and voice: RunPod publishes no worker that serves these as OpenAI routes (its image and
        audio workers, e.g. worker-comfyui and worker-faster_whisper, take queue jobs only). ASSUMED: the
        managed destination runs workers that serve OpenAI's routes behind RunPod's `/openai/v1/` proxy,
        as worker-vllm does (vLLM serves Whisper's transcriptions/translations itself), and RunPod's proxy
        passes a multipart body through as it passes JSON. Shapes follow OpenAI's API reference:
        images/generations `{"created", "data": [{"b64_json"}]}` (one deterministic PNG-signed blob per
        `n`, 1-10); audio/speech the audio bytes (`response_format` mp3 → audio/mpeg, wav → audio/wav, ...)
        sent in pieces as they are "synthesized" (so a streamed answer streams); transcriptions and
        translations (multipart: `file`, `model`, `response_format`) `{"text", "usage": {"type":
        "duration", "seconds"}}` for json (TranscriptTextUsageDuration), the bare text for `text`; the
        duration is the WAV file's (data bytes / byte rate), other formats are refused with 400.
    worker-infinity-embedding (`src/handler.py`, `src/embedding_service.py`, `src/utils.py`): routes
        /v1/models and /v1/embeddings only ("Invalid OpenAI Route: ..." otherwise); `encoding_format` is
        ignored (floats always); with one model loaded any `model` name is answered; errors are HTTP 200
        `{"object": "error", "message", "type": "BadRequestError", "param": null, "code": 400}`.
        `embedding_dim` (knob) sets the vector length (default 8).

Run: python -m control.runpod_simulator [--host 127.0.0.1] [--port 0] [--accounts FILE] [--port-file FILE]
     [--state FILE]   (templates and endpoints: read at start if present, written at shutdown)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import secrets
import signal
import string
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.typedefs import Handler

MAX_RECORDED = 10_000
MAX_JOBS_PER_ENDPOINT = 1_000
DEFAULT_REPLY_WORDS = 16

# --- a tiny JSON-schema subset: enough to reproduce the OpenAPI's 422s (unknown properties, types) ---------

Checker = Callable[[Any, str], list[str]]


def _t(*types: type, minimum: float | None = None, maximum: float | None = None, min_len: int = 0) -> Checker:
    names = "|".join("null" if t is type(None) else t.__name__ for t in types)
    low, high = -math.inf if minimum is None else minimum, math.inf if maximum is None else maximum

    def check(v: Any, path: str) -> list[str]:
        # bool is an int subclass in Python, but not in JSON Schema
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
            return [f"{path}: expected {names}"]
        if isinstance(v, int | float) and not isinstance(v, bool) and not low <= v <= high:
            return [f"{path}: {v} is outside [{minimum}, {maximum}]"]
        if isinstance(v, str | list) and len(v) < min_len:
            return [f"{path}: needs at least {min_len} item(s)"]
        return []

    return check


def _pattern(regex: str) -> Checker:
    compiled = re.compile(regex)

    def check(v: Any, path: str) -> list[str]:
        if not isinstance(v, str):
            return [f"{path}: expected str"]
        return [] if compiled.search(v) else [f"{path}: does not match {regex}"]

    return check


def _enum(*values: str) -> Checker:
    return lambda v, path: [] if v in values else [f"{path}: must be one of {', '.join(values)}"]


def _arr(item: Checker, min_items: int = 0) -> Checker:
    def check(v: Any, path: str) -> list[str]:
        if not isinstance(v, list) or len(v) < min_items:
            return [f"{path}: expected an array of at least {min_items} item(s)"]
        return [e for i, x in enumerate(v) for e in item(x, f"{path}[{i}]")]

    return check


def _map(item: Checker) -> Checker:
    def check(v: Any, path: str) -> list[str]:
        if not isinstance(v, dict):
            return [f"{path}: expected object"]
        return [e for k, x in v.items() for e in item(x, f"{path}.{k}")]

    return check


def _obj(props: dict[str, Checker], required: tuple[str, ...] = ()) -> Checker:
    def check(v: Any, path: str) -> list[str]:
        if not isinstance(v, dict):
            return [f"{path}: expected object"]
        errs = [f"{path}: missing property '{r}'" for r in required if r not in v]
        extra = [k for k in v if k not in props]
        if extra:
            errs.append(f"{path}: additional properties {', '.join(repr(k) for k in extra)} not allowed")
        return errs + [e for k, x in v.items() if k in props for e in props[k](x, f"{path}.{k}")]

    return check


def _by_type(variants: dict[str, Checker]) -> Checker:
    def check(v: Any, path: str) -> list[str]:
        kind = v.get("type") if isinstance(v, dict) else None
        if kind not in variants:
            return [f"{path}.type: must be one of {', '.join(variants)}"]
        return variants[kind](v, path)

    return check


_STR, _BOOL, _INT, _NAME = _t(str), _t(bool), _t(int), _t(str, min_len=1)
_STRS = _arr(_STR)
_CONTAINER_KEYS = ("image", "args", "disk", "ports", "env", "registry")
_CONTAINER = {"image": _STR, "args": _STR, "disk": _t(int, minimum=1), "env": _map(_STR), "ports": _STRS,
              "registry": _t(str, type(None))}
# `major.minor`, as CreateTemplateRequest / CreateEndpointGpuConfig give the CUDA fields
_CUDA = _pattern(r"^\d+\.\d+$")
_TEMPLATE_FIELDS = {
    **_CONTAINER, "name": _NAME, "allowedCudaVersions": _arr(_CUDA), "category": _enum("CPU", "NVIDIA", "AMD"),
    "mounts": _obj({"persistent": _obj({"size": _t(int, minimum=10), "path": _STR}, ("size", "path"))}),
    "public": _BOOL, "serverless": _BOOL, "startJupyter": _BOOL, "startSsh": _BOOL,
}
CREATE_TEMPLATE = _obj(_TEMPLATE_FIELDS, ("name", "image"))
UPDATE_TEMPLATE = _obj(_TEMPLATE_FIELDS)
_GPU = {"pools": _arr(_STR, 1), "excludedTypes": _arr(_pattern(r"^\s*[^-\s]")), "count": _t(int, minimum=1),
        "allowedCudaVersions": _arr(_CUDA), "minCudaVersion": _CUDA}
_ENDPOINT_FIELDS = {
    **_CONTAINER, "name": _NAME, "templateId": _NAME, "timeout": _INT, "dataCenterIds": _STRS,
    "networkVolumes": _STRS, "flashboot": _enum("OFF", "FLASHBOOT", "PRIORITY_FLASHBOOT"),
    "scaling": _by_type({
        "QUEUE_DELAY": _obj({"type": _STR, "queueDelay": _t(int, float, minimum=0.5)},
                            ("type", "queueDelay")),
        "REQUEST_COUNT": _obj({"type": _STR, "requestCount": _t(int, minimum=1)}, ("type", "requestCount")),
    }),
    "cpu": _arr(_obj({"id": _NAME, "vcpuCount": _t(int, minimum=2)}, ("id", "vcpuCount")), 1),
    "workers": _obj({"min": _t(int, minimum=0), "max": _t(int, minimum=0),
                     "idleTimeout": _t(int, minimum=1, maximum=3600)}),
}
CREATE_ENDPOINT = _obj({**_ENDPOINT_FIELDS, "type": _enum("QUEUE", "LOAD_BALANCER"),
                        "gpu": _obj(_GPU, ("pools",))}, ("name", "type", "scaling"))
UPDATE_ENDPOINT = _obj({**_ENDPOINT_FIELDS, "gpu": _obj(_GPU)})
KEY = _obj({"key": _NAME, "read_only": _BOOL}, ("key",))
HEALTH_STATES = ("ready", "initializing", "throttled", "unhealthy")
# vLLM's answer for each `vllm_*` fail knob: (HTTP status, vLLM error type, message). The messages are
# vLLM's own wording: `vllm/entrypoints/utils.py` (get_max_tokens; create_error_response maps
# ValueError to 400 BadRequestError, VLLMNotFoundError to 404), `vllm/exceptions.py` (VLLMValidationError
# may carry another http_status, e.g. 422), `vllm/v1/engine/exceptions.py` (EngineDeadError, 500), and
# the request-validation handler (400 "Bad Request").
VLLM_ERRORS = {
    "vllm_context_length": (400, "BadRequestError",
                            "Input length (40961) exceeds model's maximum context length (32768)."),
    "vllm_unknown_model": (404, "NotFoundError", "The model `{model}` does not exist."),
    "vllm_bad_parameter": (400, "Bad Request",
                           "1 validation error:\n  {'type': 'less_than_equal', 'loc': ('body', 'temperature'), "
                           "'msg': 'Input should be less than or equal to 2', 'input': 7}"),
    "vllm_unprocessable": (422, "BadRequestError", "response_format: the JSON schema could not be compiled"),
    "vllm_internal": (500, "InternalServerError",
                      "EngineCore encountered an issue. See stack trace (above) for the root cause."),
}
# worker-vllm's own failure when vLLM does not answer at all (src/handler.py, aiohttp.ClientError).
VLLM_UNREACHABLE = ("Request to vLLM failed: Cannot connect to host 127.0.0.1:8000 ssl:default "
                    "[Connect call failed ('127.0.0.1', 8000)]")
FAIL_MODES = ("none", "http500", "worker_error_200", "unauthorized", "infinity_error", "vllm_unreachable",
              *VLLM_ERRORS)
STREAM_ERROR_TYPES = ("application/json", "text/event-stream")
KNOBS = _obj({"health": _enum(*HEALTH_STATES), "cold_start_ms": _t(int, minimum=0),
              "fail": _enum(*FAIL_MODES), "stream_delay_ms": _t(int, minimum=0),
              "embedding_dim": _t(int, minimum=1, maximum=65536), "stream_split_bytes": _t(int, minimum=0),
              "stream_error_content_type": _enum(*STREAM_ERROR_TYPES)})
ACCOUNT = _obj({"id": _NAME, "email": _t(str, type(None)), "keys": _STRS, "read_only_keys": _STRS,
               "endpoint_knobs": KNOBS}, ("id",))
RUN_BODY = _obj({"input": lambda v, p: [], "webhook": _STR, "policy": _t(dict)}, ("input",))
FAIL_NEXT = _obj({"path_contains": _STR, "status": _t(int, minimum=100, maximum=599), "method": _STR,
                  "times": _t(int, minimum=1)}, ("path_contains",))

# --- state --------------------------------------------------------------------------------------------------


@dataclass
class Account:
    id: str
    email: str | None
    keys: list[str] = field(default_factory=list)
    read_only_keys: list[str] = field(default_factory=list)
    endpoint_knobs: dict[str, Any] = field(default_factory=dict)  # a test's knobs for endpoints created later

    def public(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Knobs:
    health: str = "ready"
    cold_start_ms: int = 0
    fail: str = "none"
    stream_delay_ms: int = 0
    embedding_dim: int = 8
    stream_split_bytes: int = 0
    stream_error_content_type: str = "application/json"


@dataclass
class Owned:
    owner: str
    data: dict[str, Any]


@dataclass
class SimEndpoint(Owned):
    knobs: Knobs = field(default_factory=Knobs)
    started_at: float | None = None  # when the worker woke up (monotonic); None: scaled down
    last_job_at: float = 0.0
    waiting: int = 0  # jobs whose caller is still waiting for a worker
    stranded: int = 0  # queued OpenAI-route jobs whose caller gave up: RunPod keeps them queued
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    completed: int = 0
    failed: int = 0


OwnedT = TypeVar("OwnedT", bound=Owned)


class _Fail(Exception):
    """Carries a finished error response out of nested helpers; the middleware returns it."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


def _problem(status: int, detail: str, errors: list[str] | None = None) -> _Fail:
    title = next((s.phrase for s in HTTPStatus if s == status), "Error")
    body: dict[str, Any] = {"title": title, "status": status, "detail": detail}
    if errors:
        body["errors"] = errors
    return _Fail(web.json_response(body, status=status, content_type="application/problem+json"))


def _plain(status: int, body: Any) -> _Fail:
    return _Fail(web.json_response(body, status=status))


def _openai_error(status: int, message: str, kind: str = "invalid_request_error") -> _Fail:
    return _plain(status, {"error": {"message": message, "type": kind, "param": None, "code": None}})


def _rand(n: int) -> str:
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(n))


def _bearer(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


ErrorFactory = Callable[[int, str, list[str]], _Fail]


async def _json(request: web.Request, error: ErrorFactory, checker: Checker,
                invalid_status: int = 400) -> Any:
    try:
        body = json.loads(await request.read() or b"null")
    except ValueError:
        raise error(400, "request body is not valid JSON", []) from None
    errors = checker(body, "$")
    if errors:
        raise error(invalid_status, "request validation failed: " + "; ".join(errors), errors)
    return body


def _error_field(status: int, detail: str, errors: list[str]) -> _Fail:
    return _plain(status, {"error": detail})


def _openai_error_factory(status: int, detail: str, errors: list[str]) -> _Fail:
    return _openai_error(status, detail)


def _graphql_error(status: int, detail: str, errors: list[str]) -> _Fail:
    return _plain(status, {"errors": [{"message": detail}]})


def _words(text: str) -> list[str]:
    return text.split()


def _text(content: Any) -> str:
    if isinstance(content, list):  # OpenAI content parts
        return " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return content if isinstance(content, str) else ""


def _reply(prompt: str, limit: int | None) -> tuple[list[str], str]:
    words = ["Echo:", *_words(prompt)]
    cap = DEFAULT_REPLY_WORDS if limit is None else limit
    return words[:cap], "length" if limit is not None and len(words) > limit else "stop"


def _embedding_json(text: str, dim: int) -> str:
    """The vector for `text` as JSON text: 8 values from its hash, repeated to `dim` (cheap even for
    thousands of 3,072-dimension vectors). k/128 values are exact in float32, as infinity's are."""
    values = [repr((b - 128) / 128) for b in hashlib.sha256(text.encode()).digest()[:8]]
    return "[" + ",".join((values * (dim // 8 + 1))[:dim]) + "]"


def _vllm_error(status: int, kind: str, message: str) -> dict[str, Any]:
    """What worker-vllm yields when vLLM answers `status` (src/handler.py `_error`), wrapping vLLM's body
    exactly as the handler reads it (`await resp.text()` of a compact JSONResponse)."""
    detail = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}},
                        separators=(",", ":"), ensure_ascii=False)
    return {"error": {"message": f"vLLM returned HTTP {status}: {detail}", "type": "worker_error", "code": None}}


def _infinity_error(message: str) -> dict[str, Any]:
    # worker-infinity-embedding 1.1.4 src/utils.py create_error_response: HTTP 200 to the caller.
    return {"object": "error", "message": message, "type": "BadRequestError", "param": None, "code": 400}


def _runs_infinity(env: dict[str, str]) -> bool:
    # worker-infinity-embedding reads MODEL_NAMES (src/config.py); worker-vllm reads MODEL_NAME.
    return bool(env.get("MODEL_NAMES")) and not env.get("MODEL_NAME")


def served_models(env: dict[str, str]) -> list[str]:
    name = env.get("OPENAI_SERVED_MODEL_NAME_OVERRIDE") or env.get("MODEL_NAME")
    return [name] if name else [m for m in env.get("MODEL_NAMES", "").split(";") if m]


_VLLM_ROUTES = ("chat/completions", "completions", "embeddings", "responses", "images/generations",
                "audio/speech", "audio/transcriptions", "audio/translations")
_AUDIO_TYPES = {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac", "flac": "audio/flac",
                "wav": "audio/wav", "pcm": "audio/pcm"}
SPEECH_BYTES_PER_CHARACTER = 64  # deterministic "audio": this many bytes per input character
SPEECH_CHUNK_BYTES = 1024


def wav_seconds(data: bytes) -> float | None:
    """A RIFF/WAVE file's duration: its data chunk's bytes over the fmt chunk's byte rate."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    at, rate = 12, 0
    while at + 8 <= len(data):
        chunk, size = data[at:at + 4], int.from_bytes(data[at + 4:at + 8], "little")
        if chunk == b"fmt ":
            rate = int.from_bytes(data[at + 16:at + 20], "little")
        elif chunk == b"data":
            return round(min(size, len(data) - at - 8) / rate, 3) if rate else None
        at += 8 + size + size % 2
    return None


def _multipart(content_type: str, body: bytes) -> dict[str, bytes]:
    """The fields of a multipart/form-data body (the first of each name)."""
    from email.parser import BytesParser
    from email.policy import HTTP

    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    if not message.is_multipart():
        raise _openai_error(400, "expected a multipart/form-data body")
    fields: dict[str, bytes] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if isinstance(name, str) and isinstance(payload, bytes):
            fields.setdefault(name, payload)
    return fields


def _images(body: dict[str, Any]) -> web.StreamResponse:
    n = body.get("n", 1)
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise _openai_error(400, "prompt must be a non-empty string")
    if _t(int, minimum=1, maximum=10)(n, "n"):
        raise _openai_error(400, "n must be an integer from 1 to 10")
    size = body.get("size", "1024x1024")
    data = [{"b64_json": base64.b64encode(b"\x89PNG\r\n\x1a\n" + hashlib.sha256(
        f"{prompt}|{size}|{i}".encode()).digest()).decode()} for i in range(n)]
    return web.json_response({"created": int(time.time()), "data": data})


async def _speech(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    text, voice = body.get("input"), body.get("voice")
    if not isinstance(text, str) or not text or voice is None:
        raise _openai_error(400, "input (a non-empty string) and voice are required")
    content_type = _AUDIO_TYPES.get(body.get("response_format", "mp3"))
    if content_type is None:
        raise _openai_error(400, f"response_format must be one of {', '.join(_AUDIO_TYPES)}")
    seed = hashlib.sha256(text.encode()).digest()
    audio = (seed * (len(text) * SPEECH_BYTES_PER_CHARACTER // len(seed) + 1))[:len(text) * SPEECH_BYTES_PER_CHARACTER]
    response = web.StreamResponse(headers={"Content-Type": content_type})
    response.enable_chunked_encoding()
    await response.prepare(request)
    for start in range(0, len(audio), SPEECH_CHUNK_BYTES):
        await response.write(audio[start:start + SPEECH_CHUNK_BYTES])
        await asyncio.sleep(0.001)
    await response.write_eof()
    return response


async def _responses(request: web.Request, ep: SimEndpoint, body: dict[str, Any], model: str) -> web.StreamResponse:
    raw = body.get("input")
    if isinstance(raw, str):
        texts = [raw]
    elif isinstance(raw, list) and all(isinstance(m, dict) for m in raw):
        texts = [_text(m.get("content")) for m in raw]
    else:
        raise _openai_error(400, "input must be a string or a list of input items")
    limit = body.get("max_output_tokens")
    if limit is not None and _t(int, minimum=1)(limit, "max_output_tokens"):
        raise _openai_error(400, "max_output_tokens must be a positive integer")
    words, finish = _reply(texts[-1] if texts else "", limit)
    text = " ".join(words)
    prompt_tokens = sum(len(_words(t)) for t in texts)
    usage = {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
             "output_tokens": len(words), "output_tokens_details": {"reasoning_tokens": 0},
             "total_tokens": prompt_tokens + len(words)}
    message_id = f"msg_{uuid.uuid4().hex}"
    part = {"type": "output_text", "text": text, "annotations": []}
    item = {"id": message_id, "type": "message", "role": "assistant", "status": "completed", "content": [part]}
    response = {"id": f"resp_{uuid.uuid4().hex}", "object": "response", "created_at": int(time.time()),
                "model": model, "status": "completed" if finish == "stop" else "incomplete",
                "incomplete_details": None if finish == "stop" else {"reason": "max_output_tokens"},
                "output": [item], "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
                "temperature": body.get("temperature", 1.0), "top_p": body.get("top_p", 1.0),
                "max_output_tokens": limit, "usage": usage, "error": None, "instructions": None,
                "metadata": {}, "text": {"format": {"type": "text"}}}
    if not body.get("stream"):
        return web.json_response(response)
    started = {**response, "status": "in_progress", "output": [], "usage": None, "incomplete_details": None}
    empty_item = {**item, "status": "in_progress", "content": []}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": started},
        {"type": "response.in_progress", "response": started},
        {"type": "response.output_item.added", "output_index": 0, "item": empty_item},
        {"type": "response.content_part.added", "item_id": message_id, "output_index": 0, "content_index": 0,
         "part": {**part, "text": ""}},
        *({"type": "response.output_text.delta", "item_id": message_id, "output_index": 0, "content_index": 0,
           "delta": w if i == 0 else f" {w}", "logprobs": []} for i, w in enumerate(words)),
        {"type": "response.output_text.done", "item_id": message_id, "output_index": 0, "content_index": 0,
         "text": text, "logprobs": []},
        {"type": "response.content_part.done", "item_id": message_id, "output_index": 0, "content_index": 0,
         "part": part},
        {"type": "response.output_item.done", "output_index": 0, "item": item},
        {"type": "response.completed" if finish == "stop" else "response.incomplete", "response": response},
    ]
    stream = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await stream.prepare(request)
    for n, event in enumerate(events):
        if n and ep.knobs.stream_delay_ms:
            await asyncio.sleep(ep.knobs.stream_delay_ms / 1000)
        kind = event.pop("type")
        event |= {"sequence_number": n, "type": kind}
        await stream.write(f"event: {kind}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n".encode())
    await stream.write_eof()
    return stream


# --- the serverless worker lifecycle ------------------------------------------------------------------------
# Worker states (runpod/docs `serverless/workers/overview.mdx`, "Worker states"): Initializing = downloading
# the image, loading code and cached models; Idle = "scaled down, waiting for requests" (the image is
# cached, the model is not loaded); Running; Throttled = no capacity on the host; Unhealthy = crashed,
# auto-retried. Health counts (`serverless/endpoints/operation-reference.mdx` shows idle and running;
# `initializing`, `ready`, `throttled`, `unhealthy` are from third-party captures, runpod.md §3):
# this simulator reports `ready` for a worker that has finished initializing.
# Jobs leave the queue only for a worker that has initialized, so jobs sent to a crash-looping or
# never-starting worker stay IN_QUEUE (runpod-workers.md, "RunPod platform").

# `serverless/development/optimization.mdx`: "If cold start exceeds 7 minutes, the worker is marked
# unhealthy. Extend with `RUNPOD_INIT_TIMEOUT=800` (seconds)."
DEFAULT_INIT_TIMEOUT_S = 420
# runpod-workers/worker-vllm v2.25.2 `.runpod/hub.json` allows only CUDA "13.0"; commit dac05b6: a worker
# scheduled on an older driver fails at container init ("unsatisfied condition: cuda>=13.0").
IMAGE_MIN_CUDA = {"runpod/worker-v1-vllm:v2.25.2": (13, 0)}
# Hugging Face orgs whose models are gated: worker-vllm `src/download_model.py` downloads with
# token=HF_TOKEN, and the Hub refuses a gated repo without one, so the worker crashes at start.
GATED_ORGS = ("meta-llama",)
RUNSYNC_WAIT_MS = 90_000  # runpod.md §3: /runsync waits 90 s by default (`?wait=1000-300000` ms)
JOB_POLL_S = 0.02


def _cuda(version: str) -> tuple[int, int]:
    major, _, minor = version.partition(".")
    return int(major), int(minor or 0)


def crash_reason(data: dict[str, Any]) -> str | None:
    """Why a started worker of this endpoint crashes at start (RunPod retries it: a crash loop)."""
    image, env, gpu = data.get("image") or "", data.get("env") or {}, data.get("gpu") or {}
    needed = IMAGE_MIN_CUDA.get(image)
    if needed is not None:
        allowed, floor = gpu.get("allowedCudaVersions") or [], gpu.get("minCudaVersion")
        guaranteed = (bool(allowed) and all(_cuda(v) >= needed for v in allowed)) or (
            not allowed and floor is not None and _cuda(floor) >= needed)
        if not guaranteed:
            return f"unsatisfied condition: cuda>={needed[0]}.{needed[1]}"
    model = env.get("MODEL_NAME", "")
    if model.split("/", 1)[0] in GATED_ORGS and not env.get("HF_TOKEN"):
        return f"401 Client Error: access to model {model} is restricted (gated repo)"
    return None


def init_timeout_s(data: dict[str, Any]) -> float:
    try:
        return float((data.get("env") or {}).get("RUNPOD_INIT_TIMEOUT", DEFAULT_INIT_TIMEOUT_S))
    except ValueError:
        return DEFAULT_INIT_TIMEOUT_S


def worker_phase(ep: SimEndpoint, now: float) -> str:
    """scaled_down | initializing | serving | throttled | unhealthy | none (no worker may start)."""
    if ep.knobs.health != "ready":
        return ep.knobs.health
    if ep.data["workers"].get("max", 0) == 0:
        # `serverless/troubleshooting.mdx`: an endpoint scaled down to 0 max workers starts none.
        return "none"
    # Active (min) workers are "always running (24/7)" (runpod/docs `serverless/pricing.md`, Worker
    # types): they start without waiting for a job (their cold start still applies) and never scale down.
    warm = ep.data["workers"].get("min", 0) > 0
    if ep.started_at is None:
        if not warm:
            return "scaled_down"
        ep.started_at = now
    if crash_reason(ep.data) is not None:
        return "unhealthy"
    cold_s, allowed_s = ep.knobs.cold_start_ms / 1000, init_timeout_s(ep.data)
    if now < ep.started_at + min(cold_s, allowed_s):
        return "initializing"
    if cold_s > allowed_s:
        return "unhealthy"  # its cold start outlasted RUNPOD_INIT_TIMEOUT: marked unhealthy, retried
    idle_timeout = ep.data["workers"].get("idleTimeout", 5)
    idle_s = now - max(ep.last_job_at, ep.started_at + ep.knobs.cold_start_ms / 1000)
    if not warm and ep.waiting == 0 and idle_s > idle_timeout:
        ep.started_at = None  # Flex worker scaled down after its idle timeout: the next job pays a cold start
        return "scaled_down"
    # A serving worker drains the queue: jobs whose callers left, and /run jobs.
    ep.completed += ep.stranded
    ep.stranded = 0
    for job in ep.jobs.values():
        if job["status"] == "IN_QUEUE":
            job["status"] = "COMPLETED"
            ep.completed += 1
    return "serving"


def health_counts(ep: SimEndpoint, now: float) -> dict[str, Any]:
    phase = worker_phase(ep, now)
    workers = dict.fromkeys(("idle", "running", "initializing", "ready", "throttled", "unhealthy"), 0)
    workers.update({"scaled_down": {"idle": 1}, "serving": {"idle": 1, "ready": 1}, "none": {}}.get(
        phase, {phase: 1}))
    queued = ep.waiting + ep.stranded + sum(1 for j in ep.jobs.values() if j["status"] == "IN_QUEUE")
    jobs = {"completed": ep.completed, "failed": ep.failed, "inProgress": 0, "inQueue": queued, "retried": 0}
    return {"jobs": jobs, "workers": workers}


class Simulator:
    def __init__(self, accounts: list[dict[str, Any]]) -> None:
        self.accounts: dict[str, Account] = {}
        self.templates: dict[str, Owned] = {}
        self.endpoints: dict[str, SimEndpoint] = {}
        self.requests: deque[dict[str, Any]] = deque(maxlen=MAX_RECORDED)
        self.fail_next: list[dict[str, Any]] = []
        for spec in accounts:
            self.add_account(spec)

    # persistence: RunPod keeps an account's templates and endpoints until they are deleted; with a state
    # file a restarted simulator does the same (the demo's second `gatewayctl up --demo` finds its models).
    # Jobs, knobs and warm workers are not kept: after a restart every endpoint is scaled to zero.

    def snapshot(self) -> dict[str, Any]:
        return {"templates": [{"owner": t.owner, "data": t.data} for t in self.templates.values()],
                "endpoints": [{"owner": e.owner, "data": e.data} for e in self.endpoints.values()]}

    def restore(self, doc: dict[str, Any]) -> None:
        for item in doc.get("templates", []):
            self.templates[item["data"]["id"]] = Owned(item["owner"], item["data"])
        for item in doc.get("endpoints", []):
            self.endpoints[item["data"]["id"]] = SimEndpoint(item["owner"], item["data"])

    # accounts and keys

    def add_account(self, spec: dict[str, Any]) -> Account:
        errors = ACCOUNT(spec, "$")
        if errors:
            raise ValueError("; ".join(errors))
        taken = [k for k in spec.get("keys", []) + spec.get("read_only_keys", [])
                 if (owner := self.lookup(k)) and owner[0].id != spec["id"]]
        if taken:  # checked up front so a rejected account leaves no partial state
            raise ValueError(f"keys already belong to another account: {taken}")
        acc = self.accounts.setdefault(spec["id"], Account(spec["id"], spec.get("email")))
        acc.email = spec.get("email", acc.email)
        acc.endpoint_knobs = dict(spec.get("endpoint_knobs", acc.endpoint_knobs))
        for key in spec.get("keys", []):
            self.add_key(acc.id, key, False)
        for key in spec.get("read_only_keys", []):
            self.add_key(acc.id, key, True)
        return acc

    def add_key(self, account_id: str, key: str, read_only: bool) -> None:
        acc = self.accounts.get(account_id)
        if acc is None:
            raise LookupError(f"unknown account {account_id}")
        owner = self.lookup(key)
        if owner is not None and owner[0] is not acc:
            raise ValueError("key already belongs to another account")
        if owner is None:
            (acc.read_only_keys if read_only else acc.keys).append(key)

    def lookup(self, key: str) -> tuple[Account, bool] | None:
        """Returns (account, read_only) for a live key."""
        for acc in self.accounts.values():
            if key in acc.keys or key in acc.read_only_keys:
                return acc, key in acc.read_only_keys
        return None

    def _identify(self, request: web.Request, key: str | None) -> tuple[Account, bool] | None:
        found = self.lookup(key) if key else None
        if found and _REC in request:
            request[_REC]["account_id"] = found[0].id
        return found

    # middleware: recording and injected failures

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        rec: dict[str, Any] | None = None
        if not request.path.startswith("/_sim/"):
            headers: dict[str, str] = {}
            for name, value in request.headers.items():
                low = name.lower()
                headers[low] = f"{headers[low]}, {value}" if low in headers else value
            rec = {"method": request.method, "path": request.raw_path, "headers": headers,
                   "body": (await request.read()).decode("utf-8", "replace"), "endpoint_id": None,
                   "account_id": None, "status": None, "time": time.time()}
            self.requests.append(rec)
            request[_REC] = rec
        try:
            injected = self._injected_failure(request) if rec else None
            response = injected or await handler(request)
        except _Fail as fail:
            response = fail.response
        except Exception as exc:  # aiohttp's own 404/405s, or a simulator bug that aiohttp turns into a 500
            if rec:
                rec["status"] = getattr(exc, "status", 500)
            raise
        if rec:
            rec["status"] = response.status
        return response

    def _injected_failure(self, request: web.Request) -> web.StreamResponse | None:
        for i, rule in enumerate(self.fail_next):
            method_ok = rule.get("method", request.method) == request.method
            if method_ok and rule["path_contains"] in request.raw_path:
                rule["times"] -= 1
                if rule["times"] <= 0:
                    del self.fail_next[i]
                status = rule["status"]
                if request.path.startswith(("/v2/templates", "/v2/serverless")):
                    return _problem(status, "injected failure").response
                return web.json_response({"error": "injected failure"}, status=status)
        return None

    # GraphQL

    async def graphql(self, request: web.Request) -> web.StreamResponse:
        body = await _json(request, _graphql_error, lambda v, p: [])
        query = body.get("query", "") if isinstance(body, dict) else ""
        key = _bearer(request) or request.query.get("api_key")
        found = self._identify(request, key)
        unauthorized = {"errors": [{"message": "Unauthorized"}]}
        if key and found is None:
            return web.json_response(unauthorized, status=401)
        if not isinstance(query, str):
            return web.json_response({"errors": [{"message": "query must be a string"}]})
        if query.lstrip().startswith("mutation"):
            if found is None or found[1]:
                return web.json_response(unauthorized)
        elif "myself" in query:
            me = {"id": found[0].id, "email": found[0].email} if found else None
            return web.json_response({"data": {"myself": me}})
        return web.json_response({"errors": [{"message": "operation not supported by the RunPod simulator"}]})

    # REST v2

    async def catalog_gpus(self, request: web.Request) -> web.StreamResponse:
        self._rest_account(request)
        return web.json_response({"gpus": GPU_CATALOG})

    def _rest_account(self, request: web.Request) -> Account:
        key = _bearer(request)
        if key is None:
            raise _problem(401, "missing bearer token")
        found = self._identify(request, key)
        if found is None:
            raise _problem(401, "invalid bearer token")
        if found[1] and request.method in ("POST", "PUT", "PATCH", "DELETE"):
            raise _problem(403, "access denied")
        return found[0]

    @staticmethod
    def _owned(store: dict[str, OwnedT], item_id: str, acc: Account, kind: str) -> OwnedT:
        item = store.get(item_id)
        if item is None or item.owner != acc.id:
            raise _problem(404, f"{kind} not found")
        return item

    def _check_template_name(self, acc: Account, name: str) -> None:
        if any(t.owner == acc.id and t.data["name"] == name for t in self.templates.values()):
            raise _problem(400, f"template name '{name}' is already in use")

    async def templates_root(self, request: web.Request) -> web.StreamResponse:
        acc = self._rest_account(request)
        if request.method == "GET":
            mine = [t.data for t in self.templates.values() if t.owner == acc.id]
            return web.json_response({"templates": mine})
        body = await _json(request, _problem, CREATE_TEMPLATE, 422)
        self._check_template_name(acc, body["name"])
        data = {"id": "tpl_" + _rand(10), "name": body["name"], "image": body["image"], "args": "",
                "disk": 50, "mounts": {}, "ports": [], "env": {}, "registry": None, "serverless": False,
                "public": False, "category": "NVIDIA", "startSsh": True, "startJupyter": True,
                "allowedCudaVersions": [], **copy.deepcopy(body)}
        self.templates[data["id"]] = Owned(acc.id, data)
        return web.json_response(data, status=201)

    async def template_item(self, request: web.Request) -> web.StreamResponse:
        acc = self._rest_account(request)
        tpl = self._owned(self.templates, request.match_info["id"], acc, "template")
        if request.method == "DELETE":
            if any(e.data["templateId"] == tpl.data["id"] for e in self.endpoints.values()):
                raise _problem(400, "template is bound to a serverless endpoint and cannot be deleted")
            del self.templates[tpl.data["id"]]
            return web.Response(status=204)
        if request.method == "PATCH":
            body = await _json(request, _problem, UPDATE_TEMPLATE, 422)
            if body.get("name", tpl.data["name"]) != tpl.data["name"]:
                self._check_template_name(acc, body["name"])
            if body.get("mounts") == {}:  # the OpenAPI defines `{}` as "leave unchanged"
                del body["mounts"]
            tpl.data.update(copy.deepcopy(body))
        return web.json_response(tpl.data)

    def _endpoint_view(self, request: web.Request, ep: SimEndpoint) -> dict[str, Any]:
        base = f"{request.scheme}://{request.host}/v2/{ep.data['id']}"
        if ep.data["type"] == "LOAD_BALANCER":
            urls = {"base": base, "health": f"{base}/ping"}
        else:
            urls = {"run": f"{base}/run", "runSync": f"{base}/runsync", "status": f"{base}/status/{{job_id}}",
                    "stream": f"{base}/stream/{{job_id}}", "cancel": f"{base}/cancel/{{job_id}}",
                    "retry": f"{base}/retry/{{job_id}}", "purgeQueue": f"{base}/purge-queue",
                    "health": f"{base}/health"}
        return {**ep.data, "requestUrls": urls}

    def _apply_endpoint(self, acc: Account, data: dict[str, Any], body: dict[str, Any],
                        creating: bool) -> None:
        """Applies a create or PATCH body to an endpoint record (shared so both follow the same rules)."""
        body = copy.deepcopy(body)
        tpl: dict[str, Any] = {}
        if "templateId" in body:
            found = self.templates.get(body["templateId"])
            if found is None or (found.owner != acc.id and not found.data["public"]):
                raise _problem(404, "template not found")
            if not found.data["serverless"]:
                raise _problem(422, "template is not a serverless template", ["$.templateId: not serverless"])
            tpl = copy.deepcopy(found.data)
            data.update({k: tpl[k] for k in _CONTAINER_KEYS})
        if "env" in body:  # a template's env is merged per key, body wins; otherwise PATCH replaces env
            data["env"] = {**tpl.get("env", {}), **body["env"]}
        if ("gpu" in body and "cpu" in data) or ("cpu" in body and "gpu" in data):
            raise _problem(400, "an endpoint's compute family (gpu or cpu) cannot change")
        if "gpu" in body:
            gpu = data.get("gpu") or {"count": 1, "allowedCudaVersions": [], "minCudaVersion": None}
            if "pools" in body["gpu"]:  # pools and excludedTypes are one selection (see the OpenAPI)
                gpu.pop("excludedTypes", None)
            elif "excludedTypes" in body["gpu"]:
                raise _problem(422, "Request validation failed.", ["$.gpu: excludedTypes requires pools"])
            if creating and tpl and not {"allowedCudaVersions", "minCudaVersion"} & body["gpu"].keys():
                gpu["allowedCudaVersions"] = tpl["allowedCudaVersions"]  # the template seeds CUDA constraints
            gpu.update(body.pop("gpu"))
            gpu["minCudaVersion"] = gpu["minCudaVersion"] or None
            if gpu["allowedCudaVersions"] and gpu["minCudaVersion"]:
                raise _problem(400, "allowedCudaVersions and minCudaVersion are mutually exclusive")
            data["gpu"] = gpu
        if "cpu" in body:
            data["cpu"] = [{**c, "memory": c["vcpuCount"] * 4} for c in body.pop("cpu")]
        data["workers"] = {**data["workers"], **body.pop("workers", {})}
        data.update({k: v for k, v in body.items() if k not in ("env", "templateId")})

    async def endpoints_root(self, request: web.Request) -> web.StreamResponse:
        acc = self._rest_account(request)
        if request.method == "GET":
            mine = [self._endpoint_view(request, e) for e in self.endpoints.values() if e.owner == acc.id]
            return web.json_response({"endpoints": mine})
        body = await _json(request, _problem, CREATE_ENDPOINT, 422)
        errors = [] if "image" in body or "templateId" in body else ["$: missing property 'image'"]
        if body["type"] == "LOAD_BALANCER" and body["scaling"]["type"] != "REQUEST_COUNT":
            errors.append("$.scaling: LOAD_BALANCER endpoints take REQUEST_COUNT scaling")
        if errors:
            raise _problem(422, "Request validation failed.", errors)
        if ("gpu" in body) == ("cpu" in body):
            raise _problem(400, "specify exactly one of gpu or cpu")
        data: dict[str, Any] = {
            # The OpenAPI's Endpoint example id is `ep_abc123`: minting that shape keeps every test on an
            # id with a non-alphanumeric character (ids observed from REST v1 were 14 lowercase alnums).
            "id": "ep_" + _rand(11), "name": body["name"], "type": body["type"], "image": None, "args": "",
            "disk": 50, "ports": [], "env": {}, "registry": None,
            "workers": {"min": 0, "max": 3, "idleTimeout": 10}, "dataCenterIds": [], "networkVolumes": [],
            "timeout": 300000, "flashboot": "OFF", "templateId": body.get("templateId"),
            "createdAt": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        self._apply_endpoint(acc, data, body, creating=True)
        ep = self.endpoints[data["id"]] = SimEndpoint(acc.id, data, Knobs(**acc.endpoint_knobs))
        return web.json_response(self._endpoint_view(request, ep), status=201)

    async def endpoint_item(self, request: web.Request) -> web.StreamResponse:
        acc = self._rest_account(request)
        ep = self._owned(self.endpoints, request.match_info["id"], acc, "endpoint")
        if request.method == "DELETE":
            del self.endpoints[ep.data["id"]]
            tid = ep.data["templateId"]
            # the bound template goes too, unless another endpoint still uses it
            if tid in self.templates and all(e.data["templateId"] != tid for e in self.endpoints.values()):
                del self.templates[tid]
            return web.Response(status=204)
        if request.method == "PATCH":
            body = await _json(request, _problem, UPDATE_ENDPOINT, 422)
            updated = copy.deepcopy(ep.data)  # all-or-nothing: a rejected PATCH leaves the endpoint as it was
            self._apply_endpoint(acc, updated, body, creating=False)
            ep.data = updated
        return web.json_response(self._endpoint_view(request, ep))

    # serverless inference

    def _target(self, request: web.Request) -> SimEndpoint:
        unauthorized = _plain(401, {"error": "Unauthorized"})
        found = self._identify(request, _bearer(request))
        if found is None:
            raise unauthorized
        ep = self.endpoints.get(request.match_info["endpoint_id"])
        if ep is None:
            raise _plain(404, {"error": "endpoint not found"})
        request[_REC]["endpoint_id"] = ep.data["id"]
        if ep.owner != found[0].id or ep.knobs.fail == "unauthorized":
            raise unauthorized
        if ep.knobs.fail == "http500":
            raise _plain(500, {"error": "Internal Server Error"})
        return ep

    async def _worker(self, request: web.Request) -> SimEndpoint:
        """Resolves the endpoint for a worker-served route: the job waits in the queue until a worker has
        initialized (waking a scaled-down one), however long that takes, then worker faults apply."""
        ep = self._target(request)
        if not await self._dispatch(request, ep, None):
            raise _plain(499, {"error": "client closed the request"})  # nobody reads it; recorded
        if ep.knobs.fail == "worker_error_200":
            ep.failed += 1
            raise _plain(200, {"error": {"message": "worker crashed", "type": "worker_error", "code": None}})
        return ep

    @staticmethod
    async def _dispatch(request: web.Request, ep: SimEndpoint, wait_s: float | None) -> bool:
        """Queues a job until a worker serves it. False: the caller gave up (the job stays queued, as on
        RunPod) or `wait_s` passed."""
        now = time.monotonic()
        if worker_phase(ep, now) == "scaled_down":
            ep.started_at = now  # a job wakes the scaled-down worker: its cold start begins
        deadline = None if wait_s is None else now + wait_s
        ep.waiting += 1
        try:
            while worker_phase(ep, time.monotonic()) != "serving":
                if request.transport is None or request.transport.is_closing():
                    ep.stranded += 1
                    return False
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                await asyncio.sleep(JOB_POLL_S)
        finally:
            ep.waiting -= 1
        ep.last_job_at = time.monotonic()
        return True

    async def health(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(health_counts(self._target(request), time.monotonic()))

    async def run(self, request: web.Request) -> web.StreamResponse:
        ep = self._target(request)
        body = await _json(request, _error_field, RUN_BODY)
        sync = request.match_info["kind"] == "runsync"
        try:
            wait_ms = int(request.query.get("wait", RUNSYNC_WAIT_MS)) if sync else 0
        except ValueError:
            raise _plain(400, {"error": "wait must be an integer number of milliseconds"}) from None
        served = await self._dispatch(request, ep, wait_ms / 1000)
        job = {"delayTime": 0, "executionTime": 1, "id": f"{uuid.uuid4()}-u1", "output": body["input"],
               "status": "COMPLETED" if served else "IN_QUEUE"}
        ep.jobs[job["id"]] = job
        if len(ep.jobs) > MAX_JOBS_PER_ENDPOINT:
            del ep.jobs[next(iter(ep.jobs))]
        if not served:
            return web.json_response({"id": job["id"], "status": "IN_QUEUE"})
        if ep.knobs.fail == "worker_error_200":
            ep.failed += 1
            job["status"] = "FAILED"
            raise _plain(200, {"error": {"message": "worker crashed", "type": "worker_error", "code": None}})
        ep.completed += 1
        return web.json_response(job if sync else {"id": job["id"], "status": "IN_QUEUE"})

    async def job(self, request: web.Request) -> web.StreamResponse:
        ep = self._target(request)
        worker_phase(ep, time.monotonic())  # a serving worker has taken the queued jobs
        job = ep.jobs.get(request.match_info["job_id"])
        if job is None:
            raise _plain(404, {"error": "job not found"})
        action = request.match_info["action"]
        if action == "cancel":
            job["status"] = "CANCELLED"
            return web.json_response({"id": job["id"], "status": "CANCELLED"})
        if action == "retry":  # the simulated worker finishes instantly, so the retried job is already done
            job["status"] = "COMPLETED"
            return web.json_response({"id": job["id"], "status": "IN_QUEUE"})
        if action == "stream":
            return web.json_response({"status": job["status"], "stream": [{"output": job["output"]}]})
        return web.json_response(job)

    async def purge_queue(self, request: web.Request) -> web.StreamResponse:
        self._target(request)
        return web.json_response({"removed": 0, "status": "completed"})

    async def openai(self, request: web.Request) -> web.StreamResponse:
        ep = await self._worker(request)
        if _runs_infinity(ep.data["env"]):
            return await self._infinity(request, ep)
        route, served = request.match_info["route"].strip("/"), served_models(ep.data["env"])
        if route == "models" and request.method == "GET":
            ep.completed += 1
            created = int(time.time())
            models = [{"id": m, "object": "model", "created": created, "owned_by": "vllm", "root": m,
                       "parent": None} for m in served]
            return web.json_response({"object": "list", "data": models})
        if request.method != "POST" or route not in _VLLM_ROUTES:
            raise _openai_error(404, f"route /v1/{route} not found", "NotFoundError")
        if route in ("audio/transcriptions", "audio/translations"):
            return await self._transcribe(request, ep, served, route == "audio/translations")
        body = await _json(request, _openai_error_factory, _t(dict))
        model = body.get("model") or (served[0] if served else "")
        fail = ep.knobs.fail
        if served and model not in served:
            fail = "vllm_unknown_model"  # vLLM's own answer to a model it does not serve
        if fail in VLLM_ERRORS or fail == "vllm_unreachable":
            ep.failed += 1
            if fail == "vllm_unreachable":
                error = {"error": {"message": VLLM_UNREACHABLE, "type": "worker_error", "code": None}}
            else:
                status, kind, message = VLLM_ERRORS[fail]
                error = _vllm_error(status, kind, message.replace("{model}", model))
            # A streamed request gets the same one object (the handler yields it before any chunk).
            content_type = ep.knobs.stream_error_content_type if body.get("stream") else "application/json"
            return web.Response(status=200, text=json.dumps(error), content_type=content_type)
        ep.completed += 1
        if route == "embeddings":
            return self._embeddings(body, model, ep.knobs.embedding_dim)
        if route == "images/generations":
            return _images(body)
        if route == "audio/speech":
            return await _speech(request, body)
        if route == "responses":
            return await _responses(request, ep, body, model)
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        if limit is not None and _t(int, minimum=0)(limit, "max_tokens"):
            raise _openai_error(400, "max_tokens must be a non-negative integer")
        if route == "completions":
            prompt = body.get("prompt", "")
            prompts = [prompt] if isinstance(prompt, str) else prompt
            if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
                raise _openai_error(400, "prompt must be a string or a list of strings")
            prompt_tokens = sum(len(_words(p)) for p in prompts)
            return await self._generate(request, ep, body, model, False, prompts, prompt_tokens, limit)
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise _openai_error(400, "messages must be a list of objects")
        texts = [_text(m.get("content")) for m in messages]
        last_user = next((t for m, t in zip(reversed(messages), reversed(texts), strict=True)
                          if m.get("role") == "user"), "")
        return await self._generate(request, ep, body, model, True, [last_user],
                                    sum(len(_words(t)) for t in texts), limit)

    @staticmethod
    async def _transcribe(request: web.Request, ep: SimEndpoint, served: list[str],
                          translate: bool) -> web.StreamResponse:
        fields = _multipart(request.headers.get("Content-Type", ""), await request.read())
        model = fields.get("model", b"").decode("utf-8", "replace")
        if served and model not in served:
            status, kind, message = VLLM_ERRORS["vllm_unknown_model"]
            ep.failed += 1
            return web.json_response(_vllm_error(status, kind, message.replace("{model}", model)))
        audio = fields.get("file")
        if audio is None:
            raise _openai_error(400, "file is required")
        seconds = wav_seconds(audio)
        if seconds is None:
            raise _openai_error(400, "the simulator decodes WAV files only")
        ep.completed += 1
        text = ("Translated" if translate else "Transcribed") + f" {seconds:g} seconds of audio."
        if fields.get("response_format", b"json") == b"text":
            return web.Response(text=text + "\n", content_type="text/plain")
        return web.json_response({"text": text, "usage": {"type": "duration", "seconds": seconds}})

    async def _infinity(self, request: web.Request, ep: SimEndpoint) -> web.StreamResponse:
        """worker-infinity-embedding 1.1.4, src/handler.py async_generator_handler's openai branch."""
        route = "/v1/" + request.match_info["route"].strip("/")
        names = [m for m in ep.data["env"]["MODEL_NAMES"].split(";") if m]
        if route == "/v1/models":
            ep.completed += 1
            created = int(time.time())
            return web.json_response({"data": [{"id": m, "stats": {}, "object": "model", "owned_by": "infinity",
                                                "created": created, "backend": ""} for m in names],
                                      "object": "list"})
        if route != "/v1/embeddings":
            ep.failed += 1
            return web.json_response(_infinity_error(f"Invalid OpenAI Route: {route}"))
        body = await _json(request, _openai_error_factory, _t(dict))
        model = body.get("model")
        failure = None
        if not body:
            failure = "Missing input"
        elif not model:
            failure = "Did not specify model in openai_input"
        elif len(names) > 1 and model not in names:
            # infinity_emb AsyncEngineArray.__getitem__: one engine answers any name, several need a match.
            failure = f"Engine for model name `{model}` not found. Available model names are {names}"
        elif ep.knobs.fail == "infinity_error":
            failure = "CUDA out of memory. Tried to allocate 2.00 GiB"
        raw = body.get("input")
        inputs = [raw] if isinstance(raw, str) else raw
        if failure is None and (not isinstance(inputs, list) or not inputs
                                or not all(isinstance(s, str) for s in inputs)):
            failure = "input must be a string or a non-empty list of strings"
        if failure is not None:
            ep.failed += 1
            return web.json_response(_infinity_error(failure))
        ep.completed += 1
        return self._embeddings(body, str(model), ep.knobs.embedding_dim)

    @staticmethod
    def _embeddings(body: dict[str, Any], model: str, dim: int) -> web.StreamResponse:
        """An OpenAI embeddings list. `encoding_format` is ignored, floats always, as infinity does
        (src/utils.py list_embeddings_to_response); the JSON is built as text so that thousands of long
        vectors cost little to produce."""
        raw = body.get("input")
        inputs = [raw] if isinstance(raw, str) else raw
        if not isinstance(inputs, list) or not inputs or not all(isinstance(s, str) for s in inputs):
            raise _openai_error(400, "input must be a string or a non-empty list of strings")
        vectors = {text: _embedding_json(text, dim) for text in set(inputs)}
        data = ",".join(f'{{"object":"embedding","embedding":{vectors[text]},"index":{i}}}'
                        for i, text in enumerate(inputs))
        tokens = sum(len(_words(s)) for s in inputs)
        usage = json.dumps({"prompt_tokens": tokens, "total_tokens": tokens})
        text = f'{{"model":{json.dumps(model)},"object":"list","data":[{data}],"usage":{usage}}}'
        return web.Response(text=text, content_type="application/json")

    @staticmethod
    async def _generate(request: web.Request, ep: SimEndpoint, body: dict[str, Any], model: str, chat: bool,
                        prompts: list[str], prompt_tokens: int, limit: int | None) -> web.StreamResponse:
        replies = [_reply(p, limit) for p in prompts]
        completion_tokens = sum(len(words) for words, _ in replies)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        stream = bool(body.get("stream"))
        kind = ("chat.completion.chunk" if stream else "chat.completion") if chat else "text_completion"
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "object": kind,
                "created": int(time.time()), "model": model}

        def choice(i: int, text: str, finish: str | None, stream: bool,
                   first: bool = False) -> dict[str, Any]:
            if not chat:
                return {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
            if stream:
                message = ({"role": "assistant"} if first else {}) | ({"content": text} if text else {})
                return {"index": i, "delta": message, "logprobs": None, "finish_reason": finish}
            return {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish}

        if not stream:
            choices = [choice(i, " ".join(w), fin, False) for i, (w, fin) in enumerate(replies)]
            return web.json_response({**head, "choices": choices, "usage": usage})
        # vllm/entrypoints/utils.py should_include_usage: ENABLE_FORCE_INCLUDE_USAGE turns on both the final
        # usage chunk and usage in every chunk (cumulative); a client gets them with include_usage
        # (+ continuous_usage_stats).
        raw_options = body.get("stream_options")
        options: dict[str, Any] = raw_options if isinstance(raw_options, dict) else {}
        forced = ep.data["env"].get("ENABLE_FORCE_INCLUDE_USAGE", "").lower() == "true"
        final_usage = forced or options.get("include_usage") is True
        continuous = forced or (final_usage and options.get("continuous_usage_stats") is True)
        chunks, generated = [], 0

        def add(chunk: dict[str, Any], tokens: int) -> None:
            nonlocal generated
            generated += tokens
            if continuous:
                chunk["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                                  "total_tokens": prompt_tokens + generated}
            chunks.append(chunk)

        for i, (words, finish) in enumerate(replies):
            for j, w in enumerate(words):
                add({**head, "choices": [choice(i, w if j == 0 else f" {w}", None, True, j == 0)]}, 1)
            add({**head, "choices": [choice(i, "", finish, True)]}, 0)
        if final_usage:
            chunks.append({**head, "choices": [], "usage": usage})
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        # vLLM writes compact JSON (pydantic model_dump_json); worker-vllm passes its bytes on as they come
        # (`resp.content.iter_any()`), so event and chunk boundaries need not meet: `stream_split_bytes`
        # cuts each event into pieces of that many bytes, each written on its own.
        split = ep.knobs.stream_split_bytes
        for n, chunk in enumerate(chunks):
            if n and ep.knobs.stream_delay_ms:
                await asyncio.sleep(ep.knobs.stream_delay_ms / 1000)
            event = f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n".encode()
            for start in range(0, len(event), split or len(event)):
                if start:
                    await asyncio.sleep(0.001)  # apart, so that they reach the gateway as separate reads
                await response.write(event[start:start + (split or len(event))])
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    # control routes

    async def sim_requests(self, request: web.Request) -> web.StreamResponse:
        if request.method == "DELETE":
            self.requests.clear()
            return web.Response(status=204)
        return web.json_response({"requests": list(self.requests)})

    async def sim_accounts(self, request: web.Request) -> web.StreamResponse:
        body = await _json(request, _error_field, ACCOUNT)
        try:
            return web.json_response(self.add_account(body).public(), status=201)
        except ValueError as exc:
            raise _plain(409, {"error": str(exc)}) from None

    async def sim_account_keys(self, request: web.Request) -> web.StreamResponse:
        body = await _json(request, _error_field, KEY)
        try:
            self.add_key(request.match_info["id"], body["key"], body.get("read_only", False))
        except LookupError as exc:
            raise _plain(404, {"error": str(exc)}) from None
        except ValueError as exc:
            raise _plain(409, {"error": str(exc)}) from None
        return web.json_response(self.accounts[request.match_info["id"]].public(), status=201)

    async def sim_revoke_key(self, request: web.Request) -> web.StreamResponse:
        found = self.lookup(request.match_info["key"])
        if found is None:
            raise _plain(404, {"error": "unknown key"})
        (found[0].read_only_keys if found[1] else found[0].keys).remove(request.match_info["key"])
        return web.Response(status=204)

    async def sim_state(self, request: web.Request) -> web.StreamResponse:
        accounts = [{**acc.public(),
                     "templates": [t.data for t in self.templates.values() if t.owner == acc.id],
                     "endpoints": [self._endpoint_view(request, e) for e in self.endpoints.values()
                                   if e.owner == acc.id]}
                    for acc in self.accounts.values()]
        knobs = {eid: dataclasses.asdict(e.knobs) for eid, e in self.endpoints.items()}
        return web.json_response({"accounts": accounts, "knobs": knobs})

    async def sim_knobs(self, request: web.Request) -> web.StreamResponse:
        ep = self.endpoints.get(request.match_info["id"])
        if ep is None:
            raise _plain(404, {"error": "unknown endpoint"})
        body = await _json(request, _error_field, KNOBS)
        ep.knobs = dataclasses.replace(ep.knobs, **body)
        if "cold_start_ms" in body:  # re-arm: the worker scales down, the next job pays the cold start
            ep.started_at = None
        return web.json_response(dataclasses.asdict(ep.knobs))

    async def sim_fail_next(self, request: web.Request) -> web.StreamResponse:
        body = await _json(request, _error_field, FAIL_NEXT)
        rule = {"status": 500, "times": 1, **body}
        if "method" in rule:
            rule["method"] = rule["method"].upper()
        self.fail_next.append(rule)
        return web.json_response(rule, status=201)

    async def sim_healthz(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="ok")


_REC = web.RequestKey("runpod_simulator_record", dict[str, Any])
SIMULATOR = web.AppKey("runpod_simulator", Simulator)


def _gpu(gpu_id: str, name: str, pool: str, memory: int, per_hour: float) -> dict[str, Any]:
    return {"id": gpu_id, "name": name, "pool": pool, "manufacturer": "NVIDIA", "memory": memory,
            "secure": True, "community": True, "maxCount": {"secure": 8, "community": 4},
            "price": {"secure": round(per_hour * 0.6, 2), "community": round(per_hour * 0.4, 2),
                      "serverless": per_hour}}


# A few GPU types in the shape of GET /v2/catalog/gpus (GpuType), with fixed list prices.
GPU_CATALOG = [
    _gpu("NVIDIA RTX A4000", "RTX A4000", "AMPERE_16", 16, 0.58),
    _gpu("NVIDIA GeForce RTX 4090", "RTX 4090", "ADA_24", 24, 1.1),
    _gpu("NVIDIA L40S", "L40S", "ADA_48_PRO", 48, 1.9),
    _gpu("NVIDIA A100 80GB PCIe", "A100 80GB", "AMPERE_80", 80, 2.72),
    _gpu("NVIDIA H100 80GB HBM3", "H100 80GB", "ADA_80_PRO", 80, 4.18),
]


def build_app(accounts: list[dict[str, Any]], state: dict[str, Any] | None = None) -> web.Application:
    """The simulator as an aiohttp app; its state is reachable as `app[SIMULATOR]`."""
    sim = Simulator(accounts)
    sim.restore(state or {})
    app = web.Application(middlewares=[sim.middleware], client_max_size=32 * 1024**2)
    app[SIMULATOR] = sim
    r = app.router
    for path, handler in [
        ("/_sim/healthz", sim.sim_healthz), ("/_sim/requests", sim.sim_requests),
        ("/_sim/accounts", sim.sim_accounts), ("/_sim/accounts/{id}/keys", sim.sim_account_keys),
        ("/_sim/keys/{key}", sim.sim_revoke_key), ("/_sim/state", sim.sim_state),
        ("/_sim/endpoints/{id}", sim.sim_knobs), ("/_sim/fail-next", sim.sim_fail_next),
        ("/graphql", sim.graphql),
        # REST routes come first so /v2/templates/x is never taken for an endpoint id
        ("/v2/templates", sim.templates_root), ("/v2/templates/{id}", sim.template_item),
        ("/v2/serverless", sim.endpoints_root), ("/v2/serverless/{id}", sim.endpoint_item),
        ("/v2/catalog/gpus", sim.catalog_gpus),
        ("/v2/{endpoint_id}/health", sim.health), ("/v2/{endpoint_id}/{kind:run|runsync}", sim.run),
        ("/v2/{endpoint_id}/{action:status|cancel|retry|stream}/{job_id}", sim.job),
        ("/v2/{endpoint_id}/purge-queue", sim.purge_queue),
        ("/v2/{endpoint_id}/openai/v1/{route:.*}", sim.openai),
    ]:
        r.add_route("*", path, handler)
    return app


async def serve(host: str = "127.0.0.1", port: int = 0, accounts: list[dict[str, Any]] | None = None,
                state: dict[str, Any] | None = None) -> tuple[web.AppRunner, int]:
    """Starts the simulator; returns the runner (call `cleanup()` to stop) and the bound port."""
    runner = web.AppRunner(build_app(accounts or [], state), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner, int(runner.addresses[0][1])


def load_accounts(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    accounts = doc["accounts"] if isinstance(doc, dict) else doc
    if not isinstance(accounts, list):
        raise ValueError(f"{path}: expected {{'accounts': [...]}}")
    return accounts


def _read_state(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            doc: dict[str, Any] = json.load(f)
            return doc
    except FileNotFoundError:
        return {}


def _write_state(path: str, sim: Simulator) -> None:
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(sim.snapshot(), f)
    os.replace(tmp, path)


async def _main(args: argparse.Namespace) -> None:
    accounts = load_accounts(args.accounts) if args.accounts else []
    runner, port = await serve(args.host, args.port, accounts, _read_state(args.state) if args.state else None)
    try:
        if args.port_file:  # written atomically so a poller never reads a half-written number
            tmp = f"{args.port_file}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(str(port))
            os.replace(tmp, args.port_file)
        print(f"runpod-simulator listening on http://{args.host}:{port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()
        if args.state:
            _write_state(args.state, runner.app[SIMULATOR])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m control.runpod_simulator", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--accounts",
                        help='JSON file: {"accounts": [{"id", "email", "keys", "read_only_keys"}]}')
    parser.add_argument("--port-file", help="where to write the bound port once listening")
    parser.add_argument("--state", help="JSON file keeping templates and endpoints across restarts")
    asyncio.run(_main(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
