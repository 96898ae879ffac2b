"""Key custody: ext_authz answers only its own gateway's Envoy.

A decision carries a credential (a customer's RunPod key, the platform's managed key), so every port
ext_authz serves (checks, the `/v1/models` answers, `/health`, and the admin port's internal routes)
answers only a request that carries the secret Envoy adds from its environment: header
`x-gateway-secret`, value GATEWAY_EXTAUTH_SECRET (envoy/envoy.yaml adds it to every check, health check
and internal call). `gatewayctl up` makes a fresh one at each start; compose reads it from
deploy/secrets/extauth_secret. Anyone else (a caller on the internal network with a valid gateway key,
another stack's Envoy) gets a refusal and nothing else. `/metrics` and `/ready` stay open: they carry
no credential.

The comparison is constant-time (hmac.compare_digest), costs about a microsecond, and the secret never
appears in a log line, a response or an exception.
"""

from __future__ import annotations

import hmac
import logging
import time

from extauth.errors import Denial

SECRET_HEADER = "x-gateway-secret"
# Well above guessing range; `gatewayctl up` and deploy/init-secrets.sh make 43 characters (32 bytes).
MIN_SECRET_CHARS = 32
# One warning per this many seconds at most: a caller hammering the port must not flood the log.
_WARN_EVERY_S = 10.0

log = logging.getLogger("extauth")

REFUSED = Denial(403, "forbidden", "This port answers only the gateway's Envoy.")


class EnvoySecret:
    def __init__(self, secret: str) -> None:
        self._secret = secret.encode()
        self._warned_at = -_WARN_EVERY_S

    def admits(self, presented: str | None) -> bool:
        """Whether a request carrying `presented` in x-gateway-secret comes from this gateway's Envoy."""
        if presented is not None and hmac.compare_digest(presented.encode("latin-1", "replace"), self._secret):
            return True
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY_S:
            self._warned_at = now
            log.warning("refused a request without the gateway's Envoy secret (%s)",
                        "none presented" if presented is None else "wrong secret")
        return False
