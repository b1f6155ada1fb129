"""Any KServe v2 gRPC endpoint (a legacy runtime in its own process or container, say)."""

from __future__ import annotations

import asyncio
import itertools
import logging

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from adapters.base import Backend
from server.codec import decode_outputs, encode_request
from server.config import RemoteConfig
from server.errors import BackendError, BackendTimeout, ShadowServeError
from server.transport import open_channel

# Generous enough for 64 MiB tensors each way; gRPC's 4 MiB default would reject them.
MAX_MESSAGE_BYTES = 512 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    # A channel of its own: after a failed load a fresh channel must not inherit, from gRPC's
    # process-wide pool, a connection still waiting out its reconnect backoff (up to 2 minutes).
    ("grpc.use_local_subchannel_pool", 1),
    # A backend that comes back is found within seconds, not after gRPC's default backoff of up to 2 minutes.
    ("grpc.max_reconnect_backoff_ms", 2_000),
]
PROBE_TIMEOUT_S = 2.0

log = logging.getLogger("shadowserve.adapters")


def rpc_failure(role_text: str, error: grpc.aio.AioRpcError) -> BackendError:
    """The backend's own status, kept: DEADLINE_EXCEEDED stays a timeout, UNAVAILABLE stays UNAVAILABLE."""
    message = f"{role_text}: {error.details() or error.code().name}"
    if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return BackendTimeout(message)
    if error.code() == grpc.StatusCode.CANCELLED:  # the backend went away mid-call; our client cancelled nothing
        return BackendError(message, grpc.StatusCode.UNAVAILABLE)
    return BackendError(message, error.code())


class StreamUnsupported(Exception):
    """The server has no ModelStreamInfer: call it unary."""


class InferStream:
    """Calls carried by one long-lived ModelStreamInfer stream, answers matched to calls by request id.

    A stream costs the caller less CPU per call than a unary call each (BENCHMARKS.md, figure 15). It
    carries no deadline per call: a call past its deadline is given up here and its late answer dropped.
    An error arrives as text only, so its call fails as UNKNOWN (one naming no call leaves that call to time
    out). When the stream breaks, the calls it carried fail and the next call opens a new one.
    """

    def __init__(self, stub: service_pb2_grpc.GRPCInferenceServiceStub, where: str) -> None:
        self.stub, self.where = stub, where
        self.unsupported = False
        self._outgoing: asyncio.Queue[pb.ModelInferRequest] | None = None
        self._answers: dict[str, asyncio.Future[pb.ModelInferResponse]] = {}
        self._ids = itertools.count()
        self._reader: asyncio.Task | None = None

    async def infer(self, request: pb.ModelInferRequest, timeout_s: float) -> pb.ModelInferResponse:
        if self._outgoing is None:
            self._open()
        request.id = call_id = str(next(self._ids))
        answer = self._answers[call_id] = asyncio.get_running_loop().create_future()
        self._outgoing.put_nowait(request)
        try:
            return await asyncio.wait_for(answer, timeout_s)
        except TimeoutError:
            raise BackendTimeout(f"{self.where}: no answer on the stream within {timeout_s:g}s") from None
        finally:
            del self._answers[call_id]

    def _open(self) -> None:
        outgoing = self._outgoing = asyncio.Queue()

        async def requests():
            while True:
                request = await outgoing.get()
                if request.id in self._answers:  # a call given up before it was sent is not sent
                    yield request

        call = self.stub.ModelStreamInfer(requests())
        self._reader = asyncio.get_running_loop().create_task(self._read(call, outgoing), name="candidate-stream")

    async def _read(self, call: grpc.aio.StreamStreamCall, outgoing: asyncio.Queue) -> None:
        failure: Exception = BackendError(f"{self.where} ended the stream", grpc.StatusCode.UNAVAILABLE)
        try:
            async for message in call:
                answer = self._answers.get(message.infer_response.id)
                if answer is None or answer.done():  # given up past its deadline (or an error naming no call)
                    continue
                if message.error_message:
                    answer.set_exception(BackendError(f"{self.where}: {message.error_message}", grpc.StatusCode.UNKNOWN))
                else:
                    answer.set_result(message.infer_response)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                log.info("%s does not serve ModelStreamInfer; candidate calls are unary", self.where)
                self.unsupported = True
                failure = StreamUnsupported()
            else:
                failure = rpc_failure(self.where, error)
        finally:
            call.cancel()
            if self._outgoing is outgoing:
                self._outgoing = None
            for answer in self._answers.values():
                if not answer.done():
                    answer.set_exception(failure)


class RemoteBackend(Backend):
    runtime = "remote"
    config: RemoteConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._channel: grpc.aio.Channel | None = None
        self._stub: service_pb2_grpc.GRPCInferenceServiceStub | None = None
        self.over_stream = False  # set for the shadow engine's candidate where `shadow_calls` asks for a stream
        self._stream: InferStream | None = None

    def _open(self) -> service_pb2_grpc.GRPCInferenceServiceStub:
        if self._stub is None:
            self._channel = open_channel(self.config.url, self.config.tls, CHANNEL_OPTIONS)
            self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        return self._stub

    async def load(self) -> None:
        stub = self._open()
        try:
            response = await stub.ModelReady(
                pb.ModelReadyRequest(name=self.config.model, version=self.config.version), timeout=5.0
            )
        except grpc.aio.AioRpcError as error:
            await self.close()  # the next attempt connects afresh instead of waiting out a backoff
            raise rpc_failure(f"{self.config.url} model {self.config.model!r} readiness check failed", error) from None
        if not response.ready:
            raise BackendError(f"{self.config.url} reports model {self.config.model!r} not ready", grpc.StatusCode.UNAVAILABLE)
        self.ready = True

    async def probe(self) -> bool:
        try:
            response = await self._open().ModelReady(
                pb.ModelReadyRequest(name=self.config.model, version=self.config.version), timeout=PROBE_TIMEOUT_S)
        except grpc.aio.AioRpcError:
            return False
        return response.ready

    async def run(self, inputs: dict[str, np.ndarray], timeout_s: float) -> dict[str, np.ndarray]:
        if self._stub is None:
            raise BackendError(f"{self.runtime} {self.config.url} is not connected", grpc.StatusCode.UNAVAILABLE)
        request = encode_request(self.config.model, self.config.version, "", inputs)
        where = f"{self.runtime} {self.config.url} model {self.config.model!r}"
        response = await self._infer_streamed(request, timeout_s, where) if self.over_stream else None
        if response is None:
            try:
                response = await self._stub.ModelInfer(request, timeout=timeout_s)
            except grpc.aio.AioRpcError as error:
                raise rpc_failure(where, error) from None
        try:
            return decode_outputs(response)
        except ShadowServeError as exc:
            raise BackendError(f"{self.runtime} {self.config.url} sent a malformed response: {exc}") from None

    async def _infer_streamed(self, request: pb.ModelInferRequest, timeout_s: float,
                              where: str) -> pb.ModelInferResponse | None:
        """The answer carried by this backend's stream; None where the server serves no streams."""
        if self._stream is None or self._stream.stub is not self._stub:  # a new channel: a new stream
            self._stream = InferStream(self._stub, where)
        if self._stream.unsupported:
            return None
        try:
            return await self._stream.infer(request, timeout_s)
        except StreamUnsupported:
            return None

    async def close(self) -> None:
        await super().close()
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

    def describe(self) -> dict[str, str]:
        return {"runtime": self.runtime, "url": self.config.url, "model": self.config.model}
