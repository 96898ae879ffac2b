"""Prices of managed deployments, each in its modality's unit (UNITS). A price belongs to one deployment
(deployment_prices): public names are only unique within a workspace, so a price keyed by one would charge
every workspace's model of that name alike. Input and output tokens are priced separately, in US dollars
per million tokens; images, audio seconds and characters in US dollars per unit.

A managed deployment cannot take traffic without a price: `deploy --destination managed` takes one from
--price-input/--price-output (tokens) or --price-per-unit (other units), else from the repo's catalog
(control/price_catalog.json, by Hugging Face model id; tokens only), else refuses. ext_authz loads the
prices with the workspace (it sizes spend reservations from them) and refuses a managed deployment that has
none in its modality's unit; a change is published through the workspace's generation.
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
# The unit each modality is metered and priced in. The key names are a contract: usage rows, the access
# log (envoy/gateway.lua, envoy/authz_request.lua) and `gatewayctl usage`'s `units` use them.
TOKEN = "token"
UNITS = {"llm": TOKEN, "embedding": TOKEN, "image": "image", "speech": "character", "voice": "audio_second"}
_UNIT_NAMES = {"image": "image", "character": "input character", "audio_second": "second of audio"}


@dataclass(frozen=True)
class Price:
    input_usd_per_mtok: Decimal
    output_usd_per_mtok: Decimal
    unit: str = TOKEN
    usd_per_unit: Decimal | None = None  # every unit but tokens

    def __post_init__(self) -> None:
        if self.input_usd_per_mtok < 0 or self.output_usd_per_mtok < 0 or (self.usd_per_unit or 0) < 0:
            raise ControlError("invalid_price", "prices are non-negative US dollars")
        if (self.unit == TOKEN) != (self.usd_per_unit is None):
            raise ControlError("invalid_price", f"a price per {self.unit} is one US dollar amount per unit")

    @classmethod
    def per_unit(cls, unit: str, usd: Decimal) -> Price:
        return cls(Decimal(0), Decimal(0), unit, usd)


def unit_of(modality: str) -> str:
    return UNITS[modality]


@functools.cache
def catalog() -> dict[str, Price]:
    models = json.loads(CATALOG.read_text(encoding="utf-8"))["models"]
    try:
        return {name: Price(Decimal(p["input"]), Decimal(p["output"])) for name, p in models.items()}
    except (KeyError, InvalidOperation) as exc:
        raise ControlError("invalid_price_catalog", f"{CATALOG} is malformed ({type(exc).__name__})") from None


def explicit(input_usd: Decimal | None, output_usd: Decimal | None, per_unit: Decimal | None = None,
             modality: str = "llm") -> Price | None:
    """The price given on a command line, if one was, in `modality`'s unit."""
    unit = UNITS[modality]
    if unit != TOKEN:
        if input_usd is not None or output_usd is not None:
            raise ControlError("invalid_price_unit", f"{modality} models are priced per {_UNIT_NAMES[unit]}: "
                               "give --price-per-unit USD, not token prices")
        return None if per_unit is None else Price.per_unit(unit, per_unit)
    if per_unit is not None:
        raise ControlError("invalid_price_unit", f"{modality} models are priced per token: give --price-input "
                           "and --price-output (USD per million tokens)")
    if input_usd is None and output_usd is None:
        return None
    if input_usd is None or output_usd is None:
        raise ControlError("price_required", "give both --price-input and --price-output")
    return Price(input_usd, output_usd)


def for_deploy(model: str, given: Price | None, modality: str = "llm") -> Price:
    """The price a managed deployment of `model` starts with: the one given, else the catalog's."""
    unit = UNITS[modality]
    if given is not None:
        if given.unit != unit:
            raise ControlError("invalid_price_unit", f"{modality} models are priced per {unit}, not per {given.unit}")
        return given
    if unit != TOKEN:
        raise ControlError("price_required", f"managed {modality} deployments are charged per "
                           f"{_UNIT_NAMES[unit]}: deploy with --price-per-unit USD")
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
              " output_usd_per_mtok = excluded.output_usd_per_mtok, unit = excluded.unit,"
              " usd_per_unit = excluded.usd_per_unit, updated_at = now()") if replace else " DO NOTHING"
    ctx.db.execute(
        "INSERT INTO deployment_prices (deployment_id, input_usd_per_mtok, output_usd_per_mtok, unit, usd_per_unit)"
        " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (deployment_id)" + update,
        (deployment_id, price.input_usd_per_mtok, price.output_usd_per_mtok, price.unit, price.usd_per_unit),
    )


def set_price(ctx: Context, deployment_id: str, input_usd: Decimal | None, output_usd: Decimal | None,
              unit: str | None = None, usd_per_unit: Decimal | None = None) -> dict[str, Any]:
    row = ctx.db.execute(
        "SELECT workspace_id, destination, public_name, modality FROM deployments WHERE id = %s AND state <> 'deleted'",
        (deployment_id,),
    ).fetchone()
    if row is None:
        raise ControlError("deployment_not_found",
                           f"no live deployment {deployment_id!r} (prices are set per deployment id)")
    workspace_id, destination, public_name, modality = row
    if destination != "managed":
        raise ControlError("not_managed", "bring-your-own RunPod deployments are billed by RunPod, not priced here")
    if unit is not None and unit != UNITS[modality]:
        raise ControlError("invalid_price_unit", f"{modality} models are priced per {UNITS[modality]}, not per {unit}")
    price = explicit(input_usd, output_usd, usd_per_unit, modality)
    if price is None:
        raise ControlError("price_required", "give --input and --output (USD per million tokens)"
                           if UNITS[modality] == TOKEN else "give --usd (USD per unit)")
    with hotsync.changing(ctx) as change:
        record(ctx, deployment_id, price)
        change.workspace(workspace_id)
    shown: dict[str, Any] = {"deployment_id": deployment_id, "workspace_id": workspace_id, "model": public_name,
                             "unit": price.unit}
    if price.usd_per_unit is None:
        shown |= {"input_usd_per_mtok": money(price.input_usd_per_mtok),
                  "output_usd_per_mtok": money(price.output_usd_per_mtok)}
    else:
        shown["usd_per_unit"] = f"{price.usd_per_unit:f}"  # unit prices can be finer than micro-dollars
    return shown
