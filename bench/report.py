"""The run's one table, and the same rows as JSON (`$GATEWAY_STATE_DIR/bench.json`)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Row:
    key: str
    name: str
    value: float
    unit: str
    target: str = ""
    passed: bool | None = None  # None: reported for context, no target

    @property
    def verdict(self) -> str:
        return "-" if self.passed is None else ("PASS" if self.passed else "FAIL")


def _figure(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.3f}".rstrip("0").rstrip(".") if value != int(value) else f"{value:.0f}"


def table(rows: list[Row], title: str) -> str:
    cells = [(r.name, f"{_figure(r.value)} {r.unit}".strip(), r.target, r.verdict) for r in rows]
    headers = ("metric", "value", "target", "result")
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    rule = "  ".join("-" * w for w in widths)
    lines = [title, rule, "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)), rule]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)).rstrip() for cell in cells]
    lines.append(rule)
    failed = [r.name for r in rows if r.passed is False]
    lines.append(f"{sum(r.passed is True for r in rows)} PASS, {len(failed)} FAIL"
                 + (f" ({'; '.join(failed)})" if failed else ""))
    return "\n".join(lines)


def write_json(path: Path, rows: list[Row], config: dict[str, Any], details: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "rows": [{**asdict(r), "result": r.verdict} for r in rows],
        "passed": all(r.passed is not False for r in rows),
        "config": config,
        "details": details,
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(path)
