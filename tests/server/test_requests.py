"""Requests at the boundary: every datatype in both encodings, and clear statuses for bad ones."""

from __future__ import annotations

import asyncio

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


def _zero_batch(request: pb.ModelInferRequest) -> None:
    for index, tensor in enumerate(request.inputs):
        tensor.shape[0] = 0
        request.raw_input_contents[index] = b""


def _set(parameters, key: str) -> None:
    parameters[key].string_param = "x"


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
        (lambda r: r.inputs[0].contents.fp32_contents.extend([1.0] * 6), grpc.StatusCode.INVALID_ARGUMENT,
         "input 'in_FP32' has typed contents and the request has raw_input_contents; send one or the other"),
        (lambda r: _zero_batch(r), grpc.StatusCode.INVALID_ARGUMENT, "input 'in_FP32': shape [0, 3] holds no elements; zero-size tensors are not served"),
        (lambda r: r.raw_input_contents.__setitem__(5, b"\x02" * 6), grpc.StatusCode.INVALID_ARGUMENT,
         "tensor 'in_BOOL': BOOL raw contents must be bytes 0 or 1"),
        (lambda r: [r.outputs.add(name="out_FP32") for _ in range(2)], grpc.StatusCode.INVALID_ARGUMENT,
         "output(s) ['out_FP32'] requested more than once"),
        (lambda r: _set(r.inputs[0].parameters, "shared_memory_region"), grpc.StatusCode.UNIMPLEMENTED,
         "input 'in_FP32': shared memory is not supported; send the tensor in the request"),
        (lambda r: _set(r.outputs.add(name="out_FP32").parameters, "classification"), grpc.StatusCode.UNIMPLEMENTED, "output 'out_FP32': the classification extension is not supported"),
        (lambda r: setattr(r, "model_name", "m" * 5000), grpc.StatusCode.NOT_FOUND,
         f"unknown model '{'m' * 63}...; this gateway serves ['echo', 'echo_typed']"),
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


async def test_typed_values_outside_their_datatype_are_refused(gateway):
    _, stub = gateway
    request = typed_request("echo_typed", skip=("FP16",))
    request.inputs[list(DTYPES).index("UINT8") - 1].contents.uint_contents[0] = 300  # FP16 skipped before it
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.ModelInfer(request)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.value.details() == "tensor 'in_UINT8': values in uint_contents out of the range of UINT8"


def limited_config(url: str, **limits) -> dict:
    return {"models": [{"name": "echo", "inputs": [{"name": "in_FP32", "datatype": "FP32", "shape": [-1, 3]}],
                        "outputs": [{"name": "out_FP32", "datatype": "FP32", "shape": [-1, 3]}],
                        "legacy": {"runtime": "remote", "url": url, "model": "echo"}, **limits}]}


def fp32_request(batch: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="echo")
    request.inputs.add(name="in_FP32", datatype="FP32", shape=[batch, 3])
    request.raw_input_contents.append(np.arange(batch * 3, dtype=np.float32).tobytes())
    return request


async def test_batch_and_element_limits_name_the_limit(model_server):
    url, legacy = await model_server(Behaviour(echo), model="echo")
    async with running_gateway(limited_config(url, max_batch_size=4, max_tensor_elements=9)) as running:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.grpc_port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            response = await stub.ModelInfer(fp32_request(3))  # 9 elements: at both limits
            assert decoded(response)["out_FP32"].tolist() == np.arange(9, dtype=np.float32).reshape(3, 3).tolist()
            for batch, message in (
                (4, "input 'in_FP32': 12 elements are above max_tensor_elements 9 of model 'echo'"),
                (5, "input 'in_FP32': batch of 5 is above max_batch_size 4 of model 'echo'"),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as failure:
                    await stub.ModelInfer(fp32_request(batch))
                assert (failure.value.code(), failure.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)
    assert legacy.calls == 1


@pytest.mark.parametrize("key, value", [("max_batch_size", 0), ("max_tensor_elements", -1), ("max_concurrent_requests", 0)])
def test_limits_are_validated_at_start_up(key, value):
    from server.config import parse_config
    from server.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"models\[0\]\.{key}: Input should be greater than or equal to 1"):
        parse_config(limited_config("127.0.0.1:1", **{key: value}), "test config")


async def test_requests_beyond_max_concurrent_requests_get_resource_exhausted(model_server):
    url, legacy = await model_server(Behaviour(echo, delay_s=60.0), model="echo")
    async with running_gateway(limited_config(url, max_concurrent_requests=2)) as running:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.grpc_port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            held = [asyncio.ensure_future(stub.ModelInfer(fp32_request(1))) for _ in range(2)]
            await wait_until(lambda: legacy.calls == 2)  # both reached the legacy: two in flight
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await stub.ModelInfer(fp32_request(1))
            assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert failure.value.details() == (
                "model 'echo' already has 2 requests in flight, its max_concurrent_requests; retry later")
            assert sample(running.registry, "shadowserve_requests_total", model="echo", code="RESOURCE_EXHAUSTED",
                          served_by="legacy") == 1
            legacy.delay_s = 0.0
            for call in held:
                call.cancel()  # the client gives up; its slots come back
            await asyncio.gather(*held, return_exceptions=True)
            response = await wait_until_answered(stub, fp32_request(1))
            assert decoded(response)["out_FP32"].tolist() == [[0.0, 1.0, 2.0]]


async def wait_until(predicate, timeout_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def wait_until_answered(stub, request, timeout_s: float = 30.0) -> pb.ModelInferResponse:
    """The gateway frees a cancelled request's slot once its cancellation reaches the server."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            return await stub.ModelInfer(request)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.01)


def mxnet_config(models) -> dict:
    """The demo's MXNet classifier, declared with free image sizes it cannot all run."""
    legacy = {"runtime": "mxnet", "symbol": str(models.symbol), "params": str(models.params),
              "tensor_names": {"image": "data"}, "input_names": ["data"]}
    return {"models": [{"name": "classifier", "legacy": legacy,
                        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 3, -1, -1]}],
                        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 6]}]}]}


def image_request(shape: list[int]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="classifier")
    request.inputs.add(name="image", datatype="FP32", shape=shape)
    request.raw_input_contents.append(np.zeros(shape, np.float32).tobytes())
    return request


async def test_mxnet_zero_batches_and_runtime_errors_get_clean_statuses(demo_models, model_server, caplog):
    url, legacy = await model_server(Behaviour(echo), model="echo")
    async with running_gateway(mxnet_config(demo_models)) as mxnet, running_gateway(limited_config(url)) as remote:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{mxnet.grpc_port}") as mxnet_channel, \
                grpc.aio.insecure_channel(f"127.0.0.1:{remote.grpc_port}") as remote_channel:
            mxnet_stub = service_pb2_grpc.GRPCInferenceServiceStub(mxnet_channel)
            remote_stub = service_pb2_grpc.GRPCInferenceServiceStub(remote_channel)
            for stub, request, message in (  # one behaviour, whatever the runtime
                (mxnet_stub, image_request([0, 3, 32, 32]), "input 'image': shape [0, 3, 32, 32] holds no elements"),
                (remote_stub, fp32_request(0), "input 'in_FP32': shape [0, 3] holds no elements"),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as failure:
                    await stub.ModelInfer(request)
                assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert failure.value.details() == message + "; zero-size tensors are not served"
            assert legacy.calls == 0

            with pytest.raises(grpc.aio.AioRpcError) as failure:  # 16x16 images do not fit its dense layer
                await mxnet_stub.ModelInfer(image_request([1, 3, 16, 16]))
            assert failure.value.code() == grpc.StatusCode.INTERNAL
            assert failure.value.details() == "mxnet inference failed; the gateway log has the details"
            assert "MXNetError" in caplog.text  # the operator still reads the runtime's own words
            response = await mxnet_stub.ModelInfer(image_request([1, 3, 32, 32]))
            assert response.outputs[0].shape == [1, 6]
