"""The primary path: route each request, answer from the serving side, hand the rest to the shadow engine.

Knows no framework: it sees backends only through `adapters.base.Backend`. Shadow calls, comparisons
and verdicts happen in the shadow engine process (`server/engine.py`); a primary only copies what the
engine needs into shared memory (`server/handoff.py`) and never waits for it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
import time
from typing import Iterable

import grpc
import numpy as np

from adapters.base import Backend
from server.config import ModelPairConfig, ServerConfig, TensorConfig
from server.errors import BackendError, BackendTimeout, ModelNotFound, ModelNotReady, ShadowServeError
from server.handoff import SERVED, SERVED_FAILED, SHADOW_CALL, HandoffWriter, Route, Routed
from server.loading import Loader
from server.loop_load import LoopLoad
from server.metrics import Metrics, ModelMetrics
from server.tensors import InferRequest

log = logging.getLogger("shadowserve.dispatch")

ROUTING_BUCKETS = 10_000
# Above `server.shed_shadow_from_loop_busy` the share of hand-offs skipped grows with the loop's busy
# share, reaching all of them this far above it: a short excursion sheds a few, sustained saturation all.
SHED_RAMP = 0.1
# Legacy calls answered UNAVAILABLE in a row before the model turns not ready; one answer turns it ready again.
LEGACY_DOWN_AFTER = 3
Outputs = dict[str, np.ndarray]


def routing_bucket(key: str | None) -> int:
    """Stable bucket in [0, 10000) for a routing key: same key, same bucket, on every replica."""
    if not key:
        return random.randrange(ROUTING_BUCKETS)
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % ROUTING_BUCKETS


class ModelPair(Routed):
    """A configured pair in a primary: its legacy backend, the candidate it may serve from, its routing row."""

    def __init__(self, index: int, config: ModelPairConfig, legacy: Backend, candidate: Backend | None,
                 metrics: ModelMetrics, route: Route):
        self.index = index
        self.config = config
        self.name = config.name
        self.legacy = legacy
        self.candidate = candidate  # an in-process one is reached through the shadow engine
        self.has_candidate = config.candidate is not None
        self.metrics = metrics
        self.route = route
        self.inputs: dict[str, TensorConfig] = {tensor.name: tensor for tensor in config.inputs}
        self.output_names = tuple(tensor.name for tensor in config.outputs)
        self._legacy_unanswered = 0

    @property
    def ready(self) -> bool:
        return self.legacy.ready and self.legacy_up

    @property
    def legacy_up(self) -> bool:
        return self._legacy_unanswered < LEGACY_DOWN_AFTER

    def legacy_answered(self, answered: bool, conclusive: bool = False) -> None:
        """A legacy call or probe came back; `conclusive` failures (a probe) turn it down at once."""
        was_up = self.legacy_up
        if answered:
            self._legacy_unanswered = 0
        else:
            self._legacy_unanswered = LEGACY_DOWN_AFTER if conclusive else self._legacy_unanswered + 1
        if self.legacy_up != was_up:
            log.warning("model %s: legacy backend %s", self.name,
                        "answers again; ready" if self.legacy_up else "does not answer; not ready until it does")
            self.metrics.set_legacy_up(self.legacy_up)

    def candidate_facts(self) -> dict[str, str] | None:
        """What operators may read about the candidate (an in-process one runs in the engine: its runtime)."""
        from adapters import IN_PROCESS_RUNTIMES

        if self.config.candidate is None:
            return None
        if self.config.candidate.runtime in IN_PROCESS_RUNTIMES:
            return {"runtime": self.config.candidate.runtime}
        return self.candidate.describe() if self.candidate is not None else None


class Dispatcher:
    """Runs every request on the legacy side, or on the candidate for requests routed to it."""

    def __init__(self, pairs: Iterable[ModelPair], server: ServerConfig, handoff: HandoffWriter | None = None,
                 loop_load: LoopLoad | None = None) -> None:
        self.pairs: dict[str, ModelPair] = {pair.name: pair for pair in pairs}
        self.handoff = handoff
        self.shed_from_busy = server.shed_shadow_from_loop_busy if server.shed_shadow_from_loop_busy is not None else 1.0
        self.loop_load = loop_load if loop_load is not None else LoopLoad()
        self.loader = Loader(server.backend_retry_s)
        self.legacy_probe_s = server.legacy_probe_s
        self.max_unjudged_served = server.max_unjudged_served
        self._tasks: set[asyncio.Task] = set()

    @classmethod
    def from_config(cls, models: Iterable[ModelPairConfig], server: ServerConfig, metrics: Metrics,
                    routes: list[Route], handoff: HandoffWriter | None, engine_address: str = "") -> "Dispatcher":
        from adapters import create_backend, primary_candidate

        pairs = []
        for index, (config, route) in enumerate(zip(models, routes)):
            legacy = create_backend(config.legacy, config.inputs, config.outputs)
            candidate = None
            if config.candidate is not None:
                candidate = primary_candidate(config.candidate, config.inputs, config.outputs, config.name, engine_address)
            outputs = [tensor.name for tensor in config.outputs]
            scores = [tensor.name for tensor in config.outputs if tensor.class_scores]
            pairs.append(ModelPair(index, config, legacy, candidate, metrics.for_model(config.name, outputs, scores), route))
        return cls(pairs, server, handoff, LoopLoad(metrics.loop_busy.set))

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Load every backend. Broken legacy model files stop start-up; anything else is retried."""
        self.loop_load.start()
        loads = []
        for pair in self.pairs.values():
            loads.append(self.loader.load(pair.name, "legacy", pair.legacy, required=True))
            if pair.candidate is not None:
                loads.append(self.loader.load(pair.name, "candidate", pair.candidate, required=False))
        await asyncio.gather(*loads)
        for pair in self.pairs.values():
            pair.metrics.set_legacy_up(True)
            self._spawn(self._watch_legacy(pair))

    async def _watch_legacy(self, pair: ModelPair) -> None:
        """Probe the legacy between requests, so readiness follows it even without traffic."""
        while True:
            await asyncio.sleep(self.legacy_probe_s)
            if pair.legacy.ready:
                pair.legacy_answered(await pair.legacy.probe(), conclusive=True)

    async def close(self) -> None:
        self.loop_load.stop()
        await self.loader.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for pair in self.pairs.values():
            await pair.legacy.close()
            if pair.candidate is not None:
                await pair.candidate.close()

    @property
    def ready(self) -> bool:
        """The server is ready while any of its models can serve."""
        return any(pair.ready for pair in self.pairs.values())

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
        start = time.perf_counter()
        try:
            if not pair.legacy.ready:
                raise ModelNotReady(f"model {pair.name!r} is not ready: its legacy backend is still loading")
            bucket = routing_bucket(request.routing_key or request.id)
            shadow = bucket < pair.shadow_percent * 100
            if pair.has_candidate and bucket < pair.serve_percent * 100:
                outputs, served_by = await self._canary(pair, request, shadow)
            else:
                outputs = await self._shadowed(pair, request, shadow)
        except ShadowServeError as exc:
            pair.metrics.request(exc.code.name, served_by)
            raise
        except asyncio.CancelledError:  # the RPC ended unanswered: its deadline passed, or its client cancelled it
            expired = request.deadline_s is not None and time.perf_counter() - start >= request.deadline_s
            pair.metrics.request("DEADLINE_EXCEEDED" if expired else "CANCELLED", served_by)
            raise
        pair.metrics.request("OK", served_by)
        return outputs

    async def _shadowed(self, pair: ModelPair, request: InferRequest, shadow: bool) -> Outputs:
        if not shadow and pair.has_candidate:
            pair.metrics.skipped["sampled_out"].inc()
        outputs, elapsed = await self._call_legacy(pair, request)  # a legacy failure leaves nothing to compare
        if shadow:
            self._hand_over(pair, SHADOW_CALL, request, (request.inputs, outputs), legacy_s=elapsed)
        return outputs

    async def _canary(self, pair: ModelPair, request: InferRequest, shadow: bool) -> tuple[Outputs, str]:
        """Answer from the candidate; the legacy runs beside it for comparison and as the fallback."""
        candidate = pair.candidate
        if candidate is None or not candidate.ready:
            return await self._fall_back(pair, request, "not_ready")
        if pair.route.circuit_open:
            return await self._fall_back(pair, request, "circuit_open")
        if self.handoff is not None and self.handoff.ring.unjudged >= self.max_unjudged_served:
            pair.metrics.fallback("unjudged")  # still shadowed: the engine judges it once it catches up
            return await self._shadowed(pair, request, shadow), "legacy"
        legacy_call = self._spawn(self._call_legacy(pair, request))
        start = time.perf_counter()
        try:
            outputs = await self._call(pair, candidate, "candidate", request.inputs, candidate.config.timeout_s)
            missing = [name for name in pair.output_names if name not in outputs]
            if missing:
                raise BackendError(f"candidate did not return output(s) {missing}")
        except ShadowServeError as exc:
            reason = "timeout" if isinstance(exc, BackendTimeout) else "error"
            pair.metrics.fallback(reason)
            self._hand_over(pair, SERVED_FAILED, request, (), reason=reason, candidate_s=time.perf_counter() - start)
            return (await legacy_call)[0], "legacy"
        candidate_s = time.perf_counter() - start
        if self.handoff is not None:
            self.handoff.ring.served()
        legacy_call.add_done_callback(lambda done: self._served(pair, request, done, outputs, candidate_s))
        return outputs, "candidate"

    async def _fall_back(self, pair: ModelPair, request: InferRequest, reason: str) -> tuple[Outputs, str]:
        pair.metrics.fallback(reason)
        if reason == "circuit_open":  # the guard counts it as the candidate failure it stands for
            self._hand_over(pair, SERVED_FAILED, request, (), reason=reason)
        return (await self._call_legacy(pair, request))[0], "legacy"

    def _served(self, pair: ModelPair, request: InferRequest, legacy_call: asyncio.Task, candidate: Outputs,
                candidate_s: float) -> None:
        handed_over = False
        if not legacy_call.cancelled() and legacy_call.exception() is None:
            legacy, legacy_s = legacy_call.result()
            handed_over = self._hand_over(pair, SERVED, request, (request.inputs, legacy, candidate), legacy_s=legacy_s,
                                          candidate_s=candidate_s)
        if not handed_over and self.handoff is not None:
            self.handoff.ring.served(-1)

    def _hand_over(self, pair: ModelPair, kind: int, request: InferRequest, groups: tuple[Outputs, ...],
                   reason: str = "", legacy_s: float = math.nan, candidate_s: float = math.nan) -> bool:
        """Give the engine what it needs; skipped and counted (False) when it cannot take it now."""
        if self.handoff is None:
            return False
        if kind == SHADOW_CALL and self._overloaded():
            pair.metrics.skipped["overloaded"].inc()
            return False
        if not self.handoff.put(kind, pair.index, request.routing_key or request.id, groups, reason, legacy_s, candidate_s):
            pair.metrics.skipped["saturated"].inc()
            return False
        return True

    def _overloaded(self) -> bool:
        """Whether to skip a shadow hand-off for the primary's sake: the busier the loop, the likelier."""
        excess = self.loop_load.busy - self.shed_from_busy
        return excess > 0 and random.random() * SHED_RAMP < excess

    async def _call_legacy(self, pair: ModelPair, request: InferRequest) -> tuple[Outputs, float]:
        timeout = pair.legacy.config.timeout_s
        if request.deadline_s is not None:
            timeout = min(timeout, max(request.deadline_s, 0.001))
        start = time.perf_counter()
        try:
            outputs = await self._call(pair, pair.legacy, "legacy", request.inputs, timeout)
        except ShadowServeError as exc:
            if exc.code == grpc.StatusCode.UNAVAILABLE:
                pair.legacy_answered(False)
            raise
        pair.legacy_answered(True)
        missing = [name for name in pair.output_names if name not in outputs]
        if missing:
            pair.metrics.backend_error("legacy", "INTERNAL")
            raise BackendError(f"legacy backend of {pair.name!r} did not return output(s) {missing}")
        return outputs, time.perf_counter() - start

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
            pair.metrics.latency[role].observe(time.perf_counter() - start)
