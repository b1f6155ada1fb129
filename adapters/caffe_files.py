"""Reading and checking Caffe model files (.prototxt, .caffemodel, .binaryproto) with the project's caffe.proto.

Caffe aborts the whole process on a bad file, and OpenCV may crash or silently run weights of the
wrong shape, so the files are checked here, layer by layer, before either executor sees them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
from google.protobuf import message, text_format

from adapters.base import Signature
from server.errors import ConfigError

Dims = tuple[int | None, ...]  # None: a dimension not known before a request arrives


def _caffe_pb2():
    try:
        from protos import caffe_pb2
    except ImportError as exc:
        raise ConfigError(f"protos/caffe_pb2.py is missing ({exc}); generate it with `make protos`") from None
    return caffe_pb2


# -- reading the files -----------------------------------------------------------------------


def read_prototxt(path: Path):
    """The net definition, parsed strictly; a syntax error names the line and the layer around it."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read prototxt {path}: {exc.strerror or exc}") from None
    net = _caffe_pb2().NetParameter()
    try:
        # Fields this project's caffe.proto leaves out (fillers, lr_mult, engines) only matter for training.
        text_format.Parse(text, net, allow_unknown_field=True)
    except text_format.ParseError as exc:
        line = exc.GetLine() if hasattr(exc, "GetLine") else None
        where = f" at line {line}" if line else ""
        layer = _layer_around(text, line) if line else None
        within = f", in layer {layer!r}" if layer else ""
        raise ConfigError(f"prototxt {path} does not parse{where}{within}: {exc}") from None
    if not net.layer and not net.input and not net.layers:
        raise ConfigError(f"prototxt {path} defines no layers")
    return net


_LAYER_START = re.compile(r"^\s*layers?\s*\{")
_NAME = re.compile(r"\bname\s*:\s*[\"']([^\"']*)[\"']")


def _layer_around(text: str, line: int) -> str | None:
    """The name of the layer whose block holds `line` (1-based), best effort."""
    name = None
    inside = False
    for content in text.splitlines()[:line]:
        if _LAYER_START.match(content):
            inside, name = True, None
        found = _NAME.search(content)
        if inside and name is None and found:
            name = found.group(1)
    return name


def read_caffemodel(path: Path):
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read caffemodel {path}: {exc.strerror or exc}") from None
    weights = _caffe_pb2().NetParameter()
    try:
        weights.ParseFromString(data)
    except message.DecodeError as exc:
        raise ConfigError(f"caffemodel {path} is not a binary Caffe NetParameter: {exc}") from None
    if not weights.layer and not weights.layers:
        raise ConfigError(f"caffemodel {path} holds no layers")
    return weights


def blob_shape(blob) -> tuple[int, ...]:
    """A BlobProto's shape; old files carry the legacy num/channels/height/width instead."""
    if _has_legacy_dims(blob):
        return (blob.num, blob.channels, blob.height, blob.width)
    return tuple(blob.shape.dim)


def _has_legacy_dims(blob) -> bool:
    return any(blob.HasField(field) for field in ("num", "channels", "height", "width"))


def _check_count(blob, where: str) -> None:
    shape = blob_shape(blob)
    count = len(blob.data) or len(blob.double_data)
    if count != math.prod(shape):
        raise ConfigError(f"{where} holds {count} values but its shape {list(shape)} needs {math.prod(shape)}")


def blob_array(blob, where: str) -> np.ndarray:
    _check_count(blob, where)
    return np.asarray(blob.data if len(blob.data) else blob.double_data, dtype=np.float32).reshape(blob_shape(blob))


def read_mean_file(path: Path) -> np.ndarray:
    """A `.binaryproto` mean, as Caffe's tools write it, returned as (channels, height, width)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read mean file {path}: {exc.strerror or exc}") from None
    blob = _caffe_pb2().BlobProto()
    try:
        blob.ParseFromString(data)
    except message.DecodeError as exc:
        raise ConfigError(f"mean file {path} is not a binary Caffe BlobProto: {exc}") from None
    mean = blob_array(blob, f"mean file {path}")
    if mean.ndim == 4 and mean.shape[0] == 1:
        mean = mean[0]
    if mean.ndim != 3:
        raise ConfigError(f"mean file {path} has shape {list(blob_shape(blob))}; expected 1 x C x H x W")
    return mean


# -- the net's structure, and its weights checked against it ---------------------------------

_SHAPE_PRESERVING = frozenset({
    "ReLU", "PReLU", "ELU", "Sigmoid", "TanH", "AbsVal", "BNLL", "Power", "Exp", "Log", "Threshold",
    "Dropout", "Softmax", "LRN", "MVN", "BatchNorm", "Scale", "Bias", "Split", "Eltwise",
})


@dataclasses.dataclass(frozen=True)
class CaffeGraph:
    """What a prototxt declares: input blobs, the layers that run, and which layer last writes each blob."""

    path: Path
    inputs: dict[str, Dims | None]
    layers: tuple  # LayerParameter, in execution order, Input layers left out
    producers: dict[str, tuple[int, int]]  # blob -> (index in layers, top index) of its last writer

    @classmethod
    def from_net(cls, net, path: Path) -> CaffeGraph:
        if net.layers and not net.layer:
            raise ConfigError(
                f"prototxt {path} uses the pre-2015 V1 'layers' format; upgrade it with Caffe's "
                "upgrade_net_proto_text tool"
            )
        inputs: dict[str, Dims | None] = {}
        for index, name in enumerate(net.input):
            if net.input_shape:
                inputs[name] = tuple(net.input_shape[index].dim) if index < len(net.input_shape) else None
            elif net.input_dim:
                inputs[name] = tuple(net.input_dim[4 * index : 4 * index + 4]) or None
            else:
                inputs[name] = None
        layers, producers, known = [], {}, set(inputs)
        for layer in net.layer:
            if layer.type == "Input":
                shapes = list(layer.input_param.shape)
                for top_index, top in enumerate(layer.top):
                    shape = shapes[top_index] if top_index < len(shapes) else (shapes[0] if shapes else None)
                    inputs[top] = tuple(shape.dim) if shape is not None else None
                    known.add(top)
                continue
            for bottom in layer.bottom:
                if bottom not in known:
                    raise ConfigError(
                        f"prototxt {path}: layer {layer.name!r} ({layer.type}) reads blob {bottom!r}, "
                        "which no earlier layer or input produces"
                    )
            for top_index, top in enumerate(layer.top):
                producers[top] = (len(layers), top_index)
                known.add(top)
            layers.append(layer)
        if not inputs:
            raise ConfigError(f"prototxt {path} declares no input blob (an Input layer or 'input:')")
        return cls(Path(path), inputs, tuple(layers), producers)

    def check_signature(self, signature: Signature) -> None:
        """The pair's tensors, named as this backend knows them, must be blobs of this net."""
        declared, expected = sorted(signature.input_names), sorted(self.inputs)
        if declared != expected:
            raise ConfigError(
                f"prototxt {self.path} takes input blob(s) {expected}, the pair sends {declared} "
                "(map pair tensors to blobs with tensor_names)"
            )
        for tensor in signature.outputs:
            if tensor.name not in self.producers:
                raise ConfigError(
                    f"prototxt {self.path} has no blob {tensor.name!r} for output {tensor.name!r}; "
                    f"its blobs are {sorted(self.producers)} (map pair tensors to blobs with tensor_names)"
                )
            if tensor.datatype != "FP32":
                raise ConfigError(f"Caffe blobs are FP32; output {tensor.name!r} is declared {tensor.datatype}")

    def input_dims(self, signature: Signature) -> dict[str, Dims | None]:
        """Input shapes as requests will bring them: any batch, other dimensions from the pair or the net."""
        merged: dict[str, Dims | None] = {}
        for tensor in signature.inputs:
            net_dims = self.inputs.get(tensor.name)
            pair_dims = tuple(None if dim == -1 else dim for dim in tensor.shape)
            if net_dims is not None and len(net_dims) == len(pair_dims):
                dims = tuple(pair if pair is not None else net for pair, net in zip(pair_dims, net_dims))
            elif tensor.shape:
                dims = pair_dims
            else:
                dims = net_dims
            merged[tensor.name] = (None, *dims[1:]) if dims else None
        return merged

    def check_weights(self, weights, caffemodel: Path, input_dims: dict[str, Dims | None]) -> None:
        """Every layer with learned parameters finds them in `weights`, in the number and shapes Caffe needs."""
        stored = _stored_blobs(weights)
        shapes: dict[str, Dims | None] = dict(input_dims)
        for layer in self.layers:
            bottoms = [shapes.get(bottom) for bottom in layer.bottom]
            expected = _param_shapes(layer, bottoms)
            if expected is not None:
                blobs = stored.get(layer.name)
                where = f"caffemodel {caffemodel}: layer {layer.name!r} ({layer.type})"
                if not blobs:
                    raise ConfigError(f"{where} has no weights; prototxt {self.path} needs {len(expected)} blob(s)")
                if len(blobs) != len(expected):
                    raise ConfigError(
                        f"{where} has {len(blobs)} weight blob(s); prototxt {self.path} needs {len(expected)}"
                    )
                for index, (blob, want) in enumerate(zip(blobs, expected)):
                    if not _shape_matches(blob, want):
                        raise ConfigError(
                            f"{where} weight blob {index} has shape {list(blob_shape(blob))}; "
                            f"prototxt {self.path} needs {show_dims(want)}"
                        )
                    _check_count(blob, f"{where} weight blob {index}")
            tops = _top_dims(layer, bottoms)
            for top in layer.top:
                shapes[top] = tops


def _stored_blobs(weights) -> dict[str, list]:
    """Layer name -> its weight blobs, first non-empty entry winning, as Caffe and OpenCV look them up."""
    stored: dict[str, list] = {}
    for layer in [*weights.layer, *weights.layers]:
        if layer.blobs and layer.name not in stored:
            stored[layer.name] = list(layer.blobs)
    return stored


def _shape_matches(blob, want: Dims | None) -> bool:
    if want is None:
        return True
    if _has_legacy_dims(blob):
        if len(want) > 4:
            return False
        want = (1,) * (4 - len(want)) + tuple(want)
    have = blob_shape(blob)
    return len(have) == len(want) and all(w is None or h == w for h, w in zip(have, want))


def show_dims(dims: Dims | None) -> str:
    if dims is None:
        return "(unknown)"
    return "[" + ", ".join("?" if dim is None else str(dim) for dim in dims) + "]"


def _pairs(repeated, single_h: int | None, single_w: int | None, default: int) -> tuple[int, int]:
    """Caffe's kernel/pad/stride convention: explicit _h/_w, else one value for both, else two values."""
    if single_h is not None and single_w is not None:
        return single_h, single_w
    values = list(repeated)
    if not values:
        return default, default
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def _conv_geometry(param) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]]:
    kernel = _pairs(param.kernel_size, param.kernel_h if param.HasField("kernel_h") else None,
                    param.kernel_w if param.HasField("kernel_w") else None, 1)
    has_pad = param.HasField("pad_h") or param.HasField("pad_w")
    pad = _pairs(param.pad, param.pad_h if has_pad else None, param.pad_w if has_pad else None, 0)
    stride = _pairs(param.stride, param.stride_h if param.HasField("stride_h") else None,
                    param.stride_w if param.HasField("stride_w") else None, 1)
    dilation = _pairs(param.dilation, None, None, 1)
    return kernel, pad, stride, dilation


def _param_shapes(layer, bottoms: list[Dims | None]) -> list[Dims | None] | None:
    """The learned blobs a layer needs, with None where the input shape is not known yet; None if it has none."""
    kind = layer.type
    first = bottoms[0] if bottoms else None
    channels = first[1] if first is not None and len(first) > 1 else None
    if kind in ("Convolution", "ConvolutionDepthwise", "Deconvolution"):
        param = layer.convolution_param
        (kh, kw), _, _, _ = _conv_geometry(param)
        group = param.group or 1
        if kind == "ConvolutionDepthwise":
            group = channels
        per_group = channels // group if channels is not None and group else None
        if kind == "Deconvolution":
            weight = (channels, param.num_output // group, kh, kw)
        else:
            weight = (param.num_output, per_group, kh, kw)
        return [weight, (param.num_output,)] if param.bias_term else [weight]
    if kind == "InnerProduct":
        param = layer.inner_product_param
        axis = param.axis % len(first) if first is not None else None
        inner = None
        if first is not None and all(dim is not None for dim in first[axis:]):
            inner = math.prod(first[axis:])
        weight = (inner, param.num_output) if param.transpose else (param.num_output, inner)
        return [weight, (param.num_output,)] if param.bias_term else [weight]
    if kind == "BatchNorm":
        return [(channels,), (channels,), (1,)]
    if kind in ("Scale", "Bias") and len(layer.bottom) == 1:
        param = layer.scale_param if kind == "Scale" else layer.bias_param
        if first is None:
            shape: Dims | None = {1: (None,), 0: ()}.get(param.num_axes)
        else:
            start = param.axis % len(first)
            stop = len(first) if param.num_axes == -1 else start + param.num_axes
            shape = tuple(first[start:stop])
        with_bias = kind == "Scale" and param.bias_term
        return [shape, shape] if with_bias else [shape]
    if kind == "PReLU":
        return [()] if layer.prelu_param.channel_shared else [(channels,)]
    return None


def _top_dims(layer, bottoms: list[Dims | None]) -> Dims | None:
    """The shape of a layer's top blobs, where Caffe's rules for its type are known here."""
    kind, first = layer.type, (bottoms[0] if bottoms else None)
    if first is None:
        return None
    if kind in _SHAPE_PRESERVING:
        return first
    if kind in ("Convolution", "ConvolutionDepthwise", "Deconvolution") and len(first) == 4:
        kernel, pad, stride, dilation = _conv_geometry(layer.convolution_param)
        spatial = []
        for size, k, p, s, d in zip(first[2:], kernel, pad, stride, dilation):
            extent = d * (k - 1) + 1
            if size is None:
                spatial.append(None)
            elif kind == "Deconvolution":
                spatial.append(s * (size - 1) + extent - 2 * p)
            else:
                spatial.append((size + 2 * p - extent) // s + 1)
        return (first[0], layer.convolution_param.num_output, *spatial)
    if kind == "Pooling" and len(first) == 4:
        param = layer.pooling_param
        if param.global_pooling:
            return (first[0], first[1], 1, 1)
        kernel = _pairs([param.kernel_size] if param.HasField("kernel_size") else [],
                        param.kernel_h if param.HasField("kernel_h") else None,
                        param.kernel_w if param.HasField("kernel_w") else None, 1)
        has_pad = param.HasField("pad_h") or param.HasField("pad_w")
        pad = _pairs([param.pad], param.pad_h if has_pad else None, param.pad_w if has_pad else None, 0)
        stride = _pairs([param.stride], param.stride_h if param.HasField("stride_h") else None,
                        param.stride_w if param.HasField("stride_w") else None, 1)
        spatial = []
        for size, k, p, s in zip(first[2:], kernel, pad, stride):
            if size is None:
                spatial.append(None)
                continue
            pooled = math.ceil((size + 2 * p - k) / s) + 1  # Caffe rounds up
            if p and (pooled - 1) * s >= size + p:
                pooled -= 1  # the last window must start inside the image
            spatial.append(pooled)
        return (first[0], first[1], *spatial)
    if kind == "InnerProduct":
        axis = layer.inner_product_param.axis % len(first)
        return (*first[:axis], layer.inner_product_param.num_output)
    if kind == "Flatten":
        param = layer.flatten_param
        start, end = param.axis % len(first), param.end_axis % len(first)
        middle = first[start : end + 1]
        flat = None if any(dim is None for dim in middle) else math.prod(middle)
        return (*first[:start], flat, *first[end + 1 :])
    if kind == "Concat":
        axis = layer.concat_param.axis % len(first)
        sizes = [dims[axis] if dims is not None else None for dims in bottoms]
        total = None if any(size is None for size in sizes) else sum(sizes)
        return (*first[:axis], total, *first[axis + 1 :])
    return None
