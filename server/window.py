"""A sliding window over recent shadowed requests: what `ctl status`, the demo and the guard judge."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from server.compare import MATCH, Comparison


@dataclasses.dataclass(frozen=True)
class WindowSummary:
    samples: int  # shadowed requests in the window (compared, failed or timed out)
    compared: int
    match_rate: float | None
    top1_agreement: float | None
    error_rate: float | None  # candidate errors and timeouts over samples
    latency_p50: dict[str, float | None]
    latency_p99: dict[str, float | None]
    max_abs_p50: float | None
    max_abs_p99: float | None


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _tail(values: collections.deque, last: int | None) -> list:
    items = list(values)
    return items[-last:] if last else items


class RecentWindow:
    """Bounded record of the last `size` shadow outcomes and backend latencies of one pair."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.outcomes_seen = 0  # ever recorded, so a judge can look only at outcomes after a change
        self._outcomes: collections.deque[str] = collections.deque(maxlen=size)  # verdict | "error"
        self._top1: collections.deque[tuple[int, int]] = collections.deque(maxlen=size)
        self._max_abs: collections.deque[float] = collections.deque(maxlen=size)
        self._latency = {role: collections.deque(maxlen=size) for role in ("legacy", "candidate")}

    def clear(self) -> None:
        for queue in (self._outcomes, self._top1, self._max_abs, *self._latency.values()):
            queue.clear()

    def latency(self, role: str, seconds: float) -> None:
        self._latency[role].append(seconds)

    def candidate_failed(self) -> None:
        self.outcomes_seen += 1
        self._outcomes.append("error")

    def compared(self, comparison: Comparison) -> None:
        self.outcomes_seen += 1
        self._outcomes.append(comparison.verdict)
        agree, total = comparison.top1
        if total:
            self._top1.append((agree, total))
        if comparison.outputs:
            self._max_abs.append(max(out.max_abs for out in comparison.outputs.values()))

    def summary(self, last: int | None = None) -> WindowSummary:
        """Rates and percentiles over the whole window, or over its `last` entries."""
        outcomes = _tail(self._outcomes, last)
        errors = outcomes.count("error")
        compared = len(outcomes) - errors
        top1 = _tail(self._top1, last)
        top1_total = sum(total for _, total in top1)
        latency = {role: _tail(values, last) for role, values in self._latency.items()}
        max_abs = _tail(self._max_abs, last)
        return WindowSummary(
            samples=len(outcomes),
            compared=compared,
            match_rate=outcomes.count(MATCH) / compared if compared else None,
            top1_agreement=sum(agree for agree, _ in top1) / top1_total if top1_total else None,
            error_rate=errors / len(outcomes) if outcomes else None,
            latency_p50={role: _percentile(values, 50) for role, values in latency.items()},
            latency_p99={role: _percentile(values, 99) for role, values in latency.items()},
            max_abs_p50=_percentile(max_abs, 50),
            max_abs_p99=_percentile(max_abs, 99),
        )
