"""The KServe v2 gRPC front: protobuf <-> internal types and status mapping, nothing else."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from server import __version__
from server.codec import decode_inputs, encode_response, requested_outputs, shown
from server.config import ListenTLSConfig
from server.dispatch import Dispatcher, ModelPair
from server.errors import InvalidRequest, ModelNotFound, ResourceExhausted, ShadowServeError, Unsupported
from server.memory import MemoryReturner
from server.tensors import InferRequest
from server.transport import add_port

log = logging.getLogger("shadowserve.front")

MODEL_VERSION = "1"
STREAM_MAX_IN_FLIGHT = 128  # requests of one stream processed at once; reading pauses beyond
MAX_DETAILS_CHARS = 1000  # status details travel in a header; a long one would fail the whole response


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Maps the product's exceptions to gRPC statuses for every RPC; hides everything else.

    It also parses the request messages itself, so a message that is not valid protobuf (or
    carries invalid UTF-8 in a string) gets INVALID_ARGUMENT instead of gRPC's UNKNOWN.
    """

    def __init__(self) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = await continuation(handler_call_details)
            if handler is None:
                return None
            wrapped = self._wrapped[method] = self._wrap(handler)
        return wrapped

    @staticmethod
    def _wrap(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        parse = handler.request_deserializer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _mapping_errors(handler.unary_unary, parse, stream=False), None, handler.response_serializer
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                _mapping_errors(handler.stream_stream, parse, stream=True), None, handler.response_serializer
            )
        return handler


def _mapping_errors(behaviour, parse, stream: bool):
    """`behaviour` (unary or bidi-stream) with its requests parsed and its exceptions turned into statuses."""

    async def answer(request_or_iterator, context):
        try:
            if parse is not None and stream:
                context = _ParsingContext(context, parse)
                request_or_iterator = _parsed_stream(request_or_iterator, parse)
            elif parse is not None:
                request_or_iterator = _parsed(request_or_iterator, parse)
            return await behaviour(request_or_iterator, context)
        except ShadowServeError as exc:
            code, details = exc.code, _details(str(exc))
        except Exception:
            log.exception("unhandled error in %s", behaviour.__name__)
            code, details = grpc.StatusCode.INTERNAL, "Internal server error"
        # A status, not context.abort(): abort's exception ties frames into a cycle on every failed request.
        context.set_code(code)
        context.set_details(details)

    return answer


def _parsed(message: bytes, parse):
    try:
        return parse(message)
    except Exception:
        kind = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
        name = kind.full_name if kind is not None else "request"
        raise InvalidRequest(
            f"the request is not a valid {name} message (malformed protobuf, or a string field "
            "that is not UTF-8)"
        ) from None


async def _parsed_stream(messages, parse):
    async for message in messages:
        yield _parsed(message, parse)


class _ParsingContext:
    """A stream's servicer context whose `read()` parses each message like `_parsed`."""

    def __init__(self, context: grpc.aio.ServicerContext, parse) -> None:
        self._context, self._parse = context, parse

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def read(self) -> Any:
        message = await self._context.read()
        return message if message is grpc.aio.EOF else _parsed(message, self._parse)


def _details(text: str) -> str:
    return text if len(text) <= MAX_DETAILS_CHARS else text[:MAX_DETAILS_CHARS] + "..."


@dataclasses.dataclass
class _Statistics:
    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    last_inference_ms: int = 0


_DATA_TYPE = {name: mc.DataType.Value(f"TYPE_{name}") for name in
              ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64",
               "BF16")}
_DATA_TYPE["BYTES"] = mc.TYPE_STRING


def _unsupported(message: str):
    """An RPC of the protocol the gateway does not serve: UNIMPLEMENTED, saying why."""

    async def rpc(self, request, context):
        raise Unsupported(message)

    return rpc


_NO_SHARED_MEMORY = "shared memory is not supported by this gateway; send tensors in the request"
_NO_MODEL_CONTROL = "the gateway serves the models of its config file; add or remove models there and restart it"


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """`inference.GRPCInferenceService`, the protocol Triton speaks, in front of the dispatcher."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self._statistics = {name: _Statistics() for name in dispatcher.pairs}
        self._in_flight = dict.fromkeys(dispatcher.pairs, 0)
        self.memory = MemoryReturner()

    # -- health and metadata ----------------------------------------------------------------

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.dispatcher.ready)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(
            name="shadowserve", version=__version__, extensions=["model_configuration", "statistics"]
        )

    def _pair(self, name: str, version: str) -> ModelPair:
        pair = self.dispatcher.pairs.get(name)
        if pair is None:
            raise ModelNotFound(f"unknown model {shown(name)}; this gateway serves {sorted(self.dispatcher.pairs)}")
        if version not in ("", MODEL_VERSION):
            raise ModelNotFound(
                f"model {shown(name)} has no version {shown(version)}; it serves version {MODEL_VERSION!r}"
            )
        return pair

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self._pair(request.name, request.version).ready)

    async def ModelMetadata(self, request, context):
        pair = self._pair(request.name, request.version)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=pair.name,
            versions=[MODEL_VERSION],
            platform=f"shadowserve ({describe_pair(pair)})" if pair.config.expose_backend_details else "shadowserve",
            inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in pair.config.inputs],
            outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in pair.config.outputs],
        )

    async def ModelConfig(self, request, context):
        pair = self._pair(request.name, request.version)
        config = mc.ModelConfig(
            name=pair.name,
            platform="shadowserve",
            max_batch_size=0,
            input=[mc.ModelInput(name=t.name, data_type=_DATA_TYPE[t.datatype], dims=t.shape) for t in pair.config.inputs],
            output=[mc.ModelOutput(name=t.name, data_type=_DATA_TYPE[t.datatype], dims=t.shape) for t in pair.config.outputs],
        )
        if pair.config.expose_backend_details:
            for key, value in pair_parameters(pair).items():
                config.parameters[key].string_value = value
        return pb.ModelConfigResponse(config=config)

    async def ModelStatistics(self, request, context):
        names = [request.name] if request.name else list(self.dispatcher.pairs)
        response = pb.ModelStatisticsResponse()
        for name in names:
            pair = self._pair(name, request.version)
            stats = self._statistics[pair.name]
            model = response.model_stats.add(
                name=pair.name,
                version=MODEL_VERSION,
                last_inference=stats.last_inference_ms,
                inference_count=stats.success_count,
                execution_count=stats.success_count,
            )
            model.inference_stats.success.count = stats.success_count
            model.inference_stats.success.ns = stats.success_ns
            model.inference_stats.fail.count = stats.fail_count
            model.inference_stats.fail.ns = stats.fail_ns
        return response

    async def RepositoryIndex(self, request, context):
        if request.repository_name:
            raise ModelNotFound(f"unknown repository {shown(request.repository_name)}; this gateway has one, unnamed")
        entry = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(models=[
            entry(name=pair.name, version=MODEL_VERSION, state="READY" if pair.ready else "UNAVAILABLE",
                  reason="" if pair.ready else "the legacy backend is not ready")
            for pair in self.dispatcher.pairs.values() if pair.ready or not request.ready
        ])

    RepositoryModelLoad = _unsupported(f"RepositoryModelLoad: {_NO_MODEL_CONTROL}")
    RepositoryModelUnload = _unsupported(f"RepositoryModelUnload: {_NO_MODEL_CONTROL}")
    SystemSharedMemoryStatus = _unsupported(_NO_SHARED_MEMORY)
    SystemSharedMemoryRegister = _unsupported(_NO_SHARED_MEMORY)
    SystemSharedMemoryUnregister = _unsupported(_NO_SHARED_MEMORY)
    CudaSharedMemoryStatus = _unsupported(_NO_SHARED_MEMORY)
    CudaSharedMemoryRegister = _unsupported(_NO_SHARED_MEMORY)
    CudaSharedMemoryUnregister = _unsupported(_NO_SHARED_MEMORY)
    TraceSetting = _unsupported("tracing is not supported by this gateway")
    LogSettings = _unsupported("log settings cannot be read or changed over gRPC; the gateway's --log-level sets them")

    # -- inference ----------------------------------------------------------------------------

    async def ModelInfer(self, request, context):
        try:
            return await self._infer(request, context.time_remaining())
        finally:
            self.memory.handled(request.ByteSize())

    async def _infer(self, request: pb.ModelInferRequest, deadline_s: float | None) -> pb.ModelInferResponse:
        start = time.perf_counter_ns()
        pair = self._pair(request.model_name, request.model_version)
        stats = self._statistics[pair.name]
        config = pair.config
        try:
            try:
                if self._in_flight[pair.name] >= config.max_concurrent_requests:
                    raise ResourceExhausted(
                        f"model {pair.name!r} already has {config.max_concurrent_requests} requests in flight, "
                        "its max_concurrent_requests; retry later"
                    )
                inputs = decode_inputs(request, pair.inputs, config.max_batch_size, config.max_tensor_elements)
                requested = requested_outputs(request, pair.output_names)
            except ShadowServeError as exc:
                pair.metrics.request(exc.code.name, "legacy")
                raise
            key = request.parameters.get(config.routing_parameter)
            self._in_flight[pair.name] += 1
            try:
                outputs = await self.dispatcher.infer(
                    pair,
                    InferRequest(
                        model=pair.name,
                        inputs=inputs,
                        id=request.id,
                        routing_key=_parameter_text(key) if key is not None else None,
                        requested_outputs=requested,
                        deadline_s=deadline_s,
                    ),
                )
            finally:
                self._in_flight[pair.name] -= 1
        except BaseException:
            stats.fail_count += 1
            stats.fail_ns += time.perf_counter_ns() - start
            raise
        stats.success_count += 1
        stats.success_ns += time.perf_counter_ns() - start
        stats.last_inference_ms = time.time_ns() // 1_000_000
        return encode_response(pair.name, MODEL_VERSION, request, outputs, requested)

    async def ModelStreamInfer(self, request_iterator, context):
        """Requests of one stream run concurrently; each response carries its request's id."""
        slots = asyncio.Semaphore(STREAM_MAX_IN_FLIGHT)
        write_lock = asyncio.Lock()
        tasks: set[asyncio.Task] = set()

        async def answer(request: pb.ModelInferRequest) -> None:
            try:
                try:
                    response = pb.ModelStreamInferResponse(infer_response=await self._infer(request, None))
                except ShadowServeError as exc:
                    response = pb.ModelStreamInferResponse(
                        error_message=_details(str(exc)),
                        infer_response=pb.ModelInferResponse(
                            model_name=request.model_name, model_version=request.model_version, id=request.id
                        ),
                    )
                async with write_lock:
                    await context.write(response)
            finally:
                slots.release()

        try:
            while (request := await context.read()) is not grpc.aio.EOF:
                await slots.acquire()
                task = asyncio.get_running_loop().create_task(answer(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()


def _parameter_text(parameter: pb.InferParameter) -> str:
    kind = parameter.WhichOneof("parameter_choice")
    return str(getattr(parameter, kind)) if kind else ""


def pair_parameters(pair: ModelPair) -> dict[str, str]:
    """What really runs behind a pair, as ModelConfig parameters operators can read."""
    params = {f"legacy_{key}": value for key, value in pair.legacy.describe().items()}
    candidate = pair.candidate_facts()
    if candidate is not None:
        params.update({f"candidate_{key}": value for key, value in candidate.items()})
    params.update(stage=pair.stage, shadow_percent=f"{pair.shadow_percent:g}", serve_percent=f"{pair.serve_percent:g}")
    return params


def describe_pair(pair: ModelPair) -> str:
    def side(facts: dict[str, str]) -> str:
        return "/".join([facts.get("runtime", "?"), *(v for k, v in facts.items() if k == "executor")])

    candidate = pair.candidate_facts()
    text = f"legacy={side(pair.legacy.describe())}"
    return text + (f", candidate={side(candidate)}" if candidate is not None else "")


async def start_grpc_server(
    dispatcher: Dispatcher, listen: str, max_message_bytes: int, tls: ListenTLSConfig | None = None
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Start the front on `listen` (port 0 picks a free port); returns the server and bound port."""
    server = grpc.aio.server(
        interceptors=[StatusInterceptor()],
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 1),
        ],
    )
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(dispatcher), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = add_port(server, listen, tls)
    if port == 0:
        raise OSError(f"cannot bind the gRPC front to {listen}")
    await server.start()
    return server, port, health_servicer


async def update_health(health_servicer: Any, dispatcher: Dispatcher) -> None:
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    for pair in dispatcher.pairs.values():
        await health_servicer.set(pair.name, serving if pair.ready else not_serving)
    await health_servicer.set("", serving if dispatcher.ready else not_serving)
