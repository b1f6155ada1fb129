"""`shadowserve diagnose`: try the classic Caffe/MXNet -> PyTorch migration bugs one at a time.

Each hypothesis is a transform that would undo a bug: on the candidate's input (channel order,
pixel scale, mean, layout) or on the outputs (softmax, class order, transposition). The captured
inputs run through the candidate with the input transforms applied; the captured legacy answers
are the reference. A hypothesis explains the divergence when its transform makes the candidate
match. Weight-level bugs no transform undoes are only recognised by their pattern.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from server.capture import CapturedRecord
from server.compare import MATCH, MISMATCH, SHAPE_MISMATCH, compare
from server.config import ModelPairConfig
from server.insight.sources import loaded, quiet_backend_errors, timed_infer

Tensors = dict[str, np.ndarray]
EXPLAINED_MISMATCH_RATE = 0.05  # at most this share left mismatching (and half the share before) explains it
SYSTEMATIC_MISMATCH_RATE = 0.25  # divergence on at least this share of records is systematic ...
SMALL_REL_L2 = 0.05  # ... and small while 90% of records stay under this rel_l2


@dataclasses.dataclass(frozen=True)
class Score:
    """How far the candidate is from the legacy over the records."""

    records: int
    mismatch_rate: float  # shape mismatches and candidate failures count as mismatches
    top1_agreement: float | None
    rel_l2_median: float | None  # of the worst output of each compared record


@dataclasses.dataclass(frozen=True)
class Hypothesis:
    name: str  # what is applied, e.g. "reverse the input channels"
    kind: str  # input | output
    meaning: str  # the bug it points at when it works
    apply: Callable  # input: Tensors -> Tensors; output: (legacy, candidate) -> (legacy, candidate)


@dataclasses.dataclass(frozen=True)
class Trial:
    name: str
    kind: str
    meaning: str
    after: Score | None  # None: the transform does not apply (the candidate failed with it)
    error: str = ""


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    model: str
    records: int
    captured_mismatches: int
    baseline: Score
    trials: list[Trial]  # best first
    best: Trial | None  # the trial that explains the divergence, if one does
    conclusion: str
    findings: list[str]  # patterns that point at bugs no transform undoes


def score(pair: ModelPairConfig, legacy: Sequence[Tensors], candidate: Sequence[Tensors | None]) -> Score:
    names = [output.name for output in pair.outputs]
    class_scores = frozenset(output.name for output in pair.outputs if output.class_scores)
    mismatches, agree, total, worst = 0, 0, 0, []
    for reference, answer in zip(legacy, candidate):
        if answer is None:
            mismatches += 1
            continue
        comparison = compare(reference, answer, names, class_scores, pair.atol, pair.rtol, pair.top_k)
        mismatches += comparison.verdict != MATCH
        if comparison.verdict != SHAPE_MISMATCH:
            agree, total = agree + comparison.top1[0], total + comparison.top1[1]
            worst.append(max(out.rel_l2 for out in comparison.outputs.values()))
    records = len(legacy)
    return Score(records, mismatches / records if records else 0.0, agree / total if total else None,
                 float(np.nanmedian(worst)) if worst and not np.isnan(worst).all() else None)


def _same_shape(legacy: Tensors, candidate: Tensors | None, name: str) -> bool:
    return candidate is not None and name in legacy and name in candidate and legacy[name].shape == candidate[name].shape


# -- hypotheses -------------------------------------------------------------------------------------

def _channel_axis(array: np.ndarray) -> int | None:
    """The colour axis of an image batch: 1 for NCHW, 3 for NHWC, None when it is not one."""
    if array.ndim != 4 or array.dtype.kind != "f":
        return None
    return 1 if array.shape[1] == 3 else 3 if array.shape[3] == 3 else None


def _each_image(inputs: Tensors, change: Callable[[np.ndarray, int], np.ndarray]) -> Tensors:
    changed = {}
    for name, array in inputs.items():
        axis = _channel_axis(array)
        changed[name] = change(array, axis) if axis is not None else array
    return changed


def _each_float(inputs: Tensors, change: Callable[[np.ndarray], np.ndarray]) -> Tensors:
    return {name: change(array).astype(array.dtype) if array.dtype.kind == "f" else array
            for name, array in inputs.items()}


def input_hypotheses(inputs: Sequence[Tensors]) -> list[Hypothesis]:
    """Transforms of the candidate's input that undo the classic preprocessing bugs."""
    images = [name for name, array in inputs[0].items() if _channel_axis(array) is not None]
    floats = [name for name, array in inputs[0].items() if array.dtype.kind == "f"]
    found: list[Hypothesis] = []
    if images:
        found.append(Hypothesis(
            "reverse the input channels", "input",
            "the port probably expects the other channel order (BGR where the legacy takes RGB, or the reverse)",
            lambda x: _each_image(x, lambda a, axis: np.flip(a, axis=axis).copy())))
        means = {name: np.mean([np.mean(x[name], axis=tuple(i for i in range(4) if i != _channel_axis(x[name])))
                                for x in inputs], axis=0) for name in images}
        found.append(Hypothesis(
            "subtract the per-channel input mean", "input",
            "the port probably expects mean-subtracted input where the legacy subtracts the mean itself "
            "(mean estimated from the captured inputs)",
            lambda x: {name: (a - means[name].reshape([-1 if i == _channel_axis(a) else 1 for i in range(4)])
                              ).astype(a.dtype) if name in means else a for name, a in x.items()}))
        found.append(Hypothesis(
            "transpose the input NCHW <-> NHWC", "input",
            "the port probably expects the other layout (NHWC where the legacy takes NCHW, or the reverse)",
            lambda x: _each_image(x, lambda a, axis: np.ascontiguousarray(
                a.transpose(0, 2, 3, 1) if axis == 1 else a.transpose(0, 3, 1, 2)))))
    if floats:
        found.append(Hypothesis(
            "multiply the input by 255", "input",
            "the port probably expects pixels in 0-255 where the legacy takes 0-1",
            lambda x: _each_float(x, lambda a: a * 255.0)))
        found.append(Hypothesis(
            "divide the input by 255", "input",
            "the port probably expects pixels in 0-1 where the legacy takes 0-255",
            lambda x: _each_float(x, lambda a: a / 255.0)))
    return found


def softmax(array: np.ndarray) -> np.ndarray:
    shifted = array.astype(np.float64) - array.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=-1, keepdims=True)).astype(array.dtype)


def _on(name: str, side: int, change: Callable[[np.ndarray], np.ndarray]) -> Callable:
    def apply(legacy: Tensors, candidate: Tensors) -> tuple[Tensors, Tensors]:
        pair = [dict(legacy), dict(candidate)]
        if name in pair[side]:
            pair[side][name] = change(pair[side][name])
        return pair[0], pair[1]
    return apply


def class_permutation(legacy: np.ndarray, candidate: np.ndarray) -> np.ndarray | None:
    """The candidate column each legacy class correlates with best, when that is a permutation."""
    classes = legacy.shape[-1]
    ref, new = legacy.reshape(-1, classes).astype(np.float64), candidate.reshape(-1, classes).astype(np.float64)
    if len(ref) < 2 * classes or not (np.isfinite(ref).all() and np.isfinite(new).all()):
        return None
    ref_std, new_std = ref.std(axis=0), new.std(axis=0)
    if (ref_std == 0).any() or (new_std == 0).any():
        return None
    correlation = ((ref - ref.mean(axis=0)) / ref_std).T @ ((new - new.mean(axis=0)) / new_std)
    permutation = correlation.argmax(axis=1)
    return permutation if sorted(permutation) == list(range(classes)) else None


def output_hypotheses(pair: ModelPairConfig, legacy: Sequence[Tensors], candidate: Sequence[Tensors | None]) -> list[Hypothesis]:
    """Transforms of the answers that undo the classic output bugs, per output that holds scores."""
    answered = [(ref, new) for ref, new in zip(legacy, candidate) if new is not None]
    found: list[Hypothesis] = []
    for output in pair.outputs:
        name = output.name
        shapes = [(ref[name].shape, new[name].shape) for ref, new in answered if name in ref and name in new]
        if not shapes or len(shapes[0][0]) < 2 or shapes[0][0][-1] < 2:
            continue
        found.append(Hypothesis(
            f"softmax over the candidate's {name!r}", "output",
            "the port returns logits where the legacy returns probabilities (softmax missing)",
            _on(name, 1, softmax)))
        found.append(Hypothesis(
            f"softmax over the legacy's {name!r} too", "output",
            "the port applies a softmax the legacy does not (probabilities where the legacy returns logits)",
            _on(name, 0, softmax)))
        if any(len(a) == 2 and b == a[::-1] and a != b for a, b in shapes):
            found.append(Hypothesis(
                f"transpose the candidate's {name!r}", "output",
                "the port returns this output transposed (classes first)",
                _on(name, 1, lambda a: np.ascontiguousarray(a.T) if a.ndim == 2 else a)))
        same = [(ref[name], new[name]) for ref, new in answered if _same_shape(ref, new, name)]
        if output.class_scores and same:
            permutation = class_permutation(np.concatenate([ref for ref, _ in same]),
                                            np.concatenate([new for _, new in same]))
            if permutation is not None and (permutation != np.arange(len(permutation))).any():
                moved = ", ".join(f"{i}->{j}" for i, j in enumerate(permutation) if i != j)
                found.append(Hypothesis(
                    f"reorder the candidate's classes of {name!r} ({moved})", "output",
                    f"the port's classes are in another order (legacy class -> port class: {moved})",
                    _on(name, 1, lambda a, p=permutation: np.ascontiguousarray(a[..., p]))))
    return found


# -- patterns of bugs no transform undoes -----------------------------------------------------------

def rel_l2(legacy: np.ndarray, candidate: np.ndarray) -> float:
    """|candidate - legacy| / |legacy| in float64, whatever the two dtypes."""
    ref, new = legacy.astype(np.float64), candidate.astype(np.float64)
    return float(np.linalg.norm(new - ref) / max(np.linalg.norm(ref), 1e-12))


def precision_finding(legacy: Sequence[Tensors], candidate: Sequence[Tensors | None]) -> str | None:
    """inf/NaN in the candidate's answers where the legacy's are finite: the mark of fp16 overflow."""
    hit, half = 0, False
    largest = 0.0
    for ref, new in zip(legacy, candidate):
        if new is None:
            continue
        bad = False
        for name, array in new.items():
            if name not in ref or ref[name].shape != array.shape or array.dtype.kind != "f":
                continue
            half |= array.dtype == np.float16
            broken = ~np.isfinite(array) & np.isfinite(ref[name])
            if broken.any():
                bad = True
                largest = max(largest, float(np.abs(ref[name][broken]).max()))
        hit += bad
    if not hit:
        return None
    answered = sum(new is not None for new in candidate)
    return (f"precision: the candidate returns inf/NaN in {hit} of {answered} records where the legacy's values are "
            f"finite (largest legacy |value| there {largest:.3g}){'; its outputs are float16' if half else ''}: "
            "fp16 overflow suspected (fp16 tops out at 65504); run the overflowing layers in fp32 or rescale them")


def spatial_finding(pair: ModelPairConfig, legacy: Sequence[Tensors], candidate: Sequence[Tensors | None]) -> str | None:
    """Outputs whose spatial size differs: pooling rounding, padding or stride."""
    for output in pair.outputs:
        for ref, new in zip(legacy, candidate):
            if new is None or output.name not in ref or output.name not in new:
                continue
            a, b = ref[output.name].shape, new[output.name].shape
            if len(a) == len(b) >= 3 and a[:2] == b[:2] and a[2:] != b[2:]:
                size = lambda shape: "x".join(map(str, shape[2:]))  # noqa: E731
                return (f"spatial size differs on output {output.name!r}: legacy {size(a)}, candidate {size(b)}: "
                        "points at pooling rounding (Caffe pools with ceil, PyTorch with floor unless ceil_mode=True), "
                        "padding or stride")
    return None


def depth_finding(pair: ModelPairConfig, legacy: Sequence[Tensors], candidate: Sequence[Tensors | None]) -> str | None:
    """Divergence growing along the declared outputs, when several intermediate ones are exposed."""
    if len(pair.outputs) < 2:
        return None
    medians = []
    for output in pair.outputs:
        values = [rel_l2(ref[output.name], new[output.name]) for ref, new in zip(legacy, candidate)
                  if _same_shape(ref, new, output.name)]
        if not values:
            return None
        medians.append(float(np.nanmedian(values)))
    if all(a < b for a, b in zip(medians, medians[1:])) and medians[-1] > 10 * max(medians[0], 1e-12):
        path = " -> ".join(f"{o.name} ({m:.1e})" for o, m in zip(pair.outputs, medians))
        return (f"divergence grows along the declared outputs: {path} (median rel_l2); if they are in depth order, "
                "the layers where it first jumps hold the bug (weights, flatten order, BatchNorm epsilon, LRN)")
    return None


def systematic_finding(baseline: Score, worst_rel_l2: Sequence[float]) -> str | None:
    """Small divergence on many records, top-1 intact: numerics inside the model, not a transform."""
    finite = [value for value in worst_rel_l2 if np.isfinite(value)]
    if baseline.mismatch_rate < SYSTEMATIC_MISMATCH_RATE or not finite:
        return None
    median, high = float(np.median(finite)), float(np.percentile(finite, 90))
    if high >= SMALL_REL_L2 or (baseline.top1_agreement is not None and baseline.top1_agreement < 0.95):
        return None
    return (f"small but systematic divergence: {baseline.mismatch_rate:.0%} of records mismatch, rel_l2 median "
            f"{median:.1e}, 90th percentile {high:.1e}, top-1 agreement "
            f"{'-' if baseline.top1_agreement is None else f'{baseline.top1_agreement:.0%}'}: points at numerics "
            "inside the model (BatchNorm epsilon, LRN parameters, reduced precision, a slightly different weight "
            "conversion), not at an input or output transform; if the candidate is right, widen atol/rtol "
            "(`shadowserve suggest-tolerances`)")


# -- the diagnosis ----------------------------------------------------------------------------------

def _change(before: Score, after: Score) -> str:
    parts = [f"mismatch rate {before.mismatch_rate:.0%} -> {after.mismatch_rate:.0%}"]
    if before.top1_agreement is not None and after.top1_agreement not in (None, before.top1_agreement):
        parts.append(f"top-1 agreement {before.top1_agreement:.0%} -> {after.top1_agreement:.0%}")
    return ", ".join(parts)


def _explains(before: Score, after: Score) -> bool:
    return after.mismatch_rate <= min(EXPLAINED_MISMATCH_RATE, before.mismatch_rate / 2)


def _helps(before: Score, after: Score) -> bool:
    fell = before.rel_l2_median is not None and after.rel_l2_median is not None and \
        after.rel_l2_median <= before.rel_l2_median / 10
    return after.mismatch_rate <= before.mismatch_rate / 2 or fell


def _rank(trial: Trial) -> tuple:
    if trial.after is None:
        return (1, 0.0, 0.0)
    return (0, trial.after.mismatch_rate, trial.after.rel_l2_median if trial.after.rel_l2_median is not None else np.inf)


def diagnose(pair: ModelPairConfig, legacy: Sequence[Tensors], baseline: Sequence[Tensors | None],
             input_trials: Sequence[tuple[Hypothesis, Sequence[Tensors | None], str]],
             captured_mismatches: int) -> Diagnosis:
    """Score every hypothesis against the captured legacy answers and name the one that explains the divergence.

    `baseline` holds the candidate's answers to the captured inputs; `input_trials` its answers with
    each input transform applied (none, and the error, when the candidate rejected the transformed input).
    """
    before = score(pair, legacy, baseline)
    records = len(legacy)
    if before.mismatch_rate == 0:
        conclusion = f"no bug found: the candidate matches the legacy on all {records} captured records"
        return Diagnosis(pair.name, records, captured_mismatches, before, [], None, conclusion, [])
    trials = [Trial(h.name, h.kind, h.meaning, None if error else score(pair, legacy, answers), error)
              for h, answers, error in input_trials]
    for hypothesis in output_hypotheses(pair, legacy, baseline):
        changed = [hypothesis.apply(ref, new) if new is not None else (ref, None) for ref, new in zip(legacy, baseline)]
        trials.append(Trial(hypothesis.name, hypothesis.kind, hypothesis.meaning,
                            score(pair, [ref for ref, _ in changed], [new for _, new in changed])))
    trials.sort(key=_rank)
    best = trials[0] if trials and trials[0].after is not None and _explains(before, trials[0].after) else None
    findings = [finding for finding in [precision_finding(legacy, baseline)] if finding]
    if best is not None:
        conclusion = f"likely bug: {_change(before, best.after)} when applying: {best.name}: {best.meaning}"
    else:
        helpful = [trial for trial in trials if trial.after is not None and _helps(before, trial.after)]
        worst = [max(rel_l2(ref[o.name], new[o.name]) for o in pair.outputs) for ref, new in zip(legacy, baseline)
                 if all(_same_shape(ref, new, o.name) for o in pair.outputs)]
        findings += [finding for finding in (spatial_finding(pair, legacy, baseline), depth_finding(pair, legacy, baseline),
                                             systematic_finding(before, worst)) if finding]
        if helpful:
            conclusion = (f"partly explained: {_change(before, helpful[0].after)} when applying: {helpful[0].name}: "
                          f"{helpful[0].meaning}; something else remains")
        else:
            conclusion = "no input or output transform explains the divergence"
        if not findings:
            findings.append("the pattern points at no single cause: weight-level bugs (transposed or misordered "
                            "fully-connected weights, flatten order) are likely, but these captures cannot tell which")
    return Diagnosis(pair.name, records, captured_mismatches, before, trials, best, conclusion, findings)


async def run_diagnosis(pair: ModelPairConfig, records: Sequence[CapturedRecord]) -> Diagnosis:
    """Load the pair's candidate, answer the captured inputs plain and under each input transform, diagnose."""
    tensors = [record.load() for record in records]
    inputs = [t.inputs for t in tensors]
    async with loaded(pair.candidate, pair) as candidate:
        baseline = [(await timed_infer(candidate, x))[0] for x in inputs]
        input_trials = []
        with quiet_backend_errors():
            for hypothesis in input_hypotheses(inputs):
                first, _, error = await timed_infer(candidate, hypothesis.apply(inputs[0]))
                if first is None:  # a transform the candidate rejects outright does not apply
                    input_trials.append((hypothesis, [], f"the candidate fails on it: {error}"))
                    continue
                rest = [(await timed_infer(candidate, hypothesis.apply(x)))[0] for x in inputs[1:]]
                input_trials.append((hypothesis, [first, *rest], ""))
    mismatches = sum(record.verdict in (MISMATCH, SHAPE_MISMATCH) for record in records)
    return diagnose(pair, [t.legacy for t in tensors], baseline, input_trials, mismatches)
