"""Readiness follows the legacy: a model whose legacy cannot answer is not ready until it answers again."""

from __future__ import annotations

import grpc
import tritonclient.grpc.aio as triton_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import running_gateway, sample
from tests.server.test_end_to_end import wait_for
from tests.server.test_engine import LEGACY, TENSORS, Load
from tests.support.gateway import eventually
from tests.support.kserve import Behaviour, scale_by, start_model_server

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


async def test_a_model_whose_remote_legacy_dies_turns_not_ready_under_load_and_ready_again_when_it_returns():
    legacy, url, _ = await start_model_server("m", Behaviour(scale_by(2.0)))
    port = int(url.rsplit(":", 1)[1])
    config = {"server": {"legacy_probe_s": 0.2},
              "models": [{"name": "m", **TENSORS, "legacy": {"runtime": "remote", "url": url, "model": "m", "timeout_s": 2}}]}
    async with running_gateway(config) as gateway:
        front = f"127.0.0.1:{gateway.grpc_port}"
        async with triton_aio.InferenceServerClient(front) as client, grpc.aio.insecure_channel(front) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def readiness() -> tuple:
                model, server = [(await health.Check(health_pb2.HealthCheckRequest(service=name))).status
                                 for name in ("m", "")]
                return (await client.is_model_ready("m"), await client.is_server_ready(), model, server,
                        sample(gateway.registry, "shadowserve_legacy_up", model="m"))

            up, down = (True, True, SERVING, SERVING, 1.0), (False, False, NOT_SERVING, NOT_SERVING, 0.0)
            assert await readiness() == up
            load = Load(client)
            try:
                await wait_for(lambda: len(load.answers) >= 20)
                await legacy.stop(0)
                await eventually(lambda: _is(readiness, down))
                legacy, _, _ = await start_model_server("m", Behaviour(scale_by(2.0)), port=port)
                await eventually(lambda: _is(readiness, up))
                answered = len(load.answers)
                await wait_for(lambda: len(load.answers) >= answered + 20)
            finally:
                await load.stop()
                await legacy.stop(0)
    assert set(load.answers) == {LEGACY}
    assert all(error.status() == "StatusCode.UNAVAILABLE" for error in load.failures), {str(e) for e in load.failures}


async def _is(probe, expected) -> bool:
    return await probe() == expected
