"""The benchmark's backends and baselines, each run as its own process: `python -m bench.servers KIND ...`.

kserve  a scripted KServe v2 model server (tests.support.kserve): legacy or candidate of the gateway,
        with a fixed compute time, a stall, a hang or a failure status.
echo    the bare grpc.aio baseline: answers ModelInfer (and each ModelStreamInfer message) with its input
        tensor, nothing else.
mxnet   the MXNet model behind a bare grpc.aio server, run inline: the baseline of the in-process case.

relay   the least a Python shadowing proxy can do: request bytes relayed unparsed to the legacy (whose
        answer bytes go back) and, with --candidate, to the candidate too; no checks, comparison or metrics.
        It measures the floor that gRPC's own cost per call puts under any grpc.aio gateway.

Each prints `PORT <n>` once it serves on 127.0.0.1 and stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

MAX_MESSAGE_BYTES = 512 << 20
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


class EchoServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """The least a KServe v2 server can do: one output tensor, the input's bytes sent back."""

    def __init__(self, model: str, output: str) -> None:
        self.model, self.output = model, output

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=request.name == self.model)

    async def ModelInfer(self, request, context):
        response = pb.ModelInferResponse(model_name=self.model, model_version="1", id=request.id)
        tensor = request.inputs[0]
        response.outputs.add(name=self.output, datatype=tensor.datatype, shape=tensor.shape)
        response.raw_output_contents.append(request.raw_input_contents[0])
        return response

    async def ModelStreamInfer(self, request_iterator, context):
        async for request in request_iterator:
            yield pb.ModelStreamInferResponse(infer_response=await self.ModelInfer(request, context))


class MXNetServicer(EchoServicer):
    """The bench MXNet model run inline on the event loop, as a minimal hand-written server would."""

    def __init__(self, model: str, output: str, symbol: str, params: str) -> None:
        super().__init__(model, output)
        import mxnet as mx
        import numpy as np

        self._mx, self._np = mx, np
        self._net = mx.gluon.SymbolBlock.imports(symbol, ["data"], params, ctx=mx.cpu())
        self._net.hybridize(static_alloc=True)

    async def ModelInfer(self, request, context):
        np, mx = self._np, self._mx
        tensor = request.inputs[0]
        data = np.frombuffer(request.raw_input_contents[0], np.float32).reshape(tensor.shape)
        result = self._net(mx.nd.array(data, dtype=data.dtype)).asnumpy()
        response = pb.ModelInferResponse(model_name=self.model, model_version="1", id=request.id)
        response.outputs.add(name=self.output, datatype="FP32", shape=result.shape)
        response.raw_output_contents.append(result.tobytes())
        return response


async def _relay(legacy_url: str, candidate_url: str | None) -> grpc.aio.Server:
    method = "/inference.GRPCInferenceService/ModelInfer"
    legacy = grpc.aio.insecure_channel(legacy_url, options=SERVER_OPTIONS).unary_unary(method)
    candidate = grpc.aio.insecure_channel(candidate_url, options=SERVER_OPTIONS).unary_unary(method) if candidate_url else None
    shadows: set[asyncio.Task] = set()

    async def shadow(request: bytes) -> None:
        try:
            await candidate(request, timeout=10)
        except grpc.aio.AioRpcError:
            pass

    async def infer(request: bytes, context) -> bytes:
        if candidate is not None:
            task = asyncio.get_running_loop().create_task(shadow(request))
            shadows.add(task)
            task.add_done_callback(shadows.discard)
        return await legacy(request, timeout=10)

    async def ready(request: bytes, context) -> bytes:
        return pb.ServerReadyResponse(ready=True).SerializeToString()

    server = grpc.aio.server(options=SERVER_OPTIONS)
    handlers = {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer),
                "ServerReady": grpc.unary_unary_rpc_method_handler(ready)}
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("inference.GRPCInferenceService", handlers)])
    server.bench_port = server.add_insecure_port("127.0.0.1:0")  # type: ignore[attr-defined]
    await server.start()
    return server


async def _serve(args: argparse.Namespace) -> None:
    if args.kind == "kserve":
        from tests.support.kserve import Behaviour, start_model_server

        fail = grpc.StatusCode[args.fail] if args.fail else None
        delay = 3600.0 if args.hang else args.delay_ms / 1000
        identity = lambda inputs: {args.output: inputs[args.input]}  # noqa: E731
        behaviour = Behaviour(transform=identity, delay_s=delay, busy=args.busy, fail_with=fail)
        server, url, _ = await start_model_server(args.model, behaviour)
        port = int(url.rpartition(":")[2])
    elif args.kind == "relay":
        server = await _relay(args.legacy, args.candidate)
        port = server.bench_port
    else:
        server = grpc.aio.server(options=SERVER_OPTIONS)
        if args.kind == "echo":
            servicer = EchoServicer(args.model, args.output)
        else:
            servicer = MXNetServicer(args.model, args.output, args.symbol, args.params)
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
    print(f"PORT {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.servers")
    parser.add_argument("kind", choices=["kserve", "echo", "mxnet", "relay"])
    parser.add_argument("--model", default="m")
    parser.add_argument("--input", default="x")
    parser.add_argument("--output", default="y")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="kserve: compute time per request")
    parser.add_argument("--busy", action="store_true", help="kserve: burn CPU for the delay instead of sleeping")
    parser.add_argument("--hang", action="store_true", help="kserve: never answer (within the hour)")
    parser.add_argument("--fail", default="", help="kserve: answer every request with this status, e.g. UNAVAILABLE")
    parser.add_argument("--symbol", help="mxnet: symbol JSON")
    parser.add_argument("--params", help="mxnet: params file")
    parser.add_argument("--legacy", help="relay: HOST:PORT of the legacy")
    parser.add_argument("--candidate", help="relay: HOST:PORT of the candidate (shadow every request)")
    asyncio.run(_serve(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
