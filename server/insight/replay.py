"""`shadowserve replay`: captured inputs through the legacy and the candidate a config names, as a gate.

The outcome of each record is measured with the gateway's own comparison (`server.compare`) and
summarised like the demo; thresholds are the guard's (`GuardConfig`) names.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Sequence

import numpy as np

from server.capture import CapturedRecord
from server.compare import MATCH, Comparison, compare
from server.config import GuardConfig, ModelPairConfig
from server.insight.sources import loaded, timed_infer

ERROR = "error"  # the candidate failed on this record
LEGACY_ERROR = "legacy_error"  # the legacy failed: the record cannot be judged


@dataclasses.dataclass(frozen=True)
class RecordOutcome:
    id: str
    verdict: str  # match | mismatch | shape_mismatch | error | legacy_error
    max_abs: float | None = None
    top1: tuple[int, int] = (0, 0)
    legacy_s: float | None = None
    candidate_s: float | None = None
    legacy_drift: bool = False  # the replayed legacy answer differs from the captured one
    detail: str = ""
    flips: tuple[tuple[str, int, int], ...] = ()  # (output, legacy top-1, candidate top-1) of rows that differ


@dataclasses.dataclass(frozen=True)
class Thresholds:
    max_mismatch_rate: float | None = None
    min_top1_agreement: float | None = None
    max_error_rate: float | None = None
    max_p99_latency_s: float | None = None

    @classmethod
    def of_guard(cls, guard: GuardConfig | None) -> "Thresholds":
        return cls(**{field.name: getattr(guard, field.name) for field in dataclasses.fields(cls)}) if guard else cls()

    def given(self) -> bool:
        return any(value is not None for value in dataclasses.astuple(self))


@dataclasses.dataclass(frozen=True)
class ReplaySummary:
    records: int
    compared: int
    skipped: int  # not compared: a side failed
    errors: int  # candidate failures
    match_rate: float | None
    top1_agreement: float | None
    error_rate: float | None
    max_abs_p50: float | None
    max_abs_p99: float | None
    latency_p50: dict[str, float | None]
    latency_p99: dict[str, float | None]
    legacy_drift: int


def _percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def top1_flips(legacy: np.ndarray, candidate: np.ndarray) -> list[tuple[int, int]]:
    """(legacy top-1, candidate top-1) of every row of class scores whose top-1 differs."""
    classes = legacy.shape[-1]
    ref, new = legacy.reshape(-1, classes).argmax(axis=1), candidate.reshape(-1, classes).argmax(axis=1)
    return [(int(a), int(b)) for a, b in zip(ref, new) if a != b]


def judge(record_id: str, comparison: Comparison, legacy: dict[str, np.ndarray], candidate: dict[str, np.ndarray],
          class_scores: frozenset[str]) -> RecordOutcome:
    """The outcome of one compared record: verdict, worst max|d|, top-1 agreement and class flips."""
    flips = tuple((name, a, b) for name in sorted(class_scores & comparison.outputs.keys())
                  for a, b in top1_flips(legacy[name], candidate[name]))
    max_abs = max((out.max_abs for out in comparison.outputs.values()), default=None)
    return RecordOutcome(record_id, comparison.verdict, max_abs, comparison.top1, detail=comparison.detail, flips=flips)


async def replay(pair: ModelPairConfig, records: Sequence[CapturedRecord], atol: float, rtol: float) -> list[RecordOutcome]:
    """Run every record's inputs through the pair's real legacy and candidate backends, one after the other."""
    names = [output.name for output in pair.outputs]
    class_scores = frozenset(output.name for output in pair.outputs if output.class_scores)
    outcomes = []
    async with loaded(pair.legacy, pair) as legacy, loaded(pair.candidate, pair) as candidate:
        for record in records:
            tensors = record.load()
            legacy_out, legacy_s, legacy_error = await timed_infer(legacy, tensors.inputs)
            if legacy_out is None:
                outcomes.append(RecordOutcome(record.id, LEGACY_ERROR, legacy_s=legacy_s, detail=legacy_error))
                continue
            candidate_out, candidate_s, candidate_error = await timed_infer(candidate, tensors.inputs)
            drift = compare(tensors.legacy, legacy_out, names, frozenset(), atol, rtol).verdict != MATCH
            if candidate_out is None:
                outcome = RecordOutcome(record.id, ERROR, detail=candidate_error)
            else:
                comparison = compare(legacy_out, candidate_out, names, class_scores, atol, rtol, pair.top_k)
                outcome = judge(record.id, comparison, legacy_out, candidate_out, class_scores)
            outcomes.append(dataclasses.replace(outcome, legacy_s=legacy_s, candidate_s=candidate_s, legacy_drift=drift))
    return outcomes


def summarize(outcomes: Sequence[RecordOutcome]) -> ReplaySummary:
    judged = [o for o in outcomes if o.verdict != LEGACY_ERROR]
    compared = [o for o in judged if o.verdict != ERROR]
    errors = len(judged) - len(compared)
    top1_total = sum(o.top1[1] for o in compared)
    max_abs = [o.max_abs for o in compared if o.max_abs is not None]
    latency = {"legacy": [o.legacy_s for o in outcomes if o.legacy_s is not None],
               "candidate": [o.candidate_s for o in outcomes if o.candidate_s is not None]}
    return ReplaySummary(
        records=len(outcomes), compared=len(compared), skipped=len(outcomes) - len(compared), errors=errors,
        match_rate=sum(o.verdict == MATCH for o in compared) / len(compared) if compared else None,
        top1_agreement=sum(o.top1[0] for o in compared) / top1_total if top1_total else None,
        error_rate=errors / len(judged) if judged else None,
        max_abs_p50=_percentile(max_abs, 50), max_abs_p99=_percentile(max_abs, 99),
        latency_p50={role: _percentile(values, 50) for role, values in latency.items()},
        latency_p99={role: _percentile(values, 99) for role, values in latency.items()},
        legacy_drift=sum(o.legacy_drift for o in outcomes),
    )


def flip_counts(outcomes: Sequence[RecordOutcome]) -> dict[str, list[tuple[int, int, int]]]:
    """Per class-score output: (legacy top-1, candidate top-1, rows), the most frequent flips first."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for outcome in outcomes:
        for output, legacy, candidate in outcome.flips:
            counts[output][(legacy, candidate)] += 1
    return {output: [(a, b, n) for (a, b), n in sorted(c.items(), key=lambda item: (-item[1], item[0]))]
            for output, c in sorted(counts.items())}


def breaches(summary: ReplaySummary, thresholds: Thresholds) -> list[str]:
    """Each threshold the replay breaches, in words; empty when the candidate passes."""
    if summary.compared == 0:
        return [f"no record could be compared ({summary.records} replayed, {summary.errors} candidate errors)"]
    found = []
    mismatch_rate = 1 - summary.match_rate
    if thresholds.max_mismatch_rate is not None and mismatch_rate > thresholds.max_mismatch_rate:
        found.append(f"mismatch rate {_share(mismatch_rate)} above max_mismatch_rate {_share(thresholds.max_mismatch_rate)}")
    if (thresholds.min_top1_agreement is not None and summary.top1_agreement is not None
            and summary.top1_agreement < thresholds.min_top1_agreement):
        found.append(f"top-1 agreement {_share(summary.top1_agreement)} below min_top1_agreement "
                     f"{_share(thresholds.min_top1_agreement)}")
    if thresholds.max_error_rate is not None and summary.error_rate > thresholds.max_error_rate:
        found.append(f"candidate error rate {_share(summary.error_rate)} above max_error_rate "
                     f"{_share(thresholds.max_error_rate)}")
    p99 = summary.latency_p99["candidate"]
    if thresholds.max_p99_latency_s is not None and p99 is not None and p99 > thresholds.max_p99_latency_s:
        found.append(f"candidate p99 latency {p99 * 1000:.2f} ms above max_p99_latency_s "
                     f"{thresholds.max_p99_latency_s * 1000:.2f} ms")
    return found


def _share(value: float) -> str:
    return f"{value * 100:.1f}%"
