"""MXNet 1.x models exported by `HybridBlock.export` (symbol JSON + params), run in-process."""

from __future__ import annotations

import logging
import os
import sys
import warnings

import numpy as np

from adapters.base import InProcessBackend
from server.config import MXNetConfig
from server.errors import BackendError, ConfigError


def _ops_on_the_calling_thread(context: str) -> bool:
    """MXNet's threaded engine runs every op on a thread of its own. This backend already gives each inference a
    thread, so on CPU that engine only adds a hand-over each way: about 45 µs of a 550 µs inference. The naive
    engine runs the ops on the calling thread; a hybridized graph still runs one call at a time. It is chosen only
    for a CPU model loaded before MXNet starts in this process, and never over an MXNET_ENGINE_TYPE the operator set."""
    if context != "cpu" or "mxnet" in sys.modules or "MXNET_ENGINE_TYPE" in os.environ:
        return False
    os.environ["MXNET_ENGINE_TYPE"] = "NaiveEngine"
    return True


def _start_engine_quietly(mx) -> None:
    """MXNet announces an engine chosen by MXNET_ENGINE_TYPE on stderr, in its own format: a line that would break
    `--log-format json`. Python's log handlers wait meanwhile, so none of their lines is lost."""
    handlers = [handler for handler in logging.getLogger().handlers if isinstance(handler, logging.StreamHandler)]
    for handler in handlers:
        handler.acquire()
    stderr = os.dup(2)
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        mx.nd.zeros(1).wait_to_read()  # the engine starts with the first op
    finally:
        os.dup2(stderr, 2)
        os.close(stderr)
        for handler in handlers:
            handler.release()


class MXNetBackend(InProcessBackend):
    runtime = "mxnet"
    config: MXNetConfig

    def load_blocking(self) -> None:
        config = self.config
        chose_the_engine = _ops_on_the_calling_thread(config.context)
        import mxnet as mx

        if chose_the_engine:
            _start_engine_quietly(mx)
        self._context = mx.gpu(int(config.context[4:-1])) if config.context.startswith("gpu") else mx.cpu()
        try:
            symbol = mx.sym.load(str(config.symbol))
            outputs = symbol.list_outputs()
            with warnings.catch_warnings():
                # "Cannot decide type for the following arguments": input types are known only per request.
                warnings.simplefilter("ignore", UserWarning)
                self._net = mx.gluon.SymbolBlock.imports(
                    str(config.symbol), config.input_names, str(config.params), ctx=self._context
                )
        except Exception as exc:
            raise ConfigError(f"mxnet model {config.symbol} / {config.params} failed to load: {exc}") from exc
        if len(outputs) != len(self.signature.outputs):
            raise ConfigError(
                f"mxnet symbol {config.symbol} has {len(outputs)} outputs {outputs}, "
                f"the pair declares {len(self.signature.outputs)}"
            )
        if sorted(config.input_names) != sorted(self.signature.input_names):
            raise ConfigError(
                f"mxnet input_names {config.input_names} do not match the pair's inputs "
                f"{self.signature.input_names} (map them with tensor_names)"
            )
        self._net.hybridize(static_alloc=True)
        self._mx = mx

    def run_blocking(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        mx = self._mx
        arrays = [mx.nd.array(inputs[name], ctx=self._context, dtype=inputs[name].dtype) for name in self.config.input_names]
        result = self._net(*arrays)
        results = result if isinstance(result, (list, tuple)) else [result]
        if len(results) != len(self.signature.outputs):
            raise BackendError(f"mxnet returned {len(results)} outputs, expected {len(self.signature.outputs)}")
        return {spec.name: out.asnumpy() for spec, out in zip(self.signature.outputs, results)}

    def describe(self) -> dict[str, str]:
        return {"runtime": self.runtime, "context": self.config.context}
