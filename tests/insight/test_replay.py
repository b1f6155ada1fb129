"""`shadowserve replay` as a CI gate: the buggy ports fail it, the fixed port passes on the same capture."""

from __future__ import annotations

import json

from server.capture import read_records
from tests.insight.conftest import pair_spec, shadowserve, write_config


def test_the_buggy_port_fails_the_gate_and_the_fixed_port_passes_it(bgr_capture):
    failed = shadowserve("replay", bgr_capture.folder, "--config", bgr_capture.buggy_config, "--max-mismatch-rate", "0.01")
    assert failed.returncode == 1, failed.stderr
    assert f"replayed {bgr_capture.kept} captured records" in failed.stdout
    assert "FAILED: mismatch rate 100.0% above max_mismatch_rate 1.0%" in failed.stdout
    assert "class flips of 'probabilities' (legacy top-1 -> candidate top-1)" in failed.stdout
    passed = shadowserve("replay", bgr_capture.folder, "--config", bgr_capture.fixed_config, "--max-mismatch-rate", "0.01")
    assert passed.returncode == 0, passed.stderr
    assert "gate (command line: max_mismatch_rate 0.01): passed" in passed.stdout
    header, _, row = passed.stdout.splitlines()[2:5]
    assert header.split()[:6] == ["model", "candidate", "compared", "skipped", "match", "top-1"]  # the demo's columns
    assert row.split()[:6] == ["classifier", "torch", "classifier_port.pt", str(bgr_capture.kept), "0", "100.0%"]


def test_replay_json_counts_every_flip_of_the_buggy_port(bgr_capture):
    result = shadowserve("replay", bgr_capture.folder, "--config", bgr_capture.buggy_config, "--json",
                         "--min-top1-agreement", "0.9")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    summary = report["summary"]
    assert summary["compared"] == bgr_capture.kept and summary["match_rate"] == 0.0
    assert not report["passed"] and report["breaches"][0].startswith("top-1 agreement")
    expected: dict[tuple[int, int], int] = {}
    for record in read_records(bgr_capture.folder):
        tensors = record.load()
        legacy, candidate = (int(t["probabilities"].argmax()) for t in (tensors.legacy, tensors.candidate))
        if legacy != candidate:
            expected[(legacy, candidate)] = expected.get((legacy, candidate), 0) + 1
    flips = report["flips"]["probabilities"]
    assert {(f["legacy"], f["candidate"]): f["rows"] for f in flips} == expected
    assert [f["rows"] for f in flips] == sorted((f["rows"] for f in flips), reverse=True)  # most frequent first
    assert summary["top1_agreement"] == 1 - sum(expected.values()) / bgr_capture.kept
    # channels swapped moves the coloured square between red and blue classes: 0 <-> 2 and 3 <-> 5
    assert set(expected) <= {(0, 2), (2, 0), (3, 5), (5, 3)}


def test_without_command_line_thresholds_the_pair_guard_judges(ports, logits_capture, tmp_path):
    guarded = write_config(tmp_path / "guarded.yaml", pair_spec(ports, ports.logits, guard={"max_mismatch_rate": 0.05}))
    result = shadowserve("replay", logits_capture.folder, "--config", guarded)
    assert result.returncode == 1, result.stderr
    assert "gate (the pair's guard: max_mismatch_rate 0.05): FAILED" in result.stdout
    assert "class flips" not in result.stdout  # the logits port keeps the top-1 class: nothing flips
    unguarded = shadowserve("replay", logits_capture.folder, "--config", logits_capture.buggy_config)
    assert unguarded.returncode == 0 and "not judged" in unguarded.stdout
    fixed = write_config(tmp_path / "fixed.yaml", pair_spec(ports, ports.faithful, guard={"max_mismatch_rate": 0.05}))
    assert shadowserve("replay", logits_capture.folder, "--config", fixed).returncode == 0


def test_replay_says_what_is_missing(ports, bgr_capture, tmp_path):
    other = write_config(tmp_path / "other.yaml", pair_spec(ports, ports.faithful, name="other"))
    result = shadowserve("replay", bgr_capture.folder, "--config", other)
    assert result.returncode == 2
    assert "no captured records of model 'other'; it holds records of ['classifier']" in result.stderr
    two = write_config(tmp_path / "two.yaml", pair_spec(ports, ports.faithful), pair_spec(ports, ports.bgr, name="bgr"))
    result = shadowserve("replay", bgr_capture.folder, "--config", two)
    assert result.returncode == 2 and "pick one with --model" in result.stderr
