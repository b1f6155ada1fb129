"""`shadowserve suggest-tolerances`: tolerances learned from controls hold on requests not seen yet."""

from __future__ import annotations

import json

import numpy as np
import pytest

from server.insight.tolerances import suggest
from tests.insight.conftest import capture_pair, pair_spec, shadowserve, uncertain_images, write_config


async def test_suggested_tolerances_pass_new_requests_the_defaults_fail(ports, nudged_port, tmp_path):
    loose = pair_spec(ports, nudged_port, atol=1.0)  # every answer a match: the controls a team trusts
    await capture_pair(tmp_path / "controls", loose, uncertain_images(200, seed=11))
    await capture_pair(tmp_path / "later", loose, uncertain_images(200, seed=12))
    result = shadowserve("suggest-tolerances", tmp_path / "controls", "--false-alarm-rate", "0.01", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    suggestion = report["outputs"][0]
    assert suggestion["output"] == "probabilities" and suggestion["samples"] == 200 and suggestion["resolvable"]
    assert suggestion["false_alarm_rate"] <= 0.01
    assert 1e-5 < suggestion["atol"] < 0.1 and 0 < suggestion["rtol"] < 1  # wider than the defaults, not blind
    assert report["pair"] == {"atol": suggestion["atol"], "rtol": suggestion["rtol"]}

    config = write_config(tmp_path / "nudged.yaml", pair_spec(ports, nudged_port))
    defaults = shadowserve("replay", tmp_path / "later", "--config", config, "--max-mismatch-rate", "0.05")
    assert defaults.returncode == 1, defaults.stdout + defaults.stderr  # atol 1e-5 calls this port broken
    suggested = shadowserve("replay", tmp_path / "later", "--config", config, "--max-mismatch-rate", "0.05",
                            "--atol", str(suggestion["atol"]), "--rtol", str(suggestion["rtol"]))
    assert suggested.returncode == 0, suggested.stdout + suggested.stderr


def test_without_matching_controls_it_says_how_to_get_them(bgr_capture):
    result = shadowserve("suggest-tolerances", bgr_capture.folder)
    assert result.returncode == 2
    assert "no matching control records; raise capture.matches_percent" in result.stderr
    everything = shadowserve("suggest-tolerances", bgr_capture.folder, "--samples", "all")
    assert everything.returncode == 0 and "atol: 1" in everything.stdout  # the swap moves whole probabilities


@pytest.mark.parametrize("rate", [0.01, 0.1])
def test_false_alarms_on_the_controls_stay_within_the_rate(rate):
    rng = np.random.default_rng(3)
    legacy = [rng.normal(0, 10, size=(1, 50)) for _ in range(1000)]
    candidate = [ref + rng.normal(0, 1e-3, size=ref.shape) * (1 + np.abs(ref)) for ref in legacy]
    found = suggest("y", legacy, candidate, rate)
    assert found.samples == 1000 and found.resolvable and found.false_alarm_rate <= rate
    worst = sorted(float(np.abs(b - a).max()) for a, b in zip(legacy, candidate))
    assert found.atol == worst[int(np.ceil((1 - rate) * 999))]  # atol alone covers 1 - rate of the controls
    assert suggest("y", legacy[:10], candidate[:10], 0.01).resolvable is False
