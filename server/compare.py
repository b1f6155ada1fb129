"""Divergence between the legacy and candidate answers: pure numpy, no I/O."""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np

MATCH, MISMATCH, SHAPE_MISMATCH = "match", "mismatch", "shape_mismatch"
MEASURES = ("max_abs", "mean_abs", "rel_l2", "cosine")
_EPS = 1e-12
BATCH_ELEMENTS = 65536  # elements per output stacked into one array by `compare_many`


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


def divergence(legacy: np.ndarray, candidate: np.ndarray, atol: float, rtol: float,
               class_scores: bool = False, top_k: int = 5) -> OutputDivergence:
    """Compare two same-shaped tensors; `legacy` is the reference."""
    return divergences([legacy], [candidate], atol, rtol, class_scores, top_k)[0]


def divergences(legacy: Sequence[np.ndarray], candidate: Sequence[np.ndarray], atol: float, rtol: float,
                class_scores: bool = False, top_k: int = 5) -> list[OutputDivergence]:
    """`divergence` of many pairs of tensors that all have one shape and dtype, in one set of numpy calls.

    Each numpy call costs microseconds whatever the size of a small output, so pairs stacked into
    one array per side cost little more than one pair.
    """
    count, shape = len(legacy), legacy[0].shape
    size = legacy[0].size
    if size == 0:
        return [OutputDivergence(0.0, 0.0, 0.0, 0.0, True)] * count
    if legacy[0].dtype == object:
        return [_equality(ref, new) for ref, new in zip(legacy, candidate)]
    ref = np.array(legacy, dtype=np.float64).reshape(count, size)
    new = np.array(candidate, dtype=np.float64).reshape(count, size)
    ref_norm = np.sqrt(np.einsum("ij,ij->i", ref, ref))
    new_norm = np.sqrt(np.einsum("ij,ij->i", new, new))
    product = np.maximum(ref_norm * new_norm, _EPS)
    cosine = np.where((ref_norm < _EPS) & (new_norm < _EPS), 0.0, 1.0 - np.einsum("ij,ij->i", ref, new) / product)
    if class_scores and len(shape) >= 1:
        top = _class_agreement(ref, new, count, shape[-1], top_k)
    diff = np.subtract(new, ref, out=new)  # `new` is not needed any more: reuse its memory
    rel_l2 = np.sqrt(np.einsum("ij,ij->i", diff, diff)) / np.maximum(ref_norm, _EPS)
    diff = np.abs(diff, out=diff)
    max_abs = diff.max(axis=1)
    mean_abs = diff.sum(axis=1) / size
    # Differences all within atol pass whatever rtol says; NaN fails: comparisons with NaN are False.
    within = max_abs <= atol
    if not within.all():
        rest = ~within
        within[rest] = (diff[rest] <= atol + rtol * np.abs(ref[rest])).all(axis=1)
    columns = [max_abs.tolist(), mean_abs.tolist(), rel_l2.tolist(), cosine.tolist(), within.tolist()]
    if class_scores and len(shape) >= 1:
        columns += top
    return [OutputDivergence(*row) for row in zip(*columns)]


def _equality(legacy: np.ndarray, candidate: np.ndarray) -> OutputDivergence:
    """BYTES outputs match only when equal element by element: max_abs is 1 when any element differs,
    mean_abs the share that differ; rel_l2 and cosine mean nothing for them (NaN, never exported)."""
    differ = int(np.count_nonzero(legacy != candidate))
    return OutputDivergence(float(differ > 0), differ / legacy.size, math.nan, math.nan, differ == 0)


def _class_agreement(ref: np.ndarray, new: np.ndarray, count: int, classes: int, top_k: int) -> list[list]:
    """Top-1 agreements, rows and top-k overlap per tensor, over rows of `classes` scores."""
    rows = ref.shape[1] // classes  # rows of class scores in one tensor
    ref_rows, new_rows = ref.reshape(count * rows, classes), new.reshape(count * rows, classes)
    agree = (ref_rows.argmax(axis=1) == new_rows.argmax(axis=1)).reshape(count, rows).sum(axis=1)
    k = min(top_k, classes)
    ref_top = ref_rows.argpartition(-k, axis=1)[:, -k:]
    new_top = new_rows.argpartition(-k, axis=1)[:, -k:]
    found = (ref_top[:, :, None] == new_top[:, None, :]).any(axis=2).reshape(count, rows * k)
    return [agree.tolist(), [rows] * count, (found.sum(axis=1) / (rows * k)).tolist()]


def _shape_problem(legacy: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray],
                   output_names: Sequence[str]) -> str:
    for name in output_names:
        ref, new = legacy.get(name), candidate.get(name)
        if new is None:
            return f"candidate did not return output {name!r}"
        if ref is None:
            return f"legacy did not return output {name!r}"
        if ref.shape != new.shape or ref.dtype != new.dtype:
            return f"output {name!r}: legacy {ref.dtype}{list(ref.shape)}, candidate {new.dtype}{list(new.shape)}"
    return ""


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
    return compare_many([(legacy, candidate)], output_names, class_score_outputs, atol, rtol, top_k)[0]


def compare_many(
    pairs: Sequence[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]]],
    output_names: Sequence[str],
    class_score_outputs: frozenset[str] = frozenset(),
    atol: float = 1e-5,
    rtol: float = 1e-4,
    top_k: int = 5,
) -> list[Comparison]:
    """`compare` of many (legacy, candidate) answer pairs; pairs of one output shape share numpy calls."""
    results: list[Comparison | None] = [None] * len(pairs)
    groups: dict[tuple, list[int]] = {}
    for index, (legacy, candidate) in enumerate(pairs):
        problem = _shape_problem(legacy, candidate, output_names)
        if problem:
            results[index] = Comparison(SHAPE_MISMATCH, {}, problem)
        else:
            groups.setdefault(tuple((legacy[n].shape, legacy[n].dtype) for n in output_names), []).append(index)
    for indices in groups.values():
        elements = sum(pairs[indices[0]][0][name].size for name in output_names)
        step = max(1, BATCH_ELEMENTS // max(elements, 1))  # stacked arrays stay small enough for the cache
        for start in range(0, len(indices), step):
            chunk = indices[start:start + step]
            measured = [
                divergences([pairs[i][0][name] for i in chunk], [pairs[i][1][name] for i in chunk],
                            atol, rtol, name in class_score_outputs, top_k)
                for name in output_names
            ]
            for index, outputs in zip(chunk, zip(*measured)):
                verdict = MATCH if all(out.within_tolerance for out in outputs) else MISMATCH
                results[index] = Comparison(verdict, dict(zip(output_names, outputs)))
    return results  # type: ignore[return-value]
