"""A real KServe v2 gRPC model server whose behaviour a test scripts: compute time, errors, shapes.

It stands in for a legacy service or a candidate Triton deployment over real gRPC on loopback.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Callable

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from server.codec import decode_outputs, encode_response
from server.tensors import V2_TO_NUMPY

Transform = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def scale_by(factor: float, output: str = "y", source: str = "x") -> Transform:
    return lambda inputs: {output: (inputs[source] * np.float32(factor)).astype(inputs[source].dtype)}


@dataclasses.dataclass
class Behaviour:
    """What the server does per request; tests change fields while it runs."""

    transform: Transform = dataclasses.field(default_factory=lambda: scale_by(2.0))
    delay_s: float | Callable[[dict[str, np.ndarray]], float] = 0.0  # or a delay that depends on the inputs
    busy: bool = False  # burn CPU for delay_s instead of sleeping
    fail_with: grpc.StatusCode | None = None
    gate: asyncio.Event | None = None  # while set to a cleared event, calls wait for it
    calls: int = 0
    metadata: pb.ModelMetadataResponse | None = None  # ModelMetadata's answer (a Triton adapter asks); else UNIMPLEMENTED
    streams: bool = True  # serve ModelStreamInfer, as Triton does; else UNIMPLEMENTED
    reads_streams: bool = True  # read what a stream carries; else accept streams and never read them
    streams_opened: int = 0
    stream_requests: int = 0


class ScriptedModelServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, model: str, behaviour: Behaviour) -> None:
        self.model, self.behaviour = model, behaviour

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=request.name == self.model)

    async def ModelMetadata(self, request, context):
        if self.behaviour.metadata is None:
            return _failed(context, grpc.StatusCode.UNIMPLEMENTED, "no metadata scripted")
        return self.behaviour.metadata

    async def ModelInfer(self, request, context):
        answer = await self._answer(request)
        if isinstance(answer, pb.ModelInferResponse):
            return answer
        return _failed(context, *answer)

    async def ModelStreamInfer(self, request_iterator, context):
        """Each message answered as soon as it is done, so answers may come back in another order, as Triton's do."""
        if not self.behaviour.streams:
            _failed(context, grpc.StatusCode.UNIMPLEMENTED, "no streams here")
            return
        self.behaviour.streams_opened += 1
        if not self.behaviour.reads_streams:
            await asyncio.Event().wait()
        answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()

        async def answer(request):
            result = await self._answer(request)
            if isinstance(result, pb.ModelInferResponse):
                await answers.put(pb.ModelStreamInferResponse(infer_response=result))
            else:
                await answers.put(pb.ModelStreamInferResponse(
                    error_message=result[1], infer_response=pb.ModelInferResponse(id=request.id)))

        async def read():
            async with asyncio.TaskGroup() as running:
                async for request in request_iterator:
                    self.behaviour.stream_requests += 1
                    running.create_task(answer(request))
            await answers.put(None)  # the client is done and every answer is out: the stream ends

        reading = asyncio.get_running_loop().create_task(read())
        try:
            while (message := await answers.get()) is not None:
                yield message
        finally:
            reading.cancel()

    async def _answer(self, request) -> pb.ModelInferResponse | tuple[grpc.StatusCode, str]:
        behaviour = self.behaviour
        behaviour.calls += 1
        if request.model_name != self.model:
            return grpc.StatusCode.NOT_FOUND, f"no model {request.model_name}"
        inputs = {
            tensor.name: np.frombuffer(raw, V2_TO_NUMPY[tensor.datatype]).reshape(tensor.shape)
            for tensor, raw in zip(request.inputs, request.raw_input_contents)
        }
        if behaviour.gate is not None:
            await behaviour.gate.wait()
        delay_s = behaviour.delay_s(inputs) if callable(behaviour.delay_s) else behaviour.delay_s
        if delay_s:
            if behaviour.busy:
                end = asyncio.get_running_loop().time() + delay_s
                while asyncio.get_running_loop().time() < end:
                    pass
            else:
                await asyncio.sleep(delay_s)
        if behaviour.fail_with is not None:
            return behaviour.fail_with, "scripted failure"
        return encode_response(self.model, "1", request, behaviour.transform(inputs))


def _failed(context, code: grpc.StatusCode, details: str) -> None:
    """A failed status without context.abort(), whose exception leaves a reference cycle per call."""
    context.set_code(code)
    context.set_details(details)


async def start_model_server(model: str, behaviour: Behaviour | None = None, port: int = 0,
                             credentials: grpc.ServerCredentials | None = None) -> tuple[grpc.aio.Server, str, Behaviour]:
    """`credentials`: serve TLS with them; plaintext by default."""
    behaviour = behaviour or Behaviour()
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 512 << 20),
                                      ("grpc.max_send_message_length", 512 << 20)])
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(ScriptedModelServicer(model, behaviour), server)
    listen = f"127.0.0.1:{port}"
    port = server.add_insecure_port(listen) if credentials is None else server.add_secure_port(listen, credentials)
    await server.start()
    return server, f"127.0.0.1:{port}", behaviour


__all__ = ["Behaviour", "scale_by", "start_model_server", "decode_outputs"]
