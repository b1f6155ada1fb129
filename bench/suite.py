"""The benchmark suite: every figure of issue 5, baseline and gateway measured side by side.

Each figure runs its targets in interleaved blocks (A B, then B A, ...) and reports the median over
repeats of the per-repeat ratio, so slow drift of a shared machine hits both sides alike.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
import re
import signal
import statistics
import time
import urllib.request
from pathlib import Path
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from bench import procs
from bench.load import CHANNEL_OPTIONS, Client, Run, closed_loop, h2load, infer_request, open_loop
from bench.models import INPUT_SHAPE, build_mxnet_classifier
from server.config import ServerConfig
from server.metrics import SHADOWED_SKIP_REASONS
from tests.support.certs import make_certificates

OUTPUT_SHAPE = (1, 1000)
MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Settings:
    """Request counts and durations; `quick` keeps every figure but shrinks the numbers."""

    quick: bool
    repeats: int
    serial: int  # requests per block, one at a time: a p99 of 1000 rests on the 10 slowest, one of 400 on 4
    isolation: int  # requests per block at ISOLATION_CONCURRENCY
    saturation: int  # requests per block at SATURATION_CONCURRENCY
    rate_s: float  # seconds per fixed-rate block (CPU per request)
    completeness_s: float
    memory_s: float
    scale_out: int  # requests per h2load block
    stall_s: float  # how long each gateway of figure 10, and the legacy alone (the rig's own stalls), is held at STEADY_RATE
    burst_mib: int  # figure 12: size and number of large requests
    bursts: int
    settle_s: float  # figure 12: how long the worker may take to hand the burst's memory back
    drain_s: float  # figure 13: the draining gateway's server.drain_s
    calls: int  # figure 15: candidate calls per block


FULL = Settings(quick=False, repeats=5, serial=1000, isolation=1200, saturation=2500, rate_s=5.0,
                completeness_s=20.0, memory_s=300.0, scale_out=4000, stall_s=120.0,
                burst_mib=200, bursts=3, settle_s=60.0, drain_s=2.0, calls=4000)
QUICK = Settings(quick=True, repeats=1, serial=60, isolation=150, saturation=400, rate_s=1.5,
                 completeness_s=2.0, memory_s=5.0, scale_out=300, stall_s=3.0,
                 burst_mib=64, bursts=1, settle_s=10.0, drain_s=0.5, calls=300)

ISOLATION_CONCURRENCY = 4
SATURATION_CONCURRENCY = 32
SATURATION_CHANNELS = 16
SCALE_OUT_STREAMS = 4  # concurrent streams per h2load connection
STALL_MS = 200
REMOTE_MS = 5
STEADY_RATE = 200.0  # req/s of figures 10, 11 and 14: well below saturation, so a pause is the server's, not a queue
# Figure 10's requests straight to the legacy, and to the echo server: one every 20 ms overlaps any stall of 20 ms or
# more, and 200 a second loaded the core of the load generator and the backends enough to stall it for tens of ms (the
# diagnosis in BENCHMARKS.md).
STRAIGHT_RATE = 50.0
CALLS_IN_FLIGHT = 8


@dataclasses.dataclass
class Figure:
    number: int
    name: str
    measure: str
    value: float
    target: float | None  # None: a measurement that informs a decision, with no target
    at_most: bool  # the value must be <= target (else >=)
    unit: str = ""
    per_repeat: list[float] = dataclasses.field(default_factory=list)
    detail: str = ""

    @property
    def passed(self) -> bool:
        if self.target is None:
            return True
        return self.value <= self.target if self.at_most else self.value >= self.target

    @property
    def target_text(self) -> str:
        return "–" if self.target is None else f"{'≤' if self.at_most else '≥'} {self.target:g}{self.unit}"


@dataclasses.dataclass
class Block:
    """One measured block: the load generator's view plus the target process's CPU."""

    run: Run
    cpu_s: float | None

    @property
    def cpu_us_per_request(self) -> float:
        return (self.cpu_s or 0.0) / len(self.run.latencies_ns) * 1e6

    @property
    def utilization(self) -> float:
        return (self.cpu_s or 0.0) / self.run.elapsed_s


@dataclasses.dataclass
class ScaleOutBlock:
    """One h2load block of figure 5."""

    throughput: float
    cpu_us_per_request: float
    served: int  # counted on the gateway's /metrics
    worker_cpu_s: list[float]  # per worker process of `serve --workers`


class Target:
    """An endpoint under load: a gateway, a baseline server or a backend called directly."""

    def __init__(self, name: str, url: str, process: procs.Process | None,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self.name, self.url, self.process, self.credentials = name, url, process, credentials
        self._clients: dict[int, Client] = {}

    def client(self, channels: int) -> Client:
        if channels not in self._clients:
            self._clients[channels] = Client(self.url, channels, self.credentials)
        return self._clients[channels]

    async def measure(self, load: Callable[[Client], "asyncio.Future[Run]"], channels: int) -> Block:
        client = self.client(channels)
        before = self.process.cpu_seconds() if self.process else None
        run = await load(client)
        cpu = self.process.cpu_seconds() - before if self.process else None
        return Block(run, cpu)

    async def close(self) -> None:
        await asyncio.gather(*(client.close() for client in self._clients.values()))


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def _ms(value: float) -> str:
    return f"{value:.2f} ms"


class Suite:
    def __init__(self, settings: Settings, workdir: Path, log: Callable[[str], None]) -> None:
        self.settings = settings
        self.workdir = workdir
        self.log = log
        self.figures: list[Figure] = []
        self.notes: dict[str, str] = {}
        self.processes: list[procs.Process] = []
        self.targets: dict[str, Target] = {}
        cpus = sorted(procs.all_cpus())
        # The system under test (gateway or baseline server) gets CPU 0; load generator and backends the rest.
        self.sut_cpus = {cpus[0]}
        self.rest_cpus = set(cpus[1:]) or {cpus[0]}
        self.request = infer_request(OUTPUT_SHAPE)
        self.image_request = infer_request(INPUT_SHAPE)
        self.tls: grpc.ChannelCredentials | None = None  # trusts the CA that signed gw-tls's certificate
        self.pausable: set[str] = set()  # gateways and baselines: paused while a figure measures others
        self.paused: set[str] = set()

    # -- processes -----------------------------------------------------------------------------

    def _server(self, name: str, kind: str, *args: str) -> procs.Process:
        process = procs.start_server(kind, self.workdir, name, *args)
        self.processes.append(process)
        return process

    def _gateway(self, name: str, models: list[dict], workers: int = 1, **server: object) -> procs.Gateway:
        gateway = procs.Gateway(name, models, self.workdir, workers=workers, **server)
        self.processes.append(gateway)
        return gateway

    @staticmethod
    def _pair(legacy: dict, candidate: dict | None = None, shadow_percent: float = 100, **extra: object) -> list[dict]:
        model = {"name": "m", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, -1]}],
                 "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, -1], "class_scores": True}],
                 "legacy": legacy, **extra}
        if candidate is not None:
            model.update(candidate=candidate, shadow_percent=shadow_percent)
        return [model]

    async def start(self) -> None:
        """Start every backend, baseline and gateway at once (unpinned, so start-up uses both cores)."""
        self.log("building the MXNet model and starting backends")
        symbol, params = build_mxnet_classifier(self.workdir)
        backends = {
            "legacy-5ms": ("kserve", "--delay-ms", str(REMOTE_MS)),
            "candidate-5ms": ("kserve", "--delay-ms", str(REMOTE_MS)),
            "candidate-stalled": ("kserve", "--delay-ms", str(STALL_MS)),
            "candidate-unavailable": ("kserve", "--fail", "UNAVAILABLE"),
            "candidate-hung": ("kserve", "--hang"),
            "legacy": ("kserve",),
            "candidate": ("kserve",),
            "echo": ("echo",),
            "mxnet-bare": ("mxnet", "--symbol", str(symbol), "--params", str(params)),
        }
        started = {name: self._server(name, *args) for name, args in backends.items()}
        urls = {name: f"127.0.0.1:{process.read_port(120)}" for name, process in started.items()}
        for name, process in started.items():
            self.targets[name] = Target(name, urls[name], process)
        relays = {"relay-shadow-5ms": ("--legacy", urls["legacy-5ms"], "--candidate", urls["candidate-5ms"]),
                  "relay": ("--legacy", urls["legacy"]),
                  "relay-shadow": ("--legacy", urls["legacy"], "--candidate", urls["candidate"])}
        for name, args in relays.items():
            process = self._server(name, "relay", *args)
            self.targets[name] = Target(name, f"127.0.0.1:{process.read_port(120)}", process)

        def remote(name: str, **extra: object) -> dict:
            if name.startswith("candidate"):  # called as the engine calls a Triton candidate: over one stream
                extra = {"shadow_calls": "stream", **extra}
            return {"runtime": "remote", "url": urls[name], "model": "m", **extra}

        mxnet = {"runtime": "mxnet", "symbol": str(symbol), "params": str(params), "tensor_names": {"x": "data"}}
        certificates = make_certificates(self.workdir / "certificates")
        self.tls = grpc.ssl_channel_credentials(certificates.ca.read_bytes())

        def mxnet_pair(candidate: dict | None = None) -> list[dict]:
            pair = self._pair(mxnet, candidate)
            pair[0]["inputs"][0]["shape"] = [-1, *INPUT_SHAPE[1:]]
            pair[0]["outputs"][0]["shape"] = [-1, OUTPUT_SHAPE[1]]
            return pair
        gateways = {
            "gw-shadow-5ms": dict(models=self._pair(remote("legacy-5ms"), remote("candidate-5ms"))),
            "gw-mxnet": dict(models=mxnet_pair()),
            "gw-off-5ms": dict(models=self._pair(remote("legacy-5ms"), remote("candidate-stalled"), 0)),
            "gw-stalled-5ms": dict(models=self._pair(remote("legacy-5ms"), remote("candidate-stalled"))),
            "gw-unavailable-5ms": dict(models=self._pair(remote("legacy-5ms"), remote("candidate-unavailable"))),
            "gw-unavailable-unbroken-5ms": dict(models=self._pair(remote("legacy-5ms"), remote("candidate-unavailable"),
                                                                  circuit_breaker=None)),
            # A hand-off must fit half its ring: 512 MiB lets figure 7's 64 MiB request and answer through to the engine.
            "gw-shadow": dict(models=self._pair(remote("legacy"), remote("candidate")), engine={"queue_bytes": 512 * MIB}),
            "gw-shadow-unshed": dict(models=self._pair(remote("legacy"), remote("candidate")), shed_shadow_from_loop_busy=None),
            "gw-no-shadow": dict(models=self._pair(remote("legacy"), remote("candidate"), 0)),
            "gw-no-compare": dict(models=self._pair(remote("legacy"), remote("candidate")), compare=False, metrics=False),
            "gw-1-worker": dict(models=mxnet_pair(mxnet)),
            "gw-2-workers": dict(models=mxnet_pair(mxnet), workers=2),
            "gw-hung": dict(models=self._pair(remote("legacy"), remote("candidate-hung"))),
            "gw-tls": dict(models=self._pair(remote("legacy"), remote("candidate")),
                           tls={"cert_file": str(certificates.server_cert), "key_file": str(certificates.server_key)}),
            "gw-drain": dict(models=self._pair(remote("legacy-5ms"), remote("candidate-5ms")),
                             drain_s=self.settings.drain_s, grace_s=10),
        }
        started_gateways = {name: self._gateway(name, **spec) for name, spec in gateways.items()}
        self.log(f"waiting for {len(gateways)} gateways")
        await asyncio.gather(*(asyncio.to_thread(gateway.read_ports, 300) for gateway in started_gateways.values()))
        for name, gateway in started_gateways.items():
            self.targets[name] = Target(name, gateway.url, gateway, self.tls if name == "gw-tls" else None)
        self.notes["gateway command"] = self.targets["gw-shadow"].process.command  # type: ignore[union-attr]
        await asyncio.gather(*(self._ready(self.targets[name]) for name in gateways))
        sut = ["echo", "mxnet-bare", *relays, *(name for name in gateways if name not in ("gw-1-worker", "gw-2-workers"))]
        self.pausable = {"echo", "mxnet-bare", *relays, *gateways}
        for name, target in self.targets.items():
            procs.pin(target.process.pid, self.sut_cpus if name in sut else self.rest_cpus)  # type: ignore[union-attr]
        procs.pin(os.getpid(), self.rest_cpus, with_descendants=False)

    async def _ready(self, target: Target) -> None:
        process = target.process
        try:
            await target.client(1).wait_ready(120, alive=lambda: process.popen.poll() is None)
        except TimeoutError:
            raise RuntimeError(f"{target.name} did not start:\n{process.log_tail()}") from None

    async def measuring(self, *names: str) -> None:
        """Let only the servers a figure measures run; pause the other gateways and baselines.

        An idle gateway still wakes up dozens of times a second (its engine's tick, its loop's load sampling, gRPC's
        timers), 1.4% of a core: the sixteen a figure does not measure took a fifth of the core under test.
        """
        wanted = set(names)
        for name in self.pausable - wanted - self.paused:
            self.targets[name].process.pause()  # type: ignore[union-attr]
        waking = [self.targets[name].process for name in self.paused & wanted]
        gateways = [process for process in waking if isinstance(process, procs.Gateway)]
        for gateway in gateways:
            gateway.resume_engine()
        if gateways:
            await asyncio.sleep(0.5)  # a few engine ticks: each beats the heartbeat its supervisor checks
        for process in waking:
            process.resume()  # type: ignore[union-attr]
        self.paused = self.pausable - wanted

    async def stop(self) -> None:
        await self.measuring(*self.pausable)  # a paused process would take SIGTERM only once resumed
        await asyncio.gather(*(target.close() for target in self.targets.values()))
        for process in self.processes:
            process.stop()

    # -- measuring -----------------------------------------------------------------------------

    async def interleaved(self, names: list[str], load: Callable[[Client], "asyncio.Future[Run]"], channels: int,
                          warmup: Callable[[Client], "asyncio.Future[Run]"] | None = None) -> dict[str, list[Block]]:
        """Blocks of `load` on each target in turn, the order reversed every other repeat."""
        targets = [self.targets[name] for name in names]
        for target in targets:
            await (warmup or load)(target.client(channels))
        blocks: dict[str, list[Block]] = {name: [] for name in names}
        for repeat in range(self.settings.repeats):
            for target in targets if repeat % 2 == 0 else reversed(targets):
                block = await target.measure(load, channels)
                if block.run.errors:
                    raise RuntimeError(f"{target.name}: errors {block.run.errors}")
                blocks[target.name].append(block)
        return blocks

    def _ratios(self, blocks: dict[str, list[Block]], gateway: str, baseline: str,
                value: Callable[[Block], float]) -> list[float]:
        return [value(g) / value(b) for g, b in zip(blocks[gateway], blocks[baseline])]

    def add(self, figure: Figure) -> None:
        self.figures.append(figure)
        verdict = "PASS" if figure.passed else "MISS"
        self.log(f"figure {figure.number} {figure.name}: {figure.value:.3f}{figure.unit} "
                 f"(target {figure.target_text}) {verdict}")

    # -- the figures ---------------------------------------------------------------------------

    async def added_latency(self) -> None:
        s = self.settings
        serial = lambda client: closed_loop(client, self.request, s.serial, 1)  # noqa: E731
        blocks = await self.interleaved(["legacy-5ms", "gw-shadow-5ms", "relay-shadow-5ms"], serial, 1)
        for q, target in ((50, 1.15), (99, 1.25)):
            ratios = self._ratios(blocks, "gw-shadow-5ms", "legacy-5ms", lambda b, q=q: b.run.percentile_ms(q))
            relay = _median(self._ratios(blocks, "relay-shadow-5ms", "legacy-5ms", lambda b, q=q: b.run.percentile_ms(q)))
            self.add(Figure(
                1, f"added latency p{q}, remote legacy {REMOTE_MS} ms, shadowing 100%",
                f"gateway p{q} / direct-to-legacy p{q}, one request at a time", _median(ratios), target, True,
                per_repeat=ratios,
                detail=f"direct {_ms(_median([b.run.percentile_ms(q) for b in blocks['legacy-5ms']]))}, "
                       f"gateway {_ms(_median([b.run.percentile_ms(q) for b in blocks['gw-shadow-5ms']]))}; floor, bare "
                       f"relay with shadowing: {_ms(_median([b.run.percentile_ms(q) for b in blocks['relay-shadow-5ms']]))} "
                       f"(ratio {relay:.2f})"))
            floor_ratios = self._ratios(blocks, "gw-shadow-5ms", "relay-shadow-5ms", lambda b, q=q: b.run.percentile_ms(q))
            self.add(Figure(
                1, f"added latency p{q}, remote legacy {REMOTE_MS} ms, against the relay floor",
                f"gateway p{q} / bare grpc.aio relay p{q}, both shadowing 100%, one request at a time",
                _median(floor_ratios), 1.05, True, per_repeat=floor_ratios,
                detail="the relay forwards each request to the legacy and the candidate with nothing else: the least "
                       "a shadowing gateway in Python costs"))
        image = lambda client: closed_loop(client, self.image_request, s.serial, 1)  # noqa: E731
        blocks = await self.interleaved(["mxnet-bare", "gw-mxnet"], image, 1)
        ratios = self._ratios(blocks, "gw-mxnet", "mxnet-bare", lambda b: b.run.percentile_ms(50))
        self.add(Figure(
            1, "added latency p50, in-process MXNet legacy", "gateway p50 / same model behind a bare grpc.aio server",
            _median(ratios), 1.05, True, per_repeat=ratios,
            detail=f"bare {_ms(_median([b.run.percentile_ms(50) for b in blocks['mxnet-bare']]))}, "
                   f"gateway {_ms(_median([b.run.percentile_ms(50) for b in blocks['gw-mxnet']]))}"))

    async def isolation(self) -> None:
        s = self.settings
        load = lambda client: closed_loop(client, self.request, s.isolation, ISOLATION_CONCURRENCY)  # noqa: E731
        names = ["gw-off-5ms", "gw-stalled-5ms", "gw-unavailable-5ms", "gw-unavailable-unbroken-5ms"]
        before = {name: scrape(self.targets[name].process.metrics_port) for name in names}  # type: ignore[union-attr]
        blocks = await self.interleaved(names, load, ISOLATION_CONCURRENCY)
        skipped = {name: skipped_counts(scrape(self.targets[name].process.metrics_port), before[name])  # type: ignore[union-attr]
                   for name in names}
        for name, trouble in (("gw-stalled-5ms", f"stalled {STALL_MS} ms"), ("gw-unavailable-5ms", "UNAVAILABLE")):
            for q, target in ((99, 1.10), (50, 1.05)):
                percentile = lambda b, q=q: b.run.percentile_ms(q)  # noqa: E731
                ratios = self._ratios(blocks, name, "gw-off-5ms", percentile)
                detail = (f"off {_ms(_median([percentile(b) for b in blocks['gw-off-5ms']]))}, "
                          f"on {_ms(_median([percentile(b) for b in blocks[name]]))}; shadow calls skipped: "
                          + counts_text({reason: count for reason, count in skipped[name].items() if count}))
                if name == "gw-unavailable-5ms":
                    unbroken = "gw-unavailable-unbroken-5ms"
                    detail += (f"; with no circuit breaker (every request calls the candidate): ratio "
                               f"{_median(self._ratios(blocks, unbroken, 'gw-off-5ms', percentile)):.2f}, "
                               f"on {_ms(_median([percentile(b) for b in blocks[unbroken]]))}")
                self.add(Figure(
                    2, f"shadow isolation p{q}, candidate {trouble}",
                    f"primary p{q} shadowing 100% / shadowing off ({ISOLATION_CONCURRENCY} concurrent)",
                    _median(ratios), target, True, per_repeat=ratios, detail=detail))

    async def saturation(self) -> float:
        """Figure 3; returns the saturation throughput with every request shadowed, for the later figures."""
        s = self.settings
        load = lambda client: closed_loop(client, self.request, s.saturation, SATURATION_CONCURRENCY)  # noqa: E731
        names = ["gw-no-shadow", "gw-shadow", "gw-shadow-unshed", "relay", "relay-shadow"]
        blocks = await self.interleaved(names, load, SATURATION_CHANNELS)
        median = lambda name, value: _median([value(b) for b in blocks[name]])  # noqa: E731
        throughput = lambda b: b.run.throughput  # noqa: E731
        ratios = self._ratios(blocks, "gw-shadow", "gw-no-shadow", throughput)
        unshed_ratio = _median(self._ratios(blocks, "gw-shadow-unshed", "gw-no-shadow", throughput))
        relay_ratio = _median(self._ratios(blocks, "relay-shadow", "relay", throughput))
        metrics = scrape(self.targets["gw-shadow"].process.metrics_port)  # type: ignore[union-attr]
        served, compared = served_count(metrics), compared_count(metrics)
        overloaded = sample(metrics, "shadowserve_shadow_skipped_total", model="m", reason="overloaded")

        def row(name: str) -> str:
            return (f"{median(name, throughput):.0f} req/s at {median(name, lambda b: b.utilization):.0%} CPU, "
                    f"{median(name, lambda b: b.cpu_us_per_request):.0f} µs/req")

        self.add(Figure(
            3, "shadow cost at saturation", "throughput shadowing 100% / shadowing 0%", _median(ratios), 0.80, False,
            per_repeat=ratios,
            detail=f"0%: {row('gw-no-shadow')}; 100%: {row('gw-shadow')}, {compared / served:.0%} of requests compared "
                   f"and {overloaded / served:.0%} skipped as overloaded (shed from an event loop "
                   f"busy share of {ServerConfig().shed_shadow_from_loop_busy}); with "
                   f"`shed_shadow_from_loop_busy: null` (every request shadowed): {row('gw-shadow-unshed')}, throughput "
                   f"ratio {unshed_ratio:.2f}; floor of that, bare relay: {median('relay', lambda b: b.cpu_us_per_request):.0f}"
                   f" → {median('relay-shadow', lambda b: b.cpu_us_per_request):.0f} µs/req, throughput ratio {relay_ratio:.2f}"))
        return median("gw-shadow-unshed", throughput)

    async def cpu_per_request(self, saturation: float) -> float:
        """Figures 4 and 6: CPU per request at one fixed offered rate, half the saturation with every request shadowed.

        Returns the gateway's CPU-µs per request with every request shadowed and compared, for figure 7.
        """
        s = self.settings
        rate = max(50.0, 0.5 * saturation)
        load = lambda client: open_loop(client, self.request, rate, s.rate_s)  # noqa: E731
        warmup = lambda client: open_loop(client, self.request, rate, min(1.0, s.rate_s))  # noqa: E731
        blocks = await self.interleaved(["echo", "relay-shadow", "gw-shadow", "gw-no-compare"], load, 8, warmup)
        cpu = {name: _median([b.cpu_us_per_request for b in blocks[name]]) for name in blocks}
        ratios = self._ratios(blocks, "gw-shadow", "echo", lambda b: b.cpu_us_per_request)
        self.add(Figure(
            4, "CPU efficiency", f"gateway CPU-µs/request (shadow + comparison on) / bare grpc.aio echo, at {rate:.0f} req/s",
            _median(ratios), 3.0, True, per_repeat=ratios,
            detail=f"echo {cpu['echo']:.0f} µs/req, gateway {cpu['gw-shadow']:.0f} µs/req; floor, bare relay "
                   f"with shadowing: {cpu['relay-shadow']:.0f} µs/req ({cpu['relay-shadow'] / cpu['echo']:.2f} × echo)"))
        ratios = self._ratios(blocks, "gw-shadow", "gw-no-compare", lambda b: b.cpu_us_per_request)
        self.add(Figure(
            6, "comparison and metrics", f"CPU/request comparison + metrics on / both off, at {rate:.0f} req/s",
            _median(ratios), 1.05, True, per_repeat=ratios,
            detail=f"off {cpu['gw-no-compare']:.0f} µs/req, on {cpu['gw-shadow']:.0f} µs/req"))
        return cpu["gw-shadow"]

    async def scale_out(self) -> None:
        """Figure 5: one worker on one core against two workers on both, driven by h2load.

        The legacy and the candidate run in the gateway (the MXNet model on both sides), so no backend
        process competes for the two cores, and h2load, a C load generator, costs them little; the
        Python load generator costs about as much per request as a worker and would measure the machine.
        """
        s = self.settings
        one, two = self.targets["gw-1-worker"], self.targets["gw-2-workers"]
        procs.pin(one.process.pid, self.sut_cpus)  # type: ignore[union-attr]
        procs.pin(two.process.pid, procs.all_cpus())  # type: ignore[union-attr]
        procs.pin(os.getpid(), procs.all_cpus(), with_descendants=False)  # h2load, started from here, goes anywhere
        count = s.scale_out

        async def block(target: Target) -> ScaleOutBlock:
            process = target.process
            workers = process.workers()  # type: ignore[union-attr]
            served_before, cpu_before = served_count(scrape(process.metrics_port)), process.cpu_seconds()  # type: ignore[union-attr]
            worker_cpu_before = [procs.cpu_seconds(pid) for pid in workers]
            run = await h2load(target.url, self.image_request, count, SATURATION_CHANNELS, SCALE_OUT_STREAMS, self.workdir)
            served = served_count(scrape(process.metrics_port)) - served_before  # type: ignore[union-attr]
            if run.failed or run.done != count:
                raise RuntimeError(f"{target.name}: h2load {run}")
            return ScaleOutBlock(run.throughput, (process.cpu_seconds() - cpu_before) / count * 1e6,  # type: ignore[union-attr]
                                 int(served), [procs.cpu_seconds(pid) - b for pid, b in zip(workers, worker_cpu_before)])

        try:
            for target in (one, two):
                await block(target)  # warm-up
            results: dict[str, list[ScaleOutBlock]] = {"one": [], "two": []}
            for repeat in range(s.repeats):
                for name, target in (("one", one), ("two", two)) if repeat % 2 == 0 else (("two", two), ("one", one)):
                    results[name].append(await block(target))
        finally:
            procs.pin(os.getpid(), self.rest_cpus, with_descendants=False)
        ratios = [b.throughput / a.throughput for a, b in zip(results["one"], results["two"])]

        def compared_share(target: Target) -> str:
            metrics = scrape(target.process.metrics_port)  # type: ignore[union-attr]
            return f"{compared_count(metrics) / served_count(metrics):.0%}"

        counted = sum(b.served for b in results["two"])
        worker_cpu = [sum(spent) for spent in zip(*(b.worker_cpu_s for b in results["two"]))]
        split = "/".join(f"{spent / (sum(worker_cpu) or 1.0):.0%}" for spent in worker_cpu)
        self.add(Figure(
            5, "scale-out", f"saturation throughput 2 workers on 2 cores / 1 worker on 1 core ({SATURATION_CHANNELS} "
            f"connections × {SCALE_OUT_STREAMS} streams, h2load)", _median(ratios), 1.7, False, per_repeat=ratios,
            detail=f"in-process MXNet legacy and candidate, shadowing 100%; 1 worker "
                   f"{_median([b.throughput for b in results['one']]):.0f} req/s "
                   f"({_median([b.cpu_us_per_request for b in results['one']]):.0f} µs/req), "
                   f"2 workers {_median([b.throughput for b in results['two']]):.0f} req/s "
                   f"({_median([b.cpu_us_per_request for b in results['two']]):.0f} µs/req, CPU split between workers "
                   f"{split}); one /metrics of 2 workers counted {counted} of {count * s.repeats} requests sent; "
                   f"compared: {compared_share(one)} (1 worker), {compared_share(two)} (2 workers)"))

    async def completeness(self, cpu_us_per_request: float) -> None:
        """Figure 7 at 70% of what the gateway's core can do when every request is shadowed and compared.

        That capacity is one core over the CPU per request of all its processes (figure 4): the engine's work
        included, which the primary's throughput at saturation leaves out, since the engine yields to it.
        """
        s = self.settings
        target = self.targets["gw-shadow"]
        port = target.process.metrics_port  # type: ignore[union-attr]
        rate = 0.7 * 1e6 / cpu_us_per_request
        before = scrape(port)
        run = await open_loop(target.client(8), self.request, rate, s.completeness_s)
        deadline = time.monotonic() + 30
        while True:  # outcomes land after the replies: wait until all are in (or they never will be)
            after = scrape(port)
            delta = lambda name, **labels: sample(after, name, **labels) - sample(before, name, **labels)  # noqa: E731
            served = delta("shadowserve_requests_total", code="OK", model="m", served_by="legacy")
            shadowed = served - delta("shadowserve_shadow_skipped_total", model="m", reason="sampled_out")
            compared = compared_count(after) - compared_count(before)
            skipped = skipped_counts(after, before)
            accounted = compared + sum(skipped.values()) == shadowed
            if accounted or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        self.add(Figure(
            7, "completeness at 70% of capacity",
            f"compared / shadowed-and-served at {rate:.0f} req/s (70% of one core at figure 4's CPU per request)",
            compared / shadowed if shadowed else 0.0, 0.99, False,
            detail=f"{len(run.latencies_ns)} sent, {run.errors or 'no'} errors, {served:.0f} served, "
                   f"{compared:.0f} compared, skipped {counts_text(skipped)}; "
                   f"every shadowed request compared or counted as skipped: {'yes' if accounted else 'NO'}"))
        await self.large_message(target, port)

    async def large_message(self, target: Target, port: int) -> None:
        """A 64 MiB request through the front to both backends and a 64 MiB answer back."""
        values = 64 * MIB // 4
        request = infer_request((1, values), seed=1)
        before = scrape(port)
        start = time.perf_counter()
        run = await closed_loop(target.client(1), request, 1, 1, timeout_s=120)
        elapsed = time.perf_counter() - start
        ok = not run.errors
        deadline = time.monotonic() + 60
        while (compared := compared_count(scrape(port)) - compared_count(before)) < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)  # a comparison this large runs on the comparison thread
        self.add(Figure(
            7, "64 MiB message", "64 MiB requests answered and compared / sent", float(ok and compared == 1), 1.0, False,
            detail=f"{len(request) / MIB:.1f} MiB request, {'answered' if ok else run.errors} in {elapsed:.1f} s, "
                   f"{compared:.0f} comparison recorded"))

    async def memory(self) -> None:
        s = self.settings
        target = self.targets["gw-hung"]
        process = target.process
        client = target.client(SATURATION_CHANNELS)
        await closed_loop(client, self.request, 500 if s.quick else 3000, SATURATION_CONCURRENCY)
        # Private memory: the hand-off rings are shared pages, resident as they are first written and bounded by
        # `engine.queue_bytes`; counted in RSS, they read as growth.
        start_rss = process.private_rss_bytes()  # type: ignore[union-attr]
        samples, sent = [start_rss], 0
        deadline = time.monotonic() + s.memory_s
        next_sample = time.monotonic() + min(10.0, s.memory_s)
        while time.monotonic() < deadline:
            run = await closed_loop(client, self.request, 500, SATURATION_CONCURRENCY)
            sent += len(run.latencies_ns)
            if time.monotonic() >= next_sample:
                samples.append(process.private_rss_bytes())  # type: ignore[union-attr]
                next_sample += 10.0
        end_rss = process.private_rss_bytes()  # type: ignore[union-attr]
        growth = (end_rss - start_rss) / 1e6
        label = f"{s.memory_s:.0f} s (quick mode; the full run holds 5 minutes)" if s.quick else f"{s.memory_s / 60:.0f} minutes"
        self.add(Figure(
            8, "memory with a hung candidate", f"private RSS growth after {label} at saturation, all processes",
            growth, 50, True, unit=" MB",
            detail=f"{sent} requests; private RSS {start_rss / 1e6:.0f} MB at start, {end_rss / 1e6:.0f} MB at end, "
                   f"peak {max(samples) / 1e6:.0f} MB; RSS with shared pages {process.rss_bytes() / 1e6:.0f} MB at "
                   f"end; shadow calls skipped: {counts_text(skipped_counts(scrape(process.metrics_port)))}"))  # type: ignore[union-attr]

    async def engine_killed(self) -> None:
        """Figure 9: SIGKILL the shadow engine under load; no client may notice, comparisons must come back."""
        target = self.targets["gw-shadow"]
        process = target.process
        engine = next(pid for pid in procs.descendants(process.pid) if b"shadow engine" in procs.cmdline(pid))
        client = target.client(ISOLATION_CONCURRENCY)
        runs: list[Run] = []
        resumed = asyncio.Event()

        async def load() -> None:
            while not resumed.is_set():
                runs.append(await closed_loop(client, self.request, 100, ISOLATION_CONCURRENCY))

        loading = asyncio.get_running_loop().create_task(load())
        await asyncio.sleep(1.0)
        os.kill(engine, signal.SIGKILL)
        killed = time.monotonic()
        compared_at_kill = compared_count(scrape(process.metrics_port))  # type: ignore[union-attr]
        while compared_count(scrape(process.metrics_port)) <= compared_at_kill:  # type: ignore[union-attr]
            if time.monotonic() - killed > 120:
                break
            await asyncio.sleep(0.05)
        resume_s = time.monotonic() - killed
        resumed.set()
        await loading
        failed = sum(sum(run.errors.values()) for run in runs)
        sent = sum(len(run.latencies_ns) for run in runs)
        self.add(Figure(
            9, "shadow engine killed under load", f"failed client requests ({ISOLATION_CONCURRENCY} concurrent)",
            float(failed), 0, True,
            detail=f"{sent} requests sent; comparisons resumed {resume_s:.1f} s after the SIGKILL; a hand-off of one "
                   f"request (1000 FP32 in, 1000 out) costs the primary {handoff_cost_us():.1f} µs"))

    async def stalls(self) -> None:
        """Figure 10: the longest stall of requests in flight over minutes, with a hung and a healthy candidate.

        At the same time, requests go straight to the legacy (the second core) and to the echo server (the gateway's
        core): a stall of the rig (the load generator, the legacy, the host pausing either core) delays those too and
        is not counted as the gateway's. A stall of the gateway's own making delays the echo server by a time slice
        at most: it shares the core at the same priority."""
        s = self.settings
        for name, candidate in (("gw-hung", "hung"), ("gw-shadow", "healthy")):
            run, straight, same_core = await asyncio.gather(
                open_loop(self.targets[name].client(8), self.request, STEADY_RATE, s.stall_s),
                open_loop(self.targets["legacy"].client(8), self.request, STRAIGHT_RATE, s.stall_s),
                open_loop(self.targets["echo"].client(8), self.request, STRAIGHT_RATE, s.stall_s))
            self.add(Figure(
                10, f"longest stall, candidate {candidate}",
                f"worst request's latency − median, less what requests sent straight to the legacy or to an echo server "
                f"on the gateway's core lost at the same moments; over {s.stall_s:.0f} s at {STEADY_RATE:.0f} req/s "
                f"({STRAIGHT_RATE:.0f} to each of the others), shadowing 100%",
                run.own_stall_ms(straight, same_core), 20, True, unit=" ms",
                detail=f"{len(run.latencies_ns)} requests, {run.errors or 'no'} errors; p50 {_ms(run.percentile_ms(50))}, "
                       f"p99 {_ms(run.percentile_ms(99))}, p99.9 {_ms(run.percentile_ms(99.9))}; worst latency − median "
                       f"{run.stall_ms:.1f} ms through the gateway, {straight.stall_ms:.1f} ms straight to the legacy, "
                       f"{same_core.stall_ms:.1f} ms to the echo server"))

    async def scrape_cost(self) -> None:
        """Figure 11: legacy p99 while Prometheus-like scrapes come every second, against none."""
        s = self.settings
        target = self.targets["gw-shadow"]
        port = target.process.metrics_port  # type: ignore[union-attr]
        load = lambda: open_loop(target.client(8), self.request, STEADY_RATE, s.rate_s)  # noqa: E731
        scrapes: list[tuple[float, int]] = []  # seconds, bytes

        async def scraping(stop: asyncio.Event) -> None:
            while not stop.is_set():
                start = time.perf_counter()
                size = len(await fetch_metrics(port))
                scrapes.append((time.perf_counter() - start, size))
                try:
                    await asyncio.wait_for(stop.wait(), 1.0)
                except TimeoutError:
                    pass

        await load()
        blocks: dict[str, list[Run]] = {"off": [], "on": []}
        for repeat in range(s.repeats):
            for mode in ("off", "on") if repeat % 2 == 0 else ("on", "off"):
                stop = asyncio.Event()
                scraper = asyncio.get_running_loop().create_task(scraping(stop)) if mode == "on" else None
                blocks[mode].append(await load())
                stop.set()
                if scraper is not None:
                    await scraper
        ratios = [on.percentile_ms(99) / off.percentile_ms(99) for on, off in zip(blocks["on"], blocks["off"])]
        p99 = lambda mode: _ms(_median([run.percentile_ms(99) for run in blocks[mode]]))  # noqa: E731
        self.add(Figure(
            11, "scrape cost", f"legacy p99 with /metrics scraped every second / without, at {STEADY_RATE:.0f} req/s",
            _median(ratios), 1.05, True, per_repeat=ratios,
            detail=f"without {p99('off')}, with {p99('on')}; {len(scrapes)} scrapes of "
                   f"{_median([size for _, size in scrapes]) / 1024:.0f} KiB, each answered in "
                   f"{_ms(_median([spent for spent, _ in scrapes]) * 1000)} (median) by the supervisor process"))

    async def memory_burst(self) -> None:
        """Figure 12: a worker's own memory before, during and after a burst of very large requests.

        Private memory (RssAnon): the hand-off ring's shared pages, once written, stay resident up to
        `engine.queue_bytes` whatever the burst, and are no memory the burst kept.
        """
        s = self.settings
        target = self.targets["gw-shadow"]
        worker = next(pid for pid in procs.descendants(target.process.pid)  # type: ignore[union-attr]
                      if b"shadowserve: worker" in procs.cmdline(pid))
        request = infer_request((1, s.burst_mib * MIB // 4), seed=2)
        before = peak = procs.private_rss_bytes(worker)
        sampling = True

        async def sample_peak() -> None:
            nonlocal peak
            while sampling:
                peak = max(peak, procs.private_rss_bytes(worker))
                await asyncio.sleep(0.05)

        sampler = asyncio.get_running_loop().create_task(sample_peak())
        run = await closed_loop(target.client(1), request, s.bursts, 1, timeout_s=300)
        sampling = False
        await sampler
        start = time.monotonic()
        while (after := procs.private_rss_bytes(worker)) > before + 100e6 and time.monotonic() - start < s.settle_s:
            await asyncio.sleep(0.5)
        self.add(Figure(
            12, f"memory after {s.bursts} × {s.burst_mib} MiB requests", "worker private RSS after the burst − before",
            (after - before) / 1e6, 100, True, unit=" MB",
            detail=f"{run.errors or 'no'} errors; worker private RSS {before / 1e6:.0f} MB before, {peak / 1e6:.0f} MB "
                   f"at the peak during the burst, {after / 1e6:.0f} MB {time.monotonic() - start:.0f} s after it; "
                   f"RSS with shared pages {procs.rss_bytes(worker) / 1e6:.0f} MB after"))

    async def drain(self) -> None:
        """Figure 13: SIGTERM under load; clients leave when health says NOT_SERVING, as a load balancer would."""
        s = self.settings
        target = self.targets["gw-drain"]
        process = target.process
        client = target.client(ISOLATION_CONCURRENCY)
        health = health_pb2_grpc.HealthStub(client.channels[0])
        leave_after_s = s.drain_s / 2  # how long a load balancer takes to act on NOT_SERVING; less than drain_s
        runs: list[tuple[float, Run]] = []  # start, block
        stop = asyncio.Event()

        async def load() -> None:
            while not stop.is_set():
                started = time.monotonic()
                runs.append((started, await closed_loop(client, self.request, 20, ISOLATION_CONCURRENCY)))

        loading = asyncio.get_running_loop().create_task(load())
        await asyncio.sleep(1.0)
        os.kill(process.pid, signal.SIGTERM)  # type: ignore[union-attr]
        signalled = time.monotonic()
        while (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status == health_pb2.HealthCheckResponse.SERVING:
            await asyncio.sleep(0.02)
        noticed = time.monotonic()
        await asyncio.sleep(leave_after_s)
        stop.set()
        await loading
        code = await asyncio.to_thread(process.popen.wait, 60)  # type: ignore[union-attr]
        exited = time.monotonic()
        failed = sum(sum(run.errors.values()) for _, run in runs)
        after = sum(len(run.latencies_ns) for started, run in runs if started >= signalled)
        self.add(Figure(
            13, "SIGTERM drain under load", f"failed client requests ({ISOLATION_CONCURRENCY} concurrent; clients stop "
            f"{leave_after_s:g} s after health turns NOT_SERVING, drain_s {s.drain_s:g})", float(failed), 0, True,
            detail=f"{sum(len(run.latencies_ns) for _, run in runs)} requests, {after} of them sent after the SIGTERM; "
                   f"health NOT_SERVING {noticed - signalled:.2f} s after the SIGTERM; exit code {code}, "
                   f"{exited - signalled:.1f} s after it"))

    async def tls_cost(self) -> None:
        """Figure 14: TLS on the front against plaintext, the same gateway config otherwise (connections kept open)."""
        s = self.settings
        serial = lambda client: closed_loop(client, self.request, s.serial, 1)  # noqa: E731
        blocks = await self.interleaved(["gw-shadow", "gw-tls"], serial, 1)
        ratios = self._ratios(blocks, "gw-tls", "gw-shadow", lambda b: b.run.percentile_ms(50))
        p50 = lambda name: _ms(_median([b.run.percentile_ms(50) for b in blocks[name]]))  # noqa: E731
        self.add(Figure(14, "TLS cost, latency", "gateway p50 with TLS on the front / plaintext, one request at a time",
                        _median(ratios), 1.10, True, per_repeat=ratios,
                        detail=f"plaintext {p50('gw-shadow')}, TLS {p50('gw-tls')}"))
        steady = lambda client: open_loop(client, self.request, STEADY_RATE, s.rate_s)  # noqa: E731
        blocks = await self.interleaved(["gw-shadow", "gw-tls"], steady, 8)
        ratios = self._ratios(blocks, "gw-tls", "gw-shadow", lambda b: b.cpu_us_per_request)
        cpu = lambda name: _median([b.cpu_us_per_request for b in blocks[name]])  # noqa: E731
        self.add(Figure(14, "TLS cost, CPU", f"gateway CPU-µs/request with TLS on the front / plaintext, at "
                        f"{STEADY_RATE:.0f} req/s", _median(ratios), 1.15, True, per_repeat=ratios,
                        detail=f"plaintext {cpu('gw-shadow'):.0f} µs/req, TLS {cpu('gw-tls'):.0f} µs/req"))

    async def candidate_calls(self) -> None:
        """Figure 15: the caller's CPU per candidate call, one long-lived ModelStreamInfer stream against unary calls.

        Measured in this process (the caller's side is what the shadow engine would pay) against the bare echo
        server, with CALLS_IN_FLIGHT calls outstanding either way.
        """
        s = self.settings
        channel = grpc.aio.insecure_channel(self.targets["echo"].url, options=CHANNEL_OPTIONS)
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest.FromString(self.request)

        async def unary() -> None:
            remaining = s.calls

            async def caller() -> None:
                nonlocal remaining
                while remaining > 0:
                    remaining -= 1
                    await stub.ModelInfer(request, timeout=10)

            await asyncio.gather(*(caller() for _ in range(CALLS_IN_FLIGHT)))

        async def stream() -> None:
            call = stub.ModelStreamInfer(timeout=60)
            window = asyncio.Semaphore(CALLS_IN_FLIGHT)

            async def read() -> None:
                for _ in range(s.calls):
                    answer = await call.read()
                    if answer.error_message:
                        raise RuntimeError(answer.error_message)
                    window.release()

            reading = asyncio.get_running_loop().create_task(read())
            for _ in range(s.calls):
                await window.acquire()
                await call.write(request)
            await reading
            await call.done_writing()

        async def cpu_per_call(calls) -> float:
            start = time.process_time()
            await calls()
            return (time.process_time() - start) / s.calls * 1e6

        try:
            await unary()
            await stream()
            spent: dict[str, list[float]] = {"unary": [], "stream": []}
            for repeat in range(s.repeats):
                for name, calls in (("unary", unary), ("stream", stream)) if repeat % 2 == 0 else (
                        ("stream", stream), ("unary", unary)):
                    spent[name].append(await cpu_per_call(calls))
        finally:
            await channel.close()
        ratios = [b / a for a, b in zip(spent["unary"], spent["stream"])]
        self.add(Figure(
            15, "candidate calls: stream against unary", f"caller CPU per call, one ModelStreamInfer stream / unary "
            f"ModelInfer ({CALLS_IN_FLIGHT} in flight, 1000 FP32 each way)", _median(ratios), None, True,
            per_repeat=ratios,
            detail=f"unary {_median(spent['unary']):.0f} µs/call, stream {_median(spent['stream']):.0f} µs/call"))

    async def run(self) -> None:
        try:
            await self.start()
            # This process holds MXNet and the clients: a full collection of its heap would pause every
            # client at once, a stall of the rig read as the server's (figures 10 and 11). Frozen, it is
            # not scanned again.
            gc.collect()
            gc.freeze()
            self.log("figure 1: added latency")
            await self.measuring("gw-shadow-5ms", "relay-shadow-5ms", "mxnet-bare", "gw-mxnet")
            await self.added_latency()
            self.log("figure 2: shadow isolation")
            await self.measuring("gw-off-5ms", "gw-stalled-5ms", "gw-unavailable-5ms", "gw-unavailable-unbroken-5ms")
            await self.isolation()
            self.log("figure 3: saturation")
            await self.measuring("gw-no-shadow", "gw-shadow", "gw-shadow-unshed", "relay", "relay-shadow")
            saturation = await self.saturation()
            self.log("figures 4 and 6: CPU per request")
            await self.measuring("echo", "relay-shadow", "gw-shadow", "gw-no-compare")
            cpu_us_per_request = await self.cpu_per_request(saturation)
            self.log("figure 7: completeness")
            await self.measuring("gw-shadow")
            await self.completeness(cpu_us_per_request)
            self.log("figure 5: scale-out")
            await self.measuring("gw-1-worker", "gw-2-workers")
            await self.scale_out()
            self.log("figure 8: memory")
            await self.measuring("gw-hung")
            await self.memory()
            self.log("figure 10: longest stall")
            await self.measuring("gw-hung", "gw-shadow", "echo")
            await self.stalls()
            self.log("figure 11: scrape cost")
            await self.measuring("gw-shadow")
            await self.scrape_cost()
            self.log("figure 14: TLS cost")
            await self.measuring("gw-shadow", "gw-tls")
            await self.tls_cost()
            self.log("figure 15: candidate calls, stream against unary")
            await self.measuring("echo")
            await self.candidate_calls()
            self.log("figure 13: SIGTERM drain")
            await self.measuring("gw-drain")
            await self.drain()
            self.log("figure 12: memory after large requests")
            await self.measuring("gw-shadow")
            await self.memory_burst()
            self.log("figure 9: shadow engine killed")
            await self.engine_killed()
        finally:
            await self.stop()


def handoff_cost_us(repeats: int = 2000) -> float:
    """Median wall time of one hand-off into a shared-memory ring: what shadowing a request costs a primary."""
    import numpy as np

    from server.handoff import SHADOW_CALL, HandoffWriter, SharedState

    shared = SharedState.create([(100.0, 0.0)], 1, 64 * MIB)
    read_fd, write_fd = os.pipe()
    writer = HandoffWriter(shared.rings[0], write_fd)
    groups = ({"x": np.ones((1, 1000), np.float32)}, {"y": np.ones((1, 1000), np.float32)})
    times = []
    for i in range(repeats):
        start = time.perf_counter_ns()
        writer.put(SHADOW_CALL, 0, f"request-{i}", groups, legacy_s=0.001)
        times.append(time.perf_counter_ns() - start)
        if i % 100 == 99:
            for _ in shared.rings[0].drain():
                pass
            os.read(read_fd, 4096)
    os.close(read_fd)
    os.close(write_fd)
    return statistics.median(times) / 1000


# -- /metrics ----------------------------------------------------------------------------------


async def fetch_metrics(port: int) -> bytes:
    """GET /metrics without blocking the event loop the load runs on."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
    body = await reader.read()
    writer.close()
    return body.partition(b"\r\n\r\n")[2]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return reply.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text (labels in any order); 0 when absent."""
    for match in re.finditer(rf"^{re.escape(name)}\{{([^}}]*)\}} (\S+)$", text, re.M):
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        if found == labels:
            return float(match.group(2))
    return 0.0


def skipped_counts(after: str, before: str = "") -> dict[str, float]:
    """Shadowed requests not compared, by reason, between two scrapes of a gateway's /metrics."""
    return {reason: sample(after, "shadowserve_shadow_skipped_total", model="m", reason=reason)
            - sample(before, "shadowserve_shadow_skipped_total", model="m", reason=reason)
            for reason in SHADOWED_SKIP_REASONS}


def counts_text(counts: dict[str, float]) -> str:
    return ", ".join(f"{name} {count:.0f}" for name, count in counts.items())


def compared_count(text: str) -> float:
    return sum(sample(text, "shadowserve_comparisons_total", model="m", verdict=verdict)
               for verdict in ("match", "mismatch", "shape_mismatch"))


def served_count(text: str) -> float:
    return sample(text, "shadowserve_requests_total", code="OK", model="m", served_by="legacy")
