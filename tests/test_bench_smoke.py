"""The benchmark harness end to end in its quick mode: it starts and stops everything itself, exits 0
and writes a figure for every row. No performance assertions: those figures depend on the machine."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

# Settings that would point the harness's gateway somewhere else or lengthen the run.
_SCRUBBED = ("GATEWAY_", "EXTAUTH_", "METER_", "RUNPOD_", "BENCH_", "DATABASE_URL", "REDIS_URL")


@pytest.mark.timeout(150)
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (make bench installs it)")
def test_quick_bench_writes_every_row(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED)}
    env["GATEWAY_STATE_DIR"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-m", "bench", "--quick"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=140)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = report["rows"]
    assert {r["key"] for r in rows} >= {"gateway_rps", "gateway_non_2xx", "added_p50_ms", "added_p99_ms",
                                        "ttft_added_ms", "meter_lines_per_s", "meter_catchup_s",
                                        "extauth_rss_growth_pct", "extauth_cpu_us", "rps_ratio",
                                        "ceiling_grpc_rps", "ceiling_http_rps", "ceiling_ratio"}
    # Both trivial-authz ceilings answered every request (a ceiling of refusals would flatter the gateway).
    by_key = {r["key"]: r for r in rows}
    assert by_key["ceiling_non_2xx"]["value"] == 0, by_key["ceiling_non_2xx"]
    assert by_key["ceiling_grpc_rps"]["value"] > 0 and by_key["ceiling_http_rps"]["value"] > 0
    for row in rows:
        value = row["value"]
        assert isinstance(value, int | float) and not isinstance(value, bool), row
        assert math.isfinite(value), row
        assert row["result"] in ("PASS", "FAIL", "-"), row
    for row in rows:
        assert row["name"] in done.stdout, f"{row['name']} missing from the printed table"
    # Everything it started is gone again, its temporary directory included.
    workdir = re.search(r"working in (\S+)", done.stderr)
    assert workdir, done.stderr[-2000:]
    assert not Path(workdir[1]).exists()
    leftovers = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _mentions(p, workdir[1])]
    assert not leftovers, [_read(p / "cmdline") for p in leftovers]


def _read(path: Path) -> str:
    try:
        return path.read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _mentions(proc: Path, marker: str) -> bool:
    """In its command line (Envoy, PostgreSQL, Redis) or its environment (gatewayctl up and its children)."""
    return marker in _read(proc / "cmdline") or marker in _read(proc / "environ")
