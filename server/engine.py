"""The shadow engine: the one process of a gateway that does shadow work and holds the control plane.

Primaries hand it requests through shared memory (`server/handoff.py`) and never wait for it. It calls
the candidate for shadowed requests, compares the answers, keeps the recent window, the circuit
breaker and the guard, and owns the admin service, the rollout controller and the config watcher:
the one place percentages change, written to the routing table that every primary reads. It runs at
a lower CPU priority than the primaries; when it dies, the gateway restarts it and keeps serving.

Run by `server/supervisor.py` as `python -m server.engine`, with its start-up spec on stdin.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import os
import resource
import signal
import sys
from pathlib import Path
from typing import Callable

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from adapters.base import Backend, InProcessBackend
from server.breaker import CircuitBreaker
from server.compare import Comparison
from server.config import Config, EngineConfig, ModelPairConfig, parse_config
from server.codec import decode_inputs, encode_response
from server.errors import BackendTimeout, ModelNotReady, ShadowServeError
from server.handoff import SERVED, SERVED_FAILED, SHADOW_CALL, Handoff, Route, Routed, SharedState
from server.loading import Loader
from server.metrics import Metrics, ModelMetrics
from server.outcomes import ComparisonQueue
from server.priority import lower_this_process
from server.supervisor import die_with_parent
from server.window import RecentWindow

log = logging.getLogger("shadowserve.engine")

TICK_S = 0.05  # heartbeat, circuit state published to primaries, rings drained even without a wake-up
EXIT_STUCK_CANDIDATE = 70
DRAIN_BATCH = 256  # records taken from the rings before yielding to other work
Outputs = dict[str, np.ndarray]


class ShadowPair(Routed):
    """A model pair as the engine sees it: its candidate, breaker, window and routing row."""

    def __init__(self, config: ModelPairConfig, candidate: Backend | None, metrics: ModelMetrics, route: Route,
                 capture=None) -> None:
        self.config = config
        self.name = config.name
        self.candidate = candidate
        self.metrics = metrics
        self.route = route
        self.window = RecentWindow(config.window)
        self.output_names = tuple(tensor.name for tensor in config.outputs)
        self.class_score_outputs = frozenset(t.name for t in config.outputs if t.class_scores)
        self.breaker = CircuitBreaker(config.circuit_breaker, self._circuit_changed)
        self.capture = capture
        self.metrics.stage(self.stage, self.shadow_percent, self.serve_percent)

    def _circuit_changed(self, is_open: bool) -> None:
        self.metrics.circuit_open.set(1 if is_open else 0)
        self.route.set_circuit_open(self.breaker.paused)
        if is_open:
            log.warning("model %s: candidate failed %d times in a row; circuit open, candidate calls paused",
                        self.name, self.breaker.failures)
        else:
            log.info("model %s: candidate answered a probe call; circuit closed", self.name)

    def set_percentages(self, shadow_percent: float, serve_percent: float, rolled_back: bool = False) -> None:
        self.route.set(shadow_percent, serve_percent, rolled_back)
        self.metrics.stage(self.stage, shadow_percent, serve_percent)


class Engine:
    """Shadow calls, comparisons and verdicts for every primary of one gateway."""

    def __init__(self, config: Config, shared: SharedState, metrics: Metrics, config_path: Path | None = None) -> None:
        from adapters import shadow_candidate

        self.config = config
        self.shared = shared
        self.metrics = metrics
        server = config.server
        self.max_shadow_in_flight = server.max_shadow_in_flight
        self.compare_outputs = server.compare
        self.shadow_in_flight = 0
        self.max_shadow_waiting = server.max_shadow_waiting
        self.max_waiting_bytes = server.engine.queue_bytes
        self._waiting: collections.deque[tuple[ShadowPair, Handoff]] = collections.deque()
        self._waiting_bytes = 0
        self._stuck = False  # an in-process candidate is stuck: the engine is exiting
        self.by_index: list[ShadowPair] = []
        for model, route in zip(config.models, shared.routes):
            candidate = shadow_candidate(model.candidate, model.inputs, model.outputs) if model.candidate else None
            outputs = [tensor.name for tensor in model.outputs]
            scores = [tensor.name for tensor in model.outputs if tensor.class_scores]
            capture = None
            if model.capture is not None:
                from server.capture import Capture

                capture = Capture(model.capture, model.name, metrics)
            self.by_index.append(ShadowPair(model, candidate, metrics.for_model(model.name, outputs, scores), route, capture))
        self.pairs: dict[str, ShadowPair] = {pair.name: pair for pair in self.by_index}
        self.comparisons = ComparisonQueue(server.comparison, server.max_comparisons_queued, self._record)
        self.comparison_listeners: list[Callable[[ShadowPair, Comparison | None], None]] = []
        self.loader = Loader(server.backend_retry_s)
        self._tasks: set[asyncio.Task] = set()

        from server.reload import ConfigWatcher
        from server.rollout import RolloutController

        self.rollout = RolloutController(self)
        self.watcher = ConfigWatcher(config_path, config, self.rollout, metrics) if config_path else None
        self.admin_port = 0
        self._admin = self._candidates = None

    def pair(self, name: str) -> ShadowPair:
        from server.errors import ModelNotFound

        try:
            return self.pairs[name]
        except KeyError:
            raise ModelNotFound(f"unknown model {name!r}; this gateway serves {sorted(self.pairs)}") from None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, wake_fd: int | None = None) -> None:
        from server.admin import start_admin_server

        server = self.config.server
        for ring in self.shared.rings:
            ring.forget_unjudged()
        self._admin, self.admin_port = await start_admin_server(self.rollout, server)
        self._candidates = await start_candidate_service(self, self.shared.engine_address, server.max_message_bytes)
        await asyncio.gather(*(self.loader.load(pair.name, "candidate", pair.candidate, required=False)
                               for pair in self.by_index if pair.candidate is not None))
        loop = asyncio.get_running_loop()
        if wake_fd is not None:
            os.set_blocking(wake_fd, False)
            loop.add_reader(wake_fd, self._woken, wake_fd)
        self._spawn(self._tick())
        if self.watcher is not None:
            self._spawn(self.watcher.run(server.config_poll_s))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.loader.close()
        self.comparisons.close()
        for grpc_server in (self._admin, self._candidates):
            if grpc_server is not None:
                await grpc_server.stop(0.5)
        for pair in self.by_index:
            if pair.candidate is not None:
                await pair.candidate.close()
            if pair.capture is not None:
                pair.capture.close()

    def _spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _tick(self) -> None:
        while True:
            self.shared.beat()
            for pair in self.by_index:
                pair.route.set_circuit_open(pair.breaker.paused)
            self._stop_a_stuck_candidate()
            self.drain()
            await asyncio.sleep(TICK_S)

    def _stop_a_stuck_candidate(self) -> None:
        """An in-process inference running past its deadline cannot be stopped, only its process: the engine exits,
        and the supervisor starts a new one without the stuck thread. Calls that timed out while queued never ran."""
        for pair in self.by_index if not self._stuck else ():
            candidate = pair.candidate
            if isinstance(candidate, InProcessBackend) and candidate.longest_running_s() > candidate.config.timeout_s:
                self._stuck = True
                self.metrics.candidate_killed.labels(pair.name).inc()
                log.error("model %s: an in-process candidate inference ran past its %gs deadline; restarting the "
                          "shadow engine to stop it", pair.name, candidate.config.timeout_s)
                asyncio.get_running_loop().call_later(0.1, os._exit, EXIT_STUCK_CANDIDATE)
                return

    def _woken(self, wake_fd: int) -> None:
        try:
            while os.read(wake_fd, 65536):
                pass
        except BlockingIOError:
            pass
        self.drain()

    def drain(self) -> None:
        """Take what every primary handed over; hand-offs of one model are processed in their order."""
        for ring in self.shared.rings:
            for record in ring.drain(DRAIN_BATCH):
                try:
                    self.take(record)
                except Exception:  # one malformed record must not stop the engine
                    log.exception("hand-off record could not be processed")

    # -- hand-offs -------------------------------------------------------------------------

    def take(self, record: Handoff) -> None:
        pair = self.by_index[record.model]
        if not math.isnan(record.legacy_s):
            pair.window.latency("legacy", record.legacy_s)
        if record.kind == SHADOW_CALL:
            self._start_shadow(pair, record)
        elif record.kind == SERVED:
            pair.breaker.succeeded()
            pair.window.latency("candidate", record.candidate_s)
            self._schedule_comparison(pair, record.legacy, record.candidate, record, served=True)
        elif record.kind == SERVED_FAILED:
            if record.reason != "circuit_open":
                pair.breaker.failed()
            if not math.isnan(record.candidate_s):
                pair.window.latency("candidate", record.candidate_s)
            self._candidate_failed(pair)

    def _start_shadow(self, pair: ShadowPair, record: Handoff) -> None:
        """Call the candidate now, or once a slot frees up; past what may wait, skip it as saturated."""
        if pair.candidate is None:
            return
        if self.shadow_in_flight < self.max_shadow_in_flight and not self._waiting:
            self._call(pair, record)
        elif (len(self._waiting) < self.max_shadow_waiting
              and self._waiting_bytes + record.nbytes <= self.max_waiting_bytes):
            self._waiting.append((pair, record))
            self._waiting_bytes += record.nbytes
        else:
            pair.metrics.skipped["saturated"].inc()

    def _call_waiting(self) -> None:
        while self._waiting and self.shadow_in_flight < self.max_shadow_in_flight:
            pair, record = self._waiting.popleft()
            self._waiting_bytes -= record.nbytes
            self._call(pair, record)

    def _call(self, pair: ShadowPair, record: Handoff) -> None:
        candidate = pair.candidate
        if not candidate.ready:
            pair.metrics.skipped["error"].inc()
        elif not pair.breaker.allow():
            pair.metrics.skipped["circuit_open"].inc()
            self._candidate_failed(pair)
        else:
            self.shadow_in_flight += 1
            pair.metrics.in_flight.inc()
            self._spawn(self._shadow(pair, candidate, record))

    async def _shadow(self, pair: ShadowPair, candidate: Backend, record: Handoff) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            outputs = await candidate.infer(record.inputs, candidate.config.timeout_s)
        except Exception as exc:
            failure = exc if isinstance(exc, ShadowServeError) else None
            if failure is None:
                log.exception("model %s: candidate backend raised", pair.name)
            code = failure.code.name if failure is not None else "INTERNAL"
            pair.metrics.backend_error("candidate", code)
            pair.metrics.skipped["timeout" if isinstance(exc, BackendTimeout) else "error"].inc()
            pair.breaker.failed()
            self._candidate_failed(pair)
            return
        finally:
            elapsed = loop.time() - start
            pair.metrics.latency["candidate"].observe(elapsed)
            pair.window.latency("candidate", elapsed)
            self.shadow_in_flight -= 1
            pair.metrics.in_flight.dec()
            self._call_waiting()
        pair.breaker.succeeded()
        self._schedule_comparison(pair, record.legacy, outputs, record, served=False)

    # -- verdicts --------------------------------------------------------------------------

    def _schedule_comparison(self, pair: ShadowPair, legacy: Outputs, candidate: Outputs, record: Handoff,
                             served: bool) -> None:
        """`served`: the client got the candidate's answer, so the guard must judge it without delay."""
        if not self.compare_outputs:
            record.judged()
        elif not self.comparisons.submit(pair, legacy, candidate, (record, candidate),
                                         urgent=served or pair.serve_percent > 0):
            pair.metrics.skipped["saturated"].inc()
            record.judged()

    def _record(self, pair: ShadowPair, comparison: Comparison, context: tuple[Handoff, Outputs]) -> None:
        pair.metrics.comparison(comparison)
        pair.window.compared(comparison)
        if comparison.detail:
            log.debug("model %s: %s", pair.name, comparison.detail)
        if pair.capture is not None:
            record, candidate = context
            pair.capture.offer(inputs=record.inputs, legacy=record.legacy, candidate=candidate, comparison=comparison,
                               stage=pair.stage, request_id=record.request_id, routing_key=None,
                               time_unix=record.time_unix)
        self._notify(pair, comparison)
        context[0].judged()

    def _candidate_failed(self, pair: ShadowPair) -> None:
        pair.window.candidate_failed()
        self._notify(pair, None)

    def _notify(self, pair: ShadowPair, comparison: Comparison | None) -> None:
        for listener in self.comparison_listeners:
            listener(pair, comparison)


class CandidateService(service_pb2_grpc.GRPCInferenceServiceServicer):
    """In-process candidates served to the primaries of this gateway, for the requests they answer from them."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def ModelReady(self, request, context):
        pair = self.engine.pairs.get(request.name)
        return pb.ModelReadyResponse(ready=bool(pair and pair.candidate and pair.candidate.ready))

    async def ModelInfer(self, request, context):
        pair = self.engine.pair(request.model_name)
        if pair.candidate is None or not pair.candidate.ready:
            raise ModelNotReady(f"model {pair.name!r}: the candidate is not loaded in the shadow engine")
        inputs = decode_inputs(request, {tensor.name: tensor for tensor in pair.config.inputs})
        timeout_s = context.time_remaining() or pair.candidate.config.timeout_s
        outputs = await pair.candidate.infer(inputs, timeout_s)
        return encode_response(pair.name, "", request, outputs)


async def start_candidate_service(engine: Engine, address: str, max_message_bytes: int) -> grpc.aio.Server:
    from server.grpc_front import StatusInterceptor

    server = grpc.aio.server(interceptors=[StatusInterceptor()], options=[
        ("grpc.max_receive_message_length", max_message_bytes), ("grpc.max_send_message_length", max_message_bytes)])
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(CandidateService(engine), server)
    server.add_insecure_port(address)
    await server.start()
    return server


# -- the process --------------------------------------------------------------------------


def _watch_parent(parent_pid: int, stop: asyncio.Event) -> None:
    """The engine lives only as long as the gateway that started it."""
    if os.getppid() != parent_pid:
        stop.set()
        return
    asyncio.get_running_loop().call_later(0.5, _watch_parent, parent_pid, stop)


async def serve(spec: dict) -> None:
    from prometheus_client import CollectorRegistry

    config_path = Path(spec["config_path"]) if spec.get("config_path") else None
    # The gateway validated it; model files it loaded may be gone by now and the engine needs no legacy's.
    config = parse_config(spec["config"], str(config_path or "engine spec"), check_files=False)
    state = spec["shared"]
    shared = SharedState(state["fd"], state["models"], state["rings"], state["ring_bytes"])
    engine = Engine(config, shared, Metrics(CollectorRegistry(), enabled=config.server.metrics), config_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    _watch_parent(spec["parent_pid"], stop)
    await engine.start(spec["wake_fd"])
    shared.beat()
    with os.fdopen(spec["status_fd"], "w") as status:
        status.write(json.dumps({"event": "ready", "admin_port": engine.admin_port}) + "\n")
    try:
        await stop.wait()
    finally:
        await engine.close()


def _yield_to_primaries(settings: EngineConfig) -> None:
    """Lower priority and bounded memory for this process and what it starts; gone when the gateway goes."""
    lower_this_process(settings.nice, settings.idle_priority)
    if settings.memory_limit_bytes is not None:
        resource.setrlimit(resource.RLIMIT_AS, (settings.memory_limit_bytes, settings.memory_limit_bytes))
    die_with_parent()


def main() -> None:
    from setproctitle import setproctitle

    from server import loop_load

    setproctitle("shadowserve: shadow engine")
    spec = json.loads(sys.stdin.read())
    _yield_to_primaries(EngineConfig.model_validate(spec["config"].get("server", {}).get("engine", {})))
    from server.cli import configure_logging

    configure_logging(spec.get("log_level", "INFO"))  # text or JSON, as the gateway that started it
    loop_load.run(serve(spec))


if __name__ == "__main__":
    main()
