"""Divergence between the legacy and candidate answers: pure numpy, no I/O."""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

MATCH, MISMATCH, SHAPE_MISMATCH = "match", "mismatch", "shape_mismatch"
MEASURES = ("max_abs", "mean_abs", "rel_l2", "cosine")
_EPS = 1e-12


@dataclasses.dataclass(frozen=True, slots=True)
class OutputDivergence:
    max_abs: float
    mean_abs: float
    rel_l2: float
    cosine: float
    within_tolerance: bool
    top1_agree: int = 0  # rows whose argmax agrees (class-score outputs only)
    top1_total: int = 0
    topk_overlap: float | None = None  # mean share of the legacy top-k found in the candidate top-k

    def measures(self) -> dict[str, float]:
        return {"max_abs": self.max_abs, "mean_abs": self.mean_abs, "rel_l2": self.rel_l2, "cosine": self.cosine}


@dataclasses.dataclass(frozen=True, slots=True)
class Comparison:
    verdict: str
    outputs: dict[str, OutputDivergence]
    detail: str = ""

    @property
    def top1(self) -> tuple[int, int]:
        agree = sum(out.top1_agree for out in self.outputs.values())
        return agree, sum(out.top1_total for out in self.outputs.values())


def _rows(array: np.ndarray) -> np.ndarray:
    return array.reshape(-1, array.shape[-1]) if array.ndim >= 1 else array.reshape(1, 1)


def _top_k(rows: np.ndarray, k: int) -> np.ndarray:
    return np.argpartition(rows, -k, axis=1)[:, -k:]


def divergence(legacy: np.ndarray, candidate: np.ndarray, atol: float, rtol: float,
               class_scores: bool = False, top_k: int = 5) -> OutputDivergence:
    """Compare two same-shaped tensors; `legacy` is the reference."""
    ref = legacy.astype(np.float64, copy=False).ravel()
    new = candidate.astype(np.float64, copy=False).ravel()
    diff = np.abs(new - ref)
    if diff.size == 0:
        return OutputDivergence(0.0, 0.0, 0.0, 0.0, True)
    ref_norm, new_norm = float(np.linalg.norm(ref)), float(np.linalg.norm(new))
    dot = float(np.dot(ref, new))
    if ref_norm < _EPS and new_norm < _EPS:
        cosine = 0.0
    else:
        cosine = 1.0 - dot / max(ref_norm * new_norm, _EPS)
    # NaN anywhere fails the tolerance test: comparisons with NaN are False.
    within = bool(np.all(diff <= atol + rtol * np.abs(ref)))
    result = dict(
        max_abs=float(diff.max()),
        mean_abs=float(diff.mean()),
        rel_l2=float(np.linalg.norm(new - ref)) / max(ref_norm, _EPS),
        cosine=cosine,
        within_tolerance=within,
    )
    if class_scores and legacy.ndim >= 1 and legacy.shape[-1] > 0:
        ref_rows, new_rows = _rows(legacy), _rows(candidate)
        agree = int(np.count_nonzero(ref_rows.argmax(axis=1) == new_rows.argmax(axis=1)))
        k = min(top_k, ref_rows.shape[1])
        ref_top, new_top = _top_k(ref_rows, k), _top_k(new_rows, k)
        overlap = (ref_top[:, :, None] == new_top[:, None, :]).any(axis=2).sum(axis=1) / k
        result.update(top1_agree=agree, top1_total=ref_rows.shape[0], topk_overlap=float(overlap.mean()))
    return OutputDivergence(**result)


def compare(
    legacy: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    output_names: Sequence[str],
    class_score_outputs: frozenset[str] = frozenset(),
    atol: float = 1e-5,
    rtol: float = 1e-4,
    top_k: int = 5,
) -> Comparison:
    """Compare every declared output; the verdict is the worst over them."""
    for name in output_names:
        ref, new = legacy.get(name), candidate.get(name)
        if new is None:
            return Comparison(SHAPE_MISMATCH, {}, f"candidate did not return output {name!r}")
        if ref is None:
            return Comparison(SHAPE_MISMATCH, {}, f"legacy did not return output {name!r}")
        if ref.shape != new.shape or ref.dtype != new.dtype:
            return Comparison(
                SHAPE_MISMATCH, {}, f"output {name!r}: legacy {ref.dtype}{list(ref.shape)}, candidate {new.dtype}{list(new.shape)}"
            )
    outputs = {
        name: divergence(legacy[name], candidate[name], atol, rtol, name in class_score_outputs, top_k)
        for name in output_names
    }
    verdict = MATCH if all(out.within_tolerance for out in outputs.values()) else MISMATCH
    return Comparison(verdict, outputs)
