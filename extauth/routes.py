"""The client-facing OpenAI routes the gateway serves, and the one upstream path each may be signed for.

This is the only place that decides which paths are inference: anything not in ROUTES is refused before
any credential is touched, and the upstream path is built from scratch (never from the client's path),
so no query string, dot-segment or encoded byte a client sends can reach RunPod under a stored key.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from urllib.parse import quote


@dataclass(frozen=True)
class Route:
    name: str  # the OpenAI path after /v1/
    method: str
    modalities: frozenset[str]  # deployment modalities this route may reach; empty: answered locally


# One route, one line. A deployment of a modality its route does not list gets model_not_supported; each
# modality is metered and priced in its own unit (control/pricing.py UNITS).
ROUTES: dict[str, Route] = {
    "/v1/chat/completions": Route("chat/completions", "POST", frozenset({"llm"})),
    "/v1/completions": Route("completions", "POST", frozenset({"llm"})),
    "/v1/responses": Route("responses", "POST", frozenset({"llm"})),
    "/v1/embeddings": Route("embeddings", "POST", frozenset({"embedding"})),
    "/v1/images/generations": Route("images/generations", "POST", frozenset({"image"})),
    "/v1/audio/speech": Route("audio/speech", "POST", frozenset({"speech"})),
    "/v1/audio/transcriptions": Route("audio/transcriptions", "POST", frozenset({"voice"})),
    "/v1/audio/translations": Route("audio/translations", "POST", frozenset({"voice"})),
    "/v1/models": Route("models", "GET", frozenset()),
}

MODEL_PREFIX = "/v1/models/"
# RunPod endpoint ids: lowercase alphanumerics as REST v1 returned them (`jpnw0v75y3qoql`), and the REST v2
# API reference's `ep_abc123` (the Endpoint schema's example id). Letters, digits, `_` and `-` are all
# unreserved in a URL, so no id of this alphabet can change a path; anything else (`/`, `.`, `%`, `?`,
# `#`, `\`, ...) in our own database is refused rather than spliced into one.
_ENDPOINT_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def is_endpoint_id(value: str) -> bool:
    return _ENDPOINT_ID_RE.fullmatch(value) is not None


def split_path(raw: str) -> str:
    """The path without its query string (Envoy has already normalised dot-segments and slashes)."""
    return raw.split("?", 1)[0]


def upstream_path(endpoint_id: str, route: Route) -> str | None:
    return _upstream_path(endpoint_id, route.name)


@functools.lru_cache(maxsize=4096)  # a check's hot path: the same few deployments over and over
def _upstream_path(endpoint_id: str, route_name: str) -> str | None:
    if not is_endpoint_id(endpoint_id):
        return None
    return f"/v2/{endpoint_id}/openai/v1/{route_name}"


def path_segment(value: str) -> str:
    return quote(value, safe="")
