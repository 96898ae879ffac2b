"""How much of a workspace's spend limit a managed request holds while it runs (control/spend.py owns
the limit's contract; extauth/hotstate.py the Redis side).

ext_authz never sees the body, so the estimate is an upper one from what it does see:
- prompt tokens ≤ the body's bytes (its `content-length`, handed over by envoy/authz_request.lua): a
  byte-level BPE token covers at least one byte, and the JSON around the text only adds bytes. A body
  without a length (chunked, or HTTP/2 without the header) reserves EXTAUTH_SPEND_UNSIZED_PROMPT_TOKENS.
- completion tokens ≤ the body's `max_completion_tokens` (else `max_tokens`) times its `n`, handed over
  by envoy/authz_request.lua; a request that states no budget reserves
  EXTAUTH_SPEND_DEFAULT_COMPLETION_TOKENS per choice, and may overshoot its reservation. Embeddings
  have no completion.
Priced at the deployment's own per-token prices, rounded up to a micro-dollar.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from extauth.state import DeploymentEntry

_MAX_CHOICES = 128  # beyond any real `n`; keeps a hostile header from reserving absurd sums


@dataclass(frozen=True, slots=True)
class ReservationPolicy:
    default_completion_tokens: int = 4096
    unsized_prompt_tokens: int = 32768
    ttl_s: int = 3600

    def cost_uusd(
        self, dep: DeploymentEntry, body_bytes: str | None, max_tokens: str | None, choices: str | None
    ) -> int:
        """The reservation of one request to `dep`, in micro-USD (prices per million tokens are
        micro-USD per token)."""
        prompt = int(body_bytes) if body_bytes and body_bytes.isdigit() else self.unsized_prompt_tokens
        completion = 0
        if dep.modality != "embedding":
            budget = int(max_tokens) if max_tokens and max_tokens.isdigit() else self.default_completion_tokens
            n = int(choices) if choices and choices.isdigit() else 1
            completion = budget * min(max(n, 1), _MAX_CHOICES)
        return math.ceil(prompt * (dep.input_price or 0.0) + completion * (dep.output_price or 0.0))
