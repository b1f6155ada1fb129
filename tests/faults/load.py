"""Clients under load while a fault is injected, and what every fault test checks of their outcomes.

Each request carries an input of its own, so an answer crossed between requests would show; its
expected answer is computed here, as the test legacy (`scale_by(2.0)`, y = 2x) computes it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import itertools
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tritonclient.grpc.aio as triton_aio
import yaml
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from tests.support.gateway import GatewayProcess, eventually

MODEL = "m"
TENSORS = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
           "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}]}
LISTEN = {"grpc_listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0"}
# Requests per phase (baseline, fault, recovery): a stall of the test's own event loop delays every client's
# request at once, so a p99 over 4 clients needs well over 100 x 4 requests not to be one stall.
PHASE = 400
CLIENTS = 4
BOUND_FACTOR, BOUND_EXTRA_S = 3.0, 0.05  # a fault phase's p99 may reach 3x the baseline's p99 + 50 ms
SCRAPE_EVERY_S = 0.2
CANCELLED = "cancelled"  # the status of an outcome the client cancelled itself


def request_input(n: int) -> np.ndarray:
    return np.array([[n, n + 0.25, -n, 1.0 / (n + 1)]], np.float32)


def legacy_answer(x: np.ndarray) -> bytes:
    """What the test legacy answers for `x`, computed here as it does."""
    return (x * np.float32(2.0)).astype(x.dtype).tobytes()


def remote(url: str, timeout_s: float) -> dict[str, Any]:
    return {"runtime": "remote", "url": url, "model": MODEL, "timeout_s": timeout_s}


def write_config(path: Path, pair: dict[str, Any], **server: Any) -> Path:
    path.write_text(yaml.safe_dump({"server": {**LISTEN, **server}, "models": [{"name": MODEL, **TENSORS, **pair}]}))
    return path


@dataclasses.dataclass(frozen=True)
class Outcome:
    latency_s: float  # until the answer or the failure
    exact: bool  # the answer is the legacy's, byte for byte
    status: str | None  # a failure's gRPC status ("StatusCode.UNAVAILABLE"), or CANCELLED; None for an answer


class Load:
    """`clients` tritonclient.grpc.aio clients, each with a channel of its own, sending until stopped.

    `timeout_s`: each call's client_timeout (a deadline); `cancel_after_s`: the client cancels a call
    not answered by then.
    """

    def __init__(self, url: str, clients: int = CLIENTS, timeout_s: float = 60.0,
                 cancel_after_s: float | None = None) -> None:
        self.url, self.clients, self.timeout_s, self.cancel_after_s = url, clients, timeout_s, cancel_after_s
        self.outcomes: list[Outcome] = []
        self._numbers = itertools.count()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    async def __aenter__(self) -> "Load":
        # The test process holds the suite's whole heap (torch, MXNet, ...): a full collection of it stalled
        # every client here for 260 ms, a pause of the measuring rig read as the gateway's. Frozen objects
        # are not scanned again until the load stops.
        gc.collect()
        gc.freeze()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._client(index)) for index in range(self.clients)]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        gc.unfreeze()

    def mark(self) -> int:
        return len(self.outcomes)

    def since(self, mark: int) -> list[Outcome]:
        return self.outcomes[mark:]

    async def more(self, mark: int, count: int = PHASE, timeout_s: float = 60.0) -> list[Outcome]:
        """The outcomes since `mark`, once there are `count` of them."""
        async def enough() -> bool:
            return len(self.outcomes) - mark >= count

        await eventually(enough, timeout_s)
        return self.since(mark)

    async def phase(self, count: int = PHASE) -> list[Outcome]:
        return await self.more(self.mark(), count)

    async def _client(self, index: int) -> None:
        # A channel option of its own keeps gRPC from sharing one connection between the clients.
        options = [("grpc.max_send_message_length", 1 << 30), ("grpc.max_receive_message_length", 1 << 30),
                   ("shadowserve.test_client", index)]
        loop = asyncio.get_running_loop()
        async with triton_aio.InferenceServerClient(self.url, channel_args=options) as client:
            while not self._stop.is_set():
                x = request_input(next(self._numbers))
                tensor = triton_aio.InferInput("x", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x)
                start = loop.time()
                call = loop.create_task(client.infer(MODEL, [tensor], client_timeout=self.timeout_s))
                done, _ = await asyncio.wait([call], timeout=self.cancel_after_s)
                if not done:
                    call.cancel()
                    await asyncio.gather(call, return_exceptions=True)
                    self.outcomes.append(Outcome(loop.time() - start, False, CANCELLED))
                    continue
                try:
                    answer = call.result().as_numpy("y").tobytes()
                except InferenceServerException as exc:
                    self.outcomes.append(Outcome(loop.time() - start, False, exc.status()))
                    await asyncio.sleep(0.01)  # a refusing gateway answers at once: do not spin
                    continue
                self.outcomes.append(Outcome(loop.time() - start, answer == legacy_answer(x), None))


def p99(outcomes: list[Outcome]) -> float:
    return float(np.percentile([outcome.latency_s for outcome in outcomes], 99))


def assert_p99_within_bound(baseline: list[Outcome], fault: list[Outcome], allowance_s: float = 0.0) -> None:
    """`allowance_s`: added to the bound, for a fault that holds the gateway's event loop itself."""
    bound = BOUND_FACTOR * p99(baseline) + BOUND_EXTRA_S + allowance_s
    assert p99(fault) <= bound, (f"p99 {p99(fault) * 1e3:.1f} ms under the fault, {p99(baseline) * 1e3:.1f} ms "
                                 f"without: over the bound of {bound * 1e3:.1f} ms")


def assert_legacy_answers(outcomes: list[Outcome], *failures: str) -> None:
    """Every outcome the legacy's exact bytes, or a failure with one of the statuses given."""
    wrong = [outcome for outcome in outcomes if outcome.status is None and not outcome.exact]
    assert not wrong, f"{len(wrong)} answers differ from the legacy's"
    failed = {outcome.status for outcome in outcomes if outcome.status is not None}
    assert failed <= set(failures), f"unexpected statuses {failed - set(failures)}"


def sample(text: str, name: str, **labels: str) -> float:
    """A sample's value in a /metrics page, 0 when absent."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return found.value
    return 0.0


class Scraper:
    """Samples of one gateway's /metrics, and waits on them.

    Waits scrape every SCRAPE_EVERY_S: a scrape costs the gateway's primary some CPU, which a tighter
    poll would add to the latencies measured meanwhile.
    """

    def __init__(self, gateway: GatewayProcess) -> None:
        self.gateway = gateway

    async def __call__(self, name: str, **labels: str) -> float:
        return sample(await self.gateway.metrics(), name, **labels)

    async def until(self, name: str, reached: float, timeout_s: float = 60.0, **labels: str) -> None:
        """Until the sample is at least `reached`."""
        await self._until(name, labels, lambda value: value >= reached, f">= {reached:g}", timeout_s)

    async def until_equal(self, name: str, expected: float, timeout_s: float = 60.0, **labels: str) -> None:
        await self._until(name, labels, lambda value: value == expected, f"== {expected:g}", timeout_s)

    async def _until(self, name: str, labels: dict[str, str], done: Callable[[float], bool], wanted: str,
                     timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not done(value := await self(name, **labels)):
            assert loop.time() < deadline, f"{name}{labels} is {value:g} after {timeout_s:g} s, expected {wanted}"
            await asyncio.sleep(SCRAPE_EVERY_S)
