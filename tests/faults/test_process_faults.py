"""Faults on the gateway's own processes: SIGTERM and its drain, a killed worker of two, a worker whose loop hangs."""

from __future__ import annotations

import os
import re
import signal

import numpy as np
import pytest
import torch
import tritonclient.grpc.aio as triton_aio
from grpc_health.v1 import health_pb2
from tritonclient.utils import InferenceServerException

from tests.faults.load import (
    CLIENTS, MODEL, Load, Scraper, assert_legacy_answers, assert_p99_within_bound, legacy_answer, remote,
    request_input, write_config,
)
from tests.server.test_drain import alive, exited, health_is, reaped, until
from tests.support.gateway import GatewayProcess, eventually, model_ready
from tests.support.kserve import Behaviour, scale_by

pytestmark = pytest.mark.solo

LEGACY_DELAY_S = 0.005  # requests are in flight whenever the port closes or a worker dies
DRAIN_S = 5.0  # time enough to see answers counted and health NOT_SERVING while draining on a loaded machine


async def gateway_for(tmp_path, model_server, **server) -> GatewayProcess:
    legacy_url, _ = await model_server(Behaviour(scale_by(2.0), delay_s=LEGACY_DELAY_S))
    candidate_url, _ = await model_server(Behaviour(scale_by(2.0)))
    pair = {"legacy": remote(legacy_url, 30), "candidate": remote(candidate_url, 5), "shadow_percent": 100}
    gateway = GatewayProcess(write_config(tmp_path / "shadow.yaml", pair, **server))
    await gateway.start()
    return gateway


async def test_sigterm_under_load_drains_answering_every_request_in_flight_then_exits_0(tmp_path, model_server):
    gateway = await gateway_for(tmp_path, model_server, drain_s=DRAIN_S, grace_s=30)
    metric = Scraper(gateway)
    try:
        async with Load(f"127.0.0.1:{gateway.grpc_port}") as load:
            baseline = await load.phase()
            answered = await metric("shadowserve_requests_total", model="m", code="OK", served_by="legacy")
            mark = load.mark()
            gateway.process.send_signal(signal.SIGTERM)
            await eventually(lambda: health_is(gateway.grpc_port, health_pb2.HealthCheckResponse.NOT_SERVING), 60)
            # Still answering while draining, and counting what it answers.
            await metric.until("shadowserve_requests_total", answered + 1, model="m", code="OK", served_by="legacy")
            assert await exited(gateway) == 0, "".join(gateway.output)
            draining = load.since(mark)
    finally:
        await gateway.stop()
    # Answered in full until the port closed; refused (UNAVAILABLE) after. gRPC itself answers CANCELLED to a
    # call that reached the server but no handler yet when it stops (grpc/grpc#41785): at most one per client.
    assert_legacy_answers(load.outcomes, "StatusCode.UNAVAILABLE", "StatusCode.CANCELLED")
    assert sum(outcome.status == "StatusCode.CANCELLED" for outcome in load.outcomes) <= CLIENTS
    answers = [outcome for outcome in draining if outcome.status is None]
    assert answers, "nothing was answered during the drain"
    assert_p99_within_bound(baseline, answers)


async def test_a_worker_of_two_killed_under_load_is_restarted_and_counted_while_clients_keep_their_answers(
        tmp_path, model_server):
    gateway = await gateway_for(tmp_path, model_server, workers=2, worker_restart_backoff_s=0.2)
    metric = Scraper(gateway)
    try:
        pid = gateway.process.pid
        assert await metric("shadowserve_worker_restarts_total") == 0
        killed, other = map(int, re.search(r"started 2 workers: \[(\d+), (\d+)\]", "".join(gateway.output)).groups())
        async with Load(f"127.0.0.1:{gateway.grpc_port}") as load:
            baseline = await load.phase()
            mark = load.mark()
            os.kill(killed, signal.SIGKILL)
            await until(lambda: reaped(killed), 60)
            await metric.until_equal("shadowserve_worker_restarts_total", 1)
            await until(lambda: "restarted worker 0 as" in "".join(gateway.output), 60)
            restarted = int(re.search(r"restarted worker 0 as (\d+)", "".join(gateway.output)).group(1))
            fault = await load.more(mark)
            recovery = await load.phase()
        assert alive(restarted) and alive(other)
        assert gateway.process.pid == pid and gateway.process.returncode is None  # the gateway itself went on
    finally:
        await gateway.stop()
    assert gateway.process.returncode == 0, "".join(gateway.output)
    # Only requests on the killed worker's connections can fail, and only as UNAVAILABLE.
    assert_legacy_answers(load.outcomes, "StatusCode.UNAVAILABLE")
    assert_legacy_answers(recovery)
    assert_p99_within_bound(baseline, [outcome for outcome in fault if outcome.status is None])
    assert_p99_within_bound(baseline, recovery)


class HangsOnANegativeInput(torch.nn.Module):
    """y = 2x, except that an input starting below zero never gets an answer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        while bool(x[0, 0] < 0):
            x = x + 0
        return x * 2


async def test_a_legacy_inference_that_hangs_the_event_loop_gets_its_worker_replaced(tmp_path):
    # A fast in-process legacy runs on the worker's event loop (no thread hop); a call that then hangs holds the
    # whole worker, health checks included, so the process that forked it replaces it.
    model = tmp_path / "legacy.pt"
    torch.jit.save(torch.jit.script(HangsOnANegativeInput()), str(model))
    legacy = {"runtime": "torch", "path": str(model), "timeout_s": 1}
    gateway = GatewayProcess(write_config(tmp_path / "shadow.yaml", {"legacy": legacy}, worker_restart_backoff_s=0.2))
    await gateway.start()
    metric = Scraper(gateway)
    try:
        async with triton_aio.InferenceServerClient(f"127.0.0.1:{gateway.grpc_port}") as client:
            async def ask(x: np.ndarray, timeout_s: float = 30) -> bytes:
                tensor = triton_aio.InferInput("x", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x)
                return (await client.infer(MODEL, [tensor], client_timeout=timeout_s)).as_numpy("y").tobytes()

            # Enough fast calls for the estimate to forget the first, cold ones and put the next call on the loop.
            for n in range(1000):
                assert await ask(request_input(n)) == legacy_answer(request_input(n))
            first = int(re.search(r"started 1 workers: \[(\d+)\]", "".join(gateway.output)).group(1))
            with pytest.raises(InferenceServerException) as failed:
                await ask(-request_input(1))
            assert failed.value.status() == "StatusCode.UNAVAILABLE"
            why = f"worker {first}: an inference has held its event loop past the legacy's timeout_s"
            await until(lambda: why in "".join(gateway.output), 60)
            await metric.until_equal("shadowserve_worker_restarts_total", 1)
            await until(lambda: "restarted worker 0 as" in "".join(gateway.output), 60)
            await eventually(lambda: model_ready(client), 60)
            for n in range(5):
                assert await ask(request_input(n)) == legacy_answer(request_input(n))
    finally:
        await gateway.stop()
    assert not alive(first)
    assert gateway.process.returncode == 0, "".join(gateway.output)
