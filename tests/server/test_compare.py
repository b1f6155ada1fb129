from __future__ import annotations

import numpy as np
import pytest

from server.compare import (
    MATCH,
    MISMATCH,
    SHAPE_MISMATCH,
    compare,
    compare_many,
    divergence,
)


def test_measures_on_known_values():
    legacy = np.array([[3.0, 4.0]], np.float32)
    candidate = np.array([[3.0, 4.5]], np.float32)
    result = divergence(legacy, candidate, atol=0.1, rtol=0.0)
    assert result.max_abs == pytest.approx(0.5)
    assert result.mean_abs == pytest.approx(0.25)
    assert result.rel_l2 == pytest.approx(0.5 / 5.0)
    cosine = 1 - (9 + 18) / (5.0 * np.hypot(3, 4.5))
    assert result.cosine == pytest.approx(cosine)
    assert not result.within_tolerance
    assert divergence(legacy, candidate, atol=0.0, rtol=0.13).within_tolerance  # 0.5 <= 0.13 * 4


def test_top1_and_topk_per_row():
    legacy = np.array([[0.1, 0.7, 0.2, 0.0], [0.6, 0.3, 0.05, 0.05]], np.float32)
    candidate = np.array([[0.1, 0.2, 0.7, 0.0], [0.6, 0.3, 0.06, 0.04]], np.float32)
    result = divergence(legacy, candidate, atol=1e-6, rtol=0, class_scores=True, top_k=2)
    assert (result.top1_agree, result.top1_total) == (1, 2)
    assert result.topk_overlap == pytest.approx(1.0)  # row 0: {1,2} vs {2,1}; row 1: {0,1} vs {0,1}
    result = divergence(legacy, candidate, atol=1e-6, rtol=0, class_scores=True, top_k=1)
    assert result.topk_overlap == pytest.approx(0.5)


def test_verdicts():
    a = {"y": np.ones((2, 3), np.float32)}
    assert compare(a, {"y": a["y"] + 1e-7}, ["y"]).verdict == MATCH
    assert compare(a, {"y": a["y"] + 1e-2}, ["y"]).verdict == MISMATCH
    assert compare(a, {"y": np.ones((3, 2), np.float32)}, ["y"]).verdict == SHAPE_MISMATCH
    assert compare(a, {"y": np.ones((2, 3), np.float64)}, ["y"]).verdict == SHAPE_MISMATCH
    missing = compare(a, {}, ["y"])
    assert missing.verdict == SHAPE_MISMATCH and "did not return output 'y'" in missing.detail
    nan = compare(a, {"y": np.full((2, 3), np.nan, np.float32)}, ["y"])
    assert nan.verdict == MISMATCH


def test_worst_output_decides():
    legacy = {"a": np.zeros(4, np.float32), "b": np.zeros(4, np.float32)}
    candidate = {"a": np.zeros(4, np.float32), "b": np.full(4, 1.0, np.float32)}
    result = compare(legacy, candidate, ["a", "b"])
    assert result.verdict == MISMATCH
    assert result.outputs["a"].within_tolerance and not result.outputs["b"].within_tolerance


def test_batched_comparison_equals_one_by_one():
    rng = np.random.default_rng(0)
    scores = lambda rows: rng.random((rows, 6)).astype(np.float32)  # noqa: E731
    pairs = []
    for rows in (1, 3, 1, 2, 3):
        legacy = {"y": scores(rows)}
        pairs.append((legacy, {"y": legacy["y"] + rng.normal(0, 1e-3, (rows, 6)).astype(np.float32)}))
    pairs.append(({"y": scores(2)}, {"y": scores(3)}))  # a shape mismatch among them
    pairs.append(({"y": scores(1)}, {"y": np.full((1, 6), np.nan, np.float32)}))
    same = scores(1)
    pairs.append(({"y": same}, {"y": same.copy()}))
    batched = compare_many(pairs, ["y"], frozenset({"y"}), atol=1e-3, rtol=0, top_k=3)
    single = [compare(legacy, candidate, ["y"], frozenset({"y"}), atol=1e-3, rtol=0, top_k=3) for legacy, candidate in pairs]
    assert [c.verdict for c in batched] == [c.verdict for c in single]
    assert {c.verdict for c in batched} == {MATCH, MISMATCH, SHAPE_MISMATCH}
    for got, want in zip(batched, single):
        for name, out in want.outputs.items():
            np.testing.assert_allclose(list(got.outputs[name].measures().values()), list(out.measures().values()), rtol=1e-12)
            assert (got.outputs[name].top1_agree, got.outputs[name].top1_total) == (out.top1_agree, out.top1_total)
            assert got.outputs[name].topk_overlap == pytest.approx(out.topk_overlap)


def _bytes(*rows: list[bytes]) -> np.ndarray:
    array = np.empty((len(rows), len(rows[0])), dtype=object)
    array[:] = rows
    return array


def test_bytes_outputs_compare_by_equality():
    legacy = _bytes([b"cat", b"dog"], [b"", b"\xff\x00"])
    same = divergence(legacy, _bytes([b"cat", b"dog"], [b"", b"\xff\x00"]), atol=0, rtol=0)
    assert (same.max_abs, same.mean_abs, same.within_tolerance) == (0.0, 0.0, True)
    changed = divergence(legacy, _bytes([b"cat", b"Dog"], [b"", b"\xff"]), atol=1e9, rtol=1e9, class_scores=True)
    assert (changed.max_abs, changed.mean_abs, changed.within_tolerance) == (1.0, 0.5, False)  # tolerances mean nothing
    assert np.isnan(changed.rel_l2) and np.isnan(changed.cosine) and changed.top1_total == 0
    verdicts = compare_many([({"y": legacy}, {"y": legacy.copy()}), ({"y": legacy}, {"y": _bytes([b"cat", b"dog"], [b"", b""])})], ["y"])
    assert [c.verdict for c in verdicts] == [MATCH, MISMATCH]


def test_bf16_outputs_compare_as_numbers():
    import ml_dtypes

    legacy = np.array([[1.0, 2.0, 3.0]], ml_dtypes.bfloat16)
    candidate = np.array([[1.0, 2.0, 3.015625]], ml_dtypes.bfloat16)  # one bf16 step above 3
    result = divergence(legacy, candidate, atol=0.01, rtol=0)
    assert result.max_abs == pytest.approx(0.015625) and not result.within_tolerance
    assert compare({"y": legacy}, {"y": candidate}, ["y"], atol=0.02).verdict == MATCH
