"""Candidate calls over one ModelStreamInfer stream (`shadow_calls: stream`), against real gRPC servers on loopback."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from adapters import shadow_candidate
from adapters.remote import InferStream
from server.config import RemoteConfig, TensorConfig, TritonConfig
from server.errors import BackendError, BackendTimeout
from tests.support.kserve import Behaviour, start_model_server

INPUTS = [TensorConfig(name="x", datatype="FP32", shape=[-1, 4])]
OUTPUTS = [TensorConfig(name="y", datatype="FP32", shape=[-1, 4])]


def streamed(url: str, **extra):
    return shadow_candidate(RemoteConfig(runtime="remote", url=url, model="m", shadow_calls="stream", **extra),
                            INPUTS, OUTPUTS)


def x(value: float, rows: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.full((rows, 4), value, np.float32)}


async def wait_until_no_stream_is_fed() -> None:
    """Until gRPC's tasks that feed a stream from its request generator are gone, for at most 10 s."""
    deadline = asyncio.get_running_loop().time() + 10
    while any("_consume_request_iterator" in repr(task.get_coro()) for task in asyncio.all_tasks()):
        assert asyncio.get_running_loop().time() < deadline, "a stream's request generator outlived the stream"
        await asyncio.sleep(0.05)


async def test_concurrent_calls_share_one_stream_and_each_gets_its_own_answer(model_server):
    # The first calls take longest, so the server answers them last: answers come back out of order.
    url, server = await model_server(Behaviour(delay_s=lambda inputs: 0.2 - float(inputs["x"][0, 0]) / 100))
    candidate = streamed(url)
    await candidate.load()
    try:
        answers = await asyncio.gather(*(candidate.infer(x(value), 10.0) for value in range(16)))
        assert [float(answer["y"][0, 0]) for answer in answers] == [2.0 * value for value in range(16)]
        assert server.stream_requests == 16 and server.calls == 16
    finally:
        await candidate.close()
    await wait_until_no_stream_is_fed()


async def test_a_server_without_streams_is_called_unary_also_when_the_first_calls_come_at_once(model_server):
    url, server = await model_server(Behaviour(streams=False))
    candidate = streamed(url)
    await candidate.load()
    try:
        answers = await asyncio.gather(*(candidate.infer(x(value), 10.0) for value in range(16)))
        assert [float(answer["y"][0, 0]) for answer in answers] == [2.0 * value for value in range(16)]
        assert float((await candidate.infer(x(20.0), 10.0))["y"][0, 0]) == 40.0
        assert server.stream_requests == 0 and server.calls == 17
    finally:
        await candidate.close()


async def test_a_call_past_its_deadline_times_out_and_its_late_answer_is_dropped(model_server):
    gate = asyncio.Event()
    url, server = await model_server(Behaviour(gate=gate))
    candidate = streamed(url)
    await candidate.load()
    try:
        with pytest.raises(BackendTimeout):
            await candidate.infer(x(1.0), 0.5)
        opened = server.streams_opened
        gate.set()  # the late answer to 1.0 arrives now and matches no waiting call
        assert float((await candidate.infer(x(5.0), 10.0))["y"][0, 0]) == 10.0
        assert server.streams_opened == opened and server.stream_requests == 2
    finally:
        await candidate.close()


async def test_calls_that_time_out_queued_behind_large_requests_leave_the_calls_in_flight_alone(model_server):
    url, server = await model_server(Behaviour(delay_s=1.0))
    candidate = streamed(url)
    await candidate.load()
    try:
        await candidate.infer(x(0.0), 30.0)  # the stream is open
        healthy = [asyncio.ensure_future(candidate.infer(x(value), 30.0)) for value in range(1, 9)]
        large = [candidate.infer(x(9.0, rows=2_000_000), 0.1) for _ in range(6)]  # 32 MB each
        timed_out = await asyncio.gather(*large, return_exceptions=True)
        assert all(isinstance(failure, BackendTimeout) for failure in timed_out)
        assert [float(answer["y"][0, 0]) for answer in await asyncio.gather(*healthy)] == [2.0 * v for v in range(1, 9)]
    finally:
        await candidate.close()


async def test_an_error_fails_its_own_call_and_the_stream_carries_on(model_server):
    url, server = await model_server(Behaviour(fail_with=grpc.StatusCode.INTERNAL))
    candidate = streamed(url)
    await candidate.load()
    try:
        with pytest.raises(BackendError) as raised:
            await candidate.infer(x(1.0), 10.0)
        assert not isinstance(raised.value, BackendTimeout)
        assert raised.value.code == grpc.StatusCode.UNKNOWN and "scripted failure" in str(raised.value)
        opened = server.streams_opened
        server.fail_with = None
        assert float((await candidate.infer(x(2.0), 10.0))["y"][0, 0]) == 4.0
        assert server.streams_opened == opened
    finally:
        await candidate.close()


async def test_a_server_that_stops_reading_gets_a_new_stream_and_nothing_stays_queued(model_server, monkeypatch):
    monkeypatch.setattr(InferStream, "stuck_after_s", 0.5)
    url, server = await model_server(Behaviour(reads_streams=False))
    candidate = streamed(url)
    await candidate.load()
    megabyte = x(0.0, rows=65536)  # far past HTTP/2's flow-control window
    try:
        # Each stream takes what fits gRPC's buffers; a call still queued once nothing moved for 0.5 s ends it.
        for _ in range(100):
            if server.streams_opened >= 4:  # the question whether it serves streams, then three streams
                break
            with pytest.raises(BackendTimeout):
                await candidate.infer(megabyte, 0.2)
        assert server.streams_opened >= 4
    finally:
        await candidate.close()


async def test_a_server_that_goes_away_fails_the_calls_it_carried_and_a_new_stream_follows():
    first, url, behaviour = await start_model_server("m", Behaviour(gate=asyncio.Event()))
    candidate = streamed(url)
    await candidate.load()
    try:
        waiting = asyncio.ensure_future(candidate.infer(x(1.0), 60.0))
        while behaviour.calls == 0:
            await asyncio.sleep(0.01)
        await first.stop(0)
        with pytest.raises(BackendError) as raised:
            await waiting
        assert raised.value.code == grpc.StatusCode.UNAVAILABLE and not isinstance(raised.value, BackendTimeout)
        await wait_until_no_stream_is_fed()  # the broken stream's request generator ended with it

        second, _, behaviour = await start_model_server("m", Behaviour(), port=int(url.rsplit(":", 1)[1]))
        try:
            deadline = asyncio.get_running_loop().time() + 30
            while True:  # the channel reconnects within its backoff (2 s at most)
                try:
                    answer = await candidate.infer(x(3.0), 10.0)
                    break
                except BackendError:
                    assert asyncio.get_running_loop().time() < deadline
                    await asyncio.sleep(0.1)
            assert float(answer["y"][0, 0]) == 6.0 and behaviour.stream_requests == 1
        finally:
            await second.stop(0)
    finally:
        await candidate.close()


def test_triton_candidates_stream_and_remote_ones_stay_unary_unless_asked():
    assert TritonConfig(runtime="triton", url="h:1", model="m").shadow_calls == "stream"
    assert RemoteConfig(runtime="remote", url="h:1", model="m").shadow_calls == "unary"
    assert shadow_candidate(RemoteConfig(runtime="remote", url="h:1", model="m"), INPUTS, OUTPUTS).over_stream is False
    assert streamed("h:1").over_stream is True
