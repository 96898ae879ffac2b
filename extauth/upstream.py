"""Upstream injection: what an allowed request carries to the customer's endpoint, and nothing more.

The client's credential is replaced by the workspace's RunPod key, the path is rebuilt for the
deployment's endpoint, and the destination header that picks Envoy's cluster is always overwritten.
Every client header outside a short allowlist never gets this far: Envoy removes them at the edge,
before routing (control/header_allowlist.py, envoy.yaml `early_header_mutation_extensions`), so
nothing a client forges (routing headers, x-envoy-* retry or timeout controls, forwarded-for chains)
reaches routing, this check or the upstream, and an answer has nothing left to strip.
"""

from __future__ import annotations

from collections.abc import Mapping

from extauth import body_facts
from extauth.decision import BODY_CHECK, BODY_CHECK_PATH, DESTINATION_HEADER, LOCAL_DESTINATION, PATH_HEADER

# Envoy holds a request's headers to its own limits (envoy.yaml: 100 headers, 60 KiB) also while
# ext_authz's answer adds to them; an allowed request at the edge of those limits would fail there
# with an empty 500. Such a request is refused instead (431), with room kept for what the answer adds
# (two headers, at most a few hundred bytes: credential, path). The check carries every header that is
# forwarded (the edge's allowlist, envoy.yaml `allowed_headers`) and Envoy's own additions; a header of
# the body's facts does not count (x-gateway-body travels on the check alone, x-gateway-form is removed
# before forwarding). Since the edge drops every other header, in practice only a forwarded header's
# size can reach these bounds.
MAX_CHECKED_HEADERS = 94
MAX_CHECKED_HEADER_BYTES = 59 * 1024


def fits_upstream(headers: Mapping[str, str], size_bound: int | None = None) -> bool:
    """`size_bound`: at least the headers' bytes, when the transport knows it for free (the HTTP check's
    header block); at or under the limit, the headers need not be summed."""
    own = len(headers) - (body_facts.HEADER in headers) - (body_facts.FORM_HEADER in headers)
    if own + 1 > MAX_CHECKED_HEADERS:
        return False
    if size_bound is not None and size_bound <= MAX_CHECKED_HEADER_BYTES:
        return True
    return len("".join(headers)) + len("".join(headers.values())) <= MAX_CHECKED_HEADER_BYTES


def injected_headers(path: str, runpod_key: str, destination: str) -> list[tuple[str, str]]:
    return [
        (PATH_HEADER, path),
        ("authorization", f"Bearer {runpod_key}"),
        (DESTINATION_HEADER, destination),
    ]


def local_headers(path: str) -> list[tuple[str, str]]:
    """A request the gateway answers itself goes to ext_authz's own model listing, without the client's key."""
    return [(PATH_HEADER, path), (DESTINATION_HEADER, LOCAL_DESTINATION)]


def body_check_headers() -> list[tuple[str, str]]:
    """A body the check could not judge goes to ext_authz's admin port, which answers what is wrong with it."""
    return [(PATH_HEADER, BODY_CHECK_PATH), (DESTINATION_HEADER, BODY_CHECK)]
