"""The load generators: raw grpc.aio calls over several real connections, fixed concurrency and counts;
and h2load, for the one figure where the load must cost the machine's cores little (scale-out).

Requests are serialized once and sent as bytes (no protobuf work per call on the client side), and
each channel uses its own subchannel pool, so N channels really are N TCP connections.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import re
import struct
import time
from pathlib import Path

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
SERVER_READY = "/inference.GRPCInferenceService/ServerReady"
MAX_MESSAGE_BYTES = 512 << 20
CHANNEL_OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


def infer_request(shape: tuple[int, ...], model: str = "m", seed: int = 0) -> bytes:
    """A serialized ModelInferRequest with one FP32 input `x` of random values."""
    data = np.random.default_rng(seed).random(shape, dtype=np.float32)
    request = pb.ModelInferRequest(model_name=model, id="bench")
    request.inputs.add(name="x", datatype="FP32", shape=shape)
    request.raw_input_contents.append(data.tobytes())
    return request.SerializeToString()


@dataclasses.dataclass
class Run:
    """One block of requests against one target."""

    latencies_ns: np.ndarray
    elapsed_s: float
    errors: dict[str, int]
    starts_ns: np.ndarray | None = None  # when each request was sent (perf_counter_ns), where the load records it

    @property
    def throughput(self) -> float:
        return len(self.latencies_ns) / self.elapsed_s

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_ns, q)) / 1e6

    @property
    def stall_ms(self) -> float:
        """The worst request's wait beyond the median one: a pause of the server shows here whole."""
        return float(self.latencies_ns.max() - np.median(self.latencies_ns)) / 1e6

    def own_stall_ms(self, *beside: "Run") -> float:
        """`stall_ms` less what the rig lost at the same moments: each request's wait beyond the median, minus the
        largest such wait of the requests of `beside` (sent at the same time to other servers) in flight with it.
        A pause of the load generator, the shared backends or the machine delays both; one of this server, only it."""
        assert self.starts_ns is not None and all(run.starts_ns is not None for run in beside)
        excess = self.latencies_ns - np.median(self.latencies_ns)
        sides = [_InFlight(run) for run in beside]
        own = 0
        for start, latency, wait in zip(self.starts_ns, self.latencies_ns, excess):
            if wait > own:
                own = max(own, int(wait) - max((side.longest_wait(start, start + latency) for side in sides), default=0))
        return own / 1e6


class _InFlight:
    """A run's requests by start time, to find the longest wait beyond its median among those in flight at once."""

    def __init__(self, run: Run) -> None:
        order = np.argsort(run.starts_ns)
        self.starts = run.starts_ns[order]
        self.ends = self.starts + run.latencies_ns[order]
        self.waits = np.maximum(run.latencies_ns[order] - np.median(run.latencies_ns), 0)
        self.longest = int(run.latencies_ns.max())

    def longest_wait(self, start: int, end: int) -> int:
        low, high = np.searchsorted(self.starts, [start - self.longest, end])
        overlapping = self.ends[low:high] > start
        return int(self.waits[low:high][overlapping].max()) if overlapping.any() else 0


class Client:
    """`channels` connections to one gRPC endpoint."""

    def __init__(self, url: str, channels: int = 1, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.url = url
        self.channels = [grpc.aio.secure_channel(url, credentials, options=CHANNEL_OPTIONS) if credentials
                         else grpc.aio.insecure_channel(url, options=CHANNEL_OPTIONS) for _ in range(channels)]
        self.infer = [channel.unary_unary(MODEL_INFER) for channel in self.channels]

    async def wait_ready(self, timeout_s: float, alive=lambda: True) -> None:
        ready = self.channels[0].unary_unary(
            SERVER_READY, request_serializer=pb.ServerReadyRequest.SerializeToString,
            response_deserializer=pb.ServerReadyResponse.FromString)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and alive():
            try:
                if (await ready(pb.ServerReadyRequest(), timeout=1.0)).ready:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
        raise TimeoutError(f"{self.url} did not become ready")

    async def close(self) -> None:
        await asyncio.gather(*(channel.close() for channel in self.channels))


async def closed_loop(client: Client, request: bytes, count: int, concurrency: int, timeout_s: float = 30.0) -> Run:
    """`count` requests, `concurrency` at a time, spread over the client's connections."""
    latencies = np.zeros(count, dtype=np.int64)
    errors: collections.Counter[str] = collections.Counter()
    issued = 0

    async def worker(call) -> None:
        nonlocal issued
        while issued < count:
            index = issued
            issued += 1
            start = time.perf_counter_ns()
            try:
                await call(request, timeout=timeout_s)
            except grpc.aio.AioRpcError as error:
                errors[error.code().name] += 1
            latencies[index] = time.perf_counter_ns() - start

    start = time.perf_counter()
    await asyncio.gather(*(worker(client.infer[i % len(client.infer)]) for i in range(concurrency)))
    return Run(latencies, time.perf_counter() - start, dict(errors))


async def open_loop(client: Client, request: bytes, rate: float, duration_s: float, timeout_s: float = 30.0) -> Run:
    """Requests sent at a fixed `rate` per second whatever the answers do, for `duration_s`."""
    count = max(1, int(rate * duration_s))
    latencies = np.zeros(count, dtype=np.int64)
    starts = np.zeros(count, dtype=np.int64)
    errors: collections.Counter[str] = collections.Counter()
    loop = asyncio.get_running_loop()

    async def one(index: int) -> None:
        start = starts[index] = time.perf_counter_ns()
        try:
            await client.infer[index % len(client.infer)](request, timeout=timeout_s)
        except grpc.aio.AioRpcError as error:
            errors[error.code().name] += 1
        latencies[index] = time.perf_counter_ns() - start

    tasks = []
    begin = loop.time()
    for index in range(count):
        due = begin + index / rate
        if due > loop.time():
            await asyncio.sleep(due - loop.time())
        tasks.append(loop.create_task(one(index)))
    await asyncio.gather(*tasks)
    return Run(latencies, loop.time() - begin, dict(errors), starts)


@dataclasses.dataclass
class H2loadRun:
    """One block of h2load: throughput as h2load measured it, and its request counts."""

    throughput: float
    done: int
    failed: int


async def h2load(url: str, request: bytes, count: int, connections: int, streams: int, workdir: Path) -> H2loadRun:
    """`count` ModelInfer calls by h2load, a C HTTP/2 load generator: `connections` × `streams` at a time.

    h2load knows nothing of gRPC: the body is the request in gRPC's length-prefixed framing, and a
    gRPC error still arrives as HTTP 200, so callers check the answers on the gateway's /metrics.
    """
    body = workdir / f"h2load-{len(request)}.body"
    if not body.exists():
        body.write_bytes(b"\0" + struct.pack(">I", len(request)) + request)
    process = await asyncio.create_subprocess_exec(
        "h2load", "-n", str(count), "-c", str(connections), "-m", str(streams), "-d", str(body),
        "-H", "content-type: application/grpc", "-H", "te: trailers", f"http://{url}{MODEL_INFER}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output = (await process.communicate())[0].decode(errors="replace")
    rate = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", output)
    counts = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed", output)
    if process.returncode or rate is None or counts is None:
        raise RuntimeError(f"h2load against {url} failed:\n{output[-2000:]}")
    return H2loadRun(float(rate.group(1)), int(counts.group(1)), int(counts.group(3)))
