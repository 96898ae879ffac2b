"""`gatewayctl usage`: a seeded multi-day history over three billing periods gives the right numbers in
JSON, in the terminal view and in the SVG chart."""

from __future__ import annotations

import json
import re
import secrets
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from control import usage
from tests.conftest import Gateway, Simulator, make_tenant

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def seed(gateway: Gateway, workspace_id: str, key_a: str, key_b: str) -> None:
    rows = [
        # (start time, key, model, status, input, output, cost)
        ("2026-08-31T23:59:59Z", key_a, "m1", 200, 1000, 1000, "9"),  # before the three periods: left out
        ("2026-09-03T10:00:00Z", key_a, "m1", 200, 100, 50, "0.0015"),
        ("2026-09-03T11:00:00Z", key_b, "m2", 500, 10, 0, "0"),
        ("2026-10-15T08:00:00Z", key_a, "m1", 200, 200, 100, "0.003"),
        ("2026-10-31T23:59:59Z", key_b, "m2", 200, 300, 0, "0.0003"),
        ("2026-11-01T00:00:00Z", key_a, "m1", 200, 40, 60, "0.001"),
        ("2026-11-24T09:00:00Z", key_b, "m2", 429, 0, 0, "0"),
        ("2026-11-24T09:30:00Z", key_b, "m1", 200, 60, 40, "0.001"),
    ]
    with gateway.context() as ctx:
        for start, key, model, status, inp, out, cost in rows:
            ctx.db.execute(
                "INSERT INTO usage_events (request_id, start_time, workspace_id, key_id, model, destination, status,"
                " prompt_tokens, completion_tokens, cost_usd) VALUES (%s, %s, %s, %s, %s, 'managed', %s, %s, %s, %s)",
                (secrets.token_hex(8), start, workspace_id, key, model, status, inp, out, Decimal(cost)),
            )


def test_report_over_three_billing_periods(gateway: Gateway, simulator: Simulator, tmp_path: Path) -> None:
    t = make_tenant(gateway, simulator)
    seed(gateway, t.workspace_id, "key_a", "key_b")
    with gateway.context() as ctx:
        result = usage.report(ctx, t.workspace_id, tmp_path, now=NOW)
    nov, oct_, sep = result["periods"]
    assert [p["period"] for p in (nov, oct_, sep)] == ["2026-11", "2026-10", "2026-09"]
    assert (nov["requests"], nov["input_tokens"], nov["output_tokens"]) == (3, 100, 100)
    assert Decimal(nov["cost_usd"]) == Decimal("0.002")
    assert nov["errors"] == {"429": 1}
    assert Decimal(oct_["cost_usd"]) == Decimal("0.0033")  # the last second of October stays in October
    assert (sep["requests"], sep["errors"]) == (2, {"500": 1})
    assert len(nov["daily"]) == 30 and len(oct_["daily"]) == 31
    [first_nov] = [d for d in nov["daily"] if d["date"] == "2026-11-01"]
    assert (first_nov["input_tokens"], first_nov["output_tokens"], Decimal(first_nov["cost_usd"])) == (
        40, 60, Decimal("0.001"))
    models = {m["model"]: m for m in nov["models"]}
    assert Decimal(models["m1"]["cost_usd"]) == Decimal("0.002") and models["m2"]["errors"] == 1
    keys = {k["key_id"]: k for k in nov["keys"]}
    assert keys["key_a"]["requests"] == 1 and keys["key_b"]["requests"] == 2

    svg = Path(result["chart"]).read_text()
    assert svg.startswith("<svg") and svg.count("<rect") >= 30 + 31 + 30
    assert "2026-11-01: $0.001" in svg
    text = usage.render_text(result)
    assert text.splitlines()[0].startswith("2026-11 |") and "$0.0020" in text.splitlines()[0]

    # Money is a plain decimal string with six places everywhere, a zero sum included (never "0E-9").
    costs = re.findall(r'"cost_usd": "([^"]*)"', json.dumps(result))
    assert costs and all(re.fullmatch(r"\d+\.\d{6}", c) for c in costs), sorted(set(costs))
    assert {m["model"]: m["cost_usd"] for m in sep["models"]}["m2"] == "0.000000"
    assert nov["cost_usd"] == "0.002000"


def test_usage_command_prints_json_and_a_chart_path(gateway: Gateway, simulator: Simulator) -> None:
    t = make_tenant(gateway, simulator)
    result = gateway.ctl_json("usage", t.workspace_id)
    assert result["periods"][0]["period"] == datetime.now(UTC).strftime("%Y-%m")
    assert Path(result["chart"]).exists()
    text = gateway.ctl("usage", t.workspace_id)
    assert text.returncode == 0 and "chart: " in text.stdout
    assert json.dumps(result)  # one JSON object
    assert result["periods"][0]["cost_usd"] == "0.000000"


def test_money_in_json_has_fixed_places(gateway: Gateway, simulator: Simulator) -> None:
    t = make_tenant(gateway, simulator)
    limit = gateway.ctl_json("workspace", "set-spend-limit", t.workspace_id, "12.5")
    assert limit["spend_limit_usd"] == "12.500000"
    gateway.ctl_json("deploy", t.workspace_id, "--model", "org/fixed-places", "--modality", "llm",
                     "--name", "fixed-places-model", "--destination", "managed", "--wait-timeout", "10",
                     "--price-input", "1", "--price-output", "1")
    # By public name within the workspace, as an operator would name it.
    price = gateway.ctl_json("prices", "set", "fixed-places-model", "--workspace", t.workspace_id,
                             "--input", "0.15", "--output", "1E+1")
    assert (price["input_usd_per_mtok"], price["output_usd_per_mtok"]) == ("0.150000", "10.000000")
