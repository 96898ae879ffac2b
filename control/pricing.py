"""Per-token prices of managed deployments. A price belongs to one deployment (deployment_prices): public
names are only unique within a workspace, so a price keyed by one would charge every workspace's model of
that name alike. Input and output tokens are priced separately, in US dollars per million tokens.

A managed deployment cannot take traffic without a price: `deploy --destination managed` takes one from
--price-input/--price-output, else from the repo's catalog (control/price_catalog.json, by Hugging Face
model id), else refuses. ext_authz loads the prices with the workspace (it sizes spend reservations from
them) and refuses a managed deployment that has none; a change is published through the workspace's
generation.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from control import hotsync
from control.context import Context
from control.errors import ControlError
from control.money import usd as money

CATALOG = Path(__file__).with_name("price_catalog.json")


@dataclass(frozen=True)
class Price:
    input_usd_per_mtok: Decimal
    output_usd_per_mtok: Decimal

    def __post_init__(self) -> None:
        if self.input_usd_per_mtok < 0 or self.output_usd_per_mtok < 0:
            raise ControlError("invalid_price", "prices are non-negative US dollars per million tokens")


@functools.cache
def catalog() -> dict[str, Price]:
    models = json.loads(CATALOG.read_text(encoding="utf-8"))["models"]
    try:
        return {name: Price(Decimal(p["input"]), Decimal(p["output"])) for name, p in models.items()}
    except (KeyError, InvalidOperation) as exc:
        raise ControlError("invalid_price_catalog", f"{CATALOG} is malformed ({type(exc).__name__})") from None


def explicit(input_usd: Decimal | None, output_usd: Decimal | None) -> Price | None:
    """The price given on a command line, if one was."""
    if input_usd is None and output_usd is None:
        return None
    if input_usd is None or output_usd is None:
        raise ControlError("price_required", "give both --price-input and --price-output")
    return Price(input_usd, output_usd)


def for_deploy(model: str, given: Price | None) -> Price:
    """The price a managed deployment of `model` starts with: the one given, else the catalog's."""
    if given is not None:
        return given
    found = catalog().get(model)
    if found is None:
        raise ControlError(
            "price_required",
            f"managed deployments are charged per token and {model!r} has no price in the catalog "
            f"({CATALOG.name}): deploy with --price-input USD --price-output USD (per million tokens)",
        )
    return found


def record(ctx: Context, deployment_id: str, price: Price, replace: bool = True) -> None:
    """Write a deployment's price (the caller publishes the workspace's generation); with `replace`
    False, a price already set is kept."""
    update = (" DO UPDATE SET input_usd_per_mtok = excluded.input_usd_per_mtok,"
              " output_usd_per_mtok = excluded.output_usd_per_mtok, updated_at = now()") if replace else " DO NOTHING"
    ctx.db.execute(
        "INSERT INTO deployment_prices (deployment_id, input_usd_per_mtok, output_usd_per_mtok)"
        " VALUES (%s, %s, %s) ON CONFLICT (deployment_id)" + update,
        (deployment_id, price.input_usd_per_mtok, price.output_usd_per_mtok),
    )


def set_price(ctx: Context, deployment_id: str, input_usd: Decimal, output_usd: Decimal) -> dict[str, Any]:
    price = Price(input_usd, output_usd)
    row = ctx.db.execute(
        "SELECT workspace_id, destination, public_name FROM deployments WHERE id = %s AND state <> 'deleted'",
        (deployment_id,),
    ).fetchone()
    if row is None:
        raise ControlError("deployment_not_found",
                           f"no live deployment {deployment_id!r} (prices are set per deployment id)")
    workspace_id, destination, public_name = row
    if destination != "managed":
        raise ControlError("not_managed", "bring-your-own RunPod deployments are billed by RunPod, not priced here")
    with hotsync.changing(ctx) as change:
        record(ctx, deployment_id, price)
        change.workspace(workspace_id)
    return {"deployment_id": deployment_id, "workspace_id": workspace_id, "model": public_name,
            "input_usd_per_mtok": money(input_usd), "output_usd_per_mtok": money(output_usd)}
