"""One Envoy access-log line (see the `json_format` block of envoy/envoy.yaml) to a typed usage record,
or to the reason it is rejected. ext_authz's facts arrive as one JSON object in the `authz` field.

Envoy writes absent metadata as `null`, and some operators write "-"; both (and "") become None.
Everything a record holds is checked to fit its column in `usage_events`, because one value PostgreSQL
refuses would fail the whole batch it is written with.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson

MAX_LINE_BYTES = 1 << 20  # far above any real line; bounds what one line may hold in memory

_INT4_MAX = 2**31 - 1
_INT8_MAX = 2**63 - 1
_ABSENT = (None, "-", "")
_CLIENT_ABORTED = "DC"  # Envoy response flag: downstream connection terminated
# gateway.lua's `usage_source`: "final" figures are the upstream's own; "partial" ones its cumulative
# count as of the last chunk that reached the client; "counted" ones the content events the client got.
_FINAL = "final"
_METERED_DESTINATIONS = ("runpod", "managed")
# The prompt estimate when no upstream figure arrived: request body bytes per token. English text runs
# about 4 characters a token for the tokenizers served here; the JSON around the messages is counted
# too, so the estimate errs on the high side for short prompts (README, "How usage is estimated").
BYTES_PER_TOKEN = 4
# A modality's own units (control/pricing.py UNITS), as gateway.lua and authz_request.lua log them.
_UNITS = ("image", "audio_second", "character")
_MAX_QUANTITY = 1e12
_UNMEASURED = "unmeasured"


class UsageRecord(NamedTuple):
    """A row of `usage_events`; the field names are its column names (cost is computed in SQL)."""

    request_id: str
    start_time: datetime | None
    workspace_id: str | None
    key_id: str | None
    deployment_id: str | None
    destination: str | None
    route: str | None
    model: str | None
    response_model: str | None
    status: int | None
    flags: str | None
    prompt_tokens: int
    completion_tokens: int
    usage_estimated: bool
    unit: str | None
    quantity: float
    unit_detail: str | None
    duration_ms: int | None
    ttfb_ms: int | None
    bytes_received: int | None
    bytes_sent: int | None


@dataclass(frozen=True)
class Reject:
    reason: str


class _Malformed(Exception):
    pass


def parse_line(raw: bytes) -> UsageRecord | Reject:
    if len(raw) >= MAX_LINE_BYTES:
        return Reject(f"line longer than {MAX_LINE_BYTES} bytes")
    # orjson decodes (and checks the UTF-8 of) a line in about a third of the stdlib's time: JSON
    # decoding was the largest share of the meter's time per line.
    try:
        entry = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        try:
            raw.decode()
        except UnicodeDecodeError:
            return Reject("not UTF-8")
        return Reject(f"not JSON: {err}")
    if not isinstance(entry, dict):
        return Reject("not a JSON object")
    try:
        record = _record(entry)
        # A \u escape is the only way a string decoded from valid JSON can hold a NUL or an unpaired
        # surrogate, which PostgreSQL text cannot; most lines have none, and skip the check.
        if b"\\u" in raw:
            _check_storable(record)
    except _Malformed as err:
        return Reject(str(err))
    return record


def fields(entry: dict[str, Any]) -> dict[str, Any]:
    """A line's facts side by side: Envoy's own fields, ext_authz's record lifted out of `authz`, and
    gateway.lua's figures lifted out of `usage` under the names the meter reads (response_model,
    prompt_tokens, completion_tokens, usage_source, units). Raises _Malformed. Adds to `entry` (the
    line's own decoded object) rather than copying it again: this runs for every line."""
    authz = entry.get("authz")
    if authz not in _ABSENT:
        # ext_authz's record of the decision (workspace, key, deployment, model, ...), one JSON object
        # in a string field; lines without it (denied before ext_authz, older formats) carry none.
        try:
            facts = orjson.loads(authz) if isinstance(authz, str) else None
        except orjson.JSONDecodeError:
            facts = None
        if not isinstance(facts, dict):
            raise _Malformed("authz is not a JSON object")
        facts.update(entry)  # Envoy's own fields win
        entry = facts
    if "usage" not in entry:
        return entry  # a line of an older format: the figures are fields of their own
    # The `gateway.usage` metadata namespace, logged whole as one field (envoy.yaml: each metadata
    # field costs Envoy about as much as the rest of the line): {"usage": {prompt_tokens,
    # completion_tokens, model, source}, "units": {unit, quantity, detail}}, null when neither was set.
    namespace = entry["usage"]
    if namespace in _ABSENT:
        namespace = {}
    elif type(namespace) is not dict:
        raise _Malformed("usage is not a JSON object")
    figures = namespace.get("usage")
    if figures in _ABSENT:
        figures = {}
    elif type(figures) is not dict:
        raise _Malformed("usage is not a JSON object")
    completion = figures.get("completion_tokens")
    # A stream's growing count, written alone beside the object after its first chunk (gateway.lua): the
    # object then holds the first chunk's figure. The upstream's final figures are written whole.
    if "completion_tokens" in namespace and figures.get("source") != _FINAL:
        completion = namespace["completion_tokens"]
    entry["response_model"] = figures.get("model")
    entry["prompt_tokens"] = figures.get("prompt_tokens")
    entry["completion_tokens"] = completion
    entry["usage_source"] = figures.get("source")
    entry["units"] = namespace.get("units")
    return entry


def _record(entry: dict[str, Any]) -> UsageRecord:
    entry = fields(entry)
    request_id = _text(entry, "request_id")
    if request_id is None:
        raise _Malformed("missing request_id")
    status = _int(entry, "status", 999)
    flags = _text(entry, "flags")
    destination = _text(entry, "destination")
    # Served (or being served when the client, a timeout or a reset ended it): the request reached a
    # metered endpoint and was not answered with an error. Only such a request is charged.
    served = (destination in _METERED_DESTINATIONS and _text(entry, "upstream_host") is not None
              and status is not None and status < 400)
    prompt_tokens = _int(entry, "prompt_tokens", _INT4_MAX)
    completion_tokens = _int(entry, "completion_tokens", _INT4_MAX)
    unit, quantity = _units(entry, served)
    if unit is not None:
        # Metered in its own unit: its token figures (if any) are the upstream's, never estimated; a
        # served request whose quantity nobody measured (audio the gateway cannot decode, an answer
        # without usage) is marked estimated, at 0.
        usage_estimated = status == 200 and _unit_detail(entry) == _UNMEASURED
    elif "usage_source" in entry:
        prompt_tokens, completion_tokens, usage_estimated = _best_figures(
            entry, served, prompt_tokens, completion_tokens)
    else:
        # Lines from a config without `usage_source`: a streamed response the client hung up on never
        # reached its usage chunk, so the row says the zero is a guess.
        usage_estimated = (
            (prompt_tokens is None or completion_tokens is None)
            and status == 200
            and flags is not None
            and _CLIENT_ABORTED in flags.split(",")
        )
    # Positional, in the fields' order (each value names its field): a keyword call of 21 fields costs
    # twice as much, on every line.
    return UsageRecord(
        request_id,
        _time(entry, "start_time"),
        _text(entry, "workspace_id"),
        _text(entry, "key_id"),
        _text(entry, "deployment_id"),
        destination,
        _text(entry, "route"),
        _text(entry, "model"),
        _text(entry, "response_model"),
        status,
        flags,
        prompt_tokens or 0,
        completion_tokens or 0,
        usage_estimated,
        unit,
        quantity,
        _unit_detail(entry) if unit else None,
        _int(entry, "duration_ms", _INT4_MAX),
        _int(entry, "ttfb_ms", _INT4_MAX),
        _int(entry, "bytes_received", _INT8_MAX),
        _int(entry, "bytes_sent", _INT8_MAX),
    )


def _best_figures(
    entry: dict[str, Any], served: bool, prompt_tokens: int | None, completion_tokens: int | None
) -> tuple[int | None, int | None, bool]:
    """(prompt, completion, estimated) for a request, however its client left.

    A served request (_record) gets, unless the upstream's final figures arrived, the best figures there
    are, marked estimated. Errors, denials and requests that never reached an endpoint keep a real 0."""
    if not served or _text(entry, "usage_source") == _FINAL:
        return prompt_tokens, completion_tokens, False
    if prompt_tokens is None:
        body = _int(entry, "bytes_received", _INT8_MAX) or 0
        prompt_tokens = min(-(-body // BYTES_PER_TOKEN), _INT4_MAX)
    return prompt_tokens, completion_tokens, True


def _units(entry: dict[str, Any], served: bool) -> tuple[str | None, float]:
    """The request's unit and quantity: counted only when an endpoint served it (as tokens are), so a
    denial or an upstream error that the gateway measured on the way in costs nothing."""
    units = entry.get("units")
    if units in _ABSENT:
        return None, 0.0
    if not isinstance(units, dict):
        raise _Malformed("units: not a JSON object")
    unit = _text(units, "unit")
    if unit is None:
        return None, 0.0
    if unit not in _UNITS:
        raise _Malformed(f"unit: not one of {', '.join(_UNITS)}: {unit!r:.80}")
    value = units.get("quantity")
    if isinstance(value, str) and value not in _ABSENT:
        try:
            value = float(value)
        except ValueError:
            raise _Malformed(f"quantity: not a number: {value!r:.80}") from None
    if value in _ABSENT:
        value = 0.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= _MAX_QUANTITY:
        raise _Malformed(f"quantity: expected a number from 0 to {_MAX_QUANTITY:g}, got {value!r:.80}")
    return unit, float(value) if served else 0.0


def _unit_detail(entry: dict[str, Any]) -> str | None:
    units = entry["units"]
    detail = _text(units, "detail")
    return detail[:64] if detail else None  # a client's `size` ends up here: bounded


def _text(entry: dict[str, Any], key: str) -> str | None:
    value = entry.get(key)
    if type(value) is str:
        return value if value and value != "-" else None
    if value is None:
        return None
    raise _Malformed(f"{key}: expected a string, got {value!r:.80}")


def _int(entry: dict[str, Any], key: str, maximum: int) -> int | None:
    value = entry.get(key)
    if type(value) is int and 0 <= value <= maximum:
        return value
    if value in _ABSENT:
        return None
    # Metadata of type NUMBER is a double in Envoy, so counts may arrive as 12.0, or as text.
    if (isinstance(value, float) and value.is_integer()) or (
        isinstance(value, str) and value.isascii() and value.isdigit()
    ):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= maximum:
        raise _Malformed(f"{key}: expected an integer from 0 to {maximum}, got {value!r:.80}")
    return value


def _time(entry: dict[str, Any], key: str) -> datetime | None:
    text = _text(entry, key)
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise _Malformed(f"{key}: not an ISO 8601 time: {text!r:.80}") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _check_storable(record: UsageRecord) -> None:
    for key, value in zip(UsageRecord._fields, record, strict=True):
        if not isinstance(value, str):
            continue
        if "\x00" in value:
            raise _Malformed(f"{key}: contains a NUL character")
        try:
            value.encode()
        except UnicodeEncodeError:
            raise _Malformed(f"{key}: contains an unpaired surrogate") from None
