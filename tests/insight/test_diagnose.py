"""`shadowserve diagnose` names the classic migration bugs of real ports, and says when it cannot."""

from __future__ import annotations

import json

import numpy as np

from server.config import ModelPairConfig
from server.demo.mxnet_models import save_torchscript, torch_port
from server.insight.diagnose import diagnose, precision_finding, spatial_finding
from tests.insight.conftest import capture_pair, images, pair_spec, shadowserve, uncertain_images, write_config


def diagnosis(folder, config) -> dict:
    result = shadowserve("diagnose", folder, "--config", config, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_diagnose_names_the_rgb_bgr_swap(bgr_capture):
    report = diagnosis(bgr_capture.folder, bgr_capture.buggy_config)
    assert report["records"] == report["captured_mismatches"] == bgr_capture.kept
    assert report["baseline"]["mismatch_rate"] == 1.0
    assert report["best"]["name"] == "reverse the input channels"
    assert report["best"]["after"]["mismatch_rate"] == 0.0 and report["best"]["after"]["top1_agreement"] == 1.0
    others = [t for t in report["trials"] if t["name"] != "reverse the input channels" and t["after"]]
    assert all(t["after"]["mismatch_rate"] > 0.5 for t in others)  # nothing else explains it
    layout = next(t for t in report["trials"] if t["name"] == "transpose the input NCHW <-> NHWC")
    assert layout["after"] is None and "expected input[1, 32, 32, 3] to have 3 channels" in layout["error"]
    text = shadowserve("diagnose", bgr_capture.folder, "--config", bgr_capture.buggy_config)
    assert ("likely bug: mismatch rate 100% -> 0%, top-1 agreement 0% -> 100% when applying: reverse the input "
            "channels: the port probably expects the other channel order") in text.stdout
    assert "Traceback" not in text.stderr  # the rejected layout transform is expected, not logged


def test_diagnose_names_the_missing_softmax(logits_capture):
    report = diagnosis(logits_capture.folder, logits_capture.buggy_config)
    assert report["baseline"]["mismatch_rate"] == 1.0 and report["baseline"]["top1_agreement"] == 1.0
    assert report["best"]["name"] == "softmax over the candidate's 'probabilities'"
    assert report["best"]["after"]["mismatch_rate"] == 0.0
    assert "returns logits where the legacy returns probabilities" in report["conclusion"]


def test_diagnose_finds_no_bug_in_the_faithful_port(faithful_capture, bgr_capture):
    report = diagnosis(faithful_capture.folder, faithful_capture.fixed_config)
    assert report["records"] == faithful_capture.kept and report["captured_mismatches"] == 0
    assert report["best"] is None and report["trials"] == []
    assert report["conclusion"] == f"no bug found: the candidate matches the legacy on all {faithful_capture.kept} captured records"
    fixed = diagnosis(bgr_capture.folder, bgr_capture.fixed_config)  # the fixed build, on the buggy one's mismatches
    assert fixed["best"] is None and fixed["conclusion"].startswith("no bug found")


async def test_weight_level_bugs_are_reported_by_pattern_or_as_unknown(ports, nudged_port, tmp_path):
    flatten = dict(ports.weights)  # fully-connected weights laid out for an NHWC flatten: no transform undoes it
    flatten["classes.weight"] = np.ascontiguousarray(
        ports.weights["classes.weight"].reshape(6, 16, 8, 8).transpose(0, 2, 3, 1).reshape(6, -1))
    flatten_port = save_torchscript(torch_port(flatten), tmp_path / "flatten.pt")
    await capture_pair(tmp_path / "flatten", pair_spec(ports, flatten_port), images(30, seed=4), matches_percent=0)
    report = diagnosis(tmp_path / "flatten", write_config(tmp_path / "flatten.yaml", pair_spec(ports, flatten_port)))
    assert report["best"] is None
    assert report["conclusion"] == "no input or output transform explains the divergence"
    assert "cannot tell which" in report["findings"][-1]

    await capture_pair(tmp_path / "nudged", pair_spec(ports, nudged_port), uncertain_images(60, seed=5))
    report = diagnosis(tmp_path / "nudged", write_config(tmp_path / "nudged.yaml", pair_spec(ports, nudged_port)))
    assert report["best"] is None and 0.25 <= report["baseline"]["mismatch_rate"] < 1
    assert report["findings"][0].startswith("small but systematic divergence")


# -- the patterns and output hypotheses, on answers made to show them -------------------------------

def remote_pair(outputs: list[dict]) -> ModelPairConfig:
    return ModelPairConfig.model_validate({
        "name": "m", "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}], "outputs": outputs,
        "legacy": {"runtime": "remote", "url": "legacy:8001", "model": "m"},
        "candidate": {"runtime": "remote", "url": "candidate:8001", "model": "m"}})


def scores(rows: int, classes: int = 6, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, size=(rows, 1, classes))
    return [{"p": (np.exp(row) / np.exp(row).sum()).astype(np.float32)} for row in logits]


def test_reordered_classes_are_named_with_their_mapping():
    pair = remote_pair([{"name": "p", "datatype": "FP32", "shape": [-1, 6], "class_scores": True}])
    legacy = scores(40)
    order = np.array([0, 1, 4, 3, 2, 5])
    found = diagnose(pair, legacy, [{"p": ref["p"][:, order]} for ref in legacy], [], captured_mismatches=40)
    assert found.best is not None and found.best.name == "reorder the candidate's classes of 'p' (2->4, 4->2)"
    assert found.best.after.mismatch_rate == 0.0


def test_a_transposed_output_is_named():
    pair = remote_pair([{"name": "p", "datatype": "FP32", "shape": [-1, 6]}])
    legacy = [{"p": np.concatenate([ref["p"], ref["p"] * 2])} for ref in scores(20)]
    found = diagnose(pair, legacy, [{"p": np.ascontiguousarray(ref["p"].T)} for ref in legacy], [], 20)
    assert found.baseline.mismatch_rate == 1.0
    assert found.best is not None and found.best.name == "transpose the candidate's 'p'"


def test_inf_and_nan_where_the_legacy_is_finite_point_at_fp16_overflow():
    pair = remote_pair([{"name": "p", "datatype": "FP32", "shape": [-1, 6]}])
    legacy = [{"p": np.array([[70000.0, 1.0, 2.0, 3.0, 4.0, 5.0]], np.float32)} for _ in range(4)]
    candidate = [{"p": np.array([[np.inf, 1.0, 2.0, 3.0, 4.0, np.nan]], np.float32)}] * 3 + [legacy[0]]
    assert "inf/NaN in 3 of 4 records" in precision_finding(legacy, candidate)
    found = diagnose(pair, legacy, candidate, [], 3)
    assert found.best is None and "fp16 overflow suspected" in found.findings[0]
    assert "largest legacy |value| there 7e+04" in found.findings[0]


def test_a_spatial_size_that_differs_points_at_pooling():
    pair = remote_pair([{"name": "features", "datatype": "FP32", "shape": [-1, 16, -1, -1]}])
    legacy = [{"features": np.ones((1, 16, 8, 8), np.float32)}]
    finding = spatial_finding(pair, legacy, [{"features": np.ones((1, 16, 9, 9), np.float32)}])
    assert finding.startswith("spatial size differs on output 'features': legacy 8x8, candidate 9x9")
    assert "ceil_mode=True" in finding
    assert spatial_finding(pair, legacy, legacy) is None


def test_divergence_growing_along_declared_outputs_is_reported():
    pair = remote_pair([{"name": name, "datatype": "FP32", "shape": [-1, 8]} for name in ("conv1", "conv2", "fc")])
    rng = np.random.default_rng(1)
    legacy = [{name: rng.normal(size=(1, 8)).astype(np.float32) for name in ("conv1", "conv2", "fc")} for _ in range(10)]
    candidate = [{name: (ref[name] * (1 + scale)).astype(np.float32) for name, scale in
                  (("conv1", 1e-6), ("conv2", 1e-3), ("fc", 0.3))} for ref in legacy]
    found = diagnose(pair, legacy, candidate, [], 10)
    growth = [f for f in found.findings if f.startswith("divergence grows along the declared outputs: conv1 (")]
    assert len(growth) == 1 and "-> conv2 (1.0e-03) -> fc (3.0e-01) (median rel_l2)" in growth[0]


def test_too_few_rows_give_no_class_order_guess():
    pair = remote_pair([{"name": "p", "datatype": "FP32", "shape": [-1, 6], "class_scores": True}])
    legacy = scores(3)
    found = diagnose(pair, legacy, [{"p": ref["p"][:, ::-1].copy()} for ref in legacy], [], 3)
    assert not any(t.name.startswith("reorder") for t in found.trials)
