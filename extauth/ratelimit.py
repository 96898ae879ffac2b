"""Rate-limit response headers: the legacy `X-RateLimit-*` trio, `Retry-After`, and the IETF draft
`RateLimit-Policy` / `RateLimit` fields, all derived from one bucket verdict so they always agree.

The bucket is a leaky bucket of capacity L/10 draining at L/60 per second (see hotstate.py). In the
draft's terms that is a quota of L/10 requests per window of the time it takes to drain them (6 s).
"""

from __future__ import annotations

import functools
import math

from extauth.hotstate import Verdict

POLICY_NAME = "per-key"


def burst(limit: int) -> int:
    return max(1, limit // 10)


def retry_after_s(verdict: Verdict) -> int:
    """Whole seconds until the request would be admitted, never shorter than the real wait (0: now)."""
    if verdict.retry_after_us <= 0:
        return 0
    return max(1, math.ceil(verdict.retry_after_us / 1_000_000))


# A key's limit changes rarely and a workspace has few: its two fixed headers are built once per limit.
@functools.lru_cache(maxsize=256)
def _fixed(limit: int) -> tuple[tuple[str, str], tuple[str, str]]:
    window_s = max(1, round(burst(limit) * 60 / limit))
    return ("x-ratelimit-limit", str(limit)), ("ratelimit-policy", f'"{POLICY_NAME}";q={burst(limit)};w={window_s}')


def headers(verdict: Verdict) -> list[tuple[str, str]]:
    limit_header, policy_header = _fixed(verdict.limit)
    remaining = str(verdict.remaining)
    reset_in_s = max(0, math.ceil((verdict.reset_us - verdict.now_us) / 1_000_000))
    out = [
        limit_header,
        ("x-ratelimit-remaining", remaining),
        ("x-ratelimit-reset", str(math.ceil(verdict.reset_us / 1_000_000))),
        policy_header,
        ("ratelimit", f'"{POLICY_NAME}";r={remaining};t={reset_in_s}'),
    ]
    if verdict.retry_after_us > 0:
        out.append(("retry-after", str(retry_after_s(verdict))))
    return out


def utilization(verdict: Verdict) -> float:
    """How full the bucket is: 0 when a whole burst could still pass, 1 when nothing more could."""
    return 1.0 - verdict.remaining / burst(verdict.limit)
