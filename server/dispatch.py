"""The shadow core: route each request, answer from the serving side, compare off the response path.

Knows no framework: it sees backends only through `adapters.base.Backend`.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import mmap
import random
import time
from typing import Callable, Iterable

import numpy as np

from adapters.base import Backend
from server.breaker import CircuitBreaker
from server.compare import Comparison
from server.config import ModelPairConfig, ServerConfig, TensorConfig
from server.errors import (
    BackendError,
    BackendTimeout,
    ConfigError,
    ModelNotFound,
    ModelNotReady,
    ShadowServeError,
)
from server.loop_load import LoopLoad
from server.metrics import Metrics, ModelMetrics
from server.outcomes import ComparisonQueue
from server.tensors import InferRequest
from server.window import RecentWindow

log = logging.getLogger("shadowserve.dispatch")

ROUTING_BUCKETS = 10_000
# Above `server.shed_shadow_from_loop_busy` the share of shadow calls skipped grows with the loop's busy
# share, reaching all of them this far above it: a short excursion sheds a few, sustained saturation all.
SHED_RAMP = 0.1
Outputs = dict[str, np.ndarray]


def routing_bucket(key: str | None) -> int:
    """Stable bucket in [0, 10000) for a routing key: same key, same bucket, on every replica."""
    if not key:
        return random.randrange(ROUTING_BUCKETS)
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % ROUTING_BUCKETS


def stage_of(shadow_percent: float, serve_percent: float) -> str:
    if serve_percent >= 100:
        return "cutover"
    if serve_percent > 0:
        return "canary"
    return "shadow" if shadow_percent > 0 else "off"


class ModelPair:
    """A configured pair at run time: its backends, routing percentages, metrics and window.

    The percentages live in `routing`, a row of three floats (shadow, serve, rolled back). With
    several worker processes that row sits in memory shared by all of them, so a change made in
    one worker (by `ctl`, the file watcher or the guard) routes every worker's traffic at once.
    """

    def __init__(self, config: ModelPairConfig, legacy: Backend, candidate: Backend | None, metrics: ModelMetrics,
                 routing: np.ndarray | None = None):
        self.config = config
        self.name = config.name
        self.legacy = legacy
        self.candidate = candidate
        self.metrics = metrics
        self.window = RecentWindow(config.window)
        self.inputs: dict[str, TensorConfig] = {tensor.name: tensor for tensor in config.inputs}
        self.output_names = tuple(tensor.name for tensor in config.outputs)
        self.class_score_outputs = frozenset(t.name for t in config.outputs if t.class_scores)
        if routing is None:
            routing = initial_routing([config])[0]
        self.routing = routing
        self.metrics.stage(self.stage, self.shadow_percent, self.serve_percent)
        self.breaker = CircuitBreaker(config.circuit_breaker, self._circuit_changed)

    def _circuit_changed(self, is_open: bool) -> None:
        self.metrics.circuit_open.set(1 if is_open else 0)
        if is_open:
            log.warning("model %s: candidate failed %d times in a row; circuit open, candidate calls paused",
                        self.name, self.breaker.failures)
        else:
            log.info("model %s: candidate answered a probe call; circuit closed", self.name)

    @property
    def shadow_percent(self) -> float:
        return float(self.routing[0])

    @property
    def serve_percent(self) -> float:
        return float(self.routing[1])

    @property
    def stage(self) -> str:
        return "rolled_back" if self.routing[2] else stage_of(self.shadow_percent, self.serve_percent)

    def set_percentages(self, shadow_percent: float, serve_percent: float, rolled_back: bool = False) -> None:
        self.routing[:] = (shadow_percent, serve_percent, float(rolled_back))
        self.metrics.stage(self.stage, shadow_percent, serve_percent)

    @property
    def ready(self) -> bool:
        return self.legacy.ready


def initial_routing(models: Iterable[ModelPairConfig], shared: bool = False) -> np.ndarray:
    """Routing rows for `models`, in anonymous shared memory when worker processes will share them."""
    models = list(models)
    if shared:
        buffer = mmap.mmap(-1, max(1, len(models)) * 3 * 8)
        table = np.frombuffer(buffer, dtype=np.float64)[: len(models) * 3].reshape(len(models), 3)
    else:
        table = np.zeros((len(models), 3))
    for row, model in zip(table, models):
        row[:] = (model.shadow_percent, model.serve_percent, 0.0)
    return table


class Dispatcher:
    """Runs every request on the legacy side and, when routed, on the candidate side too."""

    def __init__(self, pairs: Iterable[ModelPair], server: ServerConfig, loop_load: LoopLoad | None = None) -> None:
        self.pairs: dict[str, ModelPair] = {pair.name: pair for pair in pairs}
        self.max_shadow_in_flight = server.max_shadow_in_flight
        self.shed_from_busy = server.shed_shadow_from_loop_busy if server.shed_shadow_from_loop_busy is not None else 1.0
        self.loop_load = loop_load if loop_load is not None else LoopLoad()
        self.compare_outputs = server.compare
        self.backend_retry_s = server.backend_retry_s
        self.shadow_in_flight = 0
        self.comparisons = ComparisonQueue(server.comparison, server.max_comparisons_queued, self._record)
        self._tasks: set[asyncio.Task] = set()
        self.comparison_listeners: list[Callable[[ModelPair, Comparison | None], None]] = []

    @classmethod
    def from_config(cls, models: Iterable[ModelPairConfig], server: ServerConfig, metrics: Metrics,
                    routing: np.ndarray | None = None) -> "Dispatcher":
        from adapters import create_backend

        models = list(models)
        routing = initial_routing(models) if routing is None else routing
        pairs = []
        for config, row in zip(models, routing):
            legacy = create_backend(config.legacy, config.inputs, config.outputs)
            candidate = create_backend(config.candidate, config.inputs, config.outputs) if config.candidate else None
            outputs = [tensor.name for tensor in config.outputs]
            scores = [tensor.name for tensor in config.outputs if tensor.class_scores]
            pairs.append(ModelPair(config, legacy, candidate, metrics.for_model(config.name, outputs, scores), row))
        return cls(pairs, server, LoopLoad(metrics.loop_busy.set))

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Load every backend. Broken model files stop start-up; unreachable remotes are retried."""
        self.loop_load.start()
        loads = []
        for pair in self.pairs.values():
            loads.append(self._load(pair, "legacy", pair.legacy))
            if pair.candidate is not None:
                loads.append(self._load(pair, "candidate", pair.candidate))
        await asyncio.gather(*loads)

    async def _load(self, pair: ModelPair, role: str, backend: Backend) -> None:
        try:
            await backend.load()
            log.info("model %s: %s backend loaded %s", pair.name, role, backend.describe())
        except ConfigError as exc:
            raise ConfigError(f"model {pair.name!r} {role}: {exc}") from exc
        except Exception as exc:
            log.warning("model %s: %s backend not ready (%s); retrying in the background", pair.name, role, exc)
            self._spawn(self._retry_load(pair, role, backend))

    async def _retry_load(self, pair: ModelPair, role: str, backend: Backend) -> None:
        delay = self.backend_retry_s
        while not backend.ready:
            await asyncio.sleep(delay)
            try:
                await backend.load()
                log.info("model %s: %s backend loaded %s", pair.name, role, backend.describe())
            except ConfigError as exc:  # reachable, but serving something the pair cannot use
                log.error("model %s: %s backend does not fit the configuration: %s", pair.name, role, exc)
                delay = 30.0
            except Exception as exc:
                log.warning("model %s: %s backend still not ready: %s", pair.name, role, exc)
                delay = min(delay * 2, 30.0)

    async def close(self) -> None:
        self.loop_load.stop()
        self.comparisons.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for pair in self.pairs.values():
            await pair.legacy.close()
            if pair.candidate is not None:
                await pair.candidate.close()

    def _spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- the request path ------------------------------------------------------------------

    def pair(self, name: str) -> ModelPair:
        try:
            return self.pairs[name]
        except KeyError:
            raise ModelNotFound(f"unknown model {name!r}; this gateway serves {sorted(self.pairs)}") from None

    async def infer(self, pair: ModelPair, request: InferRequest) -> Outputs:
        """The answer for `request`: the legacy's, or the candidate's for requests routed to it."""
        served_by = "legacy"
        try:
            if not pair.legacy.ready:
                raise ModelNotReady(f"model {pair.name!r} is not ready: its legacy backend is still loading")
            candidate = pair.candidate
            bucket = routing_bucket(request.routing_key or request.id)
            if candidate is not None and bucket < pair.serve_percent * 100:
                if not candidate.ready:
                    pair.metrics.fallback("not_ready")
                    outputs = await self._shadowed(pair, None, request, shadow=False)
                elif not pair.breaker.allow():
                    pair.metrics.fallback("circuit_open")
                    self._candidate_failed(pair)
                    outputs = await self._shadowed(pair, None, request, shadow=False)
                else:
                    outputs, served_by = await self._canary(pair, candidate, request)
            else:
                outputs = await self._shadowed(pair, candidate, request, shadow=bucket < pair.shadow_percent * 100)
        except ShadowServeError as exc:
            pair.metrics.request(exc.code.name, served_by)
            raise
        pair.metrics.request("OK", served_by)
        return outputs

    async def _shadowed(self, pair: ModelPair, candidate: Backend | None, request: InferRequest, shadow: bool) -> Outputs:
        shadow_call = self._start_shadow(pair, candidate, request) if shadow else None
        if not shadow and candidate is not None:
            pair.metrics.skipped["sampled_out"].inc()
        outputs = await self._call_legacy(pair, request)  # a legacy failure leaves nothing to compare
        if shadow_call is not None:
            shadow_call.add_done_callback(functools.partial(self._compare_after_shadow, pair, outputs))
        return outputs

    async def _canary(self, pair: ModelPair, candidate: Backend, request: InferRequest) -> tuple[Outputs, str]:
        """Answer from the candidate; the legacy runs beside it for comparison and as the fallback."""
        legacy_task = self._spawn(self._call_legacy(pair, request))
        try:
            outputs = await self._call(pair, candidate, "candidate", request.inputs, candidate.config.timeout_s)
            missing = [name for name in pair.output_names if name not in outputs]
            if missing:
                raise BackendError(f"candidate did not return output(s) {missing}")
        except ShadowServeError as exc:
            pair.metrics.fallback("timeout" if isinstance(exc, BackendTimeout) else "error")
            pair.breaker.failed()
            self._candidate_failed(pair)
            return await legacy_task, "legacy"
        pair.breaker.succeeded()
        legacy_task.add_done_callback(lambda task: self._compare_after_canary(pair, task, outputs))
        return outputs, "candidate"

    def _compare_after_canary(self, pair: ModelPair, legacy_task: asyncio.Task, candidate_outputs: Outputs) -> None:
        if not legacy_task.cancelled() and legacy_task.exception() is None:
            self._schedule_comparison(pair, legacy_task.result(), candidate_outputs, served=True)

    def _start_shadow(self, pair: ModelPair, candidate: Backend | None, request: InferRequest) -> asyncio.Task | None:
        """Start the candidate call now, as a task of its own; None when it is skipped (and counted)."""
        if candidate is None:
            return None
        if not candidate.ready:
            pair.metrics.skipped["error"].inc()
            return None
        if self.shadow_in_flight >= self.max_shadow_in_flight:
            pair.metrics.skipped["saturated"].inc()
            return None
        if self._overloaded():
            pair.metrics.skipped["overloaded"].inc()
            return None
        if not pair.breaker.allow():
            pair.metrics.skipped["circuit_open"].inc()
            self._candidate_failed(pair)
            return None
        self.shadow_in_flight += 1
        pair.metrics.in_flight.inc()
        return self._spawn(self._shadow(pair, candidate, request))

    def _overloaded(self) -> bool:
        """Whether to skip a shadow call for the primary's sake: the busier the loop, the likelier."""
        excess = self.loop_load.busy - self.shed_from_busy
        return excess > 0 and random.random() * SHED_RAMP < excess

    async def _shadow(self, pair: ModelPair, candidate: Backend, request: InferRequest) -> Outputs | None:
        """The candidate's outputs, or None when it failed (counted as a skip)."""
        try:
            await asyncio.sleep(0)  # let the legacy call, started right after this task, go out first
            outputs = await self._call(pair, candidate, "candidate", request.inputs, candidate.config.timeout_s)
        except ShadowServeError as exc:
            pair.metrics.skipped["timeout" if isinstance(exc, BackendTimeout) else "error"].inc()
            pair.breaker.failed()
            self._candidate_failed(pair)
            return None
        finally:
            self.shadow_in_flight -= 1
            pair.metrics.in_flight.dec()
        pair.breaker.succeeded()
        return outputs

    def _compare_after_shadow(self, pair: ModelPair, legacy_outputs: Outputs, shadow_call: asyncio.Task) -> None:
        if not shadow_call.cancelled() and (candidate_outputs := shadow_call.result()) is not None:
            self._schedule_comparison(pair, legacy_outputs, candidate_outputs, served=False)

    async def _call_legacy(self, pair: ModelPair, request: InferRequest) -> Outputs:
        timeout = pair.legacy.config.timeout_s
        if request.deadline_s is not None:
            timeout = min(timeout, max(request.deadline_s, 0.001))
        outputs = await self._call(pair, pair.legacy, "legacy", request.inputs, timeout)
        missing = [name for name in pair.output_names if name not in outputs]
        if missing:
            pair.metrics.backend_error("legacy", "INTERNAL")
            raise BackendError(f"legacy backend of {pair.name!r} did not return output(s) {missing}")
        return outputs

    async def _call(self, pair: ModelPair, backend: Backend, role: str, inputs: Outputs, timeout_s: float) -> Outputs:
        start = time.perf_counter()
        try:
            return await backend.infer(inputs, timeout_s)
        except ShadowServeError as exc:
            pair.metrics.backend_error(role, exc.code.name)
            raise
        except Exception as exc:  # an adapter bug must still be a counted, typed failure
            log.exception("model %s: %s backend raised", pair.name, role)
            pair.metrics.backend_error(role, "INTERNAL")
            raise BackendError(f"{role} backend failed: {type(exc).__name__}") from exc
        finally:
            elapsed = time.perf_counter() - start
            pair.metrics.latency[role].observe(elapsed)
            pair.window.latency(role, elapsed)

    # -- comparison, after the reply -------------------------------------------------------

    def _schedule_comparison(self, pair: ModelPair, legacy: Outputs, candidate: Outputs, served: bool) -> None:
        """`served`: the client got the candidate's answer, so the guard must judge it without delay."""
        if self.compare_outputs and not self.comparisons.submit(pair, legacy, candidate, urgent=served or pair.serve_percent > 0):
            pair.metrics.skipped["saturated"].inc()

    def _record(self, pair: ModelPair, comparison: Comparison, context: object = None) -> None:
        pair.metrics.comparison(comparison)
        pair.window.compared(comparison)
        if comparison.detail:
            log.debug("model %s: %s", pair.name, comparison.detail)
        self._notify(pair, comparison)

    def _candidate_failed(self, pair: ModelPair) -> None:
        pair.window.candidate_failed()
        self._notify(pair, None)

    def _notify(self, pair: ModelPair, comparison: Comparison | None) -> None:
        for listener in self.comparison_listeners:
            listener(pair, comparison)
