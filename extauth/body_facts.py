"""What ext_authz learns of a request's body, which it never sees on the check.

JSON bodies: Envoy's json_to_metadata lifts the fields (envoy/envoy.yaml) and the check carries them in
one header Envoy adds to the check alone (never to the forwarded request), `x-gateway-body`: the body's
`content-length`, a space, and json_to_metadata's namespace as JSON, e.g.
`87 {"model":"my-chat","max_tokens":256,"n":2}` (over gRPC the same namespace arrives as the
CheckRequest's metadata context, and the size as the content-length header). From it:
- `model`: the body's `model`, when it is a string;
- `bytes`: the body's size (Envoy sends the check itself with content-length 0);
- `max_tokens`: the completion budget (`max_completion_tokens`, else `max_tokens`, else the Responses
  API's `max_output_tokens`), and `n`: the choice count, each only when the body states a whole number;
- `problem`, instead of a model: what is wrong with a body without a string `model` (extauth/errors.py
  words it): `not_json` (not of a JSON content type), `invalid_json` (unparseable, or not UTF-8),
  `model_type` (`model` is a number or a boolean), or `unknown`: json_to_metadata reports the same for
  `{}`, `[...]` and `{"model": null}`, so ext_authz's admin port reads such a body (`shape_of`) once the
  check has passed (envoy.yaml, route `body_check`).

Multipart bodies (the voice routes): envoy/authz_request.lua states `model`, `bytes` and the WAV
duration `audio_seconds` in `x-gateway-form`, `name=value` pairs joined by `&`, values percent-escaped.

`bytes`, `max_tokens`, `n` and `audio_seconds` size a managed request's spend reservation
(extauth/reservation.py). A client's own x-gateway-* headers never get this far (envoy.yaml removes
them before routing).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, NamedTuple
from urllib.parse import unquote

import orjson

HEADER = "x-gateway-body"
# json_to_metadata's namespace (envoy.yaml), as the gRPC check's metadata context names it.
NAMESPACE = "envoy.filters.http.json_to_metadata"
FORM_HEADER = "x-gateway-form"
# json_to_metadata's keys for a body it could not parse and for one without a string-or-scalar model.
_UNPARSED = "unparsed"
_NO_MODEL = "no_model"
UNKNOWN = "unknown"
# Where the completion budget is stated, in order of precedence (`max_output_tokens`: the Responses API's).
_BUDGETS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
# The most of a body `shape_of` parses; a larger one is judged by its first byte.
SHAPE_MAX_BYTES = 1 << 20


class BodyFacts(NamedTuple):
    model: str | None = None
    body_bytes: str | None = None
    max_tokens: str | None = None
    choices: str | None = None
    audio_seconds: str | None = None
    problem: str | None = None


NONE = BodyFacts()


def from_headers(
    headers: Mapping[str, str], namespace: Mapping[str, Any] | None = None, size: str | None = None
) -> BodyFacts:
    """The facts a check carries: a voice form's, else a JSON body's, from `x-gateway-body` or, over
    gRPC, from json_to_metadata's `namespace` and the body's `size` (the CheckRequest's)."""
    form = headers.get(FORM_HEADER)
    if form:
        return read_form(form)
    if namespace is not None:
        return from_fields(namespace, size, headers.get("content-type"))
    value = headers.get(HEADER)
    if not value:
        return NONE
    # The size, then the namespace; either may be missing (no content-length, no JSON filter run).
    brace = value.find("{")
    size = (value if brace < 0 else value[:brace]).strip() or None
    if brace < 0:
        return BodyFacts(body_bytes=size)
    text = value[brace:]
    try:
        # Header values travel as bytes (read as latin-1); the model may be UTF-8. ASCII, the common
        # case, is the same either way and skips the round trip.
        fields = orjson.loads(text if text.isascii() else text.encode("latin-1"))
    except (orjson.JSONDecodeError, UnicodeEncodeError):
        return BodyFacts(body_bytes=size)
    return from_fields(fields if isinstance(fields, dict) else {}, size, headers.get("content-type"))


def from_fields(fields: Mapping[str, Any], size: str | None, content_type: str | None) -> BodyFacts:
    """The facts in json_to_metadata's namespace (`fields`), for a body of `size` bytes."""
    model = fields.get("model")
    if isinstance(model, str):
        if len(fields) == 1:  # the model alone: nothing to size the request by
            return BodyFacts(model, size)
        budget = None
        for name in _BUDGETS:
            value = fields.get(name)
            if value is not None and (budget := _count(value)) is not None:
                break
        choices = fields.get("n")
        return BodyFacts(model, size, budget, None if choices is None else _count(choices))
    if model is not None:
        problem: str | None = "model_type"
    elif _UNPARSED in fields:
        problem = "invalid_json" if (content_type or "").startswith("application/json") else "not_json"
    elif _NO_MODEL in fields:
        problem = UNKNOWN
    else:
        problem = None
    return BodyFacts(body_bytes=size, problem=problem)


def _count(value: Any) -> str | None:
    """A count a request could mean (a whole number below 2^31); anything else is left to the upstream."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if value < 0 or value >= 2147483648 or value != int(value):
        return None
    return str(int(value))


def read_form(value: str) -> BodyFacts:
    """The facts in an `x-gateway-form` value; names it does not know are ignored, a fact stated twice
    counts once (the first)."""
    found: dict[str, str] = {}
    for pair in value.split("&"):
        name, _, text = pair.partition("=")
        found.setdefault(name, text)
    model = found.get("model")
    return BodyFacts(
        None if model is None else unquote(model),
        found.get("bytes"),
        None,
        None,
        found.get("audio_seconds"),
    )


def shape_of(body: bytes, complete: bool) -> str | None:
    """What is wrong with a JSON body json_to_metadata found no string `model` in: `not_object`,
    `model_type`, or None (it has no `model`). `complete`: `body` is the whole body (a longer one is
    judged by its first character only)."""
    head = body.lstrip()
    if not head:
        return None
    if not head.startswith(b"{"):
        return "not_object"
    if not complete:
        return None
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    if not isinstance(parsed, dict):
        return "not_object"
    return "model_type" if "model" in parsed and not isinstance(parsed["model"], str) else None
