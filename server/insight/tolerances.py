"""`shadowserve suggest-tolerances`: atol/rtol per output from control samples and a false-alarm rate.

A record matches when every element satisfies |candidate - legacy| <= atol + rtol * |legacy|
(`server.compare`). atol alone is set to the (1 - rate) quantile, over the control records, of
each record's largest difference: on its own it keeps false alarms on the controls at or below
`rate`. rtol is the same quantile of each record's largest relative difference among its
significant elements (at least 1% of the record's largest magnitude); it only loosens the check,
for answers larger than the controls held, where float error grows with the values.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

SIGNIFICANT = 0.01  # share of a record's largest magnitude above which relative differences count


@dataclasses.dataclass(frozen=True)
class Suggestion:
    output: str
    samples: int  # control records used (records with non-finite values are left out)
    atol: float
    rtol: float
    false_alarm_rate: float  # share of the controls that would mismatch under (atol, rtol)
    resolvable: bool  # enough samples to resolve the asked rate (at least 1 / rate)


def suggest(output: str, legacy: Sequence[np.ndarray], candidate: Sequence[np.ndarray], rate: float) -> Suggestion:
    """atol and rtol for one output from pairs of answers that should count as matches."""
    pairs = [(a.astype(np.float64).ravel(), b.astype(np.float64).ravel()) for a, b in zip(legacy, candidate)
             if a.shape == b.shape and a.size and np.isfinite(a).all() and np.isfinite(b).all()]
    if not pairs:
        return Suggestion(output, 0, 0.0, 0.0, 0.0, False)
    worst_abs, worst_rel = [], []
    for ref, new in pairs:
        diff, size = np.abs(new - ref), np.abs(ref)
        significant = size >= SIGNIFICANT * size.max() if size.max() > 0 else np.zeros(size.shape, bool)
        worst_abs.append(float(diff.max()))
        worst_rel.append(float((diff[significant] / size[significant]).max()) if significant.any() else 0.0)
    atol = float(np.quantile(worst_abs, 1 - rate, method="higher"))
    rtol = float(np.quantile(worst_rel, 1 - rate, method="higher"))
    alarms = sum(not (np.abs(new - ref) <= atol + rtol * np.abs(ref)).all() for ref, new in pairs)
    return Suggestion(output, len(pairs), atol, rtol, alarms / len(pairs), len(pairs) * rate >= 1)
