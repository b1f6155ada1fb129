"""The interface every runtime adapter implements."""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import logging
import math
import queue
import threading
import time
from typing import Sequence

import numpy as np

from server.config import BackendConfig, TensorConfig
from server.errors import BackendError, BackendTimeout, ShadowServeError
from server.handoff import LoopWatch


@dataclasses.dataclass(frozen=True)
class Signature:
    """The tensors a backend receives and must return, named as the backend knows them."""

    inputs: tuple[TensorConfig, ...]
    outputs: tuple[TensorConfig, ...]

    @property
    def input_names(self) -> list[str]:
        return [tensor.name for tensor in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [tensor.name for tensor in self.outputs]


class Backend(abc.ABC):
    """One model in one runtime, on one side (legacy or candidate) of a pair.

    Adapters implement `load`, `run` and, where they hold resources, `close`. The pair's tensor
    names are translated to the backend's own (`tensor_names` in config) before `run` sees them,
    so `run` works only with `self.signature` names. `run` must not block the event loop, except as
    `run_on_loop_when_fast` allows.
    """

    runtime: str = ""

    def __init__(self, config: BackendConfig, inputs: Sequence[TensorConfig], outputs: Sequence[TensorConfig]):
        self.config = config
        self._to_backend = dict(config.tensor_names)
        self._to_pair = {theirs: ours for ours, theirs in self._to_backend.items()}
        rename = lambda t: t.model_copy(update={"name": self._to_backend.get(t.name, t.name)})  # noqa: E731
        self.signature = Signature(tuple(map(rename, inputs)), tuple(map(rename, outputs)))
        self.ready = False

    @abc.abstractmethod
    async def load(self) -> None:
        """Load the model; raise ShadowServeError (or ConfigError) naming what is wrong."""

    @abc.abstractmethod
    async def run(self, inputs: dict[str, np.ndarray], timeout_s: float) -> dict[str, np.ndarray]:
        """Infer within `timeout_s`; raise BackendTimeout past it, BackendError on failure."""

    async def probe(self) -> bool:
        """Whether the loaded backend can answer now; in-process ones always can."""
        return True

    async def close(self) -> None:
        self.ready = False

    def run_on_loop_when_fast(self, watch: LoopWatch) -> None:
        """Let calls expected to be fast run on the event loop, telling `watch` while they hold it (in-process only)."""

    def describe(self) -> dict[str, str]:
        """Facts operators should see in ModelMetadata/ModelConfig parameters."""
        return {"runtime": self.runtime}

    async def infer(self, inputs: dict[str, np.ndarray], timeout_s: float | None = None) -> dict[str, np.ndarray]:
        if self._to_backend:
            inputs = {self._to_backend.get(name, name): array for name, array in inputs.items()}
        outputs = await self.run(inputs, timeout_s if timeout_s is not None else self.config.timeout_s)
        if self._to_pair:
            outputs = {self._to_pair.get(name, name): array for name, array in outputs.items()}
        return outputs


# A call expected to be this fast may run on the event loop of a worker whose loop is watched: on one core,
# the hop to an inference thread and back, among gRPC's threads, took 280 µs a request (1.47 against 1.19 ms).
ON_LOOP_UP_TO_S = 0.005
# Each call's time per input byte, or the last estimate times this if more: one slow call keeps the next few
# hundred calls on the thread, so a model whose cost varies with the input rarely blocks the loop.
ESTIMATE_DECAY = 0.99
HUNG_GRACE_S = 1.0  # an inference on the loop this long past the backend's timeout_s gets its worker replaced


class InProcessBackend(Backend):
    """A runtime that runs inside the gateway, on threads of its own.

    Calls reach the threads over one queue and come back with one wake-up of the loop: a thread pool's
    futures, chained to asyncio's and watched by `wait_for`, took about 50 µs more of a 550 µs inference.

    Given a `LoopWatch` (`run_on_loop_when_fast`), a one-thread backend runs a call on the event loop
    itself when its thread is idle and the call should take under `ON_LOOP_UP_TO_S`, judged by the
    recent calls' time per input byte. The watch lets the supervisor replace the worker if such a call
    hangs; a call that merely ends past its timeout fails as it would on the thread.
    """

    def __init__(self, config: BackendConfig, inputs: Sequence[TensorConfig], outputs: Sequence[TensorConfig]):
        super().__init__(config, inputs, outputs)
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._serve_calls, name=f"{self.runtime}-backend-{index}", daemon=True)
            for index in range(getattr(config, "threads", 1))
        ]
        self._running_since: dict[int, float] = {}  # by thread: when its inference started
        self._loop_watch: LoopWatch | None = None
        self._seconds_per_byte = math.inf  # of recent inferences; a backend not yet timed runs on its thread
        self._handed = self._finished = 0  # calls handed to the threads, and calls they are done with

    @abc.abstractmethod
    def load_blocking(self) -> None: ...

    @abc.abstractmethod
    def run_blocking(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    async def load(self) -> None:
        for thread in self._threads:
            if thread.ident is None:  # a failed load is retried on the same threads
                thread.start()
        await self._on_a_thread(self.load_blocking)
        self.ready = True

    def run_on_loop_when_fast(self, watch: LoopWatch) -> None:
        self._loop_watch = watch

    async def run(self, inputs: dict[str, np.ndarray], timeout_s: float) -> dict[str, np.ndarray]:
        watch = self._loop_watch
        if (watch is not None and len(self._threads) == 1 and self._handed == self._finished
                and self._seconds_per_byte * _nbytes(inputs) <= ON_LOOP_UP_TO_S):
            return self._run_on_the_loop(inputs, timeout_s, watch)
        answer = self._on_a_thread(self._run_checked, inputs)
        expiry = asyncio.get_running_loop().call_later(timeout_s, self._expire, answer, timeout_s)
        try:
            return await answer
        finally:
            expiry.cancel()

    def _on_a_thread(self, function, *args) -> asyncio.Future:
        """`function(*args)` on the first free thread; a call whose future is done before it starts never runs."""
        answer = asyncio.get_running_loop().create_future()
        self._handed += 1
        self._calls.put((function, args, answer))
        return answer

    def _run_on_the_loop(self, inputs: dict[str, np.ndarray], timeout_s: float,
                         watch: LoopWatch) -> dict[str, np.ndarray]:
        start = time.monotonic()
        watch.blocked(start + self.config.timeout_s + HUNG_GRACE_S)
        try:
            outputs = self._run_checked(inputs)
        finally:
            watch.free()
        if time.monotonic() - start > timeout_s:
            raise self._timeout(timeout_s)
        return outputs

    def _serve_calls(self) -> None:
        while (call := self._calls.get()) is not None:
            function, args, answer = call
            try:
                if answer.done():  # it timed out, or its request was cancelled, while it waited for this thread
                    continue
                settle, outcome = answer.set_result, function(*args)
            except BaseException as exc:
                settle, outcome = answer.set_exception, exc
            finally:
                self._finished += 1  # written by the one thread of a backend that may run calls on the loop
            try:
                answer.get_loop().call_soon_threadsafe(_settle, answer, settle, outcome)
            except RuntimeError:  # the loop has closed: nobody waits for the answer
                pass

    def _expire(self, answer: asyncio.Future, timeout_s: float) -> None:
        _settle(answer, answer.set_exception, self._timeout(timeout_s))

    def _timeout(self, timeout_s: float) -> BackendTimeout:
        return BackendTimeout(f"{self.runtime} inference exceeded {timeout_s:g}s")

    def longest_running_s(self) -> float:
        """How long the oldest inference now running has run; a call still queued for a thread has not started."""
        started = list(self._running_since.values())
        return time.monotonic() - min(started) if started else 0.0

    def _run_checked(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        thread = threading.get_ident()
        self._running_since[thread] = start = time.monotonic()
        try:
            outputs = self.run_blocking(inputs)
            measured = (time.monotonic() - start) / max(_nbytes(inputs), 1)
            recent = self._seconds_per_byte * ESTIMATE_DECAY
            self._seconds_per_byte = measured if math.isinf(recent) else max(measured, recent)
            return outputs
        except ShadowServeError:
            raise
        except Exception as exc:  # the runtime's own text stays in the log: it can disclose internals
            logging.getLogger("shadowserve.adapters").exception("%s inference failed", self.runtime)
            raise BackendError(f"{self.runtime} inference failed; the gateway log has the details") from exc
        finally:
            del self._running_since[thread]

    async def close(self) -> None:
        await super().close()
        while True:  # calls still queued are answered now, not at their deadline
            try:
                _, _, answer = self._calls.get_nowait()
            except queue.Empty:
                break
            _settle(answer, answer.set_exception, BackendError(f"the {self.runtime} backend is closing"))
        for _ in self._threads:
            self._calls.put(None)


def _nbytes(inputs: dict[str, np.ndarray]) -> int:
    return sum(array.nbytes for array in inputs.values())


def _settle(answer: asyncio.Future, settle, outcome) -> None:
    if not answer.done():
        settle(outcome)
