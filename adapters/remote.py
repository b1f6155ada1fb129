"""Any KServe v2 gRPC endpoint (a legacy runtime in its own process or container, say)."""

from __future__ import annotations

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


def rpc_failure(role_text: str, error: grpc.aio.AioRpcError) -> BackendError:
    """The backend's own status, kept: DEADLINE_EXCEEDED stays a timeout, UNAVAILABLE stays UNAVAILABLE."""
    message = f"{role_text}: {error.details() or error.code().name}"
    if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return BackendTimeout(message)
    if error.code() == grpc.StatusCode.CANCELLED:  # the backend went away mid-call; our client cancelled nothing
        return BackendError(message, grpc.StatusCode.UNAVAILABLE)
    return BackendError(message, error.code())


class RemoteBackend(Backend):
    runtime = "remote"
    config: RemoteConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._channel: grpc.aio.Channel | None = None
        self._stub: service_pb2_grpc.GRPCInferenceServiceStub | None = None

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
        try:
            response = await self._stub.ModelInfer(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as error:
            raise rpc_failure(f"{self.runtime} {self.config.url} model {self.config.model!r}", error) from None
        try:
            return decode_outputs(response)
        except ShadowServeError as exc:
            raise BackendError(f"{self.runtime} {self.config.url} sent a malformed response: {exc}") from None

    async def close(self) -> None:
        await super().close()
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

    def describe(self) -> dict[str, str]:
        return {"runtime": self.runtime, "url": self.config.url, "model": self.config.model}
