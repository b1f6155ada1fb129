"""The rollback guard's judgement on its own, one threshold at a time."""

from __future__ import annotations

import pytest

from server.config import GuardConfig
from server.rollout import RollbackGuard
from server.window import WindowSummary


def window(**overrides) -> WindowSummary:
    values = dict(samples=100, compared=100, match_rate=1.0, top1_agreement=1.0, error_rate=0.0,
                  latency_p50={"legacy": 0.004, "candidate": 0.01}, latency_p99={"legacy": 0.008, "candidate": 0.02},
                  max_abs_p50=1e-7, max_abs_p99=1e-6)
    return WindowSummary(**{**values, **overrides})


def judge(summary: WindowSummary, **thresholds):
    guard = RollbackGuard.__new__(RollbackGuard)  # breach() reads only the thresholds
    guard.config = GuardConfig(**thresholds)
    return guard.breach(summary)


ALL = dict(max_mismatch_rate=0.05, min_top1_agreement=0.98, max_error_rate=0.02, max_p99_latency_s=0.1)


def test_a_healthy_window_is_left_alone():
    assert judge(window(), **ALL) is None


@pytest.mark.parametrize("summary, reason, text", [
    (window(match_rate=0.9), "mismatch_rate", "mismatch rate 10.0% > 5.0%"),
    (window(top1_agreement=0.95), "top1_agreement", "top-1 agreement 95.0% < 98.0%"),
    (window(error_rate=0.05), "error_rate", "candidate error rate 5.0% > 2.0%"),
    (window(latency_p99={"legacy": 0.008, "candidate": 0.3}), "latency", "candidate p99 300.0 ms > 100.0 ms"),
])
def test_each_threshold_names_its_reason(summary, reason, text):
    assert judge(summary, **ALL) == (reason, text)


def test_unset_thresholds_and_missing_measures_never_trigger():
    assert judge(window(match_rate=0.0, error_rate=1.0)) is None
    assert judge(window(match_rate=None, top1_agreement=None, error_rate=None,
                        latency_p99={"legacy": None, "candidate": None}), **ALL) is None
