"""`gatewayctl usage WS --html FILE`: the page loads in a real headless browser (Debian's chromium) with
the network unreachable, every figure it shows equals the one in `gatewayctl usage WS --json`, a
bring-your-own-RunPod workspace billed $0 still sees its requests, tokens and latency, charts with
nothing to show say so, and figures the report may carry (modality units, Active tier's base fee) are
drawn without a change to the page."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from control import usage_html, workspaces
from control.context import open_context
from control.crypto import Keyring
from control.migrate import apply_migrations
from control.money import usd
from control.settings import settings_for
from control.spend import billing_month
from tests.support import ROOT


@pytest.fixture(scope="module")
def control_env(database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """What `gatewayctl usage` needs: a migrated database, Redis and a master key (no Envoy)."""
    apply_migrations(database_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "RUNPOD_"))}
    return {**env, "DATABASE_URL": database_url, "REDIS_URL": redis_url,
            "GATEWAY_STATE_DIR": str(tmp_path_factory.mktemp("usage-html")),
            "GATEWAY_MASTER_KEY": Keyring({1: secrets.token_bytes(32)}).dumps()}


HOSTILE = '<script>alert("x")</script>'
# (days after the period's start, hour, key, model, destination, status, input, output, cost, ms, ttfb ms)
Row = tuple[int, int, str, str, str, int, int, int, str, int | None, int | None]
CURRENT: list[Row] = [  # the customer's own RunPod: billed $0 here
    (0, 9, "key_a", "acme-chat", "runpod", 200, 120, 80, "0", 900, 120),
    (0, 10, "key_a", "acme-chat", "runpod", 200, 30, 20, "0", 400, 90),
    (1, 8, "key_a", "acme-embed", "runpod", 200, 500, 0, "0", 60, 60),
    (1, 9, "key_b", "acme-chat", "runpod", 429, 0, 0, "0", 1, 1),  # refused by the gateway: not timed
    (2, 7, "key_b", "acme-chat", "runpod", 502, 0, 0, "0", 30000, None),
    (2, 8, "key_a", "acme-chat", "runpod", 200, 60, 1200, "0", 2500, 300),
    (3, 8, "key_a", HOSTILE, "runpod", 200, 5, 5, "0", None, None),  # a public name chosen by the customer
]
PREVIOUS: list[Row] = [  # the managed destination, priced
    (9, 12, "key_a", "acme-managed", "managed", 200, 1000, 500, "0.0125", 1500, 200),
    (9, 13, "key_a", "acme-managed", "managed", 200, 100, 20, "0.0005", 700, 150),
    (19, 6, "key_a", "acme-managed", "managed", 500, 0, 0, "0", 80, 80),
]


def _percentile(values: list[int], q: float) -> int:
    """PostgreSQL's percentile_disc: the first value whose cumulative share reaches q."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@pytest.fixture(scope="module")
def seeded(control_env: dict[str, str]) -> Iterator[str]:
    now = datetime.now(UTC)
    current = billing_month(now)[0]
    previous = billing_month(current - timedelta(days=1))[0]
    with open_context(settings_for(control_env)) as ctx:
        ws = workspaces.create(ctx, "html-" + secrets.token_hex(3), "pro")
        for start, rows in ((current, CURRENT), (previous, PREVIOUS)):
            for day, hour, key, model, dest, status, inp, out, cost, ms, ttfb in rows:
                ctx.db.execute(
                    "INSERT INTO usage_events (request_id, start_time, workspace_id, key_id, model, destination,"
                    " status, prompt_tokens, completion_tokens, cost_usd, duration_ms, ttfb_ms)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    (secrets.token_hex(8), start + timedelta(days=day, hours=hour), ws["id"], key, model, dest,
                     status, inp, out, Decimal(cost), ms, ttfb),
                )
    yield ws["name"]


class _Figures(HTMLParser):
    """The page's figures (`data-field`), the charts that say they are empty (`data-empty`, with the
    period they belong to), and every URL-bearing attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.figures: list[tuple[str, str, str]] = []
        self.empty: set[tuple[str, str]] = set()
        self.urls: list[str] = []
        self.tags: set[str] = set()
        self._period = ""
        self._open: list[list[str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.add(tag)
        self.urls += [v for k, v in a.items() if k in ("src", "href", "xlink:href", "action", "srcset")]
        if tag == "h2" and a.get("id", "").startswith("period-"):
            self._period = a["id"].removeprefix("period-")
        if "data-empty" in a:
            self.empty.add((self._period, a["data-empty"]))
        if "data-field" in a:
            self._open.append([a["data-field"], a["data-value"], ""])

    def handle_data(self, data: str) -> None:
        for entry in self._open:
            entry[2] += data

    def handle_endtag(self, tag: str) -> None:
        if self._open and tag in ("td", "b", "span", "text"):
            field, value, text = self._open.pop()
            self.figures.append((field, value, text.strip()))


def _resolve(report: dict[str, Any], field: str) -> Decimal:
    """A figure's pointer into the report: `a+b` sums, an object stands for the sum of its values."""
    total = Decimal(0)
    for pointer in field.split("+"):
        node: Any = report
        for part in pointer.strip("/").split("/"):
            node = node[int(part)] if isinstance(node, list) else node[part]
        total += sum((Decimal(str(v)) for v in node.values()), Decimal(0)) if isinstance(node, dict) else Decimal(
            str(node))
    return total


def check_page(page: str, report: dict[str, Any]) -> _Figures:
    """Every figure on the page is the report's, rounded no further than the digits it shows."""
    parsed = _Figures()
    parsed.feed(page)
    assert parsed.figures, "no figures on the page"
    for field, value, text in parsed.figures:
        expected = _resolve(report, field)
        assert Decimal(value) == expected, (field, value, expected)
        shown = re.fullmatch(r"\$?([\d,]+(?:\.(\d+))?)", text)
        assert shown, (field, text)
        places = len(shown.group(2) or "")
        assert abs(Decimal(shown.group(1).replace(",", "")) - expected) <= Decimal("0.5").scaleb(-places), (
            field, text, expected)
    return parsed


def self_contained(page: str) -> None:
    """Nothing to fetch: no script, no external stylesheet, font, image or frame, no URL at all."""
    assert not re.search(r"<(script|link|img|iframe|object|embed|image|use)\b", page, re.I)
    assert not re.search(r"https?:|//[a-z]|@import|url\(", page, re.I), re.findall(r".{40}(?:https?:|url\().{40}",
                                                                                   page)


def browser_dom(tmp: Path, page: Path, screenshot: Path | None = None) -> str:
    """The page as headless chromium built it, every proxied or direct connection refused (the proxy is
    a closed port and `<-loopback>` sends even loopback through it)."""
    chromium = shutil.which("chromium")
    assert chromium, "chromium is missing: `make test` installs it (apt-get install chromium)"
    argv = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
            "--disable-background-networking", "--disable-component-update", f"--user-data-dir={tmp / 'profile'}",
            "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>", "--dump-dom", page.as_uri()]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_page_in_a_browser_shows_the_reports_figures(
    control_env: dict[str, str], seeded: str, tmp_path: Path
) -> None:
    page_file = tmp_path / "usage.html"
    done = subprocess.run([sys.executable, "-m", "control.cli", "usage", seeded, "--json", "--html", str(page_file)],
                          env=control_env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["html"] == str(page_file)
    current, previous, oldest = report["periods"]

    # The data the page draws: requests and latency per day and period, as PostgreSQL computes them.
    answered = [r for r in CURRENT if r[5] < 400]
    assert current["latency_ms"] == {
        "duration_p50": _percentile([r[9] for r in answered if r[9] is not None], 0.5),
        "duration_p95": _percentile([r[9] for r in answered if r[9] is not None], 0.95),
        "ttfb_p50": _percentile([r[10] for r in answered if r[10] is not None], 0.5),
        "ttfb_p95": _percentile([r[10] for r in answered if r[10] is not None], 0.95),
    } == {"duration_p50": 400, "duration_p95": 2500, "ttfb_p50": 90, "ttfb_p95": 300}
    assert [(d["requests"], d["errors"]) for d in current["daily"][:5]] == [(2, 0), (2, 1), (2, 1), (1, 0), (0, 0)]
    assert current["daily"][1]["latency_ms"] == {"duration_p50": 60, "duration_p95": 60, "ttfb_p50": 60,
                                                  "ttfb_p95": 60}  # the 429 is not timed
    assert current["daily"][3]["latency_ms"] == dict.fromkeys(current["latency_ms"])  # answered, not timed
    assert current["cost_usd"] == "0.000000" and previous["cost_usd"] == "0.013000"
    assert oldest["requests"] == 0 and oldest["latency_ms"]["ttfb_p95"] is None

    html = page_file.read_text()
    self_contained(html)
    dom = browser_dom(tmp_path, page_file)
    assert "</svg>" in dom and "Usage of " in dom
    assert "&lt;script&gt;alert" in dom  # the name is shown as text, never run
    parsed = check_page(dom, report)
    fields = {f for f, _, _ in parsed.figures}

    for p, rep in enumerate((current, previous)):
        at = f"/periods/{p}"
        assert {f"{at}/{k}" for k in ("requests", "errors", "input_tokens", "output_tokens", "cost_usd")} <= fields
        assert {f"{at}/latency_ms/{k}" for k in rep["latency_ms"]} <= fields
        assert {f"{at}/models/{i}/cost_usd" for i in range(len(rep["models"]))} <= fields
        assert {f"{at}/errors/{status}" for status in rep["errors"]} <= fields
        for i, d in enumerate(rep["daily"]):
            day = f"{at}/daily/{i}"
            assert (f"{day}/requests" in fields) == bool(d["requests"]), day
            assert (f"{day}/cost_usd" in fields) == bool(Decimal(d["cost_usd"])), day
            assert (f"{day}/input_tokens+{day}/output_tokens" in fields) == bool(d["input_tokens"] + d["output_tokens"])
            assert (f"{day}/latency_ms/duration_p95" in fields) == bool(d["latency_ms"]["duration_p95"])
    # Billed $0 on its own RunPod: the cost charts say so, the counts are drawn.
    assert {(current["period"], "daily-cost"), (current["period"], "model-cost")} <= parsed.empty
    assert not {k for period, k in parsed.empty if period == current["period"]} & {
        "requests", "tokens", "latency-ttfb", "latency-duration", "errors"}
    assert not {k for period, k in parsed.empty if period == previous["period"]} & {"daily-cost", "model-cost"}
    assert (oldest["period"], "period") in parsed.empty  # nothing used: one sentence, no empty axes
    assert not any(f.startswith("/periods/2/daily") for f in fields)


def test_units_and_base_fee_render_generically(control_env: dict[str, str], seeded: str, tmp_path: Path) -> None:
    """A report as modality metering and Active tier extend it: `units` per period and per model (their
    cost already inside cost_usd), and a base fee per day and per period beside the usage cost."""
    from control import usage

    with open_context(settings_for(control_env)) as ctx:
        report = copy.deepcopy(usage.report(ctx, seeded, tmp_path / "charts"))
    current, previous = report["periods"][0], report["periods"][1]
    previous["units"] = {"image": 3, "audio_second": 12.5, "character": 4800}
    previous["models"][0]["units"] = {"image": 3, "audio_second": 12.5, "character": 4800}
    fee_per_day = Decimal("0.322581")
    for d in current["daily"]:
        d["base_fee_usd"], d["total_usd"] = usd(fee_per_day), usd(Decimal(d["cost_usd"]) + fee_per_day)
    fee = fee_per_day * len(current["daily"])
    current["base_fee_usd"], current["total_usd"] = usd(fee), usd(Decimal(current["cost_usd"]) + fee)
    current["base_fees"] = [{"deployment_id": "dep_0123", "model": "acme-active", "min_workers": 1,
                             "days": len(current["daily"]), "monthly_usd": "10.000000", "base_fee_usd": usd(fee)}]
    for rep in report["periods"][1:]:
        for d in rep["daily"]:
            d["base_fee_usd"], d["total_usd"] = "0.000000", d["cost_usd"]
        rep["base_fee_usd"], rep["total_usd"], rep["base_fees"] = "0.000000", rep["cost_usd"], []

    page_file = tmp_path / "extended.html"
    page_file.write_text(usage_html.render(report, "acme"), encoding="utf-8")
    self_contained(page_file.read_text())
    parsed = check_page(browser_dom(tmp_path, page_file), report)
    fields = {f for f, _, _ in parsed.figures}
    assert {f"/periods/1/units/{u}" for u in previous["units"]} <= fields
    assert {f"/periods/1/models/0/units/{u}" for u in previous["units"]} <= fields
    assert {"/periods/0/base_fee_usd", "/periods/0/total_usd", "/periods/0/base_fees/0/base_fee_usd",
            "/periods/0/base_fees/0/monthly_usd"} <= fields
    # The fee alone fills the daily chart of a workspace whose usage is billed $0.
    assert {f"/periods/0/daily/{i}/total_usd" for i in range(len(current["daily"]))} <= fields
    assert (current["period"], "daily-cost") not in parsed.empty


def test_an_unwritable_page_path_is_a_clear_error(control_env: dict[str, str], seeded: str, tmp_path: Path) -> None:
    target = tmp_path / "no-such-dir" / "usage.html"
    done = subprocess.run([sys.executable, "-m", "control.cli", "usage", seeded, "--html", str(target)],
                          env=control_env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "html_not_written" in done.stderr and str(target) in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
