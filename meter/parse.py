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
    prompt_tokens, completion_tokens, usage_source, units). Raises _Malformed."""
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
        entry = {**facts, **entry}
    if "usage" not in entry:
        return entry  # a line of an older format: the figures are fields of their own
    # The `gateway.usage` metadata namespace, logged whole as one field (envoy.yaml: each metadata
    # field costs Envoy about as much as the rest of the line): {"usage": {prompt_tokens,
    # completion_tokens, model, source}, "units": {unit, quantity, detail}}, null when neither was set.
    namespace = entry["usage"]
    namespace = {} if namespace in _ABSENT else namespace
    figures = namespace.get("usage") if isinstance(namespace, dict) else None
    figures = {} if figures in _ABSENT else figures
    if not isinstance(namespace, dict) or not isinstance(figures, dict):
        raise _Malformed("usage is not a JSON object")
    completion = figures.get("completion_tokens")
    # A stream's growing count, written alone beside the object after its first chunk (gateway.lua): the
    # object then holds the first chunk's figure. The upstream's final figures are written whole.
    if "completion_tokens" in namespace and figures.get("source") != _FINAL:
        completion = namespace["completion_tokens"]
    return {**entry, "response_model": figures.get("model"), "prompt_tokens": figures.get("prompt_tokens"),
            "completion_tokens": completion, "usage_source": figures.get("source"),
            "units": namespace.get("units")}


def _record(entry: dict[str, Any]) -> UsageRecord:
    entry = fields(entry)
    request_id = _text(entry, "request_id")
    if request_id is None:
        raise _Malformed("missing request_id")
    status = _int(entry, "status", 999)
    flags = _text(entry, "flags")
    prompt_tokens = _int(entry, "prompt_tokens", _INT4_MAX)
    completion_tokens = _int(entry, "completion_tokens", _INT4_MAX)
    unit, quantity = _units(entry, status)
    if unit is not None:
        # Metered in its own unit: its token figures (if any) are the upstream's, never estimated; a
        # served request whose quantity nobody measured (audio the gateway cannot decode, an answer
        # without usage) is marked estimated, at 0.
        usage_estimated = status == 200 and _unit_detail(entry) == _UNMEASURED
    elif "usage_source" in entry:
        prompt_tokens, completion_tokens, usage_estimated = _best_figures(
            entry, status, prompt_tokens, completion_tokens)
    else:
        # Lines from a config without `usage_source`: a streamed response the client hung up on never
        # reached its usage chunk, so the row says the zero is a guess.
        usage_estimated = (
            (prompt_tokens is None or completion_tokens is None)
            and status == 200
            and flags is not None
            and _CLIENT_ABORTED in flags.split(",")
        )
    return UsageRecord(
        request_id=request_id,
        start_time=_time(entry, "start_time"),
        workspace_id=_text(entry, "workspace_id"),
        key_id=_text(entry, "key_id"),
        deployment_id=_text(entry, "deployment_id"),
        destination=_text(entry, "destination"),
        route=_text(entry, "route"),
        model=_text(entry, "model"),
        response_model=_text(entry, "response_model"),
        status=status,
        flags=flags,
        prompt_tokens=prompt_tokens or 0,
        completion_tokens=completion_tokens or 0,
        usage_estimated=usage_estimated,
        unit=unit,
        quantity=quantity,
        unit_detail=_unit_detail(entry) if unit else None,
        duration_ms=_int(entry, "duration_ms", _INT4_MAX),
        ttfb_ms=_int(entry, "ttfb_ms", _INT4_MAX),
        bytes_received=_int(entry, "bytes_received", _INT8_MAX),
        bytes_sent=_int(entry, "bytes_sent", _INT8_MAX),
    )


def _best_figures(
    entry: dict[str, Any], status: int | None, prompt_tokens: int | None, completion_tokens: int | None
) -> tuple[int | None, int | None, bool]:
    """(prompt, completion, estimated) for a request, however its client left.

    A request that reached an endpoint and was not answered with an error was served (or was being
    served when the client, a timeout or a reset ended it): unless the upstream's final figures arrived,
    it gets the best figures there are, marked estimated. Errors, denials and requests that never reached
    an endpoint keep a real 0."""
    source = _text(entry, "usage_source")
    reached = _text(entry, "upstream_host") is not None and _text(entry, "destination") in _METERED_DESTINATIONS
    if source == _FINAL or not reached or status is None or status >= 400:
        return prompt_tokens, completion_tokens, False
    if prompt_tokens is None:
        body = _int(entry, "bytes_received", _INT8_MAX) or 0
        prompt_tokens = min(-(-body // BYTES_PER_TOKEN), _INT4_MAX)
    return prompt_tokens, completion_tokens, True


def _units(entry: dict[str, Any], status: int | None) -> tuple[str | None, float]:
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
    reached = _text(entry, "upstream_host") is not None and _text(entry, "destination") in _METERED_DESTINATIONS
    if not reached or status is None or status >= 400:
        return unit, 0.0
    return unit, float(value)


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
