"""Every branch of the one place exceptions become gRPC statuses, on a real server."""

from __future__ import annotations

import grpc
import pytest

from server.errors import BackendError, InvalidRequest
from server.grpc_front import StatusInterceptor


async def _raise(exc: Exception):
    raise exc


def _handlers() -> grpc.GenericRpcHandler:
    def unary(exc):
        return grpc.unary_unary_rpc_method_handler(lambda request, context: _raise(exc))

    def stream(exc):
        async def behaviour(request_iterator, context):
            await context.read()
            raise exc

        return grpc.stream_stream_rpc_method_handler(behaviour)

    return grpc.method_handlers_generic_handler("test.Status", {
        "Invalid": unary(InvalidRequest("input 'x' is wrong")),
        "Backend": unary(BackendError("legacy said no", grpc.StatusCode.RESOURCE_EXHAUSTED)),
        "Bug": unary(RuntimeError("secret internals /etc/passwd")),
        "Ok": grpc.unary_unary_rpc_method_handler(lambda request, context: _echo(request)),
        "StreamInvalid": stream(InvalidRequest("bad stream")),
        "StreamBug": stream(KeyError("internals")),
    })


async def _echo(request: bytes) -> bytes:
    return request


@pytest.fixture
async def channel():
    server = grpc.aio.server(interceptors=[StatusInterceptor()])
    server.add_generic_rpc_handlers((_handlers(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel
    await server.stop(0)


@pytest.mark.parametrize("method, code, details", [
    ("Invalid", grpc.StatusCode.INVALID_ARGUMENT, "input 'x' is wrong"),
    ("Backend", grpc.StatusCode.RESOURCE_EXHAUSTED, "legacy said no"),
    ("Bug", grpc.StatusCode.INTERNAL, "Internal server error"),
])
async def test_unary_errors_map_to_statuses(channel, method, code, details):
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await channel.unary_unary(f"/test.Status/{method}")(b"x")
    assert failure.value.code() == code and failure.value.details() == details
    assert await channel.unary_unary("/test.Status/Ok")(b"still serving") == b"still serving"


@pytest.mark.parametrize("method, code, details", [
    ("StreamInvalid", grpc.StatusCode.INVALID_ARGUMENT, "bad stream"),
    ("StreamBug", grpc.StatusCode.INTERNAL, "Internal server error"),
])
async def test_stream_errors_map_to_statuses(channel, method, code, details):
    call = channel.stream_stream(f"/test.Status/{method}")()
    await call.write(b"x")
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call.read()
    assert failure.value.code() == code and failure.value.details() == details


async def test_unknown_methods_stay_unimplemented(channel):
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await channel.unary_unary("/test.Status/Nope")(b"x")
    assert failure.value.code() == grpc.StatusCode.UNIMPLEMENTED
