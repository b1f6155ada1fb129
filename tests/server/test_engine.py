"""The shadow engine as its own process: killed, hung or crashing, it never costs a client an answer."""

from __future__ import annotations

import asyncio
import os
import signal

import numpy as np
import pytest
import torch
import tritonclient.grpc.aio as triton_aio

from tests.conftest import running_gateway, sample
from tests.server.test_end_to_end import wait_for
from tests.support.kserve import Behaviour, scale_by

TENSORS = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
           "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}]}
X = np.array([[1.0, 2.0]], np.float32)
LEGACY = (X * 2).tobytes()


class Scale(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2.000001


class Spin(torch.nn.Module):
    """Answers after a busy loop; by default far past any deadline the tests give it."""

    def __init__(self, iterations: int = 2_000_000_000) -> None:
        super().__init__()
        self.iterations = iterations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(1)
        i = 0
        while i < self.iterations:
            total = total + 1.0
            i += 1
        return x * 2 + total * 0


class Hog(torch.nn.Module):
    """Reserves 8 GiB on every call without touching it: only an address-space limit refuses that."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hog = torch.empty([2_147_483_648])
        return x * 2 + hog[:1] * 0


def torchscript(module: torch.nn.Module, path) -> str:
    torch.jit.save(torch.jit.script(module), str(path))
    return str(path)


def pair(legacy_url: str, candidate: dict, **extra) -> dict:
    return {"name": "m", **TENSORS, "legacy": {"runtime": "remote", "url": legacy_url, "model": "m", "timeout_s": 5},
            "candidate": candidate, **extra}


async def ask(client) -> bytes:
    tensor = triton_aio.InferInput("x", [1, 2], "FP32")
    tensor.set_data_from_numpy(X)
    return (await client.infer("m", [tensor])).as_numpy("y").tobytes()


class Load:
    """Clients sending requests until stopped; every answer and failure is kept."""

    def __init__(self, client, clients: int = 4) -> None:
        self.answers: list[bytes] = []
        self.failures: list[BaseException] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.get_running_loop().create_task(self._run(client)) for _ in range(clients)]

    async def _run(self, client) -> None:
        while not self._stop.is_set():
            try:
                self.answers.append(await ask(client))
            except Exception as exc:
                self.failures.append(exc)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


@pytest.fixture
async def legacy_url(model_server):
    url, _ = await model_server(Behaviour(scale_by(2.0)))
    return url


async def test_the_engine_calls_a_candidate_over_one_stream_where_the_config_asks(legacy_url, model_server):
    candidate_url, candidate = await model_server(Behaviour(scale_by(2.0)))
    streamed = {"runtime": "remote", "url": candidate_url, "model": "m", "shadow_calls": "stream"}
    async with running_gateway({"models": [pair(legacy_url, streamed, shadow_percent=100)]}) as gateway:
        async with triton_aio.InferenceServerClient(f"127.0.0.1:{gateway.grpc_port}") as client:
            answers = [await ask(client) for _ in range(10)]
        await wait_for(lambda: sample(gateway.registry, "shadowserve_comparisons_total", model="m", verdict="match") == 10)
    assert answers == [LEGACY] * 10
    assert candidate.stream_requests == 10 and candidate.calls == 10


async def test_killing_the_engine_under_load_costs_no_answer_and_comparisons_resume(legacy_url, model_server):
    candidate_url, _ = await model_server(Behaviour(scale_by(2.0)))
    config = {"server": {"engine": {"restart_backoff_s": 0.2}},
              "models": [pair(legacy_url, {"runtime": "remote", "url": candidate_url, "model": "m"}, shadow_percent=100)]}
    async with running_gateway(config) as gateway:
        registry = gateway.registry
        matches = lambda: sample(registry, "shadowserve_comparisons_total", model="m", verdict="match")  # noqa: E731
        async with triton_aio.InferenceServerClient(f"127.0.0.1:{gateway.grpc_port}") as client:
            load = Load(client)
            await wait_for(lambda: matches() >= 20, timeout_s=30)
            first_engine = gateway.engine.pid
            os.kill(first_engine, signal.SIGKILL)
            await wait_for(lambda: gateway.engine.pid != first_engine and sample(registry, "shadowserve_engine_up") == 1,
                           timeout_s=60)
            resumed_from = matches()
            await wait_for(lambda: matches() > resumed_from + 20, timeout_s=60)  # the new engine compares again
            await load.stop()
        assert not load.failures, load.failures[:3]
        assert len(load.answers) > 40 and set(load.answers) == {LEGACY}  # every answer the legacy's, bytes equal
        assert sample(registry, "shadowserve_engine_restarts_total") == 1


def scheduling(pid: int) -> set[tuple[int, int]]:
    """(policy, nice) of every thread of `pid`."""
    return {(os.sched_getscheduler(int(tid)), os.getpriority(os.PRIO_PROCESS, int(tid)))
            for tid in os.listdir(f"/proc/{pid}/task")}


@pytest.mark.parametrize("idle_priority, policy", [(True, os.SCHED_IDLE), (False, os.SCHED_OTHER)])
async def test_every_thread_of_the_engine_runs_below_the_primaries(legacy_url, model_server, idle_priority, policy):
    candidate_url, _ = await model_server(Behaviour(scale_by(2.0)))
    config = {"server": {"engine": {"idle_priority": idle_priority, "nice": 7}},
              "models": [pair(legacy_url, {"runtime": "remote", "url": candidate_url, "model": "m"}, shadow_percent=100)]}
    async with running_gateway(config) as gateway:
        engine = scheduling(gateway.engine.pid)
    own = os.getpriority(os.PRIO_PROCESS, 0)
    assert engine == {(policy, min(own + 7, 19))}
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the primary (here, this process) keeps its own


async def test_canary_with_an_in_process_candidate_is_served_through_the_engine(legacy_url, tmp_path):
    candidate = {"runtime": "torch", "path": torchscript(Scale(), tmp_path / "scale.pt")}
    async with running_gateway({"models": [pair(legacy_url, candidate, shadow_percent=100, serve_percent=100)]}) as gateway:
        async with triton_aio.InferenceServerClient(f"127.0.0.1:{gateway.grpc_port}") as client:
            await wait_for(lambda: gateway.dispatcher.pairs["m"].candidate.ready, timeout_s=30)
            answers = {await ask(client) for _ in range(5)}
        assert answers == {(X * 2.000001).astype(np.float32).tobytes()}
        registry = gateway.registry
        assert sample(registry, "shadowserve_requests_total", model="m", code="OK", served_by="candidate") == 5
        await wait_for(lambda: sample(registry, "shadowserve_comparisons_total", model="m", verdict="match") == 5)


async def test_an_in_process_candidate_stuck_past_its_deadline_is_killed_with_its_engine(legacy_url, tmp_path):
    candidate = {"runtime": "torch", "path": torchscript(Spin(), tmp_path / "spin.pt"), "timeout_s": 0.3}
    config = {"server": {"engine": {"restart_backoff_s": 0.2, "hang_s": 3}},
              "models": [pair(legacy_url, candidate, shadow_percent=100)]}
    async with running_gateway(config) as gateway:
        registry = gateway.registry
        first_engine = gateway.engine.pid
        async with triton_aio.InferenceServerClient(f"127.0.0.1:{gateway.grpc_port}") as client:
            load = Load(client, clients=2)
            await wait_for(lambda: sample(registry, "shadowserve_engine_restarts_total") >= 1, timeout_s=60)
            await load.stop()
        assert gateway.engine.pid != first_engine
        assert not load.failures, load.failures[:3]
        assert load.answers and set(load.answers) == {LEGACY}
        assert sample(registry, "shadowserve_candidate_killed_total", model="m") >= 1


async def test_calls_that_time_out_waiting_for_a_busy_in_process_candidate_leave_the_engine_running(legacy_url, tmp_path):
    # Each inference takes milliseconds, far inside the deadline; 60 at once on one thread queue for longer.
    candidate = {"runtime": "torch", "path": torchscript(Spin(iterations=5_000), tmp_path / "busy.pt"),
                 "timeout_s": 0.2}
    # On a busy machine the burst would make the primary shed some hand-offs as overloaded: keep all 60.
    config = {"server": {"shed_shadow_from_loop_busy": None},
              "models": [pair(legacy_url, candidate, shadow_percent=100, circuit_breaker={"failures": 1000})]}
    async with running_gateway(config) as gateway:
        registry = gateway.registry
        first_engine = gateway.engine.pid
        async with triton_aio.InferenceServerClient(f"127.0.0.1:{gateway.grpc_port}") as client:
            await wait_for(lambda: gateway.dispatcher.pairs["m"].candidate.ready, timeout_s=30)
            assert set(await asyncio.gather(*(ask(client) for _ in range(60)))) == {LEGACY}
        timeouts = lambda: sample(registry, "shadowserve_shadow_skipped_total", model="m", reason="timeout")  # noqa: E731
        # The engine runs niced: on a machine kept busy it may take long to get through the burst.
        await wait_for(lambda: sample(registry, "shadowserve_comparisons_total", model="m", verdict="match")
                       + timeouts() == 60, timeout_s=120)
        assert timeouts() >= 1
        assert sample(registry, "shadowserve_candidate_killed_total", model="m") == 0
        assert sample(registry, "shadowserve_engine_restarts_total") == 0 and gateway.engine.pid == first_engine


async def test_the_engine_captures_mismatched_requests_with_both_answers(legacy_url, model_server, tmp_path):
    from server.capture import read_records

    candidate_url, _ = await model_server(Behaviour(scale_by(3.0)))  # disagrees on every request
    capture = {"dir": str(tmp_path / "capture"), "max_per_second": 1000}
    config = {"models": [pair(legacy_url, {"runtime": "remote", "url": candidate_url, "model": "m"},
                              shadow_percent=100, capture=capture)]}
    async with running_gateway(config) as gateway:
        async with triton_aio.InferenceServerClient(f"127.0.0.1:{gateway.grpc_port}") as client:
            assert {await ask(client) for _ in range(3)} == {LEGACY}
        await wait_for(lambda: sample(gateway.registry, "shadowserve_capture_records_total", model="m") == 3)
    records = read_records(tmp_path / "capture")
    assert [record.verdict for record in records] == ["mismatch"] * 3
    tensors = records[0].load()
    assert tensors.inputs["x"].tobytes() == X.tobytes() and tensors.legacy["y"].tobytes() == LEGACY
    assert tensors.candidate["y"].tobytes() == (X * 3).tobytes() and records[0].meta["stage"] == "shadow"


async def test_a_stopped_engine_bounds_the_candidate_answers_served_unjudged(legacy_url, model_server):
    candidate_url, _ = await model_server(Behaviour(scale_by(2.0)))
    config = {"server": {"max_unjudged_served": 5, "engine": {"hang_s": 600}},
              "models": [pair(legacy_url, {"runtime": "remote", "url": candidate_url, "model": "m"}, serve_percent=100)]}
    async with running_gateway(config) as gateway:
        registry = gateway.registry
        served = lambda side: sample(registry, "shadowserve_requests_total", model="m", code="OK", served_by=side)  # noqa: E731
        async with triton_aio.InferenceServerClient(f"127.0.0.1:{gateway.grpc_port}") as client:
            assert await ask(client) == LEGACY
            await wait_for(lambda: gateway.shared.rings[0].unjudged == 0)
            os.kill(gateway.engine.pid, signal.SIGSTOP)
            try:
                answers = [await ask(client) for _ in range(30)]
                assert (served("candidate"), served("legacy")) == (1 + 5, 25)
                assert sample(registry, "shadowserve_fallbacks_total", model="m", reason="unjudged") == 25
            finally:
                os.kill(gateway.engine.pid, signal.SIGCONT)
            await wait_for(lambda: gateway.shared.rings[0].unjudged == 0)
            answers += [await ask(client) for _ in range(3)]
            assert served("candidate") == 1 + 5 + 3
    assert set(answers) == {LEGACY}


async def test_an_in_process_candidate_past_the_engine_memory_limit_is_stopped_and_counted(legacy_url, tmp_path):
    candidate = {"runtime": "torch", "path": torchscript(Hog(), tmp_path / "hog.pt"), "timeout_s": 30}
    config = {"server": {"engine": {"memory_limit_bytes": 6 * 1024 ** 3}},
              "models": [pair(legacy_url, candidate, shadow_percent=100)]}
    async with running_gateway(config) as gateway:
        registry = gateway.registry
        errors = lambda: sample(registry, "shadowserve_shadow_skipped_total", model="m", reason="error")  # noqa: E731
        async with triton_aio.InferenceServerClient(f"127.0.0.1:{gateway.grpc_port}") as client:
            await wait_for(lambda: sample(registry, "shadowserve_engine_up") == 1, timeout_s=60)
            answers = [await ask(client) for _ in range(3)]
            await wait_for(lambda: errors() == 3, timeout_s=60)
            assert sample(registry, "shadowserve_backend_errors_total", model="m", role="candidate", code="INTERNAL") == 3
            assert sample(registry, "shadowserve_engine_restarts_total") == 0
    assert answers == [LEGACY] * 3
