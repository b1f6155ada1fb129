"""The golden rule: a slow, failing or garbage-returning candidate never changes the legacy answer."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from protos import admin_pb2, admin_pb2_grpc
from server import loop_load
from server.ctl import format_status
from tests.conftest import running_gateway, sample
from tests.server.test_end_to_end import wait_for
from tests.support.kserve import Behaviour, scale_by, start_model_server

pytestmark = pytest.mark.solo

PAIR_TENSORS = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
}


def remote(url: str, timeout_s: float = 2.0) -> dict:
    return {"runtime": "remote", "url": url, "model": "m", "timeout_s": timeout_s}


@pytest.fixture
async def backends(model_server):
    """A real legacy KServe server (y = 2x) and a candidate whose behaviour each test scripts."""
    legacy_url, legacy = await model_server(Behaviour(scale_by(2.0)))
    candidate_url, candidate = await model_server(Behaviour(scale_by(2.0)))
    return legacy_url, legacy, candidate_url, candidate


def config(legacy_url: str, candidate_url: str, candidate_timeout_s: float = 2.0, **extra) -> dict:
    server = extra.pop("server", {})
    pair = {"name": "m", **PAIR_TENSORS, "legacy": remote(legacy_url), "candidate": remote(candidate_url, candidate_timeout_s),
            "shadow_percent": 100, **extra}
    return {"models": [pair], "server": server}


async def infer(client, x: np.ndarray) -> np.ndarray:
    tensor = triton_aio.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return (await client.infer("m", [tensor])).as_numpy("y")


X = np.arange(8, dtype=np.float32).reshape(2, 4)


async def test_failing_candidate_is_counted_and_invisible(backends):
    legacy_url, _, candidate_url, candidate = backends
    candidate.fail_with = grpc.StatusCode.RESOURCE_EXHAUSTED
    async with running_gateway(config(legacy_url, candidate_url)) as gateway:
        async with triton_aio.InferenceServerClient(f"127.0.0.1:{gateway.grpc_port}") as client:
            for _ in range(5):
                assert np.array_equal(await infer(client, X), X * 2)
        registry = gateway.registry
        await wait_for(lambda: sample(registry, "shadowserve_shadow_skipped_total", model="m", reason="error") == 5)
        assert sample(registry, "shadowserve_backend_errors_total", model="m", role="candidate", code="RESOURCE_EXHAUSTED") == 5
        assert sample(registry, "shadowserve_requests_total", model="m", code="OK", served_by="legacy") == 5
        assert sample(registry, "shadowserve_comparisons_total", model="m", verdict="match") == 0


async def admin_status(gateway) -> admin_pb2.StatusResponse:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.admin_port}") as channel:
        return await admin_pb2_grpc.ShadowAdminStub(channel).Status(admin_pb2.StatusRequest())


async def test_a_candidate_that_keeps_failing_is_paused_then_probed_back(backends):
    legacy_url, _, candidate_url, candidate = backends
    candidate.fail_with = grpc.StatusCode.UNAVAILABLE
    breaker = {"failures": 3, "open_s": 0.3}
    async with running_gateway(config(legacy_url, candidate_url, circuit_breaker=breaker)) as gateway:
        registry = gateway.registry
        skipped = lambda reason: sample(registry, "shadowserve_shadow_skipped_total", model="m", reason=reason)  # noqa: E731
        async with triton_aio.InferenceServerClient(f"127.0.0.1:{gateway.grpc_port}") as client:
            for _ in range(3):
                assert np.array_equal(await infer(client, X), X * 2)
            await wait_for(lambda: skipped("error") == 3)
            assert sample(registry, "shadowserve_candidate_circuit_open", model="m") == 1
            for _ in range(10):  # the legacy answers while the candidate is paused or probed
                assert np.array_equal(await infer(client, X), X * 2)
            await wait_for(lambda: skipped("error") + skipped("circuit_open") == 13)
            assert skipped("circuit_open") >= 1 and candidate.calls == skipped("error")  # skipped calls never reach it
            status = (await admin_status(gateway)).pairs[0]
            assert status.window.samples == 13 and status.window.error_rate == 1.0  # as if every call had failed
            if status.candidate_circuit_open:
                assert "m: candidate circuit open" in format_status([status])

            candidate.fail_with = None
            # The first call after the pause is the probe: it answers, the circuit closes, comparisons resume.
            sent = 13
            while sample(registry, "shadowserve_comparisons_total", model="m", verdict="match") == 0:
                assert np.array_equal(await infer(client, X), X * 2)
                sent += 1
                await wait_for(lambda: skipped("error") + skipped("circuit_open") + sample(
                    registry, "shadowserve_comparisons_total", model="m", verdict="match") == sent)
            await wait_for(lambda: sample(registry, "shadowserve_candidate_circuit_open", model="m") == 0)
            for _ in range(3):
                assert np.array_equal(await infer(client, X), X * 2)
            await wait_for(lambda: sample(registry, "shadowserve_comparisons_total", model="m", verdict="match") == 4)
            assert not (await admin_status(gateway)).pairs[0].candidate_circuit_open
        assert candidate.calls == skipped("error") + 4
        assert sample(registry, "shadowserve_requests_total", model="m", code="OK", served_by="legacy") == sent + 3


async def test_wrong_shape_candidate_is_a_shape_mismatch(backends):
    legacy_url, _, candidate_url, candidate = backends
    candidate.transform = lambda inputs: {"y": np.zeros((2, 5), np.float32)}
    async with running_gateway(config(legacy_url, candidate_url)) as gateway:
        async with triton_aio.InferenceServerClient(f"127.0.0.1:{gateway.grpc_port}") as client:
            for _ in range(3):
                assert np.array_equal(await infer(client, X), X * 2)
        registry = gateway.registry
        await wait_for(lambda: sample(registry, "shadowserve_comparisons_total", model="m", verdict="shape_mismatch") == 3)
        assert sample(registry, "shadowserve_comparisons_total", model="m", verdict="match") == 0


async def test_garbage_candidate_is_a_mismatch(backends):
    legacy_url, _, candidate_url, candidate = backends
    candidate.transform = lambda inputs: {"y": np.full((2, 4), np.nan, np.float32)}
    async with running_gateway(config(legacy_url, candidate_url)) as gateway:
        async with triton_aio.InferenceServerClient(f"127.0.0.1:{gateway.grpc_port}") as client:
            assert np.array_equal(await infer(client, X), X * 2)
        registry = gateway.registry
        await wait_for(lambda: sample(registry, "shadowserve_comparisons_total", model="m", verdict="mismatch") == 1)


async def test_slow_candidate_neither_delays_the_answer_nor_queues_without_bound(backends):
    legacy_url, legacy, candidate_url, candidate = backends
    candidate.delay_s = 60.0  # stalled: every shadow call runs into its 3 s deadline
    server = {"max_shadow_in_flight": 4, "max_shadow_waiting": 4}
    async with running_gateway(config(legacy_url, candidate_url, candidate_timeout_s=3.0, server=server)) as gateway:
        registry = gateway.registry
        skipped = lambda reason: sample(registry, "shadowserve_shadow_skipped_total", model="m", reason=reason)  # noqa: E731
        async with triton_aio.InferenceServerClient(f"127.0.0.1:{gateway.grpc_port}") as client:
            latencies = []
            for _ in range(12):
                start = time.perf_counter()
                assert np.array_equal(await infer(client, X), X * 2)
                latencies.append(time.perf_counter() - start)
            # Four calls hold every slot and four requests wait for them; the other four are skipped.
            await wait_for(lambda: candidate.calls == 4 and skipped("saturated") == 4)
        # An answer that waited for the candidate would take its 3 s deadline.
        assert max(latencies) < 1.5, latencies
        await wait_for(lambda: skipped("timeout") == 8)  # the waiting four are called once the first four time out
        assert candidate.calls == 8 and skipped("saturated") == 4
        assert sample(registry, "shadowserve_backend_errors_total", model="m", role="candidate", code="DEADLINE_EXCEEDED") == 8
        await wait_for(lambda: sample(registry, "shadowserve_shadow_in_flight", model="m") == 0)


async def test_legacy_failure_returns_the_legacy_status(backends):
    legacy_url, legacy, candidate_url, _ = backends
    legacy.fail_with = grpc.StatusCode.UNAVAILABLE
    async with running_gateway(config(legacy_url, candidate_url)) as gateway:
        async with triton_aio.InferenceServerClient(f"127.0.0.1:{gateway.grpc_port}") as client:
            with pytest.raises(InferenceServerException) as failure:
                await infer(client, X)
            assert failure.value.status() == "StatusCode.UNAVAILABLE"
            assert "scripted failure" in failure.value.message()
            legacy.fail_with = None
            assert np.array_equal(await infer(client, X), X * 2)  # still serving
        registry = gateway.registry
        assert sample(registry, "shadowserve_requests_total", model="m", code="UNAVAILABLE", served_by="legacy") == 1
        assert sample(registry, "shadowserve_backend_errors_total", model="m", role="legacy", code="UNAVAILABLE") == 1


async def test_sampling_follows_shadow_percent(backends):
    legacy_url, _, candidate_url, candidate = backends
    async with running_gateway(config(legacy_url, candidate_url, shadow_percent=0)) as gateway:
        async with triton_aio.InferenceServerClient(f"127.0.0.1:{gateway.grpc_port}") as client:
            for _ in range(5):
                await infer(client, X)
        assert candidate.calls == 0
        assert sample(gateway.registry, "shadowserve_shadow_skipped_total", model="m", reason="sampled_out") == 5


def test_busy_gateway_skips_shadow_calls_until_the_loop_has_room():
    """With the loop busier than server.shed_shadow_from_loop_busy, the primary is answered and the shadow skipped."""

    async def scenario() -> None:
        servers = [await start_model_server("m", Behaviour(scale_by(2.0))) for _ in range(2)]
        (_, legacy_url, legacy), (_, candidate_url, candidate) = servers
        # The legacy runs on the gateway's own loop here, so burning CPU in it keeps that loop busy.
        legacy.delay_s, legacy.busy = 0.02, True
        try:
            async with running_gateway(config(legacy_url, candidate_url, server={"shed_shadow_from_loop_busy": 0.5})) as gateway:
                registry = gateway.registry
                skipped = lambda reason: sample(registry, "shadowserve_shadow_skipped_total", model="m", reason=reason)  # noqa: E731
                compared = lambda: sample(registry, "shadowserve_comparisons_total", model="m", verdict="match")  # noqa: E731
                async with triton_aio.InferenceServerClient(f"127.0.0.1:{gateway.grpc_port}") as client:
                    for _ in range(60):
                        assert np.array_equal(await infer(client, X), X * 2)
                    assert sample(registry, "shadowserve_event_loop_busy_ratio") > 0.5
                    assert skipped("overloaded") >= 1
                    await wait_for(lambda: compared() + skipped("overloaded") == 60)
                    assert candidate.calls == compared()

                    legacy.delay_s = 0.0
                    await wait_for(lambda: sample(registry, "shadowserve_event_loop_busy_ratio") < 0.5)
                    sent, compared_before = 60, compared()
                    while compared() == compared_before:  # shadow calls resume once the loop has room
                        assert np.array_equal(await infer(client, X), X * 2)
                        sent += 1
                        await wait_for(lambda: compared() + skipped("overloaded") == sent)
                    assert candidate.calls == compared()
        finally:
            for server, _, _ in servers:
                await server.stop(0)

    loop_load.run(scenario())
