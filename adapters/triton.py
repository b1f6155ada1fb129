"""A model on a Triton Inference Server, reached through tritonclient.grpc.aio."""

from __future__ import annotations

import grpc
from tritonclient.grpc import aio as triton_aio
from tritonclient.utils import InferenceServerException

from adapters.remote import CHANNEL_OPTIONS, RemoteBackend
from server.config import TensorConfig, TritonConfig
from server.errors import BackendError, BackendTimeout, ConfigError
from server.transport import channel_credentials

LOAD_TIMEOUT_S = 5.0


def triton_failure(message: str, error: InferenceServerException) -> BackendError:
    """tritonclient reports the gRPC status as text ("StatusCode.UNAVAILABLE"); restore the real one.

    DEADLINE_EXCEEDED becomes a BackendTimeout, as for every other backend; a status that is
    missing or unknown (a client-side failure) reads as UNAVAILABLE.
    """
    name = (error.status() or "").rsplit(".", 1)[-1]
    code = grpc.StatusCode[name] if name in grpc.StatusCode.__members__ else grpc.StatusCode.UNAVAILABLE
    text = f"{message}: {error.message()}"
    return BackendTimeout(text) if code == grpc.StatusCode.DEADLINE_EXCEEDED else BackendError(text, code)


def _mismatch(served, wanted: TensorConfig) -> str | None:
    """Why Triton's tensor metadata cannot carry the pair's tensor, or None when it can."""
    shape = list(served.shape)
    if served.datatype != wanted.datatype:
        return f"is {served.datatype}, the pair declares {wanted.datatype}"
    if len(shape) != len(wanted.shape) or any(-1 not in (a, b) and a != b for a, b in zip(shape, wanted.shape)):
        return f"has shape {shape}, the pair declares {wanted.shape}"
    return None


class TritonBackend(RemoteBackend):
    runtime = "triton"
    config: TritonConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._client: triton_aio.InferenceServerClient | None = None

    async def load(self) -> None:
        if self._client is None:
            creds = channel_credentials(self.config.tls) if self.config.tls is not None else None
            self._client = triton_aio.InferenceServerClient(self.config.url, creds=creds, channel_args=CHANNEL_OPTIONS)
        model, version = self.config.model, self.config.version
        where = f"Triton at {self.config.url} model {model!r}"
        try:
            ready = await self._client.is_model_ready(model, version, client_timeout=LOAD_TIMEOUT_S)
            # ModelReady only says false; ModelMetadata fails with Triton's reason (NOT_FOUND
            # "unknown model" for a misspelt name), which is what an operator needs to read.
            metadata = await self._client.get_model_metadata(model, version, client_timeout=LOAD_TIMEOUT_S)
        except InferenceServerException as error:
            # Drop the channel: it would sit in gRPC's reconnect backoff (up to 2 minutes) and fail
            # the next retry even after Triton is back. A fresh one connects on the next attempt.
            await self._drop_client()
            raise triton_failure(where, error) from None
        if not ready:
            raise BackendError(f"{where} is not ready", grpc.StatusCode.UNAVAILABLE)
        # A name, datatype or shape Triton does not serve would fail every call: refuse it now.
        for kind, served, wanted in (
            ("input", {t.name: t for t in metadata.inputs}, self.signature.inputs),
            ("output", {t.name: t for t in metadata.outputs}, self.signature.outputs),
        ):
            missing = sorted(t.name for t in wanted if t.name not in served)
            if missing:
                raise ConfigError(
                    f"Triton model {model!r} has {kind}s {sorted(served)}, not {missing}; map names with tensor_names"
                )
            for tensor in wanted:
                problem = _mismatch(served[tensor.name], tensor)
                if problem:
                    raise ConfigError(f"Triton model {model!r} {kind} {tensor.name!r} {problem}")
        # The hot path builds requests itself on tritonclient's stub: no InferInput objects per call.
        self._stub = self._client._client_stub
        self.ready = True

    async def close(self) -> None:
        await self._drop_client()

    async def _drop_client(self) -> None:
        self.ready = False
        self._end_stream()
        client, self._client, self._stub = self._client, None, None
        if client is not None:
            await client.close()
