"""Comparisons after the reply: batched when nothing waits on them, at once when the guard does."""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Callable, Protocol

import numpy as np

from server.compare import MISMATCH, Comparison, compare_many
from server.config import ComparisonConfig, ModelPairConfig

Outputs = dict[str, np.ndarray]


class ComparedPair(Protocol):
    name: str
    config: ModelPairConfig
    output_names: tuple[str, ...]
    class_score_outputs: frozenset[str]


Item = tuple[ComparedPair, Outputs, Outputs, object]  # pair, legacy, candidate, context handed back to `record`


class ComparisonQueue:
    """Compares legacy/candidate answer pairs off the response path and hands each verdict to `record`.

    Small outputs wait up to `config.batch_s` and are compared together, since numpy's cost per call,
    not per element, dominates them. An `urgent` pair (an answer a client already got from the
    candidate, which the guard must judge) is compared at once, together with whatever waits.
    Outputs above `config.inline_max_elements` go to a thread so they never stall the loop.
    """

    def __init__(self, config: ComparisonConfig, max_queued: int,
                 record: Callable[[ComparedPair, Comparison, object], None]) -> None:
        self.config = config
        self.max_queued = max_queued
        self.queued = 0
        self._record = record
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compare")
        self._pending: list[Item] = []
        self._pending_elements = 0
        self._timer: asyncio.TimerHandle | None = None

    def submit(self, pair: ComparedPair, legacy: Outputs, candidate: Outputs, context: object = None,
               urgent: bool = False) -> bool:
        """Queue one comparison; False when the queue is full and it was skipped."""
        size = sum(array.size for array in legacy.values())
        if size > self.config.inline_max_elements:
            if self.queued >= self.max_queued:
                return False
            self.queued += 1
            future = asyncio.get_running_loop().run_in_executor(self._pool, compare_items, pair, [(legacy, candidate)])
            future.add_done_callback(lambda done: self._compared_in_thread(pair, context, done))
            return True
        if self._pending_elements + size > self.config.inline_max_elements or len(self._pending) >= self.config.batch_max:
            self.flush()
        self.queued += 1
        self._pending.append((pair, legacy, candidate, context))
        self._pending_elements += size
        if urgent or self.config.batch_s == 0:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.config.batch_s, self.flush)
        return True

    def flush(self) -> None:
        """Compare every waiting pair now: one set of numpy calls per model and shape."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending, self._pending_elements = self._pending, [], 0
        by_model: dict[str, tuple[ComparedPair, list[Item]]] = {}
        for item in pending:
            by_model.setdefault(item[0].name, (item[0], []))[1].append(item)
        for pair, items in by_model.values():
            comparisons = compare_items(pair, [(legacy, candidate) for _, legacy, candidate, _ in items])
            for (_, _, _, context), comparison in zip(items, comparisons):
                self._record(pair, comparison, context)
        self.queued -= len(pending)

    def _compared_in_thread(self, pair: ComparedPair, context: object, done: asyncio.Future) -> None:
        self.queued -= 1
        if not done.cancelled():
            self._record(pair, done.result()[0], context)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pool.shutdown(wait=False, cancel_futures=True)


def compare_items(pair: ComparedPair, items: list[tuple[Outputs, Outputs]]) -> list[Comparison]:
    config = pair.config
    try:
        return compare_many(items, pair.output_names, pair.class_score_outputs, config.atol, config.rtol, config.top_k)
    except Exception as exc:  # outputs numpy cannot compare are a mismatch, never a crash
        if len(items) > 1:  # find which: compare them one by one
            return [comparison for item in items for comparison in compare_items(pair, [item])]
        return [Comparison(MISMATCH, {}, f"outputs could not be compared: {type(exc).__name__}: {exc}")]
