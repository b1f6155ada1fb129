"""The protocol as a Triton client sees it: every RPC answered clearly, BYTES and BF16 end to end,
nothing internal disclosed, and ports bound where the operator asks."""

from __future__ import annotations

import asyncio
import os
import socket
import urllib.request
from pathlib import Path
from typing import Callable

import grpc
import ml_dtypes
import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException, deserialize_bytes_tensor, serialize_byte_tensor

from server.config import ServerConfig
from tests.conftest import running_gateway, sample
from tests.support.ports import free_port

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
UNSERVED = {
    "RepositoryModelLoad": "RepositoryModelLoad: the gateway serves the models of its config file",
    "RepositoryModelUnload": "RepositoryModelUnload: the gateway serves the models of its config file",
    "SystemSharedMemoryStatus": "shared memory is not supported by this gateway; send tensors in the request",
    "SystemSharedMemoryRegister": "shared memory is not supported",
    "SystemSharedMemoryUnregister": "shared memory is not supported",
    "CudaSharedMemoryStatus": "shared memory is not supported",
    "CudaSharedMemoryRegister": "shared memory is not supported",
    "CudaSharedMemoryUnregister": "shared memory is not supported",
    "TraceSetting": "tracing is not supported by this gateway",
    "LogSettings": "log settings cannot be read or changed over gRPC",
}


class TritonCodecModel(service_pb2_grpc.GRPCInferenceServiceServicer):
    """A KServe v2 model server decoding and encoding with tritonclient's own codecs, not the gateway's.

    `text` (BYTES) comes back as `text_out` through `change`; `number` (BF16) as `number_out`, doubled.
    """

    def __init__(self, change: Callable[[bytes], bytes] = lambda item: item) -> None:
        self.change = change
        self.received: list[dict[str, np.ndarray]] = []

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=True)

    async def ModelInfer(self, request, context):
        raw = {tensor.name: (tensor, data) for tensor, data in zip(request.inputs, request.raw_input_contents)}
        text_tensor, text_raw = raw["text"]
        number_tensor, number_raw = raw["number"]
        text = deserialize_bytes_tensor(text_raw).reshape(text_tensor.shape)
        number = np.frombuffer(number_raw, ml_dtypes.bfloat16).reshape(number_tensor.shape)
        self.received.append({"text": text, "number": number})
        changed = np.vectorize(self.change, otypes=[object])(text)
        doubled = (number.astype(np.float32) * 2).astype(ml_dtypes.bfloat16)
        response = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
        response.outputs.add(name="text_out", datatype="BYTES", shape=changed.shape)
        response.raw_output_contents.append(serialize_byte_tensor(changed).item())
        response.outputs.add(name="number_out", datatype="BF16", shape=doubled.shape)
        response.raw_output_contents.append(doubled.tobytes())
        return response


@pytest.fixture
async def model_servers():
    """`url, model = await start(TritonCodecModel(...))` on a free loopback port; all stopped after the test."""
    servers = []

    async def start(model: TritonCodecModel) -> tuple[str, TritonCodecModel]:
        server = grpc.aio.server()
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(model, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        return f"127.0.0.1:{port}", model

    yield start
    for server in servers:
        await server.stop(0)


def pair(legacy_url: str, candidate_url: str | None = None, name: str = "texts", **extra) -> dict:
    remote = lambda url: {"runtime": "remote", "url": url, "model": "m"}  # noqa: E731
    tensors = lambda suffix: [{"name": f"text{suffix}", "datatype": "BYTES", "shape": [-1, 2]},  # noqa: E731
                              {"name": f"number{suffix}", "datatype": "BF16", "shape": [-1, 3]}]
    config = {"name": name, "inputs": tensors(""), "outputs": tensors("_out"), "legacy": remote(legacy_url), **extra}
    if candidate_url is not None:
        config.update(candidate=remote(candidate_url), shadow_percent=100)
    return config


TEXT = np.array([[b"hello", b""], [b"\x00\xff\x00", "ünïcode".encode()]], dtype=object)
NUMBER = np.array([[1.5, -2.0, 3.0], [0.0, 1e-3, 65504.0]], dtype=ml_dtypes.bfloat16)


def inputs(text: np.ndarray = TEXT, number: np.ndarray = NUMBER) -> list[triton_aio.InferInput]:
    text_input = triton_aio.InferInput("text", list(text.shape), "BYTES")
    text_input.set_data_from_numpy(text)
    number_input = triton_aio.InferInput("number", list(number.shape), "BF16")
    number_input.set_data_from_numpy(number)
    return [text_input, number_input]


async def wait_until(predicate, timeout_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_bytes_and_bf16_reach_both_sides_and_compare(model_servers):
    legacy_url, legacy = await model_servers(TritonCodecModel())
    candidate_url, candidate = await model_servers(TritonCodecModel())
    wrong_url, _ = await model_servers(TritonCodecModel(change=lambda item: item[::-1]))
    config = {"models": [pair(legacy_url, candidate_url), pair(legacy_url, wrong_url, name="reversed")]}
    async with running_gateway(config) as gateway:
        async with triton_aio.InferenceServerClient(f"127.0.0.1:{gateway.grpc_port}") as client:
            result = await client.infer("texts", inputs())
            assert result.get_output("text_out").datatype == "BYTES"
            assert result.get_output("number_out").datatype == "BF16"
            assert result.as_numpy("text_out").tolist() == TEXT.tolist()
            assert result.as_numpy("number_out").tobytes() == (NUMBER.astype(np.float32) * 2).astype(ml_dtypes.bfloat16).tobytes()
            await client.infer("reversed", inputs())
        await wait_until(lambda: candidate.received)  # the shadow engine calls it after the reply
        for side in (legacy, candidate):  # each backend got the client's exact tensors
            assert side.received[0]["text"].tolist() == TEXT.tolist()
            assert side.received[0]["number"].tobytes() == NUMBER.tobytes()
        registry = gateway.registry
        await wait_until(lambda: sample(registry, "shadowserve_comparisons_total", model="texts", verdict="match") == 1)
        await wait_until(lambda: sample(registry, "shadowserve_comparisons_total", model="reversed", verdict="mismatch") == 1)
        divergence = lambda model, measure: sample(  # noqa: E731
            registry, "shadowserve_divergence_sum", model=model, output="text_out", measure=measure)
        # "hello" and "\x00\xff\x00" read the same backwards: 2 of 4 elements differ
        assert (divergence("reversed", "max_abs"), divergence("reversed", "mean_abs")) == (1.0, 0.5)
        assert sample(registry, "shadowserve_divergence_count", model="reversed", output="text_out", measure="rel_l2") == 0


async def test_bytes_as_typed_contents_and_broken_length_prefixes(model_servers):
    legacy_url, legacy = await model_servers(TritonCodecModel())
    async with running_gateway({"models": [pair(legacy_url)]}) as gateway:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            request = pb.ModelInferRequest(model_name="texts")
            request.inputs.add(name="text", datatype="BYTES", shape=[1, 2]).contents.bytes_contents.extend([b"a", b"bc"])
            number = request.inputs.add(name="number", datatype="BF16", shape=[1, 3])
            with pytest.raises(grpc.aio.AioRpcError) as failure:  # BF16 has no typed field
                await stub.ModelInfer(request)
            assert failure.value.details() == "tensor 'number': BF16 data must be sent as raw contents"
            number.ClearField("contents")
            del request.inputs[:]
            request.inputs.add(name="text", datatype="BYTES", shape=[1, 2])
            request.inputs.add(name="number", datatype="BF16", shape=[1, 3])
            request.raw_input_contents.extend([b"\x01\x00\x00\x00a\x02\x00\x00\x00bc", NUMBER[:1].tobytes()])
            response = await stub.ModelInfer(request)
            assert deserialize_bytes_tensor(response.raw_output_contents[0]).tolist() == [b"a", b"bc"]
            for raw, message in (
                (b"\x01\x00\x00\x00a\x09\x00\x00\x00bc", "BYTES element 1 claims 9 bytes, but only 2 remain"),
                (b"\x01\x00\x00\x00a\x02\x00\x00\x00bcd", "1 bytes left after the 2 BYTES elements of shape [1, 2]"),
                (b"\x02\x00\x00\x00ab\x02\x00", "BYTES element 1 has no length prefix; contents end first"),
                (b"\x01\x00", "2 bytes of raw contents cannot hold the 2 BYTES elements of shape [1, 2] "
                                "(each needs a 4-byte length prefix)"),
            ):
                request.raw_input_contents[0] = raw
                with pytest.raises(grpc.aio.AioRpcError) as failure:
                    await stub.ModelInfer(request)
                assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert failure.value.details() == f"tensor 'text': {message}"
    assert len(legacy.received) == 1


async def test_every_rpc_of_the_protocol_answers_a_status_a_client_can_act_on(model_servers, caplog):
    legacy_url, _ = await model_servers(TritonCodecModel())
    async with running_gateway({"models": [pair(legacy_url)]}) as gateway:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
            codes = {}
            for method in SERVICE.methods:
                if method.client_streaming:
                    continue  # ModelStreamInfer: tested with the streaming clients
                request_class = getattr(pb, method.input_type.name)
                response_class = getattr(pb, method.output_type.name)
                call = channel.unary_unary(f"/{SERVICE.full_name}/{method.name}",
                                           request_serializer=request_class.SerializeToString,
                                           response_deserializer=response_class.FromString)
                try:
                    await call(request_class())
                    codes[method.name] = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as error:
                    codes[method.name] = error.code()
                    if method.name in UNSERVED:
                        assert UNSERVED[method.name] in error.details(), method.name
        assert {name for name, code in codes.items() if code == grpc.StatusCode.UNIMPLEMENTED} == set(UNSERVED)
        assert not {code for code in codes.values()} & {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
        assert codes["ModelInfer"] == codes["ModelReady"] == grpc.StatusCode.NOT_FOUND  # no model named ""
        async with triton_aio.InferenceServerClient(f"127.0.0.1:{gateway.grpc_port}") as client:
            for call in (client.load_model("texts"), client.unload_model("texts"),
                         client.get_system_shared_memory_status(), client.get_trace_settings()):
                with pytest.raises(InferenceServerException) as failure:
                    await call
                assert failure.value.status() == "StatusCode.UNIMPLEMENTED"
    assert "unhandled error" not in caplog.text


async def test_repository_index_lists_the_served_models(model_servers):
    legacy_url, _ = await model_servers(TritonCodecModel())
    down = f"127.0.0.1:{free_port()}"  # nothing listens: that legacy never loads
    async with running_gateway({"models": [pair(legacy_url), pair(down, name="down")]}) as gateway:
        async with triton_aio.InferenceServerClient(f"127.0.0.1:{gateway.grpc_port}") as client:
            index = await client.get_model_repository_index(as_json=True)
            assert sorted(index["models"], key=lambda model: model["name"]) == [
                {"name": "down", "version": "1", "state": "UNAVAILABLE", "reason": "the legacy backend is not ready"},
                {"name": "texts", "version": "1", "state": "READY"},
            ]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            ready = await stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
            assert [model.name for model in ready.models] == ["texts"]
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await stub.RepositoryIndex(pb.RepositoryIndexRequest(repository_name="models"))
            assert failure.value.code() == grpc.StatusCode.NOT_FOUND
            assert failure.value.details() == "unknown repository 'models'; this gateway has one, unnamed"


async def client_visible(port: int) -> bytes:
    """Every metadata answer a client can get, serialized."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        answers = [
            await stub.ServerMetadata(pb.ServerMetadataRequest()),
            await stub.ModelMetadata(pb.ModelMetadataRequest(name="texts")),
            await stub.ModelConfig(pb.ModelConfigRequest(name="texts")),
            await stub.RepositoryIndex(pb.RepositoryIndexRequest()),
            await stub.ModelStatistics(pb.ModelStatisticsRequest()),
        ]
    return b"".join(answer.SerializeToString() for answer in answers)


async def test_clients_see_no_backend_unless_the_operator_exposes_it(model_servers):
    legacy_url, _ = await model_servers(TritonCodecModel())
    candidate_url, _ = await model_servers(TritonCodecModel())
    async with running_gateway({"models": [pair(legacy_url, candidate_url)]}) as gateway:
        async with triton_aio.InferenceServerClient(f"127.0.0.1:{gateway.grpc_port}") as client:
            metadata = await client.get_model_metadata("texts")
            config = (await client.get_model_config("texts")).config
        assert metadata.platform == config.platform == "shadowserve"
        assert len(config.parameters) == 0
        seen = await client_visible(gateway.grpc_port)
        for secret in (legacy_url, candidate_url, "remote", "candidate", "legacy", "stage"):
            assert secret.encode() not in seen, secret
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
            ("text", "BYTES", [-1, 2]), ("number", "BF16", [-1, 3])]
        assert [t.data_type for t in config.input] == [mc.TYPE_STRING, mc.TYPE_BF16]

    async with running_gateway({"models": [pair(legacy_url, candidate_url, expose_backend_details=True)]}) as gateway:
        async with triton_aio.InferenceServerClient(f"127.0.0.1:{gateway.grpc_port}") as client:
            metadata = await client.get_model_metadata("texts")
            parameters = (await client.get_model_config("texts")).config.parameters
        assert metadata.platform == "shadowserve (legacy=remote, candidate=remote)"
        assert parameters["candidate_url"].string_value == candidate_url
        assert parameters["stage"].string_value == "shadow"


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the sockets listening on TCP `port`, read from the kernel's tables."""
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            host, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                words = bytes.fromhex(host)  # each 32-bit word in the host's (little-endian) order
                address = socket.inet_ntop(family, b"".join(words[i:i + 4][::-1] for i in range(0, len(words), 4)))
                found.add(address.removeprefix("::ffff:"))  # an IPv6 socket bound to an IPv4 address
    return found


def test_default_binds():
    server = ServerConfig()
    assert server.grpc_listen == "0.0.0.0:8001"  # the front is the service: clients on the network reach it
    assert server.metrics_listen == "0.0.0.0:8002"  # Prometheus scrapes the pod's address, not its loopback
    assert server.admin_listen == "127.0.0.1:8003"  # flips traffic: loopback unless admin_allow_remote


async def test_every_port_binds_where_the_operator_asks(model_servers):
    legacy_url, _ = await model_servers(TritonCodecModel())
    async with running_gateway({"models": [pair(legacy_url)]}) as gateway:  # every *_listen on 127.0.0.1:0
        ports = {"grpc": gateway.grpc_port, "metrics": gateway.metrics_port, "admin": gateway.admin_port}
        assert {name: listening_addresses(port) for name, port in ports.items()} == {
            name: {"127.0.0.1"} for name in ports}
        with urllib.request.urlopen(f"http://127.0.0.1:{gateway.metrics_port}/metrics", timeout=10) as reply:
            assert b"shadowserve_requests_total" in reply.read()


async def test_a_scrape_is_rendered_at_idle_cpu_priority_and_leaves_the_serving_thread_as_it_was(model_servers):
    legacy_url, _ = await model_servers(TritonCodecModel())
    policies: list[int] = []

    class Probe:
        """Notes the scheduling policy of the thread that renders /metrics."""

        def collect(self):
            policies.append(os.sched_getscheduler(0))
            return []

    async with running_gateway({"models": [pair(legacy_url)]}) as gateway:
        gateway.registry.own.register(Probe())
        for _ in range(2):
            with urllib.request.urlopen(f"http://127.0.0.1:{gateway.metrics_port}/metrics", timeout=10) as reply:
                assert b"shadowserve_requests_total" in reply.read()
    assert policies == [os.SCHED_IDLE, os.SCHED_IDLE]
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
