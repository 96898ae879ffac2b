"""What envoy/authz_request.lua tells ext_authz about a request's body, which ext_authz never sees.

One header, `x-gateway-body`, of `name=value` pairs joined by `&` (values percent-escaped), e.g.
`model=my-chat&bytes=87&max_tokens=256&n=2`:
- `model`: the body's `model` (a JSON string, or a voice form's `model` field);
- `bytes`: the body's size (Envoy sends the check itself with content-length 0);
- `max_tokens`: the completion budget (`max_completion_tokens`, else `max_tokens`, else the Responses
  API's `max_output_tokens`), and `n`: the choice count, each only when the body states a whole number;
- `audio_seconds`: a voice request's WAV duration;
- `error`, instead of a model: what is wrong with a body without a string `model` (extauth/errors.py
  words it).
`bytes`, `max_tokens`, `n` and `audio_seconds` size a managed request's spend reservation
(extauth/reservation.py).

One header rather than one per fact: each header the Lua adds costs Envoy ~9,500 instructions a request
(it is copied into the check, listed for removal and dropped). A client's own `x-gateway-body` never
gets this far (envoy.yaml removes it before routing).
"""

from __future__ import annotations

from typing import NamedTuple
from urllib.parse import unquote

HEADER = "x-gateway-body"


class BodyFacts(NamedTuple):
    model: str | None = None
    body_bytes: str | None = None
    max_tokens: str | None = None
    choices: str | None = None
    audio_seconds: str | None = None
    problem: str | None = None


NONE = BodyFacts()


def read(value: str | None) -> BodyFacts:
    """The facts in an `x-gateway-body` value; names it does not know are ignored, a fact stated twice
    counts once (the first)."""
    if not value:
        return NONE
    found: dict[str, str] = {}
    for pair in value.split("&"):
        name, _, text = pair.partition("=")
        found.setdefault(name, text)
    model = found.get("model")
    return BodyFacts(
        None if model is None else unquote(model),
        found.get("bytes"),
        found.get("max_tokens"),
        found.get("n"),
        found.get("audio_seconds"),
        found.get("error"),
    )
