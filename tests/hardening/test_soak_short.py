"""The soak benchmark, CI-sized: 15 s of mixed traffic with faults through a real gateway."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[2]
SOAK = PROJECT / "bench" / "soak.py"


@pytest.mark.slow
def test_soak_short(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, str(SOAK), "--duration", "15", "--interval", "5", "--json", str(out)],
        capture_output=True, text=True, timeout=90, cwd=PROJECT)
    assert out.exists(), f"no report (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n" \
                         f"{proc.stderr[-2000:]}"
    report = json.loads(out.read_text())
    assert report["unexpected"] == {}, report["unexpected_samples"]
    assert report["gateway_alive"]
    assert proc.returncode == 0, report["failures"]
    # Every kind of traffic and every fault really ran.
    assert set(report["ok"]) == {"small", "large", "post", "ws", "slow"}, report["ok"]
    assert set(report["expected_failures"]) == {"reset", "refused"}
    assert sum(report["ok"].values()) > 500
    # Reported over time, with memory that does not creep.
    assert len(report["intervals"]) >= 3
    assert report["rss_growth_mib"] < 32, report["intervals"]
    assert all(line["unexpected"] == 0 for line in report["intervals"])
    small_p99 = max(line["p99_ms"].get("small", 0) for line in report["intervals"])
    assert small_p99 < 500, report["intervals"]
