"""The usage page a customer reads: `gatewayctl usage WS --html FILE` renders the report of
control/usage.py as one self-contained HTML file (inline CSS and inline SVG, no script, no font or image
from the network), so it opens from a mail attachment or an air-gapped laptop alike.

Per billing period, current first: daily cost (with Active tier's base fee stacked on it when the report
carries one), requests and errors, tokens in and out, latency (p50/p95 of the first byte and of the
whole request), cost per model, each modality's unit per model, errors by status and usage per key. A
chart with nothing to show says so in words: a bring-your-own-RunPod workspace is billed $0 here by
design and sees its requests, tokens and latency instead of empty cost axes.

Every figure drawn from the report is one element carrying `data-field` (a JSON pointer into the
report; `a+b` for a sum, a pointer to an object for the sum of its values) and `data-value` (the exact
figure), so a test can check the page against `gatewayctl usage WS --json`. Money is shown rounded to
two significant digits below a dollar and to cents above; the JSON keeps six places."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal
from html import escape
from pathlib import Path
from typing import Any

from control.errors import ControlError

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;color:#1d2430;
  background:#f4f6f9;margin:0;padding:24px}
main{max-width:1040px;margin:0 auto}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:32px 0 8px;border-bottom:2px solid #d5dbe3;
  padding-bottom:4px}h3{font-size:14px;margin:0 0 6px}
.sub{color:#5b6676;font-size:13px;margin:0 0 16px}
.card{background:#fff;border:1px solid #dde3ea;border-radius:6px;padding:12px 14px;margin:10px 0}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:0 12px}
.figures{display:flex;flex-wrap:wrap;gap:8px;margin:8px 0}
.figure{background:#fff;border:1px solid #dde3ea;border-radius:6px;padding:8px 12px;flex:1 1 auto}
.figure b{display:block;font-size:18px;white-space:nowrap}.figure small{color:#5b6676;font-size:12px}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{padding:4px 8px;border-bottom:1px solid #e6eaf0;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}th{color:#5b6676;font-weight:600}
.empty{color:#5b6676;font-style:italic;margin:6px 0}
.legend{font-size:12px;color:#3c4654;margin:0 0 4px}
.legend i{display:inline-block;width:10px;height:10px;margin:0 4px 0 12px;vertical-align:-1px}
svg{width:100%;height:auto;display:block}
svg text{font-size:10px;fill:#3c4654}
.half svg text{font-size:11px}
code{font-size:12px;background:#e9edf2;padding:0 3px;border-radius:3px}
footer{color:#5b6676;font-size:12px;margin:32px 0 0}
"""

BLUE, ORANGE, GREY, RED, GREEN, PURPLE, LIGHT_BLUE = (
    "#3b7dd8", "#f29e4c", "#9aa5b1", "#d64545", "#4caf7a", "#8e6bbf", "#9cc3ef")
_NONE = "<td>&ndash;</td>"
_CHAR_W = 6.2  # px per character of the charts' 10 px labels (digits and punctuation)
_UNIT_NAMES = {"image": "images", "audio_second": "audio seconds", "character": "characters"}


# ---- figures as the page shows them ------------------------------------------------------------------

def money(value: Decimal | str) -> str:
    """Cents from a dollar up, else two significant digits (at most the JSON's six places)."""
    d = Decimal(value)
    if d == 0:
        return "$0.00"
    places = 2 if abs(d) >= 1 else min(6, max(2, 1 - d.adjusted()))
    return f"${d.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP):,f}"


def count(value: int | Decimal | str | float) -> str:
    """A count or a quantity: whole numbers with thousands separators, fractions to two places."""
    d = Decimal(str(value))
    if d == d.to_integral_value():
        return f"{int(d):,}"
    return f"{d.quantize(Decimal('0.01'), rounding=ROUND_HALF_UP):,f}"


def money_tick(value: Decimal, step: Decimal) -> str:
    """An axis's dollars, all ticks to the places their step needs."""
    return f"${value:,.{max(2, -step.adjusted())}f}"


def count_tick(value: Decimal, step: Decimal) -> str:
    return count(value)


def unit_name(unit: str) -> str:
    return _UNIT_NAMES.get(unit, unit.replace("_", " ") + "s")


def _attr(value: object) -> str:
    return escape(str(value), quote=True)


def figure(field: str, raw: object, text: str, tag: str = "span", extra: str = "") -> str:
    """One figure taken from the report, marked with where it comes from."""
    return f'<{tag} data-field="{_attr(field)}" data-value="{_attr(raw)}"{extra}>{escape(text)}</{tag}>'


def _sum(values: Sequence[Any]) -> Decimal:
    return sum((Decimal(str(v)) for v in values), Decimal(0))


# ---- charts ------------------------------------------------------------------------------------------

@dataclass
class Label:
    text: str
    field: str
    raw: object


@dataclass
class Series:
    name: str
    color: str
    values: list[Decimal]


def _nice_step(peak: Decimal, whole: bool) -> Decimal:
    raw = peak / 4
    magnitude = Decimal(1).scaleb(raw.adjusted())
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    return max(step, Decimal(1)) if whole else step


def column_chart(
    x_labels: list[str], tips: list[str], series: list[Series], labels: list[list[Label | None]],
    tick: Callable[[Decimal, Decimal], str], axis: str, x_axis: str, grouped: bool = False, whole: bool = True,
) -> str:
    """Columns per day with a y axis and each column's value written above it, level when it fits the
    column, else rotated (a month of days leaves about 28 px per column). Stacked series share one label
    per day (their total); grouped series stand side by side, one label each."""
    width, left, right, plot_h, bottom = 960, 64, 12, 130, 36
    n = len(x_labels)
    slot = (width - left - right) / max(1, n)
    bar_w = (slot - 4) / (len(series) if grouped else 1)
    level = all(len(label.text) * _CHAR_W <= bar_w for day in labels for label in day if label)
    longest = max((len(label.text) for day in labels for label in day if label), default=0)
    top = 20 if level else 12 + round(longest * _CHAR_W)  # room above the tallest column for its label
    peak = max((max(v) if grouped else sum(v, Decimal(0))) for v in zip(*(s.values for s in series), strict=True))
    step = _nice_step(peak, whole) if peak > 0 else Decimal(1)
    ceiling = step * (peak / step).to_integral_value(rounding=ROUND_CEILING) if peak > 0 else step
    base = top + plot_h

    def y(v: Decimal) -> float:
        return base - float(v / ceiling) * plot_h

    out = [f'<svg viewBox="0 0 {width} {top + plot_h + bottom}" role="img" aria-label="{_attr(axis)}">']
    tick_value = Decimal(0)
    while tick_value <= ceiling:
        ty = y(tick_value)
        out.append(f'<line x1="{left}" y1="{ty:.1f}" x2="{width - right}" y2="{ty:.1f}" stroke="#e3e7ed"/>'
                   f'<text x="{left - 6}" y="{ty + 3:.1f}" text-anchor="end">{escape(tick(tick_value, step))}</text>')
        tick_value += step
    mid = top + plot_h / 2
    out.append(f'<text x="14" y="{mid:.0f}" transform="rotate(-90 14 {mid:.0f})" text-anchor="middle">'
               f'{escape(axis)}</text>')
    for i in range(n):
        x0 = left + i * slot
        stack = Decimal(0)
        anchors = []
        for s_index, s in enumerate(series):
            x = x0 + 2 + (s_index * bar_w if grouped else 0)
            lower = Decimal(0) if grouped else stack
            stack = lower + s.values[i]
            if s.values[i] > 0:
                out.append(f'<rect x="{x:.1f}" y="{y(stack):.1f}" width="{max(1.0, bar_w - grouped):.1f}"'
                           f' height="{max(0.5, y(lower) - y(stack)):.1f}" fill="{s.color}">'
                           f'<title>{escape(tips[i])}</title></rect>')
            anchors.append((x + bar_w / 2, y(stack) - 4))
        for label, (cx, cy) in zip(labels[i], anchors if grouped else anchors[-1:], strict=True):
            if label is None:
                continue
            turn = "" if level else f' transform="rotate(-90 {cx + 3:.1f} {cy:.1f})"'
            at = f'x="{cx:.1f}" y="{cy:.1f}" text-anchor="middle"' if level else f'x="{cx + 3:.1f}" y="{cy:.1f}"'
            out.append(f'<text {at}{turn} data-field="{_attr(label.field)}" data-value="{_attr(label.raw)}">'
                       f'{escape(label.text)}</text>')
        out.append(f'<text x="{x0 + slot / 2:.1f}" y="{base + 14}" text-anchor="middle">{escape(x_labels[i])}</text>')
    out.append(f'<text x="{(left + width - right) / 2:.0f}" y="{base + 30}" text-anchor="middle">'
               f'{escape(x_axis)}</text>'
               f'<line x1="{left}" y1="{base}" x2="{width - right}" y2="{base}" stroke="#8a94a3"/>'
               f'<line x1="{left}" y1="{top}" x2="{left}" y2="{base}" stroke="#8a94a3"/></svg>')
    return "".join(out)


def bar_rows(rows: list[tuple[str, Decimal, Label]], color: str) -> str:
    """Horizontal bars, one row per name, the value written after each bar (sized for half a page)."""
    width, name_w, value_w, row_h = 480, 150, 80, 22
    peak = max((v for _, v, _ in rows), default=Decimal(0)) or Decimal(1)
    span = width - name_w - value_w - 16
    out = [f'<svg viewBox="0 0 {width} {row_h * len(rows) + 8}" role="img">']
    for i, (name, value, label) in enumerate(rows):
        y = 4 + i * row_h
        w = float(value / peak) * span
        shown = name if len(name) <= 24 else name[:23] + "…"
        out.append(f'<text x="{name_w - 8}" y="{y + 14}" text-anchor="end">{escape(shown)}<title>{escape(name)}'
                   f'</title></text>'
                   f'<rect x="{name_w}" y="{y + 3}" width="{max(1.0, w):.1f}" height="{row_h - 6}" fill="{color}"/>'
                   f'<text x="{name_w + max(1.0, w) + 6:.1f}" y="{y + 14}" data-field="{_attr(label.field)}"'
                   f' data-value="{_attr(label.raw)}">{escape(label.text)}</text>')
    out.append(f'<line x1="{name_w}" y1="2" x2="{name_w}" y2="{row_h * len(rows) + 6}" stroke="#8a94a3"/></svg>')
    return "".join(out)


def card(title: str, body: str, legend: list[tuple[str, str]] | None = None, wide: bool = True) -> str:
    keys = "".join(f'<i style="background:{c}"></i>{escape(n)}' for n, c in legend or [])
    legend_html = f'<div class="legend">{keys}</div>' if keys else ""
    attrs = ' class="card" style="grid-column:1 / -1"' if wide else ' class="card half"'
    return f'<section{attrs}><h3>{escape(title)}</h3>{legend_html}{body}</section>'


def empty(kind: str, text: str) -> str:
    return f'<p class="empty" data-empty="{_attr(kind)}">{escape(text)}</p>'


# ---- the page ----------------------------------------------------------------------------------------

def _month_name(rep: dict[str, Any]) -> str:
    return date.fromisoformat(rep["start"]).strftime("%B %Y")


def _units(rep: dict[str, Any]) -> dict[str, Any]:
    units: dict[str, Any] = rep.get("units") or {}
    return units


def _daily_sections(p: int, rep: dict[str, Any]) -> list[str]:
    days = rep["daily"]
    at = f"/periods/{p}/daily"
    x_labels = [str(date.fromisoformat(d["date"]).day) for d in days]
    month = _month_name(rep)
    axis_days = f"day of {month} (UTC)"
    cards = []

    fees = [Decimal(d.get("base_fee_usd", 0)) for d in days]
    costs = [Decimal(d["cost_usd"]) for d in days]
    has_fee = any(fees)
    if any(costs) or has_fee:
        series = [Series("usage", BLUE, costs)] + ([Series("Active base fee", GREY, fees)] if has_fee else [])
        total_key = "total_usd" if has_fee else "cost_usd"
        labels: list[list[Label | None]] = [
            [Label(money(d[total_key]), f"{at}/{i}/{total_key}", d[total_key]) if Decimal(d[total_key]) else None]
            for i, d in enumerate(days)]
        tips = [f"{d['date']}: {money(d['cost_usd'])} usage"
                + (f" + {money(d['base_fee_usd'])} base fee" if has_fee else "") for d in days]
        body = column_chart(x_labels, tips, series, labels, money_tick, "US dollars", axis_days, whole=False)
        legend = [(s.name, s.color) for s in series] if has_fee else None
        cards.append(card("Daily cost", body, legend))
    else:
        note = " (requests served by your own RunPod account are billed to it by RunPod)" if rep["requests"] else ""
        cards.append(card("Daily cost", empty("daily-cost", f"No billed cost in {month}{note}.")))

    if rep["requests"]:
        ok = [Decimal(d["requests"] - d["errors"]) for d in days]
        failed = [Decimal(d["errors"]) for d in days]
        labels = [[Label(count(d["requests"]), f"{at}/{i}/requests", d["requests"]) if d["requests"] else None]
                  for i, d in enumerate(days)]
        tips = [f"{d['date']}: {d['requests']} requests, {d['errors']} errors" for d in days]
        body = column_chart(x_labels, tips, [Series("answered", GREEN, ok), Series("errors", RED, failed)],
                            labels, count_tick, "requests", axis_days)
        cards.append(card("Requests per day", body, [("answered", GREEN), ("errors (status ≥ 400)", RED)]))
    else:
        cards.append(card("Requests per day", empty("requests", f"No requests in {month}.")))

    if rep["input_tokens"] or rep["output_tokens"]:
        inp = [Decimal(d["input_tokens"]) for d in days]
        out = [Decimal(d["output_tokens"]) for d in days]
        labels = [[Label(count(d["input_tokens"] + d["output_tokens"]), f"{at}/{i}/input_tokens+{at}/{i}/output_tokens",
                         d["input_tokens"] + d["output_tokens"]) if d["input_tokens"] + d["output_tokens"] else None]
                  for i, d in enumerate(days)]
        tips = [f"{d['date']}: {d['input_tokens']:,} input, {d['output_tokens']:,} output tokens" for d in days]
        body = column_chart(x_labels, tips, [Series("input", BLUE, inp), Series("output", ORANGE, out)],
                            labels, count_tick, "tokens", axis_days)
        cards.append(card("Tokens per day", body, [("input", BLUE), ("output", ORANGE)]))
    else:
        cards.append(card("Tokens per day", empty("tokens", f"No tokens in {month}.")))

    for kind, title in (("ttfb", "Time to first byte per day"), ("duration", "Whole request per day")):
        p50s = [Decimal(d["latency_ms"][f"{kind}_p50"] or 0) for d in days]
        p95s = [Decimal(d["latency_ms"][f"{kind}_p95"] or 0) for d in days]
        if not any(p95s):
            cards.append(card(title, empty(f"latency-{kind}", f"No answered request in {month} to time.")))
            continue
        labels = []
        for i, d in enumerate(days):
            pair: list[Label | None] = []
            for q in ("p50", "p95"):
                v = d["latency_ms"][f"{kind}_{q}"]
                pair.append(Label(count(v), f"{at}/{i}/latency_ms/{kind}_{q}", v) if v else None)
            labels.append(pair)
        tips = [f"{d['date']}: p50 {d['latency_ms'][f'{kind}_p50']} ms, p95 {d['latency_ms'][f'{kind}_p95']} ms"
                for d in days]
        body = column_chart(x_labels, tips, [Series("p50", LIGHT_BLUE, p50s), Series("p95", BLUE, p95s)],
                            labels, count_tick, "milliseconds", axis_days, grouped=True)
        cards.append(card(title + " (answered requests, ms)", body, [("p50", LIGHT_BLUE), ("p95", BLUE)]))
    return cards


def _breakdown_sections(p: int, rep: dict[str, Any]) -> list[str]:
    at = f"/periods/{p}"
    month = _month_name(rep)
    models = rep["models"]
    cards = []
    if any(Decimal(m["cost_usd"]) for m in models):
        rows = [(m["model"], Decimal(m["cost_usd"]), Label(money(m["cost_usd"]), f"{at}/models/{i}/cost_usd",
                                                            m["cost_usd"])) for i, m in enumerate(models)]
        cards.append(card("Cost per model", bar_rows(rows, BLUE), wide=False))
    else:
        cards.append(card("Cost per model", empty("model-cost", f"No model was billed in {month}."), wide=False))

    errors = rep["errors"]
    if errors:
        rows = [(f"HTTP {status}", Decimal(n), Label(count(n), f"{at}/errors/{status}", n))
                for status, n in errors.items()]
        cards.append(card("Errors by status", bar_rows(rows, RED), wide=False))
    else:
        cards.append(card("Errors by status", empty("errors", f"No errors in {month}."), wide=False))

    for unit, total in _units(rep).items():
        rows = [(m["model"], Decimal(str(m["units"][unit])),
                 Label(count(m["units"][unit]), f"{at}/models/{i}/units/{unit}", m["units"][unit]))
                for i, m in enumerate(models) if (m.get("units") or {}).get(unit)]
        total_html = figure(f"{at}/units/{unit}", total, count(total))
        body = f'<p class="sub">{total_html} {escape(unit_name(unit))} in {escape(month)}</p>' + (
            bar_rows(rows, PURPLE) if rows else "")
        cards.append(card(f"{unit_name(unit).capitalize()} per model", body, wide=False))
    return cards


def _model_table(p: int, rep: dict[str, Any], group: str, units: list[str]) -> str:
    entries = rep["models" if group == "model" else "keys"]
    at = f"/periods/{p}/{'models' if group == 'model' else 'keys'}"
    heads = [group if group == "model" else "key", "requests", "errors", "input tokens", "output tokens",
             *(unit_name(u) for u in units), "cost"]
    out = ["<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in heads) + "</tr>"]
    for i, m in enumerate(entries):
        name = escape(str(m[group])) + (" <small>(includes estimates)</small>" if m.get("includes_estimates") else "")
        cells = [f"<td>{name}</td>"]
        for key in ("requests", "errors", "input_tokens", "output_tokens"):
            cells.append(figure(f"{at}/{i}/{key}", m[key], count(m[key]), "td"))
        for u in units:
            v = (m.get("units") or {}).get(u)
            cells.append(figure(f"{at}/{i}/units/{u}", v, count(v), "td") if v is not None else _NONE)
        cells.append(figure(f"{at}/{i}/cost_usd", m["cost_usd"], money(m["cost_usd"]), "td"))
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _generic_table(at: str, rows: list[dict[str, Any]]) -> str:
    """A list of objects the report may grow (Active tier's base fees): money columns formatted as money."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    heads = "".join(f"<th>{escape(c.removesuffix('_usd').replace('_', ' '))}</th>" for c in columns)
    out = [f"<table><tr>{heads}</tr>"]
    for i, row in enumerate(rows):
        cells = []
        for c in columns:
            v = row.get(c)
            if c.endswith("_usd") and v is not None:
                cells.append(figure(f"{at}/{i}/{c}", v, money(v), "td"))
            elif isinstance(v, int | float) and not isinstance(v, bool):
                cells.append(figure(f"{at}/{i}/{c}", v, count(v), "td"))
            else:
                cells.append(_NONE if v is None else f"<td>{escape(str(v))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _p50_p95(at: str, latency: dict[str, Any], kind: str) -> str:
    """`p50 / p95` of one latency, or "" when no answered request was timed."""
    if latency[f"{kind}_p50"] is None:
        return ""
    return " / ".join(figure(f"{at}/latency_ms/{kind}_{q}", latency[f"{kind}_{q}"], count(latency[f"{kind}_{q}"]))
                      for q in ("p50", "p95"))


def _figures(p: int, rep: dict[str, Any]) -> str:
    at = f"/periods/{p}"
    lat = rep["latency_ms"]

    def box(value_html: str, caption: str) -> str:
        return f'<div class="figure">{value_html}<small>{escape(caption)}</small></div>'

    parts = []
    if "total_usd" in rep and Decimal(rep.get("base_fee_usd", 0)):
        parts.append(box(figure(f"{at}/total_usd", rep["total_usd"], money(rep["total_usd"]), "b"), "total"))
        parts.append(box(figure(f"{at}/cost_usd", rep["cost_usd"], money(rep["cost_usd"]), "b"), "usage cost"))
        parts.append(box(figure(f"{at}/base_fee_usd", rep["base_fee_usd"], money(rep["base_fee_usd"]), "b"),
                         "Active base fee (prorated per day)"))
    else:
        parts.append(box(figure(f"{at}/cost_usd", rep["cost_usd"], money(rep["cost_usd"]), "b"), "cost"))
    parts.append(box(figure(f"{at}/requests", rep["requests"], count(rep["requests"]), "b"), "requests"))
    parts.append(box(figure(f"{at}/errors", sum(rep["errors"].values()), count(sum(rep["errors"].values())), "b"),
                     "errors"))
    parts.append(box(figure(f"{at}/input_tokens", rep["input_tokens"], count(rep["input_tokens"]), "b"),
                     "input tokens"))
    parts.append(box(figure(f"{at}/output_tokens", rep["output_tokens"], count(rep["output_tokens"]), "b"),
                     "output tokens"))
    for unit, v in _units(rep).items():
        parts.append(box(figure(f"{at}/units/{unit}", v, count(v), "b"), unit_name(unit)))
    for kind, caption in (("ttfb", "first byte"), ("duration", "whole request")):
        pair = _p50_p95(at, lat, kind)
        if pair:
            parts.append(f'<div class="figure"><b>{pair} ms</b><small>{caption} p50 / p95</small></div>')
    return '<div class="figures">' + "".join(parts) + "</div>"


def _period(p: int, rep: dict[str, Any]) -> str:
    month = _month_name(rep)
    when = "current period" if p == 0 else f"{p} period{'s' if p > 1 else ''} ago"
    head = (f'<h2 id="period-{escape(rep["period"])}">{escape(month)} <small>({when}, {escape(rep["start"])}'
            f' to {escape(rep["end"])} exclusive)</small></h2>')
    if not rep["requests"] and not Decimal(rep.get("total_usd", rep["cost_usd"])):
        return head + empty("period", f"Nothing used in {month}: no requests, no cost.")
    parts = [head, _figures(p, rep), '<div class="grid">', *_daily_sections(p, rep),
             *_breakdown_sections(p, rep)]
    units = list(_units(rep))
    parts.append(card("Per model", _model_table(p, rep, "model", units)))
    if rep.get("keys"):
        parts.append(card("Per API key", _model_table(p, rep, "key_id", units)))
    if rep.get("base_fees"):
        parts.append(card("Active tier base fees (prorated per day)", _generic_table(f"/periods/{p}/base_fees",
                                                                                      rep["base_fees"])))
    parts.append("</div>")
    return "".join(parts)


def _summary(result: dict[str, Any]) -> str:
    """The three periods side by side, one row per figure (a row per unit, base fee rows when billed)."""
    reps = result["periods"]
    units = list(dict.fromkeys(u for rep in reps for u in _units(rep)))
    fee = any(Decimal(rep.get("base_fee_usd", 0)) for rep in reps)

    def counted(key: str) -> Callable[[str, dict[str, Any]], str]:
        return lambda at, rep: figure(f"{at}/{key}", rep[key], count(rep[key]), "td")

    def unit(u: str) -> Callable[[str, dict[str, Any]], str]:
        return lambda at, rep: (figure(f"{at}/units/{u}", _units(rep)[u], count(_units(rep)[u]), "td")
                                if u in _units(rep) else "<td>0</td>")

    def latency(kind: str) -> Callable[[str, dict[str, Any]], str]:
        return lambda at, rep: f"<td>{pair} ms</td>" if (pair := _p50_p95(at, rep["latency_ms"], kind)) else _NONE

    def dollars(key: str) -> Callable[[str, dict[str, Any]], str]:
        return lambda at, rep: figure(f"{at}/{key}", rep[key], money(rep[key]), "td")

    rows: list[tuple[str, Callable[[str, dict[str, Any]], str]]] = [
        ("requests", counted("requests")),
        ("errors", lambda at, rep: figure(f"{at}/errors", sum(rep["errors"].values()),
                                          count(sum(rep["errors"].values())), "td")),
        ("input tokens", counted("input_tokens")), ("output tokens", counted("output_tokens")),
        *((unit_name(u), unit(u)) for u in units),
        ("first byte p50 / p95", latency("ttfb")), ("whole request p50 / p95", latency("duration")),
        ("usage cost", dollars("cost_usd")),
        *((("Active base fee", dollars("base_fee_usd")), ("total", dollars("total_usd"))) if fee else ()),
    ]
    heads = "".join(f'<th><a href="#period-{escape(rep["period"])}">{escape(_month_name(rep))}</a>'
                    f'{" (current)" if p == 0 else ""}</th>' for p, rep in enumerate(reps))
    out = [f"<table><tr><th></th>{heads}</tr>"]
    for name, cell in rows:
        out.append(f"<tr><td>{escape(name)}</td>" + "".join(cell(f"/periods/{p}", rep) for p, rep in enumerate(reps))
                   + "</tr>")
    out.append("</table>")
    return card("The three billing periods", "".join(out))


def render(result: dict[str, Any], workspace_name: str | None = None, generated_at: str | None = None) -> str:
    """The whole page for one `usage.report` result."""
    ws = escape(workspace_name or result["workspace_id"])
    title = f"Usage of {ws}"
    stamp = f" Generated {escape(generated_at)}." if generated_at else ""
    body = "".join(_period(p, rep) for p, rep in enumerate(result["periods"]))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{title}</title><style>{_CSS}</style></head><body><main>"
        f'<h1>{title}</h1><p class="sub">Workspace {escape(result["workspace_id"])}; billing periods are calendar'
        f" months in UTC. Money is rounded here; <code>gatewayctl usage --json</code> has it to six places.{stamp}</p>"
        f"{_summary(result)}{body}"
        "<footer>Latency counts answered requests (status below 400). Errors are requests answered with a"
        " status of 400 or more, the gateway's refusals included.</footer></main></body></html>\n"
    )


def write(path: Path, result: dict[str, Any], workspace_name: str, generated_at: str) -> None:
    try:
        path.write_text(render(result, workspace_name, generated_at), encoding="utf-8")
    except OSError as exc:
        raise ControlError("html_not_written", f"cannot write the usage page to {path}: {exc.strerror}") from None
