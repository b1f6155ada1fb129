"""Any KServe v2 gRPC endpoint (a legacy runtime in its own process or container, say)."""

from __future__ import annotations

import asyncio
import functools
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
    out). When the stream breaks, the calls it carried fail and the next call opens a new one. A call that
    times out before its request was sent leaves nothing queued; once nothing moved either way for
    `stuck_after_s`, it ends the stream too, since a server that stops reading would otherwise hold it.
    """

    stuck_after_s = 5.0

    def __init__(self, stub: service_pb2_grpc.GRPCInferenceServiceStub, where: str) -> None:
        self.stub, self.where = stub, where
        self._ids = itertools.count(1)
        self._open: _OpenStream | None = None
        self._serves_streams: asyncio.Future[bool] | None = None

    async def infer(self, request: pb.ModelInferRequest, timeout_s: float) -> pb.ModelInferResponse:
        """The answer within `timeout_s`; StreamUnsupported where the server has no streams."""
        try:
            async with asyncio.timeout(timeout_s):
                if not await self.serves_streams():
                    raise StreamUnsupported
                return await self._call(request)
        except TimeoutError:
            raise BackendTimeout(f"{self.where}: no answer on the stream within {timeout_s:g}s") from None

    async def _call(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        stream = self._open = self._open or _OpenStream(self)
        request.id = call_id = str(next(self._ids))
        answer = stream.answers[call_id] = asyncio.get_running_loop().create_future()
        stream.outgoing.put_nowait(request)
        try:
            return await answer
        except asyncio.CancelledError:  # past the deadline
            if int(call_id) > stream.sent:  # still queued
                request.Clear()
                if asyncio.get_running_loop().time() - stream.moved_at > self.stuck_after_s:
                    self.close(stream)
            raise
        finally:
            del stream.answers[call_id]

    async def serves_streams(self) -> bool:
        if self._serves_streams is None:
            self._serves_streams = asyncio.ensure_future(self._ask_for_streams())
            self._serves_streams.add_done_callback(lambda asked: asked.cancelled() or asked.exception())  # retrieved
        try:
            return await asyncio.shield(self._serves_streams)
        except BackendError:
            self._serves_streams = None  # unreachable now: ask again on the next call
            raise

    async def _ask_for_streams(self) -> bool:
        """Asked by a stream that carries nothing. Asking with real calls would not do: a server without
        streams ends the stream at once, and gRPC reports the next write to it as INTERNAL."""
        call = self.stub.ModelStreamInfer(iter(()))
        try:
            code = await asyncio.wait_for(call.code(), PROBE_TIMEOUT_S)
        except TimeoutError:
            return True  # still open
        finally:
            call.cancel()
        if code == grpc.StatusCode.UNIMPLEMENTED:
            log.info("%s does not serve ModelStreamInfer; candidate calls are unary", self.where)
            return False
        if code != grpc.StatusCode.OK:
            raise BackendError(f"{self.where}: {await call.details() or code.name}", code)
        return True

    def close(self, stream: _OpenStream | None = None, failure=None) -> None:
        """Ends `stream` (the open one by default); the calls it still carries fail with `failure()`."""
        stream = stream or self._open
        if stream is None:
            return
        if self._open is stream:
            self._open = None
        stream.call.cancel()
        stream.outgoing.put_nowait(None)  # ends the request generator, which gRPC's writer task awaits
        failure = failure or (lambda: BackendError(f"{self.where} ended the stream", grpc.StatusCode.UNAVAILABLE))
        for answer in stream.answers.values():
            if not answer.done():
                answer.set_exception(failure())

    async def read(self, stream: _OpenStream) -> None:
        failure = None
        try:
            async for message in stream.call:
                stream.moved_at = asyncio.get_running_loop().time()
                answer = stream.answers.get(message.infer_response.id)
                if answer is None or answer.done():  # given up past its deadline (or an error naming no call)
                    continue
                if message.error_message:
                    answer.set_exception(BackendError(f"{self.where}: {message.error_message}", grpc.StatusCode.UNKNOWN))
                else:
                    answer.set_result(message.infer_response)
        except grpc.aio.AioRpcError as error:
            failure = functools.partial(rpc_failure, self.where, error)
        except Exception:
            log.exception("%s: reading the stream failed", self.where)
        finally:
            self.close(stream, failure)


class _OpenStream:
    """One ModelStreamInfer call: what waits to be sent, and the calls waiting for an answer on it."""

    def __init__(self, owner: InferStream) -> None:
        self.outgoing: asyncio.Queue[pb.ModelInferRequest | None] = asyncio.Queue()
        self.answers: dict[str, asyncio.Future[pb.ModelInferResponse]] = {}
        self.sent = 0  # the id of the last request handed to gRPC
        self.moved_at = asyncio.get_running_loop().time()  # when a request last left or an answer came
        self.call = owner.stub.ModelStreamInfer(self._requests())
        self.reader = asyncio.get_running_loop().create_task(owner.read(self), name="candidate-stream")

    async def _requests(self):
        while (request := await self.outgoing.get()) is not None:
            if request.id in self.answers:  # a call given up before it was sent is not sent
                self.sent = int(request.id)
                self.moved_at = asyncio.get_running_loop().time()
                yield request


class RemoteBackend(Backend):
    runtime = "remote"
    config: RemoteConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._channel: grpc.aio.Channel | None = None
        self._stub: service_pb2_grpc.GRPCInferenceServiceStub | None = None
        self.over_stream = False  # set for the shadow engine's candidate where `shadow_calls` asks for a stream
        self._stream: InferStream | None = None
        self._where = f"{self.runtime} {self.config.url} model {self.config.model!r}"  # what its errors name

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
        deadline = asyncio.get_running_loop().time() + timeout_s
        response = None
        if self.over_stream:
            try:
                response = await self._current_stream().infer(request, timeout_s)
            except StreamUnsupported:
                pass
        if response is None:
            try:
                response = await self._stub.ModelInfer(request, timeout=deadline - asyncio.get_running_loop().time())
            except grpc.aio.AioRpcError as error:
                raise rpc_failure(self._where, error) from None
        try:
            return decode_outputs(response)
        except ShadowServeError as exc:
            raise BackendError(f"{self.runtime} {self.config.url} sent a malformed response: {exc}") from None

    def _current_stream(self) -> InferStream:
        if self._stream is None or self._stream.stub is not self._stub:  # a new channel: a new stream
            self._end_stream()
            self._stream = InferStream(self._stub, self._where)
        return self._stream

    def _end_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    async def close(self) -> None:
        await super().close()
        self._end_stream()
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

    def describe(self) -> dict[str, str]:
        return {"runtime": self.runtime, "url": self.config.url, "model": self.config.model}
