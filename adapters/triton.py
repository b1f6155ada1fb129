"""A model on a Triton Inference Server, reached through tritonclient.grpc.aio."""

from __future__ import annotations

import grpc
from tritonclient.grpc import aio as triton_aio
from tritonclient.utils import InferenceServerException

from adapters.remote import CHANNEL_OPTIONS, RemoteBackend
from server.config import TritonConfig
from server.errors import BackendError, ConfigError


def triton_failure(message: str, error: InferenceServerException) -> BackendError:
    """tritonclient reports the gRPC status as text ("StatusCode.UNAVAILABLE"); restore the real one."""
    name = (error.status() or "").rsplit(".", 1)[-1]
    code = grpc.StatusCode[name] if name in grpc.StatusCode.__members__ else grpc.StatusCode.UNAVAILABLE
    return BackendError(f"{message}: {error.message()}", code)


class TritonBackend(RemoteBackend):
    runtime = "triton"
    config: TritonConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._client: triton_aio.InferenceServerClient | None = None

    async def load(self) -> None:
        if self._client is None:
            self._client = triton_aio.InferenceServerClient(self.config.url, channel_args=CHANNEL_OPTIONS)
        model, version = self.config.model, self.config.version
        try:
            if not await self._client.is_model_ready(model, version, client_timeout=5.0):
                raise BackendError(f"Triton at {self.config.url} reports {model!r} not ready", grpc.StatusCode.UNAVAILABLE)
            metadata = await self._client.get_model_metadata(model, version, client_timeout=5.0)
        except InferenceServerException as error:
            raise triton_failure(f"Triton at {self.config.url} model {model!r}", error) from None
        for kind, served, wanted in (
            ("inputs", {t.name for t in metadata.inputs}, self.signature.input_names),
            ("outputs", {t.name for t in metadata.outputs}, self.signature.output_names),
        ):
            missing = sorted(set(wanted) - served)
            if missing:
                raise ConfigError(
                    f"Triton model {model!r} has {kind} {sorted(served)}, not {missing}; map names with tensor_names"
                )
        # The hot path builds requests itself on tritonclient's stub: no InferInput objects per call.
        self._stub = self._client._client_stub
        self.ready = True

    async def close(self) -> None:
        self.ready = False
        if self._client is not None:
            await self._client.close()
            self._client = self._stub = None
