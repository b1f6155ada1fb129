"""Property-based bad input: hypothesis drives ModelInfer over real gRPC against a real gateway.

Whatever a client sends, it gets INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED or UNIMPLEMENTED
(or OK for a request that is in fact valid), never INTERNAL or UNKNOWN; the gateway keeps answering
good requests and its memory stays flat. The gateway and its legacies run on an event loop in a
background thread, so hypothesis drives plain blocking gRPC calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import threading
from pathlib import Path
from typing import Iterator

import grpc
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import serialize_byte_tensor

from tests.conftest import running_gateway
from tests.server.test_protocol import TritonCodecModel
from tests.server.test_protocol import pair as texts_pair
from tests.support.kserve import start_model_server

ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNIMPLEMENTED}
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

NUMS = {"name": "nums", "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
        "max_batch_size": 64, "max_tensor_elements": 192}


@pytest.fixture(scope="module")
def gateway_address() -> Iterator[str]:
    """A real gateway serving `nums` (FP32, with limits) and `texts` (BYTES and BF16) from remote legacies."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="gateway-loop", daemon=True)
    thread.start()
    run = lambda coroutine: asyncio.run_coroutine_threadsafe(coroutine, loop).result(60)  # noqa: E731
    stack = contextlib.AsyncExitStack()

    async def start() -> str:
        nums_server, nums_url, _ = await start_model_server("m")
        stack.push_async_callback(nums_server.stop, 0)
        texts_server = grpc.aio.server()
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(TritonCodecModel(), texts_server)
        texts_url = f"127.0.0.1:{texts_server.add_insecure_port('127.0.0.1:0')}"
        await texts_server.start()
        stack.push_async_callback(texts_server.stop, 0)
        remote = {"runtime": "remote", "url": nums_url, "model": "m"}
        config = {"models": [{**NUMS, "legacy": remote}, texts_pair(texts_url)]}
        gateway = await stack.enter_async_context(running_gateway(config))
        return f"127.0.0.1:{gateway.grpc_port}"

    try:
        yield run(start())
    finally:
        run(stack.aclose())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture(scope="module")
def channel(gateway_address: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(gateway_address) as channel:
        yield channel


def good_request(model: str, batch: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id="good")
    if model == "nums":
        request.inputs.add(name="x", datatype="FP32", shape=[batch, 3])
        request.raw_input_contents.append(np.arange(batch * 3, dtype=np.float32).tobytes())
        return request
    text = np.array([[b"a" * row, b"\xff"] for row in range(batch)], dtype=object)
    request.inputs.add(name="text", datatype="BYTES", shape=[batch, 2])
    request.inputs.add(name="number", datatype="BF16", shape=[batch, 3])
    request.raw_input_contents.extend([serialize_byte_tensor(text).item(),
                                       np.ones((batch, 3), ml_dtypes.bfloat16).tobytes()])
    return request


def assert_good_answer(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    response = stub.ModelInfer(good_request("nums", 2), timeout=10)
    assert np.frombuffer(response.raw_output_contents[0], np.float32).tolist() == [0, 2, 4, 6, 8, 10]
    response = stub.ModelInfer(good_request("texts", 2), timeout=10)
    assert [out.name for out in response.outputs] == ["text_out", "number_out"]


def outcome(call, request) -> grpc.StatusCode:
    try:
        call(request, timeout=10)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
             "FP16", "FP32", "FP64", "BF16", "BYTES", "", "FOO", "fp32"]
DIMS = st.one_of(st.integers(-3, 5), st.sampled_from([2**31, 2**62, 2**63 - 1, -(2**63)]))
NAMES = st.one_of(st.sampled_from(["", "x", "y", "text", "number", "nums", "texts", "n" * 100_000]), st.text(max_size=40))
TYPED = {
    "bool_contents": st.lists(st.booleans(), max_size=12),
    "int_contents": st.lists(st.integers(-(2**31), 2**31 - 1), max_size=12),
    "int64_contents": st.lists(st.integers(-(2**63), 2**63 - 1), max_size=12),
    "uint_contents": st.lists(st.integers(0, 2**32 - 1), max_size=12),
    "uint64_contents": st.lists(st.integers(0, 2**64 - 1), max_size=12),
    "fp32_contents": st.lists(st.floats(width=32), max_size=12),
    "fp64_contents": st.lists(st.floats(), max_size=12),
    "bytes_contents": st.lists(st.binary(max_size=8), max_size=12),
}
PARAMETER = st.one_of(st.booleans().map(lambda v: pb.InferParameter(bool_param=v)),
                      st.integers(-(2**63), 2**63 - 1).map(lambda v: pb.InferParameter(int64_param=v)),
                      st.text(max_size=20).map(lambda v: pb.InferParameter(string_param=v)))


def mutate(request: pb.ModelInferRequest, data: st.DataObject) -> None:
    """Apply a few drawn breakages to a good request."""
    for kind in data.draw(st.lists(st.sampled_from([
        "datatype", "batch", "shape", "raw", "splice", "typed_and_raw", "typed_only", "input_name", "model_name",
        "version", "parameters", "input_parameters", "outputs", "extra_input",
    ]), max_size=3)):
        tensor = request.inputs[data.draw(st.integers(0, len(request.inputs) - 1))] if request.inputs else None
        raw = request.raw_input_contents
        index = data.draw(st.integers(0, len(raw) - 1)) if raw else None
        if kind == "datatype" and tensor is not None:
            tensor.datatype = data.draw(st.one_of(st.sampled_from(DATATYPES), st.text(max_size=12)))
        elif kind == "batch" and tensor is not None:  # zero, negative, enormous batches of the right rank
            tensor.shape[0] = data.draw(DIMS)
        elif kind == "shape" and tensor is not None:
            tensor.ClearField("shape")
            tensor.shape.extend(data.draw(st.lists(DIMS, max_size=6)))
        elif kind == "raw" and index is not None:
            raw[index] = data.draw(st.binary(max_size=96))
        elif kind == "splice" and index is not None:  # BYTES length prefixes and byte counts that no longer fit
            cut = data.draw(st.integers(0, len(raw[index])))
            inserted = data.draw(st.one_of(st.binary(max_size=8), st.integers(0, 2**32 - 1).map(struct.Struct("<I").pack)))
            raw[index] = raw[index][:cut] + inserted + raw[index][cut + data.draw(st.integers(0, 8)):]
        elif kind in ("typed_and_raw", "typed_only") and tensor is not None:
            if kind == "typed_only":
                request.ClearField("raw_input_contents")
            field = data.draw(st.sampled_from(sorted(TYPED)))
            getattr(tensor.contents, field).extend(data.draw(TYPED[field]))
        elif kind == "input_name" and tensor is not None:
            tensor.name = data.draw(NAMES)
        elif kind == "model_name":
            request.model_name = data.draw(NAMES)
        elif kind == "version":
            request.model_version = data.draw(st.one_of(st.sampled_from(["", "1", "2", "-1"]), st.text(max_size=5)))
        elif kind == "parameters":
            for key, value in data.draw(st.dictionaries(st.text(max_size=20), PARAMETER, max_size=4)).items():
                request.parameters[key].CopyFrom(value)
        elif kind == "input_parameters" and tensor is not None:
            keys = st.one_of(st.text(max_size=20), st.sampled_from(["shared_memory_region", "binary_data_size"]))
            for key, value in data.draw(st.dictionaries(keys, PARAMETER, max_size=3)).items():
                tensor.parameters[key].CopyFrom(value)
        elif kind == "outputs":
            for name in data.draw(st.lists(NAMES, max_size=3)):
                request.outputs.add(name=name)
        elif kind == "extra_input":
            request.inputs.add(name=data.draw(NAMES), datatype=data.draw(st.sampled_from(DATATYPES)),
                               shape=data.draw(st.lists(DIMS, max_size=4)))


@FUZZ
@given(data=st.data())
def test_broken_requests_get_clear_statuses(channel, data):
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    request = good_request(data.draw(st.sampled_from(["nums", "texts"])), data.draw(st.integers(1, 4)))
    mutate(request, data)
    code = outcome(stub.ModelInfer, request)
    event(code.name)
    assert code in ALLOWED | {grpc.StatusCode.OK}, code


@FUZZ
@given(message=st.one_of(
    st.binary(max_size=256),
    st.tuples(st.binary(max_size=4), st.integers(0, 200), st.binary(min_size=1, max_size=8)).map(
        lambda t: (lambda good: good[:t[1]] + t[2] + good[t[1] + len(t[0]):])(good_request("nums", 1).SerializeToString())),
))
def test_raw_garbage_as_the_request_message(channel, message):
    code = outcome(channel.unary_unary(MODEL_INFER), message)
    event(code.name)
    assert code in ALLOWED | {grpc.StatusCode.OK}, code


def test_invalid_utf8_and_ten_thousand_inputs(channel):
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    garbled = good_request("nums", 1).SerializeToString().replace(b"nums", b"n\xc3\x28s")
    with pytest.raises(grpc.RpcError) as failure:
        channel.unary_unary(MODEL_INFER)(garbled, timeout=10)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid inference.ModelInferRequest message" in failure.value.details()

    crowded = good_request("nums", 1)
    for index in range(10_000):
        crowded.inputs.add(name=f"x{index}", datatype="FP32", shape=[1, 3])
        crowded.raw_input_contents.append(bytes(12))
    with pytest.raises(grpc.RpcError) as failure:
        stub.ModelInfer(crowded, timeout=10)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.value.details() == "request has 10001 inputs; model 'nums' takes 1: ['x']"

    stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
    with pytest.raises(grpc.RpcError) as failure:
        list(stream(iter([garbled]), timeout=10))
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert_good_answer(stub)


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def bad_requests() -> list[tuple[str, bytes]]:
    """One of each kind, a few a MiB large: a leak of their buffers would show at once."""
    big = good_request("nums", 64)
    big.raw_input_contents[0] = bytes(2 << 20)  # byte count that does not match
    huge_shape = good_request("nums", 1)
    huge_shape.inputs[0].shape[:] = [2**62, 3]
    typed_and_raw = good_request("nums", 1)
    typed_and_raw.inputs[0].contents.fp32_contents.extend([1.0] * 3)
    broken_prefix = good_request("texts", 1)
    broken_prefix.raw_input_contents[0] = struct.pack("<I", 2**31) + bytes(1 << 20)
    many_outputs = good_request("nums", 1)
    for _ in range(1000):
        many_outputs.outputs.add(name="y" * 100)
    unknown = good_request("nope" * 10_000, 1)
    return [(MODEL_INFER, request.SerializeToString())
            for request in (big, huge_shape, typed_and_raw, broken_prefix, many_outputs, unknown)] + [
        (MODEL_INFER, b"\xff" * (1 << 20)), ("/inference.GRPCInferenceService/ModelConfig", b"\x0a\x02\xc3\x28")]


def test_memory_stays_flat_under_bad_input(channel):
    requests = [(channel.unary_unary(method), message) for method, message in bad_requests()]

    def round_of_bad_requests() -> None:
        for call, message in requests:
            assert outcome(call, message) in ALLOWED

    for _ in range(20):  # warm up: allocator pools, gRPC buffers
        round_of_bad_requests()
    before = rss_bytes()
    for _ in range(100):  # about 500 MiB of bad requests in all
        round_of_bad_requests()
    growth = rss_bytes() - before
    assert growth < 32 << 20, f"RSS grew by {growth / 2**20:.1f} MiB over 800 bad requests"
    assert_good_answer(service_pb2_grpc.GRPCInferenceServiceStub(channel))
