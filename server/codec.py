"""KServe v2 protobuf <-> numpy, with every request checked before a runtime sees it.

Zero-size inputs (a dimension of 0) are refused with INVALID_ARGUMENT: runtimes disagree on
them (MXNet fails, a remote server may answer an empty batch), so no runtime ever sees one.
"""

from __future__ import annotations

import math
import struct
from typing import Iterable, Mapping, Sequence

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from server.config import TensorConfig
from server.errors import InvalidRequest, Unsupported
from server.tensors import V2_TO_NUMPY, v2_datatype

# v2 datatype -> the typed `contents` field that carries it (FP16 and BF16 travel only as raw bytes).
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
    "BYTES": "bytes_contents",
}
# Datatypes narrower than their typed field: values must be checked against their range.
_NARROW_FIELD = {"INT8": np.int32, "INT16": np.int32, "UINT8": np.uint32, "UINT16": np.uint32}
_LENGTH = struct.Struct("<I")  # the length prefix of each BYTES element
SHOWN_CHARS = 64  # longest client-chosen text quoted back in an error message
SHM_PARAMETER = "shared_memory_region"


def shown(value: object, quote: bool = True) -> str:
    """`value` as error messages quote it, cut short: clients choose names and shapes of any length."""
    text = repr(value) if quote and isinstance(value, str) else str(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."


def _from_raw(name: str, datatype: str, shape: Sequence[int], count: int, raw: bytes) -> np.ndarray:
    if datatype == "BYTES":
        return _bytes_from_raw(name, shape, count, raw)
    dtype = V2_TO_NUMPY[datatype]
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise InvalidRequest(
            f"tensor {shown(name)}: {len(raw)} bytes of raw contents, but shape {shown(list(shape))} "
            f"of {datatype} needs {expected} bytes"
        )
    if datatype == "BOOL" and raw.translate(None, b"\x00\x01"):
        raise InvalidRequest(f"tensor {shown(name)}: BOOL raw contents must be bytes 0 or 1")
    return np.frombuffer(raw, dtype).reshape(shape)


def _bytes_from_raw(name: str, shape: Sequence[int], count: int, raw: bytes) -> np.ndarray:
    """BYTES raw contents: each element a 4-byte little-endian length, then that many bytes."""
    if count * _LENGTH.size > len(raw):
        raise InvalidRequest(
            f"tensor {shown(name)}: {len(raw)} bytes of raw contents cannot hold the {count} BYTES elements "
            f"of shape {shown(list(shape))} (each needs a 4-byte length prefix)"
        )
    items = np.empty(count, dtype=object)
    offset = 0
    for index in range(count):
        if offset + _LENGTH.size > len(raw):
            raise InvalidRequest(f"tensor {shown(name)}: BYTES element {index} has no length prefix; contents end first")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if offset + length > len(raw):
            raise InvalidRequest(
                f"tensor {shown(name)}: BYTES element {index} claims {length} bytes, but only "
                f"{len(raw) - offset} remain"
            )
        items[index] = raw[offset:offset + length]
        offset += length
    if offset != len(raw):
        raise InvalidRequest(
            f"tensor {shown(name)}: {len(raw) - offset} bytes left after the {count} BYTES elements "
            f"of shape {shown(list(shape))}"
        )
    return items.reshape(shape)


def _from_contents(name: str, datatype: str, shape: Sequence[int], count: int,
                   contents: pb.InferTensorContents) -> np.ndarray:
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidRequest(f"tensor {shown(name)}: {datatype} data must be sent as raw contents")
    values = getattr(contents, field)
    if len(values) != count:
        raise InvalidRequest(
            f"tensor {shown(name)}: {len(values)} values in {field}, but shape {shown(list(shape))} needs {count}"
        )
    if datatype == "BYTES":
        items = np.empty(count, dtype=object)
        items[:] = list(values)
        return items.reshape(shape)
    array = np.array(values, dtype=V2_TO_NUMPY[datatype])
    if datatype in _NARROW_FIELD and not np.array_equal(array, np.array(values, dtype=_NARROW_FIELD[datatype])):
        raise InvalidRequest(f"tensor {shown(name)}: values in {field} out of the range of {datatype}")
    return array.reshape(shape)


def _array(name: str, datatype: str, shape: Sequence[int], raw: bytes | None,
           contents: pb.InferTensorContents) -> np.ndarray:
    count = math.prod(shape)
    if raw is not None:
        return _from_raw(name, datatype, shape, count, raw)
    return _from_contents(name, datatype, shape, count, contents)


def _check_shape(name: str, shape: Sequence[int], declared: Sequence[int], model: str,
                 max_batch_size: int | None, max_tensor_elements: int | None) -> None:
    if any(dim < 0 for dim in shape):
        raise InvalidRequest(f"input {shown(name)}: negative dimension in shape {shown(list(shape))}")
    if len(shape) != len(declared) or any(want not in (-1, got) for got, want in zip(shape, declared)):
        raise InvalidRequest(
            f"input {shown(name)}: shape {shown(list(shape))} does not match the model's {list(declared)}"
        )
    if 0 in shape:
        raise InvalidRequest(
            f"input {shown(name)}: shape {shown(list(shape))} holds no elements; zero-size tensors are not served"
        )
    if max_batch_size is not None and shape and shape[0] > max_batch_size:
        raise InvalidRequest(
            f"input {shown(name)}: batch of {shape[0]} is above max_batch_size {max_batch_size} of model {shown(model)}"
        )
    if max_tensor_elements is not None and (count := math.prod(shape)) > max_tensor_elements:
        raise InvalidRequest(
            f"input {shown(name)}: {count} elements are above max_tensor_elements {max_tensor_elements} "
            f"of model {shown(model)}"
        )


def decode_inputs(
    request: pb.ModelInferRequest,
    declared: Mapping[str, TensorConfig],
    max_batch_size: int | None = None,
    max_tensor_elements: int | None = None,
) -> dict[str, np.ndarray]:
    """The request's input tensors, validated against the model's declared inputs and limits."""
    model = request.model_name
    if len(request.inputs) > len(declared):
        raise InvalidRequest(
            f"request has {len(request.inputs)} inputs; model {shown(model)} takes {len(declared)}: {sorted(declared)}"
        )
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidRequest(
            f"request has {len(request.inputs)} inputs but {len(raw)} raw_input_contents; "
            "send raw contents for every input or for none"
        )
    inputs: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        spec = declared.get(name)
        if spec is None:
            raise InvalidRequest(f"model {shown(model)} has no input {shown(name)}; its inputs are {sorted(declared)}")
        if name in inputs:
            raise InvalidRequest(f"input {shown(name)} appears more than once")
        if tensor.datatype != spec.datatype:
            raise InvalidRequest(
                f"input {shown(name)}: datatype {shown(tensor.datatype, quote=False) if tensor.datatype else '(empty)'} "
                f"but the model expects {spec.datatype}"
            )
        if SHM_PARAMETER in tensor.parameters:
            raise Unsupported(f"input {shown(name)}: shared memory is not supported; send the tensor in the request")
        if raw and tensor.contents.ByteSize():
            raise InvalidRequest(
                f"input {shown(name)} has typed contents and the request has raw_input_contents; send one or the other"
            )
        _check_shape(name, tensor.shape, spec.shape, model, max_batch_size, max_tensor_elements)
        inputs[name] = _array(name, tensor.datatype, tensor.shape, raw[index] if raw else None, tensor.contents)
    missing = [name for name in declared if name not in inputs]
    if missing:
        raise InvalidRequest(f"model {shown(model)} needs input(s) {missing}, missing from the request")
    return inputs


def requested_outputs(request: pb.ModelInferRequest, declared: Iterable[str]) -> tuple[str, ...]:
    """The outputs the client asked for (all when none), each at most once, as plain tensors."""
    names = tuple(output.name for output in request.outputs)
    declared = tuple(declared)
    unknown = [shown(name, quote=False) for name in names if name not in declared]
    if unknown:
        raise InvalidRequest(
            f"model {shown(request.model_name)} has no output(s) {unknown[:8]}; its outputs are {sorted(declared)}"
        )
    if len(set(names)) != len(names):
        raise InvalidRequest(f"output(s) {shown(sorted({n for n in names if names.count(n) > 1}))} requested more than once")
    for output in request.outputs:
        if SHM_PARAMETER in output.parameters:
            raise Unsupported(f"output {shown(output.name)}: shared memory is not supported; outputs come in the response")
        if "classification" in output.parameters:
            raise Unsupported(f"output {shown(output.name)}: the classification extension is not supported")
    return names


def decode_outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Output tensors of a backend's response (raw or typed contents)."""
    raw = response.raw_output_contents
    outputs = {}
    for index, tensor in enumerate(response.outputs):
        if tensor.datatype not in V2_TO_NUMPY:
            raise InvalidRequest(f"output {shown(tensor.name)} has unsupported datatype {shown(tensor.datatype)}")
        if any(dim < 0 for dim in tensor.shape):
            raise InvalidRequest(f"output {shown(tensor.name)}: negative dimension in shape {shown(list(tensor.shape))}")
        outputs[tensor.name] = _array(
            tensor.name, tensor.datatype, tensor.shape, raw[index] if index < len(raw) else None, tensor.contents
        )
    return outputs


def raw_contents(array: np.ndarray) -> bytes:
    """A tensor's raw contents as the protocol sends them; BYTES elements get their length prefixes."""
    if array.dtype.kind not in "OSU":
        return array.tobytes()
    parts = []
    for item in array.ravel():
        if isinstance(item, str):
            item = item.encode()
        elif not isinstance(item, bytes):
            raise TypeError(f"a BYTES tensor holds a {type(item).__name__}; expected bytes or str")
        parts += (_LENGTH.pack(len(item)), item)
    return b"".join(parts)


def encode_request(model: str, version: str, request_id: str, inputs: Mapping[str, np.ndarray]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for name, array in inputs.items():
        request.inputs.add(name=name, datatype=v2_datatype(array), shape=array.shape)
        request.raw_input_contents.append(raw_contents(array))
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
        response.raw_output_contents.append(raw_contents(array))
    return response
