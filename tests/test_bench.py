"""The benchmark harness cannot rot: its quick mode runs end to end and reports every figure."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.solo

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(480)
def test_quick_bench_reports_every_figure(tmp_path):
    report, figures = tmp_path / "BENCHMARKS.md", tmp_path / "figures.json"
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    run = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(report), "--json", str(figures)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    assert run.returncode == 0, run.stderr[-4000:]
    found = json.loads(figures.read_text())
    assert {figure["number"] for figure in found} == set(range(1, 16))
    for figure in found:  # a number for each, not a pass: timings on a shared CI machine are noise
        assert isinstance(figure["value"], float) and math.isfinite(figure["value"]), figure
        assert (figure["target"] is None or figure["target"] >= 0) and figure["measure"]
    text = report.read_text()
    assert "## Machine" in text and "nproc" in text and "python -m bench --quick" in text
    for number in range(1, 16):
        assert f"\n| {number} | " in text
    assert "quick mode" in text


def test_a_stall_the_rig_shares_is_not_counted_as_the_gateways():
    import numpy as np

    from bench.load import Run

    ms = 1_000_000
    starts = np.arange(0, 1000 * 5 * ms, 5 * ms, dtype=np.int64)
    latencies = np.full(1000, 2 * ms, dtype=np.int64)
    straight = Run(latencies.copy(), 5.0, {}, starts.copy())
    gateway = Run(latencies.copy(), 5.0, {}, starts + ms)
    gateway.latencies_ns[100] += 30 * ms  # the load generator paused: both sides waited
    straight.latencies_ns[100] += 28 * ms
    gateway.latencies_ns[500] += 12 * ms  # the gateway's own
    assert gateway.stall_ms == 30.0
    assert gateway.own_stall_ms(straight) == 12.0
    gateway.latencies_ns[700] += 40 * ms  # nothing straight to the legacy was in flight then
    straight.latencies_ns[690] += 40 * ms
    assert gateway.own_stall_ms(straight) == 40.0
    same_core = Run(latencies.copy(), 5.0, {}, starts + 2 * ms)  # the host paused the gateway's core, not the other
    same_core.latencies_ns[700] += 39 * ms
    assert gateway.own_stall_ms(straight, same_core) == 12.0
    assert gateway.own_stall_ms() == 40.0
