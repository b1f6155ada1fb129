"""Caffe models (deploy .prototxt + .caffemodel), run in-process by pycaffe or by OpenCV's DNN module.

Two executors run the same files. `pycaffe` is the user's own Caffe (`import caffe`), the runtime
their service has today. `opencv` is `cv2.dnn.readNetFromCaffe`, which executes Caffe models
without Caffe. Before either sees the files, they are read with the project's own caffe.proto and
checked layer by layer: Caffe aborts the whole process on a bad file, and OpenCV may crash or
silently run weights of the wrong shape, so neither can be trusted to report a broken model.

Blob names are Caffe's: the pair's tensors map onto the prototxt's input blobs and onto any named
blob as an output, with Caffe's meaning of a blob rewritten in place (its value after the last
layer that writes it).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import queue
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Protocol

import numpy as np

from adapters.base import InProcessBackend
from adapters.caffe_files import (
    CaffeGraph,
    Dims,
    show_dims,
    read_caffemodel,
    read_mean_file,
    read_prototxt,
)
from server.config import CaffeConfig, TensorConfig
from server.errors import ConfigError

log = logging.getLogger("shadowserve.adapters.caffe")


# -- the legacy side's preprocessing ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CaffeTransform:
    """The classic `caffe.io.Transformer` preprocessing, in its order: channel swap, raw scale,
    mean subtraction, input scale. The mean is in the net's channel order (after the swap)."""

    channel_swap: tuple[int, ...] | None = None
    raw_scale: float | None = None
    mean: np.ndarray | None = None  # (C, 1, 1) or (C, H, W)
    input_scale: float | None = None
    mean_source: str = ""

    @classmethod
    def from_config(cls, config: CaffeConfig, dims: Dims | None) -> CaffeTransform | None:
        if config.channel_swap is None and config.raw_scale is None and config.input_scale is None \
                and config.mean_values is None and config.mean_file is None:
            return None
        if dims is None or len(dims) != 4:
            raise ConfigError(
                f"the Caffe transform (mean, scale, channel swap) needs an N x C x H x W input; "
                f"the first input is {show_dims(dims) if dims is not None else 'of unknown shape'}"
            )
        channels, spatial = dims[1], dims[2:]
        swap = None
        if config.channel_swap is not None:
            swap = tuple(config.channel_swap)
            if sorted(swap) != list(range(len(swap))) or (channels is not None and len(swap) != channels):
                raise ConfigError(
                    f"channel_swap {list(swap)} is not an order of the input's {channels or len(swap)} channels"
                )
        mean, source = None, ""
        if config.mean_values is not None:
            values = np.asarray(config.mean_values, dtype=np.float32)
            if channels is not None and len(values) not in (1, channels):
                raise ConfigError(f"mean_values has {len(values)} values for an input of {channels} channels")
            mean, source = values.reshape(-1, 1, 1), f"mean_values={config.mean_values}"
        elif config.mean_file is not None:
            mean = read_mean_file(config.mean_file)
            per_channel = [round(float(v), 3) for v in mean.mean(axis=(1, 2))]
            if channels is not None and mean.shape[0] != channels:
                raise ConfigError(f"mean file {config.mean_file} has {mean.shape[0]} channels, the input {channels}")
            if all(size is not None for size in spatial) and tuple(mean.shape[1:]) != tuple(spatial):
                raise ConfigError(
                    f"mean file {config.mean_file} is {mean.shape[1]}x{mean.shape[2]}, the input is "
                    f"{spatial[0]}x{spatial[1]}; cropping is not done here: set mean_values to its "
                    f"per-channel means {per_channel} instead"
                )
            source = f"mean_file={Path(config.mean_file).name}"
        return cls(swap, config.raw_scale, mean, config.input_scale, source)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        data = batch[:, list(self.channel_swap)] if self.channel_swap is not None else batch
        data = np.array(data, dtype=np.float32)  # a private copy: request buffers are read-only
        if self.raw_scale is not None:
            data *= np.float32(self.raw_scale)
        if self.mean is not None:
            data -= self.mean
        if self.input_scale is not None:
            data *= np.float32(self.input_scale)
        return data

    def summary(self) -> str:
        parts = []
        if self.channel_swap is not None:
            parts.append(f"channel_swap={list(self.channel_swap)}")
        if self.raw_scale is not None:
            parts.append(f"raw_scale={self.raw_scale:g}")
        if self.mean_source:
            parts.append(self.mean_source)
        if self.input_scale is not None:
            parts.append(f"input_scale={self.input_scale:g}")
        return ", ".join(parts)


# -- executors -------------------------------------------------------------------------------


class CaffeExecutor(Protocol):
    """One loaded copy of the net, answering with the blobs it was built for. Not thread-safe: the
    backend keeps one per inference thread."""

    name: str
    version: str

    def forward(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class OpenCVExecutor:
    name = "opencv"

    def __init__(self, graph: CaffeGraph, caffemodel: Path, outputs: Sequence[str]) -> None:
        import cv2

        self.check_caffe_semantics(graph)
        self.version = cv2.__version__
        try:
            net = cv2.dnn.readNetFromCaffe(str(graph.path), str(caffemodel))
            net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
            net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
            # Caffe convolves by im2col + GEMM; OpenCV's Winograd 3x3 kernels are faster but drift about
            # ten times further from Caffe's numbers, and the legacy answer is the one clients get.
            net.enableWinograd(False)
            layer_names = self._opencv_layer_names(net, graph)  # creates the layers: may fail
        except cv2.error as exc:
            raise ConfigError(f"OpenCV cannot load {graph.path} / {caffemodel}: {_cv_message(exc)}") from None
        self._net = net
        self._layers, self._where = self._plan(graph, layer_names, outputs)

    @staticmethod
    def check_caffe_semantics(graph: CaffeGraph) -> None:
        """Refuse the layer settings where OpenCV is known to compute something other than Caffe."""
        for layer in graph.layers:
            where = f"prototxt {graph.path}: layer {layer.name!r} ({layer.type})"
            lrn = layer.lrn_param
            if layer.type == "LRN" and lrn.norm_region == lrn.ACROSS_CHANNELS and lrn.k != 1:
                raise ConfigError(
                    f"{where} sets k: {lrn.k:g}; OpenCV's LRN ignores k and always uses 1, so it would "
                    "not answer as Caffe does. Run this model with executor 'pycaffe'"
                )
            if layer.type == "BatchNorm" and layer.batch_norm_param.HasField("use_global_stats") \
                    and not layer.batch_norm_param.use_global_stats:
                raise ConfigError(
                    f"{where} sets use_global_stats: false (statistics of each batch); OpenCV computes "
                    "that only for batches of one. Run this model with executor 'pycaffe'"
                )

    @staticmethod
    def _opencv_layer_names(net, graph: CaffeGraph) -> dict[int, str]:
        """Caffe layer index -> OpenCV layer name.

        OpenCV adds layers in prototxt order (plus helpers, such as an MVN before a BatchNorm that
        computes batch statistics) but may rename them, so they are matched by order and type.
        """
        names = list(net.getLayerNames())
        kinds = [net.getLayer(layer_id).type for layer_id in range(1, len(names) + 1)]
        aliases = {"ConvolutionDepthwise": "Convolution", "Axpy": "Eltwise"}
        mapping, cursor = {}, 0
        for index, layer in enumerate(graph.layers):
            want = aliases.get(layer.type, layer.type)
            for position in range(cursor, len(names)):
                if kinds[position] == want:
                    mapping[index], cursor = names[position], position + 1
                    break
        return mapping

    @staticmethod
    def _plan(graph: CaffeGraph, layer_names: dict[int, str], outputs: Sequence[str]):
        """The OpenCV layers to retrieve, and where each output blob is among their results."""
        layers: list[str] = []
        where: dict[str, tuple[int, int]] = {}
        for blob in outputs:
            layer_index, top_index = graph.producers[blob]
            if layer_index not in layer_names:
                layer = graph.layers[layer_index]
                raise ConfigError(
                    f"prototxt {graph.path}: OpenCV made no layer of layer {layer.name!r} ({layer.type}), "
                    f"which writes output blob {blob!r}"
                )
            if layer_names[layer_index] not in layers:
                layers.append(layer_names[layer_index])
            where[blob] = (layers.index(layer_names[layer_index]), top_index)
        return layers, where

    def forward(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, array in inputs.items():
            self._net.setInput(array, name)
        results = self._net.forwardAndRetrieve(self._layers)
        return {blob: results[layer][top] for blob, (layer, top) in self._where.items()}


def _cv_message(exc: Exception) -> str:
    """OpenCV's error text without its source-path preamble."""
    text = str(exc).strip()
    return text.split(" error: ", 1)[-1] if " error: " in text else text


class PycaffeExecutor:
    name = "pycaffe"

    def __init__(self, caffe: ModuleType, graph: CaffeGraph, caffemodel: Path, outputs: Sequence[str]) -> None:
        self.version = str(getattr(caffe, "__version__", "unknown"))
        try:
            self._net = caffe.Net(str(graph.path), str(caffemodel), caffe.TEST)
        except Exception as exc:  # pycaffe raises plain RuntimeErrors, and more
            raise ConfigError(f"pycaffe cannot load {graph.path} / {caffemodel}: {exc}") from exc
        self._outputs = list(outputs)

    def forward(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        net = self._net
        reshaped = False
        for name, array in inputs.items():
            if tuple(net.blobs[name].data.shape) != array.shape:
                net.blobs[name].reshape(*array.shape)
                reshaped = True
        if reshaped:
            net.reshape()
        for name, array in inputs.items():
            net.blobs[name].data[...] = array
        net.forward(blobs=self._outputs)
        # Caffe reuses blob memory on the next forward: hand out copies.
        return {name: np.array(net.blobs[name].data, dtype=np.float32, copy=True) for name in self._outputs}


def import_pycaffe() -> tuple[ModuleType | None, str]:
    """The user's Caffe, or why it cannot be imported."""
    try:
        return importlib.import_module("caffe"), ""
    except Exception as exc:  # noqa: BLE001 - a broken Caffe build raises more than ImportError
        return None, f"{type(exc).__name__}: {exc}"


# -- the backend -----------------------------------------------------------------------------


class CaffeBackend(InProcessBackend):
    runtime = "caffe"
    config: CaffeConfig

    def __init__(self, config: CaffeConfig, inputs: Sequence[TensorConfig], outputs: Sequence[TensorConfig]) -> None:
        super().__init__(config, inputs, outputs)
        self.executor_name = config.executor
        self.executor_version = ""
        self._transform: CaffeTransform | None = None
        self._pool: queue.SimpleQueue[CaffeExecutor] = queue.SimpleQueue()

    def load_blocking(self) -> None:
        config = self.config
        for kind, path in (("prototxt", config.prototxt), ("caffemodel", config.caffemodel)):
            if not Path(path).is_file():
                raise ConfigError(f"{kind} {path} not found")
        graph = CaffeGraph.from_net(read_prototxt(config.prototxt), config.prototxt)
        graph.check_signature(self.signature)
        dims = graph.input_dims(self.signature)
        graph.check_weights(read_caffemodel(config.caffemodel), config.caffemodel, dims)
        transform = CaffeTransform.from_config(config, dims[self.signature.input_names[0]])

        caffe, reason = (None, "not asked for") if config.executor == "opencv" else import_pycaffe()
        if config.executor == "pycaffe" and caffe is None:
            raise ConfigError(
                f"executor 'pycaffe' was asked for, but `import caffe` failed ({reason}); "
                "install the user's Caffe build here or choose executor 'opencv'"
            )
        outputs = self.signature.output_names
        executors: list[CaffeExecutor] = [
            PycaffeExecutor(caffe, graph, config.caffemodel, outputs) if caffe is not None
            else OpenCVExecutor(graph, config.caffemodel, outputs)
            for _ in range(config.threads)
        ]
        if config.executor == "auto":
            log.info("caffe model %s: executor auto chose %s%s", config.prototxt, executors[0].name,
                     "" if caffe is not None else f" (pycaffe unavailable: {reason})")
        self._warm_up(executors, graph, dims)
        self._transform = transform
        self.executor_name, self.executor_version = executors[0].name, executors[0].version
        self._pool = queue.SimpleQueue()
        for executor in executors:
            self._pool.put(executor)

    def _warm_up(self, executors: list[CaffeExecutor], graph: CaffeGraph, dims: dict[str, Dims | None]) -> None:
        """Run one zero batch where every input shape is known, so a net that cannot run fails start-up."""
        if not all(shape is not None and all(dim is not None for dim in shape[1:]) for shape in dims.values()):
            return
        batch = {name: np.zeros((1, *shape[1:]), np.float32) for name, shape in dims.items()}
        for executor in executors:
            try:
                executor.forward(batch)
            except Exception as exc:  # noqa: BLE001 - whatever the runtime raises, start-up must fail
                shapes = ", ".join(f"{name} {list(array.shape)}" for name, array in batch.items())
                raise ConfigError(
                    f"{executor.name} cannot run {graph.path} with {self.config.caffemodel} "
                    f"on input {shapes}: {_cv_message(exc)}"
                ) from None

    def run_blocking(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        first = self.signature.input_names[0]
        batch = {}
        for name, array in inputs.items():
            if name == first and self._transform is not None:
                batch[name] = self._transform(array)
            else:
                batch[name] = np.ascontiguousarray(array, dtype=np.float32)
        executor = self._pool.get()
        try:
            return executor.forward(batch)
        finally:
            self._pool.put(executor)

    def describe(self) -> dict[str, str]:
        facts = {"runtime": self.runtime, "executor": self.executor_name}
        if self.executor_version:
            facts["executor_version"] = self.executor_version
        facts["prototxt"] = Path(self.config.prototxt).name
        if self._transform is not None:
            facts["preprocessing"] = self._transform.summary()
        return facts
