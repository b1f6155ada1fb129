"""The request path leaves no reference cycles, so the collector has nothing of ours to pause for."""

from __future__ import annotations

import asyncio
import gc
import types

import grpc
import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from tests.conftest import running_gateway
from tests.server.test_engine import TENSORS, ask
from tests.support.kserve import Behaviour, scale_by, start_model_server

CYCLE_SUSPECTS = (types.FrameType, types.CoroutineType, asyncio.Future, BaseException, np.ndarray)


def ours(thing: object) -> bool:
    return isinstance(thing, CYCLE_SUSPECTS) or type(thing).__module__.split(".")[0] in {"server", "adapters"}


async def test_requests_answered_failed_and_refused_leave_no_cycles_of_the_gateway():
    servers = [await start_model_server("m", Behaviour(scale_by(2.0))) for _ in range(2)]
    (legacy, legacy_url, legacy_behaviour), (candidate, candidate_url, _) = servers
    remote = lambda url: {"runtime": "remote", "url": url, "model": "m"}  # noqa: E731
    config = {"models": [{"name": "m", **TENSORS, "legacy": remote(legacy_url), "candidate": remote(candidate_url),
                          "shadow_percent": 100, "serve_percent": 30}]}
    async with running_gateway(config) as gateway:
        async with triton_aio.InferenceServerClient(f"127.0.0.1:{gateway.grpc_port}") as client:

            async def requests(count: int) -> list[str]:
                outcomes = []
                for i in range(count):
                    legacy_behaviour.fail_with = grpc.StatusCode.INTERNAL if i % 5 == 4 else None
                    try:
                        if i % 7 == 6:
                            await client.infer("nope", [])
                        await ask(client)
                        outcomes.append("OK")
                    except InferenceServerException as exc:
                        outcomes.append(exc.status())
                return outcomes

            await requests(35)
            gc.collect()
            gc.disable()
            gc.set_debug(gc.DEBUG_SAVEALL)
            try:
                outcomes = await requests(140)
                gc.collect()
                cycles = [thing for thing in gc.garbage if ours(thing)]
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
                gc.enable()
    for server, _, _ in servers:
        await server.stop(0)
    assert {"OK", "StatusCode.INTERNAL", "StatusCode.NOT_FOUND"} <= set(outcomes)
    assert cycles == []
