"""How much of a workspace's spend limit a managed request holds while it runs (control/spend.py owns
the limit's contract; extauth/hotstate.py the Redis side).

ext_authz never sees the body, so the estimate is an upper one from what it does see:
- prompt tokens ≤ the body's bytes (its `content-length`, handed over by envoy/authz_request.lua): a
  byte-level BPE token covers at least one byte, and the JSON around the text only adds bytes. A body
  without a length (chunked, or HTTP/2 without the header) reserves EXTAUTH_SPEND_UNSIZED_PROMPT_TOKENS.
- completion tokens ≤ the body's `max_completion_tokens` (else `max_tokens`, else the Responses API's
  `max_output_tokens`) times its `n`, handed over
  by envoy/authz_request.lua; a request that states no budget reserves
  EXTAUTH_SPEND_DEFAULT_COMPLETION_TOKENS per choice, and may overshoot its reservation. Embeddings
  have no completion.
Priced at the deployment's own per-token prices, rounded up to a micro-dollar.

The other units (control/pricing.py UNITS), at the deployment's price per unit:
- images: the body's `n` (default 1), each at the price of one image;
- characters of speech input ≤ the body's bytes (a character is at least one byte of JSON);
- audio seconds: the WAV file's duration when envoy/authz_request.lua read one, else the body's bytes
  over AUDIO_BYTES_PER_SECOND, a rate below any speech codec's usual bit rate (opus, mp3, AAC at 8 kbps
  or more), so that the estimate errs high.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from control.pricing import TOKEN
from extauth.state import DeploymentEntry

_MAX_CHOICES = 128  # beyond any real `n`; keeps a hostile header from reserving absurd sums
AUDIO_BYTES_PER_SECOND = 1000


def _choices(header: str | None) -> int:
    """The body's `n` as handed over (1 when absent or not a count), within [1, _MAX_CHOICES]."""
    return min(max(int(header), 1), _MAX_CHOICES) if header and header.isdigit() else 1


@dataclass(frozen=True, slots=True)
class ReservationPolicy:
    default_completion_tokens: int = 4096
    unsized_prompt_tokens: int = 32768
    ttl_s: int = 3600

    def cost_uusd(
        self, dep: DeploymentEntry, body_bytes: str | None, max_tokens: str | None, choices: str | None,
        audio_seconds: str | None = None,
    ) -> int:
        """The reservation of one request to `dep`, in micro-USD (prices per million tokens are
        micro-USD per token)."""
        prompt = int(body_bytes) if body_bytes and body_bytes.isdigit() else self.unsized_prompt_tokens
        if dep.unit != TOKEN:
            return math.ceil(self._units(dep.unit, prompt, choices, audio_seconds) * (dep.unit_price or 0.0) * 1e6)
        completion = 0
        if dep.modality != "embedding":
            budget = int(max_tokens) if max_tokens and max_tokens.isdigit() else self.default_completion_tokens
            completion = budget * _choices(choices)
        return math.ceil(prompt * (dep.input_price or 0.0) + completion * (dep.output_price or 0.0))

    @staticmethod
    def _units(unit: str | None, body_bytes: int, choices: str | None, audio_seconds: str | None) -> float:
        if unit == "image":
            return _choices(choices)
        if unit == "audio_second":
            try:
                seconds = float(audio_seconds) if audio_seconds else None
            except ValueError:
                seconds = None
            if seconds is not None and 0 <= seconds < 1e7:
                return seconds
            return body_bytes / AUDIO_BYTES_PER_SECOND
        return body_bytes  # characters
