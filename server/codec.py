"""KServe v2 protobuf <-> numpy, with every request checked before a runtime sees it."""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from server.config import TensorConfig
from server.errors import InvalidRequest
from server.tensors import V2_TO_NUMPY, v2_datatype

# v2 datatype -> the typed `contents` field that carries it (FP16 travels only as raw bytes).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def _array(name: str, datatype: str, shape: Sequence[int], raw: bytes | None, contents: pb.InferTensorContents) -> np.ndarray:
    dtype = V2_TO_NUMPY[datatype]
    count = math.prod(shape)
    if raw is not None:
        expected = count * dtype.itemsize
        if len(raw) != expected:
            raise InvalidRequest(
                f"tensor {name!r}: {len(raw)} bytes of raw contents, but shape {list(shape)} "
                f"of {datatype} needs {expected} bytes"
            )
        return np.frombuffer(raw, dtype).reshape(shape)
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidRequest(f"tensor {name!r}: {datatype} data must be sent as raw contents")
    values = getattr(contents, field)
    if len(values) != count:
        raise InvalidRequest(
            f"tensor {name!r}: {len(values)} values in {field}, but shape {list(shape)} needs {count}"
        )
    return np.array(values, dtype=dtype).reshape(shape)


def _check_shape(name: str, shape: Sequence[int], declared: Sequence[int]) -> None:
    if any(dim < 0 for dim in shape):
        raise InvalidRequest(f"input {name!r}: negative dimension in shape {list(shape)}")
    if len(shape) != len(declared) or any(want not in (-1, got) for got, want in zip(shape, declared)):
        raise InvalidRequest(f"input {name!r}: shape {list(shape)} does not match the model's {list(declared)}")


def decode_inputs(request: pb.ModelInferRequest, declared: Mapping[str, TensorConfig]) -> dict[str, np.ndarray]:
    """The request's input tensors, validated against the model's declared inputs."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidRequest(
            f"request has {len(request.inputs)} inputs but {len(raw)} raw_input_contents; "
            "send raw contents for every input or for none"
        )
    inputs: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        spec = declared.get(tensor.name)
        if spec is None:
            raise InvalidRequest(
                f"model {request.model_name!r} has no input {tensor.name!r}; its inputs are {sorted(declared)}"
            )
        if tensor.name in inputs:
            raise InvalidRequest(f"input {tensor.name!r} appears more than once")
        if tensor.datatype != spec.datatype:
            raise InvalidRequest(
                f"input {tensor.name!r}: datatype {tensor.datatype or '(empty)'} but the model expects {spec.datatype}"
            )
        _check_shape(tensor.name, tensor.shape, spec.shape)
        inputs[tensor.name] = _array(tensor.name, tensor.datatype, tensor.shape, raw[index] if raw else None, tensor.contents)
    missing = [name for name in declared if name not in inputs]
    if missing:
        raise InvalidRequest(f"model {request.model_name!r} needs input(s) {missing}, missing from the request")
    return inputs


def requested_outputs(request: pb.ModelInferRequest, declared: Iterable[str]) -> tuple[str, ...]:
    names = tuple(output.name for output in request.outputs)
    unknown = [name for name in names if name not in declared]
    if unknown:
        raise InvalidRequest(f"model {request.model_name!r} has no output(s) {unknown}; its outputs are {sorted(declared)}")
    return names


def decode_outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Output tensors of a backend's response (raw or typed contents)."""
    raw = response.raw_output_contents
    outputs = {}
    for index, tensor in enumerate(response.outputs):
        if tensor.datatype not in V2_TO_NUMPY:
            raise InvalidRequest(f"output {tensor.name!r} has unsupported datatype {tensor.datatype!r}")
        outputs[tensor.name] = _array(
            tensor.name, tensor.datatype, tensor.shape, raw[index] if index < len(raw) else None, tensor.contents
        )
    return outputs


def encode_request(model: str, version: str, request_id: str, inputs: Mapping[str, np.ndarray]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for name, array in inputs.items():
        request.inputs.add(name=name, datatype=v2_datatype(array), shape=array.shape)
        request.raw_input_contents.append(array.tobytes())
    return request


def encode_response(
    model: str,
    version: str,
    request: pb.ModelInferRequest,
    outputs: Mapping[str, np.ndarray],
    requested: Sequence[str] = (),
) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=model, model_version=version, id=request.id)
    for key, value in request.parameters.items():
        response.parameters[key].CopyFrom(value)
    for name in requested or outputs:
        array = outputs[name]
        response.outputs.add(name=name, datatype=v2_datatype(array), shape=array.shape)
        response.raw_output_contents.append(array.tobytes())
    return response
