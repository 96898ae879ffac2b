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


ROUTES: dict[str, Route] = {
    "/v1/chat/completions": Route("chat/completions", "POST", frozenset({"llm"})),
    "/v1/completions": Route("completions", "POST", frozenset({"llm"})),
    "/v1/embeddings": Route("embeddings", "POST", frozenset({"embedding"})),
    "/v1/models": Route("models", "GET", frozenset()),
}

MODEL_PREFIX = "/v1/models/"
# RunPod endpoint ids are lowercase alphanumerics; anything else in our own database is refused rather
# than spliced into a path.
_ENDPOINT_ID_RE = re.compile(r"[a-z0-9]{1,64}")


def split_path(raw: str) -> str:
    """The path without its query string (Envoy has already normalised dot-segments and slashes)."""
    return raw.split("?", 1)[0]


def upstream_path(endpoint_id: str, route: Route) -> str | None:
    return _upstream_path(endpoint_id, route.name)


@functools.lru_cache(maxsize=4096)  # a check's hot path: the same few deployments over and over
def _upstream_path(endpoint_id: str, route_name: str) -> str | None:
    if _ENDPOINT_ID_RE.fullmatch(endpoint_id) is None:
        return None
    return f"/v2/{endpoint_id}/openai/v1/{route_name}"


def path_segment(value: str) -> str:
    return quote(value, safe="")
