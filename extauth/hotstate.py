"""The per-request Redis round trip: one script that checks the caller's cached view is current, that
the key is not revoked, runs the key's leaky bucket and, for a managed request of a workspace with a
spend limit, reserves the request's estimated cost, all atomically on Redis's clock.

Redis layout. Every key of one check carries its workspace as a hash tag (`{ws_...}`), so all of them
share one Redis Cluster slot:
  gw:{ws}:k:<key_id>  hash  g=generation x=revoked(0/1) r=explicit rpm limit (0: the workspace default)
  gw:{ws}:w           hash  g=generation d=default rpm c=ceiling rpm l=spend limit in micro-USD (-1: none)
                            s=when a pending downgrade takes effect, Redis time in us (0: none pending)
                            sd, sc=the default and ceiling rpm from then on (the lower plan's)
  gw:{ws}:b:<key_id>  string  the bucket's theoretical arrival time, in microseconds (GCRA)
  gw:{ws}:$           hash  m=billing month (YYYYMM) p=managed spend committed in month m, micro-USD
                      (PostgreSQL's figure, only ever raised within a month) r=sum of live reservations
  gw:{ws}:$r          hash  request id -> reserved micro-USD
  gw:{ws}:$e          zset  request id, scored by the Redis time (us) its reservation expires
The k and w hashes expire after HOTSTATE_TTL_S and are rebuilt from PostgreSQL on demand, which bounds how
stale a missed update can leave them; they are only ever moved forward in generation, so a replica writing
back an old read cannot undo a newer change that the control plane published. The spend hash is rebuilt
the same way (a check that finds it missing, or of another month, reloads the workspace), and the meter
settles it after each batch (SETTLE_SCRIPT): reservations released by request id, `p` raised to the
committed figure. A reservation never settled (its log line lost) expires after the TTL its check passed.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal
from typing import Any, NamedTuple

from control.plans import effective_limits

HOTSTATE_TTL_S = 300
# The spend hash outlives every reservation it sums (their TTL is at most hours); it goes only once a
# workspace has had no managed traffic for this long, and is then rebuilt from PostgreSQL.
SPEND_STATE_TTL_S = 40 * 24 * 3600
# Expired reservations dropped per check at most: bounded work per call, and they expire at most as
# fast as checks made them.
_EXPIRED_PER_CHECK = 8

ALLOW, OVER_LIMIT, UNKNOWN, STALE, REVOKED, EXPIRED = 1, 0, -1, -2, -3, -4
# Verdict.spend: no reservation was asked for, one was made, or the limit refused it.
SPEND_NONE, SPEND_RESERVED, SPEND_REFUSED = 0, 1, 2
NO_SPEND_LIMIT = -1

# DECIDE_SCRIPT's KEYS and ARGV, by name: the script reads them under these names (see _prologue).
DECIDE_KEYS = ("key_hash", "workspace_hash", "bucket", "spend", "reservations", "reservation_expiry")
DECIDE_ARGS = (
    "deadline_us",  # Redis time (us) past which the caller has given up: change nothing; 0: none
    "key_generation",  # the caller's view; a mismatch answers STALE
    "workspace_generation",
    "month",  # the billing month (YYYYMM) the caller's clock is in
    "reserve_uusd",  # the cost to reserve; 0: none (every bring-your-own or unlimited request)
    "request_id",  # names the reservation the meter will release
    "reservation_ttl_s",
    "spent_uusd",  # PostgreSQL's spend this month, published with a refresh; -1: not refreshing
    "key_fields_n",  # then that many key-hash fields, then the workspace-hash fields (refresh only)
)


# What the script reads for the trailing DECIDE_ARGS a check leaves out (decide_args): no reservation,
# no refresh. The script's prologue applies them, so this is their one statement.
DECIDE_ARG_DEFAULTS: dict[str, Any] = {"reserve_uusd": 0, "request_id": "", "reservation_ttl_s": 0,
                                       "spent_uusd": -1, "key_fields_n": 0}


def _prologue(names: Sequence[str], array: str, defaults: Mapping[str, Any] | None = None) -> str:
    """Each of `array`'s values as a local named `names`; an absent one as its default, if it has one."""
    defaults = defaults or {}
    return "".join(
        f"local {name} = {array}[{i}]" + (f" or '{defaults[name]}'" if name in defaults else "") + "\n"
        for i, name in enumerate(names, 1)
    )


def _constants(script: str) -> str:
    for name, value in (("HOTSTATE_TTL_S", HOTSTATE_TTL_S), ("SPEND_STATE_TTL_S", SPEND_STATE_TTL_S),
                        ("EXPIRED_PER_CHECK", _EXPIRED_PER_CHECK), ("ALLOW", ALLOW),
                        ("OVER_LIMIT", OVER_LIMIT), ("UNKNOWN", UNKNOWN), ("STALE", STALE), ("REVOKED", REVOKED),
                        ("EXPIRED", EXPIRED), ("SPEND_NONE", SPEND_NONE), ("SPEND_RESERVED", SPEND_RESERVED),
                        ("SPEND_REFUSED", SPEND_REFUSED), ("NARGS", len(DECIDE_ARGS))):
        script = script.replace(f"@{name}@", str(value))
    return script


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

# The spend hash: a month's committed figure only ever rises, and a newer month replaces an older one.
# Reservations (`r`) are released one by one, never below zero.
_SPEND = """
local function put_spent(key, month, spent)
  local cur = redis.call('HMGET', key, 'm', 'p')
  local m = tonumber(cur[1] or '0')
  if m < month then
    redis.call('HSET', key, 'm', month, 'p', spent)
  elseif m == month and tonumber(cur[2] or '0') < spent then
    redis.call('HSET', key, 'p', spent)
  end
  redis.call('EXPIRE', key, @SPEND_STATE_TTL_S@)
end
local function release(spend_key, amounts_key, expiry_key, id)
  local amount = tonumber(redis.call('HGET', amounts_key, id) or '0')
  if amount == 0 then return end
  redis.call('HDEL', amounts_key, id)
  redis.call('ZREM', expiry_key, id)
  local left = redis.call('HINCRBY', spend_key, 'r', -amount)
  if left < 0 then redis.call('HSET', spend_key, 'r', 0) end
end
"""

PUT_SCRIPT = _constants(
    _PUT
    + """
put(KEYS[1], ARGV, @HOTSTATE_TTL_S@)
return 1
"""
)

# Returns the Verdict's fields in order. Every reply carries Redis's clock (now_us), so the caller can
# learn the offset of its own clock from Redis's and pass deadlines Redis can check.
DECIDE_SCRIPT = _constants(
    _PUT
    + _SPEND
    + _prologue(DECIDE_KEYS, "KEYS")
    + _prologue(DECIDE_ARGS, "ARGV", DECIDE_ARG_DEFAULTS)
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local deadline = tonumber(deadline_us)
if deadline > 0 and now > deadline then return {@EXPIRED@, 0, 0, 0, 0, now, @SPEND_NONE@} end
local n = tonumber(key_fields_n)
local kf, wf = {}, {}
for i = 1, n do kf[i] = ARGV[@NARGS@ + i] end
for i = @NARGS@ + 1 + n, #ARGV do wf[#wf + 1] = ARGV[i] end
put(key_hash, kf, @HOTSTATE_TTL_S@)
put(workspace_hash, wf, @HOTSTATE_TTL_S@)
local this_month = tonumber(month)
local spent_in = tonumber(spent_uusd)
if spent_in >= 0 then put_spent(spend, this_month, spent_in) end
local k = redis.call('HMGET', key_hash, 'g', 'x', 'r')
local w = redis.call('HMGET', workspace_hash, 'g', 'd', 'c', 's')
if (not k[1]) or (not w[1]) then return {@UNKNOWN@, 0, 0, 0, 0, now, @SPEND_NONE@} end
if k[1] ~= key_generation or w[1] ~= workspace_generation then return {@STALE@, 0, 0, 0, 0, now, @SPEND_NONE@} end
if k[2] == '1' then return {@REVOKED@, 0, 0, 0, 0, now, @SPEND_NONE@} end
local reserve = tonumber(reserve_uusd)
local spent = nil
-- The limit is read by a check that reserves only (each field read costs every check).
local spend_limit = -1
if reserve > 0 then spend_limit = tonumber(redis.call('HGET', workspace_hash, 'l') or '-1') end
if spend_limit >= 0 then
  local s = redis.call('HMGET', spend, 'm', 'p')
  if (not s[1]) or tonumber(s[1]) ~= this_month then return {@UNKNOWN@, 0, 0, 0, 0, now, @SPEND_NONE@} end
  spent = tonumber(s[2])
end
local limit = tonumber(k[3])
-- A pending downgrade holds from its moment on Redis's clock: every replica switches together.
if w[4] and w[4] ~= '0' and now >= tonumber(w[4]) then
  local after = redis.call('HMGET', workspace_hash, 'sd', 'sc')
  w[2], w[3] = after[1], after[2]
end
if limit <= 0 then limit = tonumber(w[2]) end
local ceiling = tonumber(w[3])
if limit > ceiling then limit = ceiling end
local interval = 60000000 / limit
local burst = math.max(1, math.floor(limit / 10))
local tau = (burst - 1) * interval
local tat = tonumber(redis.call('GET', bucket) or '0')
if tat < now then tat = now end
if tat - now > tau then
  return {@OVER_LIMIT@, limit, 0, math.ceil(tat), math.ceil(tat - tau - now), now, @SPEND_NONE@}
end
local new = tat + interval
redis.call('SET', bucket, string.format('%.0f', new), 'PX', math.ceil((new - now) / 1000) + 1000)
local remaining = math.floor((tau - (new - now)) / interval) + 1
if remaining < 0 then remaining = 0 end
local spend_state = @SPEND_NONE@
if spent then
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', reservation_expiry, '-inf', now, 'LIMIT', 0, @EXPIRED_PER_CHECK@)) do
    release(spend, reservations, reservation_expiry, id)
  end
  local reserved = tonumber(redis.call('HGET', spend, 'r') or '0')
  if reserved > 0 and redis.call('EXISTS', reservations) == 0 then
    -- The amounts expired as a whole (no reservation for SPEND_STATE_TTL_S): none is live.
    reserved = 0
    redis.call('HSET', spend, 'r', 0)
  end
  if spent + reserved + reserve > spend_limit then
    spend_state = @SPEND_REFUSED@
  else
    local ttl = tonumber(reservation_ttl_s)
    redis.call('HINCRBY', reservations, request_id, reserve)
    redis.call('ZADD', reservation_expiry, now + ttl * 1000000, request_id)
    redis.call('HINCRBY', spend, 'r', reserve)
    -- Each reservation expires on its own (the zset's score); the keys outlive them all.
    redis.call('EXPIRE', spend, @SPEND_STATE_TTL_S@)
    redis.call('EXPIRE', reservations, @SPEND_STATE_TTL_S@)
    redis.call('EXPIRE', reservation_expiry, @SPEND_STATE_TTL_S@)
    spend_state = @SPEND_RESERVED@
  end
end
return {@ALLOW@, limit, remaining, math.ceil(new), 0, now, spend_state}
"""
)

SETTLE_KEYS = ("spend", "reservations", "reservation_expiry")
SETTLE_ARGS = ("month", "spent_uusd")  # spent -1: leave the figure alone; then the request ids to release

# The meter's half: after a batch commits, release its managed requests' reservations and raise the
# month's spend to what PostgreSQL now holds. Safe to repeat: a released id is gone, and the figure only
# rises, so a replayed batch or a second meter changes nothing.
SETTLE_SCRIPT = _constants(
    _SPEND
    + _prologue(SETTLE_KEYS, "KEYS")
    + _prologue(SETTLE_ARGS, "ARGV")
    + """
local spent_in = tonumber(spent_uusd)
if spent_in >= 0 then put_spent(spend, tonumber(month), spent_in) end
for i = #SETTLE_ARGS + 1, #ARGV do release(spend, reservations, reservation_expiry, ARGV[i]) end
return 1
""".replace("#SETTLE_ARGS", str(len(SETTLE_ARGS)))
)


def _tag(workspace_id: str) -> str:
    return "gw:{" + workspace_id + "}:"


def key_redis_key(workspace_id: str, key_id: str) -> str:
    return f"{_tag(workspace_id)}k:{key_id}"


def workspace_redis_key(workspace_id: str) -> str:
    return f"{_tag(workspace_id)}w"


def bucket_redis_key(workspace_id: str, key_id: str) -> str:
    return f"{_tag(workspace_id)}b:{key_id}"


def spend_redis_keys(workspace_id: str) -> tuple[str, str, str]:
    """SETTLE_SCRIPT's KEYS: the spend hash, the reservations' amounts and their expiries."""
    tag = _tag(workspace_id)
    return f"{tag}$", f"{tag}$r", f"{tag}$e"


@functools.lru_cache(maxsize=4096)
def decide_keys(key_id: str, workspace_id: str) -> tuple[str, ...]:
    """DECIDE_SCRIPT's KEYS, in its order (built once per key: a check is a hot path)."""
    return (key_redis_key(workspace_id, key_id), workspace_redis_key(workspace_id),
            bucket_redis_key(workspace_id, key_id), *spend_redis_keys(workspace_id))


def decide_args(
    deadline_us: int,
    key_generation: int,
    workspace_generation: int,
    month: int,
    reserve_uusd: int = 0,
    request_id: str = "",
    reservation_ttl_s: int = 0,
    spent_uusd: int = -1,
    key_fields: Sequence[Any] = (),
    workspace_fields: Sequence[Any] = (),
) -> list[Any]:
    """DECIDE_SCRIPT's ARGV (DECIDE_ARGS, then the refreshed fields). A check that neither reserves nor
    refreshes sends the first four only: the script reads the missing ones as these defaults, and each
    argument costs encoding here and parsing in Redis on every check."""
    head = [deadline_us, key_generation, workspace_generation, month]
    if not reserve_uusd:
        # Nothing reserved: the reservation's name and lifetime mean nothing to the script.
        request_id, reservation_ttl_s = "", 0
    tail = (reserve_uusd, request_id, reservation_ttl_s, spent_uusd, len(key_fields))
    if tail == _TAIL_DEFAULTS and not workspace_fields:
        return head
    return [*head, *tail, *key_fields, *workspace_fields]


# DECIDE_ARG_DEFAULTS in DECIDE_ARGS's order, after the four every check sends: compared as one tuple,
# since decide_args runs on every check.
_TAIL_DEFAULTS = tuple(DECIDE_ARG_DEFAULTS[name] for name in DECIDE_ARGS[4:])


def key_fields(generation: int, revoked: bool, rpm_limit: int | None) -> list[Any]:
    return ["g", generation, "x", 1 if revoked else 0, "r", rpm_limit or 0]


class PlanSwitch(NamedTuple):
    """A pending downgrade as the workspace hash carries it (fields s, sd, sc)."""

    at_us: int  # microseconds since the epoch; 0: none pending
    rpm_default: int
    rpm_ceiling: int


NO_SWITCH = PlanSwitch(0, 0, 0)


def plan_switch(pending_plan: str | None, at_us: int | None) -> PlanSwitch:
    """A workspace row's pending downgrade as the hash carries it (the lower plan's own limits)."""
    if pending_plan is None or at_us is None:
        return NO_SWITCH
    return PlanSwitch(at_us, *effective_limits(pending_plan, None, None))


def workspace_fields(generation: int, rpm_default: int, rpm_ceiling: int, spend_limit_uusd: int | None,
                     switch: PlanSwitch = NO_SWITCH) -> list[Any]:
    # Every field is always written, so a cancelled switch cannot survive in the hash.
    limit = NO_SPEND_LIMIT if spend_limit_uusd is None else spend_limit_uusd
    return ["g", generation, "d", rpm_default, "c", rpm_ceiling, "l", limit,
            "s", switch.at_us, "sd", switch.rpm_default, "sc", switch.rpm_ceiling]


def uusd(usd: Decimal | float | int) -> int:
    """US dollars as whole micro-dollars, rounded up (the unit Redis sums spend and limits in)."""
    return int(Decimal(str(usd)).scaleb(6).to_integral_value(ROUND_CEILING))


def month_tag(now: datetime) -> int:
    """The UTC billing month of `now` as YYYYMM (the spend hash's `m`)."""
    now = now.astimezone(UTC)
    return now.year * 100 + now.month


class Verdict(NamedTuple):
    # A tuple rather than a frozen dataclass: one is built per check, and a frozen dataclass's __init__
    # costs a setattr call per field.
    status: int
    limit: int = 0
    remaining: int = 0
    reset_us: int = 0
    retry_after_us: int = 0
    now_us: int = 0
    spend: int = SPEND_NONE


def parse_verdict(reply: list[int]) -> Verdict:
    # The script's reply is integers already (hiredis hands Lua numbers over as ints).
    return Verdict._make(reply)


class RedisClock:
    """Deadlines in Redis's time: past the moment this process will have given up on a check (its Redis
    timeout) or Envoy on it (the check budget), the script changes nothing. The offset of Redis's clock
    from this host's is learned from each reply's now_us (taken when the script ran, so the estimate
    errs early by at most the reply's trip), so host clocks need not agree. Until a first reply it is
    assumed 0; a check whose deadline that makes wrong comes back EXPIRED with Redis's time, and is
    retried once on the corrected offset."""

    def __init__(self, timeout_s: float, budget_s: float) -> None:
        self._timeout_us = int(timeout_s * 1_000_000)
        self._budget_us = int(budget_s * 1_000_000)
        self.offset_us = 0

    @staticmethod
    def now_us() -> int:
        return time.time_ns() // 1000

    def deadline_us(self, started_us: int) -> int:
        """For a script call made now by a check that started at `started_us` (this host's clock)."""
        return min(started_us + self._budget_us, self.now_us() + self._timeout_us) + self.offset_us

    def observe(self, redis_now_us: int) -> None:
        if redis_now_us:
            self.offset_us = redis_now_us - self.now_us()


class MonthClock:
    """The current billing month, recomputed only when the clock passes the month's end."""

    def __init__(self) -> None:
        self._month = 0
        self._until = 0.0

    def month(self) -> int:
        now = time.time()
        if now >= self._until:
            moment = datetime.fromtimestamp(now, UTC)
            self._month = month_tag(moment)
            start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
            end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(
                month=start.month + 1)
            self._until = end.timestamp()
        return self._month
