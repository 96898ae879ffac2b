"""The per-request Redis round trip: one script that checks the caller's cached view is current, that
the key is not revoked, and runs the key's leaky bucket, all atomically on Redis's clock.

Redis layout (every hash expires after HOTSTATE_TTL_S and is rebuilt from PostgreSQL on demand, which
bounds how stale a missed update can leave it):
  gw:k:<key_id>  hash  g=generation x=revoked(0/1) r=explicit rpm limit (0: the workspace default)
  gw:w:<ws_id>   hash  g=generation d=default rpm c=ceiling rpm
  gw:b:<key_id>  string  the bucket's theoretical arrival time, in microseconds (GCRA)
  gw:o:<ws_id>   string  present while the workspace is at its monthly spend limit (set by the meter
                 and by `workspace set-spend-limit`; it expires at the end of the month)
Hashes are only ever moved forward in generation, so a replica writing back an old read cannot undo a
newer change that the control plane published.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

HOTSTATE_TTL_S = 300

# Monotonic put of one hash: fields are written only when `g` is newer than what is stored.
_PUT = """
local function put(key, fields, ttl)
  if #fields == 0 then return end
  local cur = redis.call('HGET', key, 'g')
  if (not cur) or tonumber(cur) < tonumber(fields[2]) then
    redis.call('HSET', key, unpack(fields))
  end
  redis.call('EXPIRE', key, ttl)
end
"""

PUT_SCRIPT = (
    _PUT
    + """
put(KEYS[1], ARGV, HOTSTATE_TTL_S)
return 1
"""
).replace("HOTSTATE_TTL_S", str(HOTSTATE_TTL_S))

# KEYS: key hash, workspace hash, bucket, spend flag. ARGV: expected key gen, expected ws gen, key fields count N,
# N key fields, then workspace fields (empty when not refreshing).
# Returns {status, limit, remaining, reset_us, retry_after_us, now_us, over_spend}; status 1 allow, 0 over limit,
# -1 unknown to Redis, -2 the caller's view is stale, -3 revoked.
DECIDE_SCRIPT = (
    _PUT
    + """
local n = tonumber(ARGV[3])
local kf, wf = {}, {}
for i = 1, n do kf[i] = ARGV[3 + i] end
for i = 4 + n, #ARGV do wf[#wf + 1] = ARGV[i] end
put(KEYS[1], kf, HOTSTATE_TTL_S)
put(KEYS[2], wf, HOTSTATE_TTL_S)
local k = redis.call('HMGET', KEYS[1], 'g', 'x', 'r')
local w = redis.call('HMGET', KEYS[2], 'g', 'd', 'c')
if (not k[1]) or (not w[1]) then return {-1} end
if k[1] ~= ARGV[1] or w[1] ~= ARGV[2] then return {-2} end
if k[2] == '1' then return {-3} end
local limit = tonumber(k[3])
if limit <= 0 then limit = tonumber(w[2]) end
local ceiling = tonumber(w[3])
if limit > ceiling then limit = ceiling end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = 60000000 / limit
local burst = math.max(1, math.floor(limit / 10))
local tau = (burst - 1) * interval
local tat = tonumber(redis.call('GET', KEYS[3]) or '0')
if tat < now then tat = now end
if tat - now > tau then
  return {0, limit, 0, math.ceil(tat), math.ceil(tat - tau - now), now, 0}
end
local new = tat + interval
redis.call('SET', KEYS[3], string.format('%.0f', new), 'PX', math.ceil((new - now) / 1000) + 1000)
local remaining = math.floor((tau - (new - now)) / interval) + 1
if remaining < 0 then remaining = 0 end
local over = redis.call('EXISTS', KEYS[4])
return {1, limit, remaining, math.ceil(new), 0, now, over}
"""
).replace("HOTSTATE_TTL_S", str(HOTSTATE_TTL_S))

ALLOW, OVER_LIMIT, UNKNOWN, STALE, REVOKED = 1, 0, -1, -2, -3


def key_redis_key(key_id: str) -> str:
    return f"gw:k:{key_id}"


def workspace_redis_key(workspace_id: str) -> str:
    return f"gw:w:{workspace_id}"


def bucket_redis_key(key_id: str) -> str:
    return f"gw:b:{key_id}"


def spend_redis_key(workspace_id: str) -> str:
    return f"gw:o:{workspace_id}"


@functools.lru_cache(maxsize=4096)
def decide_keys(key_id: str, workspace_id: str) -> tuple[str, str, str, str]:
    """DECIDE_SCRIPT's KEYS, in its order (built once per key: a check is a hot path)."""
    return (key_redis_key(key_id), workspace_redis_key(workspace_id), bucket_redis_key(key_id),
            spend_redis_key(workspace_id))


def key_fields(generation: int, revoked: bool, rpm_limit: int | None) -> list[Any]:
    return ["g", generation, "x", 1 if revoked else 0, "r", rpm_limit or 0]


def workspace_fields(generation: int, rpm_default: int, rpm_ceiling: int) -> list[Any]:
    return ["g", generation, "d", rpm_default, "c", rpm_ceiling]


class Verdict(NamedTuple):
    # A tuple rather than a frozen dataclass: one is built per check, and a frozen dataclass's __init__
    # costs a setattr call per field.
    status: int
    limit: int = 0
    remaining: int = 0
    reset_us: int = 0
    retry_after_us: int = 0
    now_us: int = 0
    over_spend: int = 0


def parse_verdict(reply: list[int]) -> Verdict:
    return Verdict(*map(int, reply))
