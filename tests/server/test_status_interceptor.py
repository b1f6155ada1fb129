"""Every branch of the one place exceptions become gRPC statuses, on a real server."""

from __future__ import annotations

import grpc
import pytest

from tritonclient.grpc import service_pb2 as pb

from server.errors import BackendError, InvalidRequest
from server.grpc_front import MAX_DETAILS_CHARS, StatusInterceptor


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
        "Long": unary(InvalidRequest("x" * 100_000)),
        "Parsed": grpc.unary_unary_rpc_method_handler(
            _model_name, pb.ModelInferRequest.FromString, pb.ModelInferResponse.SerializeToString),
        "StreamParsed": grpc.stream_stream_rpc_method_handler(
            _model_names, pb.ModelInferRequest.FromString, pb.ModelInferResponse.SerializeToString),
    })


async def _model_name(request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
    return pb.ModelInferResponse(model_name=request.model_name)


async def _model_names(request_iterator, context) -> None:
    while (request := await context.read()) is not grpc.aio.EOF:
        await context.write(pb.ModelInferResponse(model_name=request.model_name))


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


async def test_long_details_are_cut_short(channel):
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await channel.unary_unary("/test.Status/Long")(b"x")
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.value.details() == "x" * MAX_DETAILS_CHARS + "..."


GARBAGE = [b"\xff\xff\xff", pb.ModelInferRequest(model_name="ok").SerializeToString().replace(b"ok", b"\xc3\x28")]


@pytest.mark.parametrize("message", GARBAGE, ids=["not protobuf", "invalid UTF-8"])
async def test_messages_that_do_not_parse_are_invalid_arguments(channel, message):
    call = channel.unary_unary("/test.Status/Parsed")
    assert pb.ModelInferResponse.FromString(await call(pb.ModelInferRequest(model_name="m").SerializeToString())).model_name == "m"
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call(message)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.value.details() == (
        "the request is not a valid inference.ModelInferRequest message (malformed protobuf, or a string field that is not UTF-8)")

    stream = channel.stream_stream("/test.Status/StreamParsed")()
    await stream.write(pb.ModelInferRequest(model_name="first").SerializeToString())
    assert pb.ModelInferResponse.FromString(await stream.read()).model_name == "first"
    await stream.write(message)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stream.read()
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
