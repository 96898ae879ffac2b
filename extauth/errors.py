"""Every error the gateway itself answers with, in OpenAI's error shape, in one catalog.

The messages never echo a credential; a client-supplied model name is echoed only truncated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from extauth.ratelimit import burst

INVALID_REQUEST = "invalid_request_error"


@dataclass(frozen=True)
class Denial:
    status: int
    code: str
    message: str
    type: str = INVALID_REQUEST
    headers: tuple[tuple[str, str], ...] = field(default=())
    param: str | None = None

    def body(self) -> str:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return json.dumps({"error": error})


def _shown(value: str) -> str:
    return value if len(value) <= 128 else value[:128] + "..."


def missing_api_key() -> Denial:
    return Denial(
        401,
        "invalid_api_key",
        "You didn't provide an API key. Send it in the Authorization header as `Bearer YOUR_KEY`.",
    )


def invalid_api_key() -> Denial:
    return Denial(401, "invalid_api_key", "Incorrect API key provided. It may be malformed, unknown or revoked.")


def unknown_url(method: str, path: str) -> Denial:
    return Denial(404, "unknown_url", f"Invalid URL ({_shown(method)} {_shown(path)})")


def method_not_allowed(method: str, path: str) -> Denial:
    return Denial(405, "method_not_allowed", f"{_shown(method)} is not supported on {_shown(path)}")


def missing_model() -> Denial:
    return Denial(400, "missing_model", "You must provide a model parameter in a JSON request body.")


# What is wrong with a body that has no string `model` (the `problem` of extauth/body_facts.py, from
# json_to_metadata's facts or, for `not_object` and some `model_type`s, from the body itself).
_BODY_FACTS = {
    "not_json": ("invalid_json", None, "The request body must be JSON, sent with `Content-Type: application/json`."),
    "invalid_json": (
        "invalid_json",
        None,
        "We could not parse the JSON body of your request: it is not valid JSON, or not encoded in UTF-8.",
    ),
    "not_object": ("invalid_json", None, "The request body must be a JSON object, not an array or a bare value."),
    "model_type": ("invalid_type", "model", "Invalid type for 'model': expected a string."),
}


def bad_body(fact: str | None) -> Denial:
    """A body without a usable `model`: what is wrong with it, if the gateway could tell."""
    known = _BODY_FACTS.get(fact or "")
    if known is None:
        return missing_model()
    code, param, message = known
    return Denial(400, code, message, param=param)


def request_headers_too_large() -> Denial:
    return Denial(
        431,
        "request_headers_too_large",
        "The request carries too many or too large headers for this gateway: at most 88 headers and "
        "59 KiB in all.",
    )


def model_not_found(model: str) -> Denial:
    return Denial(
        404,
        "model_not_found",
        f"The model `{_shown(model)}` does not exist or you do not have access to it.",
    )


def wrong_route_for_model(model: str, route: str) -> Denial:
    return Denial(
        400,
        "model_not_supported",
        f"The model `{_shown(model)}` does not support /v1/{route}.",
    )


UNAVAILABLE_RETRY_S = 1


def gateway_unavailable() -> Denial:
    return Denial(
        503,
        "gateway_unavailable",
        f"The gateway is temporarily unable to authorize requests. Retry in {UNAVAILABLE_RETRY_S} s.",
        type="server_error",
        headers=(("retry-after", str(UNAVAILABLE_RETRY_S)),),
    )


def rate_limited(limit: int, retry_after_s: int) -> Denial:
    # SDK users see the message, not the Retry-After header: it carries the wait and the bucket's shape.
    return Denial(
        429,
        "rate_limit_exceeded",
        f"Rate limit reached for this API key: {limit} requests per minute, in bursts of at most "
        f"{burst(limit)}. Retry in {retry_after_s} s, or ask for a higher limit (`gatewayctl keys set-limit`).",
        type="requests",
    )


def byoc_plan_required(plan: str) -> Denial:
    return Denial(
        403,
        "byoc_plan_required",
        f"Inference on your own RunPod deployments needs plan Pro or above (this workspace: {plan}); "
        "it is suspended until the workspace upgrades or redeploys on the managed destination.",
    )


def byoc_runpod_not_linked() -> Denial:
    return Denial(
        403, "byoc_runpod_not_linked", "No RunPod API key is linked to this workspace. Connect RunPod in Settings."
    )


def byoc_modality_unsupported(modality: str) -> Denial:
    return Denial(
        400,
        "byoc_modality_unsupported",
        f"{modality} models cannot run on your own RunPod account; deploy them on the managed destination.",
    )


def byoc_runpod_key_rejected() -> Denial:
    return Denial(
        403,
        "byoc_runpod_key_rejected",
        "RunPod rejected the API key linked to this workspace. Reconnect RunPod in Settings.",
    )


def byoc_account_mismatch() -> Denial:
    return Denial(
        403,
        "byoc_runpod_key_rejected",
        "The RunPod account linked to this workspace does not own this model's endpoint. "
        "Reconnect RunPod in Settings with the account that deployed it, or redeploy.",
    )


def model_not_priced(model: str) -> Denial:
    # The operator's omission, not the client's; the message names who can fix it. 403, not 503: a 503
    # from ext_authz is Envoy's "authorization unavailable" (its local reply replaces the body), and
    # SDKs would retry it in vain.
    return Denial(
        403,
        "model_not_priced",
        f"The model `{_shown(model)}` has no price set, so it cannot be served yet. The gateway operator "
        "sets one with `gatewayctl prices set <deployment id> --input USD --output USD`.",
    )


def plan_limit_exceeded() -> Denial:
    return Denial(
        403,
        "plan_limit_exceeded",
        "This workspace has reached its monthly spend limit for managed inference. "
        "Raise the limit or wait for the next billing period.",
    )
