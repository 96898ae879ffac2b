"""The one client for RunPod's APIs: GraphQL only for the account identity (GraphQL retires in 2027;
keep it behind `account_id`), REST v2 for templates and serverless endpoints, and the endpoint health
route. The API key lives only in the Authorization header: never in a URL, message or repr.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from control.errors import ControlError
from extauth.routes import is_endpoint_id


class RunPodError(ControlError):
    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(code, message)
        self.status = status


class RunPodClient:
    def __init__(self, api_url: str, api_key: str, inference_url: str = "", timeout_s: float = 20.0) -> None:
        self._api_url = api_url.rstrip("/")
        self._inference_url = inference_url.rstrip("/")
        self._key = api_key
        self._timeout = timeout_s

    def __repr__(self) -> str:
        return f"RunPodClient(api_url={self._api_url!r})"

    def _call(self, method: str, url: str, body: Any = None, timeout_s: float | None = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("authorization", f"Bearer {self._key}")
        request.add_header("accept", "application/json")
        if data is not None:
            request.add_header("content-type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s or self._timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RunPodError("runpod_unreachable", f"RunPod could not be reached: {reason}") from None
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, None

    def _rest(self, method: str, path: str, body: Any = None, ok: tuple[int, ...] = (200,)) -> Any:
        status, payload = self._call(method, f"{self._api_url}/v2{path}", body)
        if status in ok:
            return payload
        detail = payload.get("detail") if isinstance(payload, dict) else None
        if status in (401, 403):
            raise RunPodError("runpod_key_rejected", f"RunPod refused the key ({status}): {detail}", status)
        if status == 404:
            raise RunPodError("runpod_not_found", f"RunPod: {method} {path} not found", status)
        raise RunPodError("runpod_error", f"RunPod answered {status} to {method} {path}: {detail}", status)

    def account_id(self) -> str:
        """The RunPod account the key belongs to; raises when RunPod does not accept the key."""
        status, payload = self._call("POST", f"{self._api_url}/graphql", {"query": "query { myself { id } }"})
        if status in (401, 403):
            raise RunPodError("runpod_key_invalid", "RunPod rejected this API key; nothing was stored.", status)
        myself = (payload or {}).get("data", {}).get("myself") if isinstance(payload, dict) else None
        if status != 200 or not isinstance(myself, dict) or not myself.get("id"):
            raise RunPodError("runpod_key_invalid", "RunPod did not confirm this API key; nothing was stored.")
        return str(myself["id"])

    def find_template(self, name: str) -> dict[str, Any] | None:
        listing = self._rest("GET", "/templates")
        return next((t for t in listing.get("templates", []) if t.get("name") == name), None)

    def create_template(self, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._rest("POST", "/templates", body, ok=(200, 201))
        return result

    def delete_template(self, template_id: str) -> None:
        try:
            self._rest("DELETE", f"/templates/{_segment(template_id)}", ok=(200, 204))
        except RunPodError as exc:
            if exc.status != 404:
                raise

    def gpu_catalog(self) -> list[dict[str, Any]]:
        listing = self._rest("GET", "/catalog/gpus")
        return list(listing.get("gpus", []))

    def find_endpoint(self, name: str) -> dict[str, Any] | None:
        listing = self._rest("GET", "/serverless")
        return next((e for e in listing.get("endpoints", []) if e.get("name") == name), None)

    def create_endpoint(self, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._rest("POST", "/serverless", body, ok=(200, 201))
        return result

    def get_endpoint(self, endpoint_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._rest("GET", f"/serverless/{_segment(endpoint_id)}")
        return result

    def delete_endpoint(self, endpoint_id: str) -> None:
        try:
            self._rest("DELETE", f"/serverless/{_segment(endpoint_id)}", ok=(200, 204))
        except RunPodError as exc:
            if exc.status != 404:
                raise

    def health(self, endpoint_id: str) -> dict[str, Any]:
        status, payload = self._call("GET", f"{self._inference_url}/v2/{_segment(endpoint_id)}/health")
        if status != 200 or not isinstance(payload, dict):
            raise RunPodError("runpod_unreachable", f"endpoint health answered {status}", status)
        return payload

    def openai_models(self, endpoint_id: str, timeout_s: float) -> tuple[int, Any]:
        """The endpoint's OpenAI-route model list, served by a worker: (status, payload). The request waits
        in RunPod's queue while no worker has loaded the model, so `timeout_s` bounds the whole wait."""
        return self._call("GET", f"{self._inference_url}/v2/{_segment(endpoint_id)}/openai/v1/models",
                          timeout_s=max(0.1, timeout_s))


def _segment(resource_id: str) -> str:
    """A RunPod id as a path segment, refused if it could change the path (ids share one alphabet)."""
    if not is_endpoint_id(resource_id):
        raise RunPodError("runpod_bad_id", "a RunPod id that is not a plain path segment was refused")
    return resource_id
