"""`gatewayctl usage`: what a workspace used and spent in the current billing period (the calendar
month, UTC) and the two before it: a daily cost chart (an SVG file, and a compact terminal view), the
token breakdown and each modality's own units, cost per model, error counts, and the same per key.
Active deployments' base fees (control/tiers.py) are prorated per day beside the usage cost:
`base_fee_usd` per day, per deployment and per period, and `total_usd` = usage cost + base fee."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from html import escape
from pathlib import Path
from typing import Any

from control import tiers, workspaces
from control.context import Context
from control.money import usd
from control.spend import billing_month

PERIODS = 3
_BARS = " ▁▂▃▄▅▆▇█"
# Requests, errors and latency per day and per period (the HTML page, control/usage_html.py, draws them).
# Latency is that of answered requests (status < 400): a refusal answered by the gateway in a
# millisecond says nothing about how fast the models serve. percentile_disc: a duration that occurred.
_ACTIVITY = (
    "count(*), count(*) FILTER (WHERE status >= 400), "
    + ", ".join(
        f"percentile_disc({q}) WITHIN GROUP (ORDER BY {column}) FILTER (WHERE status < 400)"
        for column in ("duration_ms", "ttfb_ms") for q in (0.5, 0.95)
    )
)


def _latency(values: Sequence[int | None]) -> dict[str, int | None]:
    """p50/p95 of the whole request (duration) and of its first byte (ttfb), in ms; None: none answered."""
    duration_p50, duration_p95, ttfb_p50, ttfb_p95 = values
    return {"duration_p50": duration_p50, "duration_p95": duration_p95, "ttfb_p50": ttfb_p50, "ttfb_p95": ttfb_p95}


def periods(now: datetime) -> list[tuple[datetime, datetime]]:
    """The current billing period first, then the two before it."""
    out = []
    start, end = billing_month(now)
    for _ in range(PERIODS):
        out.append((start, end))
        end = start
        start, _ = billing_month(start - timedelta(days=1))
    return out


def _period_report(ctx: Context, ws_id: str, start: datetime, end: datetime, now: datetime) -> dict[str, Any]:
    where = "workspace_id = %s AND start_time >= %s AND start_time < %s"
    args = (ws_id, start, end)
    daily = {
        d: (cost, inp, out)
        for d, cost, inp, out in ctx.db.execute(
            "SELECT (start_time AT TIME ZONE 'UTC')::date, sum(cost_usd), sum(prompt_tokens), sum(completion_tokens)"
            f" FROM usage_events WHERE {where} GROUP BY 1",
            args,
        )
    }
    fees_by_day, fees = tiers.base_fees(ctx, ws_id, start, end, now)
    days = []
    day = start.date()
    while day < end.date():
        cost, inp, out = daily.get(day, (Decimal(0), 0, 0))
        fee = fees_by_day.get(day, Decimal(0))
        days.append(
            {"date": day.isoformat(), "cost_usd": usd(cost), "input_tokens": int(inp), "output_tokens": int(out),
             "base_fee_usd": usd(fee), "total_usd": usd(cost + fee)}
        )
        day += timedelta(days=1)

    def grouped(column: str) -> list[dict[str, Any]]:
        rows = ctx.db.execute(
            f"SELECT coalesce({column}, '-'), count(*), sum(prompt_tokens), sum(completion_tokens), sum(cost_usd),"
            " count(*) FILTER (WHERE status >= 400), bool_or(usage_estimated)"
            f" FROM usage_events WHERE {where} GROUP BY 1 ORDER BY sum(cost_usd) DESC, 1",
            args,
        ).fetchall()
        return [
            {column: name, "requests": n, "input_tokens": int(i), "output_tokens": int(o), "cost_usd": usd(c),
             "errors": e, "includes_estimates": bool(est)}
            for name, n, i, o, c, e, est in rows
        ]

    errors = {
        str(status): n
        for status, n in ctx.db.execute(
            f"SELECT status, count(*) FROM usage_events WHERE {where} AND status >= 400 GROUP BY 1 ORDER BY 1", args
        )
    }
    activity = {
        day.isoformat(): row
        for day, *row in ctx.db.execute(
            f"SELECT (start_time AT TIME ZONE 'UTC')::date, {_ACTIVITY} FROM usage_events WHERE {where} GROUP BY 1",
            args,
        )
    }
    for entry in days:
        requests, failed, *latency = activity.get(entry["date"], (0, 0, None, None, None, None))
        entry.update(requests=requests, errors=failed, latency_ms=_latency(latency))
    period_activity = ctx.db.execute(f"SELECT {_ACTIVITY} FROM usage_events WHERE {where}", args).fetchone()
    assert period_activity is not None
    total = ctx.db.execute(
        f"SELECT count(*), coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0),"
        f" coalesce(sum(cost_usd), 0) FROM usage_events WHERE {where}",
        args,
    ).fetchone()
    assert total is not None
    fee_total = sum(fees_by_day.values(), Decimal(0))
    period_units, model_units = _units(ctx, where, args)
    models = grouped("model")
    for m in models:
        m["units"] = model_units.get(m["model"], {})
    return {
        "period": start.strftime("%Y-%m"),
        "start": start.date().isoformat(),
        "end": end.date().isoformat(),
        "requests": total[0],
        "input_tokens": int(total[1]),
        "output_tokens": int(total[2]),
        "cost_usd": usd(total[3]),
        "base_fee_usd": usd(fee_total),
        "total_usd": usd(total[3] + fee_total),
        "base_fees": fees,
        "errors": errors,
        "units": period_units,
        "daily": days,
        "models": models,
        "keys": grouped("key_id"),
        "latency_ms": _latency(period_activity[2:]),
    }


def _units(ctx: Context, where: str, args: tuple[Any, ...]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Each modality's own units used (control/pricing.py UNITS; only those used), in all and per model:
    `{"image": N, "audio_second": X, "character": Y}` (images and characters whole, seconds to 3 places).
    Their cost is in the cost figures already."""
    total: dict[str, Any] = {}
    by_model: dict[str, dict[str, Any]] = {}
    for model, unit, quantity in ctx.db.execute(
        f"SELECT coalesce(model, '-'), unit, sum(quantity) FROM usage_events WHERE {where}"
        " AND unit IS NOT NULL AND quantity > 0 GROUP BY 1, 2 ORDER BY 1, 2",
        args,
    ):
        by_model.setdefault(model, {})[unit] = _quantity(unit, quantity)
        total[unit] = _quantity(unit, quantity + total.get(unit, 0))
    return dict(sorted(total.items())), by_model


def _quantity(unit: str, value: float) -> int | float:
    return round(value, 3) if unit == "audio_second" else round(value)


def _units_text(units: dict[str, Any]) -> str:
    return "".join(f", {q} {unit}{'' if q == 1 else 's'}" for unit, q in units.items())


def report(ctx: Context, ws_ref: str, chart_dir: Path, now: datetime | None = None) -> dict[str, Any]:
    ws = workspaces.resolve(ctx, ws_ref)
    now = now or datetime.now(UTC)
    result = {
        "workspace_id": ws["id"],
        "periods": [_period_report(ctx, ws["id"], s, e, now) for s, e in periods(now)],
    }
    chart_dir.mkdir(parents=True, exist_ok=True)
    chart = chart_dir / f"usage-{ws['id']}-{result['periods'][0]['period']}.svg"
    chart.write_text(svg_chart(result["periods"]), encoding="utf-8")
    result["chart"] = str(chart)
    return result


def svg_chart(reports: list[dict[str, Any]]) -> str:
    """Daily cost bars, one panel per billing period, oldest first."""
    width, panel_h, pad = 960, 180, 40
    days = [d for r in reversed(reports) for d in r["daily"]]
    peak = max((Decimal(d["cost_usd"]) for d in days), default=Decimal(0)) or Decimal(1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{(panel_h + pad) * len(reports) + pad}"'
             ' font-family="sans-serif" font-size="12">',
             '<rect width="100%" height="100%" fill="white"/>']
    for row, rep in enumerate(reversed(reports)):
        top = pad + row * (panel_h + pad)
        bar_w = (width - 2 * pad) / max(1, len(rep["daily"]))
        parts.append(f'<text x="{pad}" y="{top - 8}" font-weight="bold">{escape(rep["period"])}: '
                     f'${Decimal(rep["cost_usd"]):.4f}, {rep["input_tokens"]} input / {rep["output_tokens"]} output'
                     ' tokens</text>')
        parts.append(f'<line x1="{pad}" y1="{top + panel_h}" x2="{width - pad}" y2="{top + panel_h}" stroke="#888"/>')
        for i, d in enumerate(rep["daily"]):
            h = float(Decimal(d["cost_usd"]) / peak) * (panel_h - 10)
            x = pad + i * bar_w
            parts.append(f'<rect x="{x:.1f}" y="{top + panel_h - h:.1f}" width="{max(1.0, bar_w - 2):.1f}"'
                         f' height="{h:.1f}" fill="#3b7dd8"><title>{d["date"]}: ${d["cost_usd"]}</title></rect>')
            if i % 7 == 0:
                parts.append(f'<text x="{x:.1f}" y="{top + panel_h + 14}" fill="#555">{d["date"][5:]}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def terminal_chart(rep: dict[str, Any]) -> str:
    costs = [Decimal(d["cost_usd"]) for d in rep["daily"]]
    peak = max(costs, default=Decimal(0)) or Decimal(1)
    bars = "".join(_BARS[round(float(c / peak) * (len(_BARS) - 1))] for c in costs)
    return f"{rep['period']} |{bars}| ${Decimal(rep['cost_usd']):.4f}"


def render_text(result: dict[str, Any]) -> str:
    lines = []
    for rep in result["periods"]:
        lines.append(terminal_chart(rep))
        lines.append(f"  requests {rep['requests']}, tokens in {rep['input_tokens']} / out {rep['output_tokens']}"
                     f"{_units_text(rep['units'])},"
                     f" errors {sum(rep['errors'].values())} {rep['errors'] or ''}".rstrip())
        for m in rep["models"]:
            lines.append(f"  model {m['model']}: ${Decimal(m['cost_usd']):.6f} ({m['input_tokens']} in,"
                         f" {m['output_tokens']} out{_units_text(m['units'])}, {m['requests']} requests,"
                         f" {m['errors']} errors)")
        for k in rep["keys"]:
            lines.append(f"  key {k['key_id']}: ${Decimal(k['cost_usd']):.6f} ({k['requests']} requests)")
        if rep["base_fees"]:
            lines.append(f"  Active base fees: ${Decimal(rep['base_fee_usd']):.6f}; with usage "
                         f"${Decimal(rep['total_usd']):.6f}")
        for f in rep["base_fees"]:
            lines.append(f"  base fee {f['model']} ({f['deployment_id']}, {f['min_workers']} warm):"
                         f" ${Decimal(f['base_fee_usd']):.6f} for {f['days']} days"
                         f" at ${Decimal(f['monthly_usd']):.2f}/month")
    lines.append(f"chart: {result['chart']}")
    if "html" in result:
        lines.append(f"html: {result['html']}")
    return "\n".join(lines)

