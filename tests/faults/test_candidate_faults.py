"""Candidate faults under load: killed, silent, slow, answering garbage, and a config reload.

One gateway (`shadowserve serve`) shadows every request to a candidate on a fixed port; each test
injects its fault while tritonclient clients send, then lifts it, and the same gateway recovers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from pathlib import Path
from typing import Any, AsyncIterator

import grpc
import numpy as np
import pytest
import pytest_asyncio
import yaml

from tests.faults.load import (
    Load, Scraper, assert_legacy_answers, assert_p99_within_bound, remote, write_config,
)
from tests.support.gateway import GatewayProcess, eventually
from tests.support.kserve import Behaviour, scale_by, start_model_server

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.solo]

LEGACY_DELAY_S = 0.005
CANDIDATE_TIMEOUT_S = 1.0
BREAKER = {"failures": 5, "open_s": 0.2, "max_open_s": 1.0}  # a recovered candidate is probed within a second
RESUMED = 20  # comparisons after a fault is lifted that show the candidate is compared again


@dataclasses.dataclass
class Rig:
    gateway: GatewayProcess
    metric: Scraper
    config: Path
    pair: dict[str, Any]
    legacy: Behaviour
    candidate: Behaviour
    candidate_server: grpc.aio.Server
    candidate_port: int

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.gateway.grpc_port}"

    async def restart_candidate(self) -> None:
        self.candidate_server, _, _ = await start_model_server("m", self.candidate, port=self.candidate_port)

    async def matches(self) -> float:
        return await self.metric("shadowserve_comparisons_total", model="m", verdict="match")

    async def until_compared_again(self) -> None:
        await self.metric.until("shadowserve_comparisons_total", await self.matches() + RESUMED, model="m",
                                verdict="match")

    def still_the_same_gateway(self, pid: int) -> None:
        assert self.gateway.process.pid == pid and self.gateway.process.returncode is None


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rig(tmp_path_factory):
    legacy_server, legacy_url, legacy = await start_model_server("m", Behaviour(scale_by(2.0), delay_s=LEGACY_DELAY_S))
    candidate_server, candidate_url, candidate = await start_model_server("m", Behaviour(scale_by(2.0)))
    pair = {"legacy": remote(legacy_url, 30), "candidate": remote(candidate_url, CANDIDATE_TIMEOUT_S),
            "shadow_percent": 100, "circuit_breaker": BREAKER}
    path = write_config(tmp_path_factory.mktemp("candidate-faults") / "shadow.yaml", pair, config_poll_s=0.2)
    gateway = GatewayProcess(path)
    await gateway.start()
    rig = Rig(gateway, Scraper(gateway), path, pair, legacy, candidate, candidate_server,
              int(candidate_url.rsplit(":", 1)[1]))
    try:
        yield rig
    finally:
        await gateway.stop()
        await rig.candidate_server.stop(0)
        await legacy_server.stop(0)


async def test_a_killed_candidate_costs_no_answer_and_is_compared_again_once_restarted_on_its_port(rig):
    pid = rig.gateway.process.pid
    errors = await rig.metric("shadowserve_backend_errors_total", model="m", role="candidate", code="UNAVAILABLE")
    skipped = await rig.metric("shadowserve_shadow_skipped_total", model="m", reason="error")
    async with Load(rig.url) as load:
        baseline = await load.phase()
        mark = load.mark()
        await rig.candidate_server.stop(0)
        await rig.metric.until("shadowserve_shadow_skipped_total", skipped + 1, model="m", reason="error")
        fault = await load.more(mark)
        assert await rig.metric("shadowserve_backend_errors_total", model="m", role="candidate",
                                code="UNAVAILABLE") > errors

        await rig.restart_candidate()
        await rig.until_compared_again()
        recovery = await load.phase()
    assert_legacy_answers(load.outcomes)
    assert_p99_within_bound(baseline, fault)
    assert_p99_within_bound(baseline, recovery)
    rig.still_the_same_gateway(pid)


@contextlib.asynccontextmanager
async def silent(rig: Rig, where: str) -> AsyncIterator[None]:
    """The candidate goes silent: its server takes calls and never answers them ("call"), or its port
    accepts connections and never says a word ("port"); it answers again on leaving."""
    if where == "call":
        rig.candidate.gate = asyncio.Event()
        try:
            yield
        finally:
            rig.candidate.gate.set()
            rig.candidate.gate = None
        return
    await rig.candidate_server.stop(0)
    connections: list[asyncio.StreamWriter] = []
    listener = await asyncio.start_server(lambda reader, writer: connections.append(writer), "127.0.0.1",
                                          rig.candidate_port)
    try:
        yield
    finally:
        listener.close()
        for connection in connections:
            connection.close()
        await rig.restart_candidate()


@pytest.mark.parametrize("where", ["call", "port"])
async def test_a_candidate_that_never_answers_costs_no_answer_and_its_calls_time_out(rig, where):
    pid = rig.gateway.process.pid
    # A silent server lets every call reach its deadline. A silent port is gRPC's to judge: while the
    # handshake is pending a call waits out its deadline, and once the attempt gives up it fails UNAVAILABLE.
    codes = ["DEADLINE_EXCEEDED"] if where == "call" else ["DEADLINE_EXCEEDED", "UNAVAILABLE"]

    async def failed_calls() -> float:
        return sum([await rig.metric("shadowserve_backend_errors_total", model="m", role="candidate", code=code)
                    for code in codes])

    async def one_more_failed() -> bool:
        return await failed_calls() >= before + 1

    before = await failed_calls()
    async with Load(rig.url) as load:
        baseline = await load.phase()
        mark = load.mark()
        async with silent(rig, where):
            await eventually(one_more_failed, timeout_s=120)
            fault = await load.more(mark)
        await rig.until_compared_again()
        recovery = await load.phase()
    assert_legacy_answers(load.outcomes)
    assert_p99_within_bound(baseline, fault)
    assert_p99_within_bound(baseline, recovery)
    assert await failed_calls() >= before + 1
    rig.still_the_same_gateway(pid)


async def test_a_candidate_ten_times_slower_than_the_legacy_is_still_compared_and_delays_no_answer(rig):
    pid = rig.gateway.process.pid
    name = "shadowserve_backend_latency_seconds"

    async def slow_calls() -> float:  # candidate calls that took longer than 25 ms
        return (await rig.metric(f"{name}_count", model="m", role="candidate")
                - await rig.metric(f"{name}_bucket", model="m", role="candidate", le="0.025"))

    async with Load(rig.url) as load:
        baseline = await load.phase()
        slow_before, matches = await slow_calls(), await rig.matches()
        mark = load.mark()
        rig.candidate.delay_s = 10 * LEGACY_DELAY_S
        try:
            fault = await load.more(mark)
            await rig.until_compared_again()
            assert await slow_calls() >= slow_before + RESUMED
        finally:
            rig.candidate.delay_s = 0.0
        recovery = await load.phase()
    assert_legacy_answers(load.outcomes)
    assert_p99_within_bound(baseline, fault)
    assert_p99_within_bound(baseline, recovery)
    assert await rig.matches() >= matches + RESUMED
    rig.still_the_same_gateway(pid)


GARBAGE = {
    "nan": ({"transform": lambda inputs: {"y": np.full_like(inputs["x"], np.nan)}},
            ("shadowserve_comparisons_total", {"verdict": "mismatch"})),
    "inf": ({"transform": lambda inputs: {"y": np.full_like(inputs["x"], np.inf)}},
            ("shadowserve_comparisons_total", {"verdict": "mismatch"})),
    "wrong shape": ({"transform": lambda inputs: {"y": np.zeros((1, 5), np.float32)}},
                    ("shadowserve_comparisons_total", {"verdict": "shape_mismatch"})),
    "wrong dtype": ({"transform": lambda inputs: {"y": (inputs["x"] * 2).astype(np.float64)}},
                    ("shadowserve_comparisons_total", {"verdict": "shape_mismatch"})),
    "error": ({"fail_with": grpc.StatusCode.INTERNAL},
              ("shadowserve_backend_errors_total", {"role": "candidate", "code": "INTERNAL"})),
}


@pytest.mark.parametrize("garbage", list(GARBAGE))
async def test_a_candidate_answering_garbage_or_errors_is_counted_and_never_reaches_a_client(rig, garbage):
    pid = rig.gateway.process.pid
    fields, (counter, labels) = GARBAGE[garbage]
    counted = await rig.metric(counter, model="m", **labels)
    async with Load(rig.url) as load:
        baseline = await load.phase()
        mark = load.mark()
        original = {field: getattr(rig.candidate, field) for field in fields}
        for field, value in fields.items():
            setattr(rig.candidate, field, value)
        try:
            await rig.metric.until(counter, counted + 5, model="m", **labels)
            fault = await load.more(mark)
        finally:
            for field, value in original.items():
                setattr(rig.candidate, field, value)
        await rig.until_compared_again()
        recovery = await load.phase()
    assert_legacy_answers(load.outcomes)
    assert_p99_within_bound(baseline, fault)
    assert_p99_within_bound(baseline, recovery)
    rig.still_the_same_gateway(pid)


async def test_a_config_reload_under_load_applies_its_percentages_and_rejects_a_broken_edit(rig):
    pid = rig.gateway.process.pid
    applied = await rig.metric("shadowserve_config_reloads_total", result="applied")
    rejected = await rig.metric("shadowserve_config_reloads_total", result="rejected")
    sampled_out = await rig.metric("shadowserve_shadow_skipped_total", model="m", reason="sampled_out")
    original = rig.config.read_text()
    edited = yaml.safe_load(original)
    edited["models"][0]["shadow_percent"] = 0
    async with Load(rig.url) as load:
        baseline = await load.phase()
        mark = load.mark()
        try:
            rig.config.write_text(yaml.safe_dump(edited))
            await rig.metric.until_equal("shadowserve_config_reloads_total", applied + 1, result="applied")
            await rig.metric.until_equal("shadowserve_shadow_percent", 0, model="m")
            await rig.metric.until("shadowserve_shadow_skipped_total", sampled_out + 20, model="m", reason="sampled_out")

            rig.config.write_text("models: [")
            await rig.metric.until_equal("shadowserve_config_reloads_total", rejected + 1, result="rejected")
            assert await rig.metric("shadowserve_shadow_percent", model="m") == 0  # the running config stays
        finally:
            rig.config.write_text(original)
        await rig.metric.until_equal("shadowserve_config_reloads_total", applied + 2, result="applied")
        await rig.metric.until_equal("shadowserve_shadow_percent", 100, model="m")
        await rig.until_compared_again()
        fault = load.since(mark)
    assert_legacy_answers(load.outcomes)
    assert_p99_within_bound(baseline, fault)
    rig.still_the_same_gateway(pid)
