"""The interface every runtime adapter implements."""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Sequence

import numpy as np

from server.config import BackendConfig, TensorConfig
from server.errors import BackendError, BackendTimeout, ShadowServeError


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
    so `run` works only with `self.signature` names. `run` must never block the event loop.
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


class InProcessBackend(Backend):
    """A runtime that runs inside the gateway, on its own threads, never on the event loop."""

    threads: int = 1

    def __init__(self, config: BackendConfig, inputs: Sequence[TensorConfig], outputs: Sequence[TensorConfig]):
        super().__init__(config, inputs, outputs)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=getattr(config, "threads", 1), thread_name_prefix=f"{self.runtime}-backend"
        )
        self._running_since: dict[int, float] = {}  # by thread: when its inference started

    @abc.abstractmethod
    def load_blocking(self) -> None: ...

    @abc.abstractmethod
    def run_blocking(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    async def load(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self.load_blocking)
        self.ready = True

    async def run(self, inputs: dict[str, np.ndarray], timeout_s: float) -> dict[str, np.ndarray]:
        future = asyncio.get_running_loop().run_in_executor(self._executor, self._run_checked, inputs)
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            raise BackendTimeout(f"{self.runtime} inference exceeded {timeout_s:g}s") from None

    def longest_running_s(self) -> float:
        """How long the oldest inference now running has run; a call still queued for a thread has not started."""
        started = list(self._running_since.values())
        return time.monotonic() - min(started) if started else 0.0

    def _run_checked(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        thread = threading.get_ident()
        self._running_since[thread] = time.monotonic()
        try:
            return self.run_blocking(inputs)
        except ShadowServeError:
            raise
        except Exception as exc:  # the runtime's own text stays in the log: it can disclose internals
            logging.getLogger("shadowserve.adapters").exception("%s inference failed", self.runtime)
            raise BackendError(f"{self.runtime} inference failed; the gateway log has the details") from exc
        finally:
            del self._running_since[thread]

    async def close(self) -> None:
        await super().close()
        self._executor.shutdown(wait=False, cancel_futures=True)
