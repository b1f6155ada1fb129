"""Faults on the primary path under load: the remote legacy goes down and comes back, clients give up.

One gateway (`shadowserve serve`) with a remote legacy that takes LEGACY_DELAY_S per call, long enough
for the impatient clients' deadlines to expire and their cancellations to land inside it.
"""

from __future__ import annotations

import dataclasses

import grpc
import pytest
import pytest_asyncio

from tests.faults.load import (
    CANCELLED, Load, Scraper, assert_legacy_answers, assert_p99_within_bound, remote, write_config,
)
from tests.support.gateway import GatewayProcess
from tests.support.kserve import Behaviour, scale_by, start_model_server

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.solo]

LEGACY_DELAY_S = 0.02
IMPATIENT_S = 0.01  # deadline, or time before cancelling, of the impatient clients: within the legacy's delay


@dataclasses.dataclass
class Rig:
    gateway: GatewayProcess
    metric: Scraper
    legacy: Behaviour
    legacy_server: grpc.aio.Server
    legacy_port: int

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.gateway.grpc_port}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rig(tmp_path_factory):
    legacy_server, legacy_url, legacy = await start_model_server("m", Behaviour(scale_by(2.0), delay_s=LEGACY_DELAY_S))
    candidate_server, candidate_url, _ = await start_model_server("m", Behaviour(scale_by(2.0)))
    pair = {"legacy": remote(legacy_url, 30), "candidate": remote(candidate_url, 5), "shadow_percent": 100}
    path = write_config(tmp_path_factory.mktemp("legacy-faults") / "shadow.yaml", pair, legacy_probe_s=0.2)
    gateway = GatewayProcess(path)
    await gateway.start()
    rig = Rig(gateway, Scraper(gateway), legacy, legacy_server, int(legacy_url.rsplit(":", 1)[1]))
    try:
        yield rig
    finally:
        await gateway.stop()
        await candidate_server.stop(0)
        await rig.legacy_server.stop(0)


async def test_a_remote_legacy_down_is_a_clear_unavailable_and_serving_resumes_when_it_returns_on_its_port(rig):
    pid = rig.gateway.process.pid
    unavailable = await rig.metric("shadowserve_requests_total", model="m", code="UNAVAILABLE", served_by="legacy")
    assert await rig.metric("shadowserve_legacy_up", model="m") == 1
    async with Load(rig.url) as load:
        baseline = await load.phase()
        mark = load.mark()
        await rig.legacy_server.stop(0)
        await rig.metric.until_equal("shadowserve_legacy_up", 0, model="m")
        async with rig.gateway.client() as client:
            assert not await client.is_model_ready("m")
        fault = await load.more(mark)

        rig.legacy_server, _, _ = await start_model_server("m", rig.legacy, port=rig.legacy_port)
        await rig.metric.until_equal("shadowserve_legacy_up", 1, model="m")
        async with rig.gateway.client() as client:
            assert await client.is_model_ready("m")
        recovery = await load.phase()
    assert_legacy_answers(load.outcomes, "StatusCode.UNAVAILABLE")
    assert sum(outcome.status is not None for outcome in fault) >= 1
    assert_legacy_answers(recovery)  # every request answered again
    assert_p99_within_bound(baseline, fault)  # failures are prompt: nobody waits on a backend that is gone
    assert_p99_within_bound(baseline, recovery)
    assert await rig.metric("shadowserve_requests_total", model="m", code="UNAVAILABLE",
                            served_by="legacy") >= unavailable + 1
    assert rig.gateway.process.pid == pid and rig.gateway.process.returncode is None


async def test_clients_that_cancel_or_whose_deadlines_expire_cost_the_others_nothing_and_are_counted(rig):
    pid = rig.gateway.process.pid
    expired = await rig.metric("shadowserve_requests_total", model="m", code="DEADLINE_EXCEEDED", served_by="legacy")
    cancelled = await rig.metric("shadowserve_requests_total", model="m", code="CANCELLED", served_by="legacy")
    async with Load(rig.url) as load:
        baseline = await load.phase()
        mark = load.mark()
        async with Load(rig.url, clients=2, timeout_s=IMPATIENT_S) as late, \
                Load(rig.url, clients=2, cancel_after_s=IMPATIENT_S) as cancelling:
            await late.phase(50)
            await cancelling.phase(50)
            await rig.metric.until("shadowserve_requests_total", expired + 1, model="m", code="DEADLINE_EXCEEDED",
                                   served_by="legacy")
            await rig.metric.until("shadowserve_requests_total", cancelled + 1, model="m", code="CANCELLED",
                                   served_by="legacy")
            fault = await load.more(mark)
        recovery = await load.phase()
    assert_legacy_answers(load.outcomes)  # the patient clients: every answer exact
    assert_legacy_answers(late.outcomes, "StatusCode.DEADLINE_EXCEEDED")
    assert_legacy_answers(cancelling.outcomes, CANCELLED)
    assert_p99_within_bound(baseline, fault)
    assert_p99_within_bound(baseline, recovery)
    assert await rig.metric("shadowserve_legacy_up", model="m") == 1  # a client giving up is no legacy failure
    await rig.metric.until_equal("shadowserve_shadow_in_flight", 0, model="m")
    assert rig.gateway.process.pid == pid and rig.gateway.process.returncode is None
