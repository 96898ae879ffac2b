"""Plans and what each allows: the one place plan rules live.

Limits are requests per minute per API key. Enterprise limits are set per workspace by an operator;
until then an enterprise workspace gets Team's numbers.

Plan changes follow the billing cycle (the calendar month in UTC, control/spend.py `billing_month`): an
upgrade applies at once; a downgrade is pending until the start of the next billing period, when the
lower plan's rules hold everywhere (`in_force`), unless an operator forces it with `--now`.
"""

from __future__ import annotations

from dataclasses import dataclass

PLAN_ORDER = ("starter", "pro", "team", "enterprise")
# What may run on a customer's own RunPod account; the managed destination serves every modality.
BYOC_MODALITIES = ("llm", "embedding")


@dataclass(frozen=True)
class Plan:
    name: str
    can_mint_keys: bool
    can_deploy: bool  # on either destination
    byoc_allowed: bool
    rpm_default: int
    rpm_ceiling: int


PLANS: dict[str, Plan] = {
    "starter": Plan(
        "starter", can_mint_keys=False, can_deploy=False, byoc_allowed=False, rpm_default=60, rpm_ceiling=60
    ),
    "pro": Plan("pro", can_mint_keys=True, can_deploy=True, byoc_allowed=True, rpm_default=500, rpm_ceiling=1000),
    "team": Plan("team", can_mint_keys=True, can_deploy=True, byoc_allowed=True, rpm_default=5000, rpm_ceiling=10000),
    "enterprise": Plan(
        "enterprise", can_mint_keys=True, can_deploy=True, byoc_allowed=True, rpm_default=5000, rpm_ceiling=10000
    ),
}


def effective_limits(plan: str, rpm_default: int | None, rpm_ceiling: int | None) -> tuple[int, int]:
    """(default, ceiling) for a workspace: per-workspace overrides apply to enterprise only."""
    base = PLANS[plan]
    if plan != "enterprise":
        return base.rpm_default, base.rpm_ceiling
    ceiling = rpm_ceiling or base.rpm_ceiling
    return min(rpm_default or base.rpm_default, ceiling), ceiling


def is_downgrade(current: str, target: str) -> bool:
    return PLAN_ORDER.index(target) < PLAN_ORDER.index(current)


def in_force(plan: str, pending_plan: str | None, pending_at_us: int, now_us: int) -> str:
    """The plan whose rules hold at `now_us` (microseconds since the epoch): a pending downgrade from
    its effective time on. A compare, cheap enough for every check."""
    if pending_plan is not None and now_us >= pending_at_us:
        return pending_plan
    return plan
