"""Requests at the boundary: every datatype in both encodings, and clear statuses for bad ones."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from server.codec import CONTENTS_FIELD
from tests.conftest import running_gateway, sample
from tests.support.kserve import Behaviour

DTYPES = {"FP32": np.float32, "FP16": np.float16, "INT64": np.int64, "INT32": np.int32, "UINT8": np.uint8, "BOOL": np.bool_}


def echo(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name.replace("in_", "out_"): array for name, array in inputs.items()}


@pytest.fixture
async def gateway(model_server):
    url, _ = await model_server(Behaviour(echo), model="echo")
    typed = [dt for dt in DTYPES if dt != "FP16"]  # FP16 has no typed contents field
    tensors = lambda prefix, types: [{"name": f"{prefix}_{dt}", "datatype": dt, "shape": [-1, 3]} for dt in types]  # noqa: E731
    legacy = {"runtime": "remote", "url": url, "model": "echo"}
    config = {"models": [
        {"name": "echo", "inputs": tensors("in", DTYPES), "outputs": tensors("out", DTYPES), "legacy": legacy},
        {"name": "echo_typed", "inputs": tensors("in", typed), "outputs": tensors("out", typed),
         "legacy": legacy},
    ]}
    async with running_gateway(config) as running:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.grpc_port}") as channel:
            yield running, service_pb2_grpc.GRPCInferenceServiceStub(channel)


def arrays() -> dict[str, np.ndarray]:
    values = np.array([[0, 1, 2], [3, 4, 5]])
    return {dt: (values % 2).astype(np.bool_) if dt == "BOOL" else values.astype(np.dtype(t)) for dt, t in DTYPES.items()}


def raw_request(data: dict[str, np.ndarray], model: str = "echo") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id="req-1")
    for dt, array in data.items():
        request.inputs.add(name=f"in_{dt}", datatype=dt, shape=array.shape)
        request.raw_input_contents.append(array.tobytes())
    return request


def decoded(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    return {
        out.name: np.frombuffer(raw, np.dtype(DTYPES[out.datatype])).reshape(out.shape)
        for out, raw in zip(response.outputs, response.raw_output_contents)
    }


async def test_every_datatype_round_trips_as_raw_contents(gateway):
    _, stub = gateway
    request = raw_request(arrays())
    request.parameters["trace"].string_param = "abc"
    response = await stub.ModelInfer(request)
    assert response.id == "req-1" and response.model_name == "echo" and response.model_version == "1"
    assert response.parameters["trace"].string_param == "abc"
    got = decoded(response)
    for dt, array in arrays().items():
        assert response.outputs[list(DTYPES).index(dt)].datatype == dt
        assert got[f"out_{dt}"].tobytes() == array.tobytes()


def typed_request(model: str, skip: tuple[str, ...] = ()) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    for dt, array in arrays().items():
        if dt in skip:
            continue
        tensor = request.inputs.add(name=f"in_{dt}", datatype=dt, shape=array.shape)
        if dt in CONTENTS_FIELD:
            getattr(tensor.contents, CONTENTS_FIELD[dt]).extend(array.ravel().tolist())
    return request


async def test_typed_contents_are_accepted_for_every_typed_datatype(gateway):
    _, stub = gateway
    response = await stub.ModelInfer(typed_request("echo_typed", skip=("FP16",)))
    got = decoded(response)
    for dt, array in arrays().items():
        if dt != "FP16":
            assert got[f"out_{dt}"].tobytes() == array.tobytes(), dt


async def test_fp16_needs_raw_contents(gateway):
    _, stub = gateway
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.ModelInfer(typed_request("echo"))
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tensor 'in_FP16': FP16 data must be sent as raw contents" in failure.value.details()


@pytest.mark.parametrize(
    "mutate, code, message",
    [
        (lambda r: setattr(r, "model_name", "nope"), grpc.StatusCode.NOT_FOUND, "unknown model 'nope'"),
        (lambda r: r.inputs[0].shape.__setitem__(0, -2), grpc.StatusCode.INVALID_ARGUMENT, "negative dimension"),
        (lambda r: setattr(r, "model_version", "7"), grpc.StatusCode.NOT_FOUND, "has no version '7'"),
        (lambda r: (r.inputs.pop(), r.raw_input_contents.pop()), grpc.StatusCode.INVALID_ARGUMENT, "needs input(s) ['in_BOOL']"),
        (lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 5), grpc.StatusCode.INVALID_ARGUMENT,
         "tensor 'in_FP32': 5 bytes of raw contents, but shape [2, 3] of FP32 needs 24 bytes"),
        (lambda r: setattr(r.inputs[0], "datatype", "FP64"), grpc.StatusCode.INVALID_ARGUMENT,
         "input 'in_FP32': datatype FP64 but the model expects FP32"),
        (lambda r: r.inputs[0].shape.__setitem__(1, 4), grpc.StatusCode.INVALID_ARGUMENT,
         "input 'in_FP32': shape [2, 4] does not match the model's [-1, 3]"),
        (lambda r: setattr(r.inputs[0], "name", "bogus"), grpc.StatusCode.INVALID_ARGUMENT, "has no input 'bogus'"),
        (lambda r: r.raw_input_contents.pop(), grpc.StatusCode.INVALID_ARGUMENT, "6 inputs but 5 raw_input_contents"),
        (lambda r: r.outputs.add(name="out_nope"), grpc.StatusCode.INVALID_ARGUMENT, "has no output(s) ['out_nope']"),
    ],
)
async def test_bad_requests_get_clear_statuses_and_the_server_keeps_serving(gateway, mutate, code, message):
    running, stub = gateway
    request = raw_request(arrays())
    mutate(request)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.ModelInfer(request)
    assert failure.value.code() == code
    assert message in failure.value.details()
    response = await stub.ModelInfer(raw_request(arrays()))
    assert len(response.outputs) == len(DTYPES)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert sample(running.registry, "shadowserve_requests_total", model="echo", code="INVALID_ARGUMENT", served_by="legacy") == 1


async def test_requested_outputs_are_the_only_ones_returned(gateway):
    _, stub = gateway
    request = raw_request(arrays())
    request.outputs.add(name="out_INT64")
    response = await stub.ModelInfer(request)
    assert [out.name for out in response.outputs] == ["out_INT64"]
    assert decoded(response)["out_INT64"].tolist() == [[0, 1, 2], [3, 4, 5]]


async def test_unknown_model_on_readiness_and_metadata_rpcs(gateway):
    _, stub = gateway
    for call, request in ((stub.ModelReady, pb.ModelReadyRequest(name="nope")),
                          (stub.ModelMetadata, pb.ModelMetadataRequest(name="nope")),
                          (stub.ModelConfig, pb.ModelConfigRequest(name="nope"))):
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await call(request)
        assert failure.value.code() == grpc.StatusCode.NOT_FOUND
        assert "unknown model 'nope'; this gateway serves ['echo', 'echo_typed']" in failure.value.details()
