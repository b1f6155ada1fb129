"""Runtime adapters, imported lazily by name so a missing runtime only fails when asked for."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Sequence

from server.errors import ConfigError

if TYPE_CHECKING:
    from adapters.base import Backend
    from server.config import BackendConfig, TensorConfig

RUNTIMES: dict[str, str] = {
    "mxnet": "adapters.mxnet:MXNetBackend",
    "torch": "adapters.torch:TorchBackend",
    "triton": "adapters.triton:TritonBackend",
    "remote": "adapters.remote:RemoteBackend",
    "caffe": "adapters.caffe:CaffeBackend",
}


def backend_class(runtime: str) -> type["Backend"]:
    try:
        module_name, class_name = RUNTIMES[runtime].split(":")
    except KeyError:
        raise ConfigError(f"unknown runtime {runtime!r}; known: {sorted(RUNTIMES)}") from None
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"runtime {runtime!r} is not installed here: {exc}") from exc
    return getattr(module, class_name)


def create_backend(
    config: "BackendConfig", inputs: Sequence["TensorConfig"], outputs: Sequence["TensorConfig"]
) -> "Backend":
    return backend_class(config.runtime)(config, inputs, outputs)  # type: ignore[attr-defined]


def shadow_candidate(
    config: "BackendConfig", inputs: Sequence["TensorConfig"], outputs: Sequence["TensorConfig"]
) -> "Backend":
    """The candidate the shadow engine calls: a Triton or remote one over one stream where `shadow_calls` says so."""
    candidate = create_backend(config, inputs, outputs)
    if getattr(config, "shadow_calls", "unary") == "stream":
        candidate.over_stream = True  # type: ignore[attr-defined]
    return candidate


IN_PROCESS_RUNTIMES = frozenset({"mxnet", "torch", "caffe"})


def primary_candidate(
    config: "BackendConfig", inputs: Sequence["TensorConfig"], outputs: Sequence["TensorConfig"], model: str,
    engine_address: str,
) -> "Backend":
    """The candidate a primary calls when it serves from it. A Triton or remote one is called directly; an
    in-process runtime never loads into a primary: the shadow engine runs it and serves it at `engine_address`."""
    if config.runtime not in IN_PROCESS_RUNTIMES:
        return create_backend(config, inputs, outputs)
    from server.config import RemoteConfig

    through_engine = RemoteConfig(runtime="remote", url=engine_address, model=model, timeout_s=config.timeout_s)
    return create_backend(through_engine, inputs, outputs)
