"""64 MiB and 200 MiB requests under a load of small ones: answered exactly, their shadow skipped and counted.

The gateway's event loop itself parses, copies and serializes a large message (several copies of
200 MiB, seconds on a loaded 2-core machine), so small requests sent meanwhile may wait that long:
their p99 is bound by 3x the baseline's + 50 ms + the time the large requests took. Once those are
answered, the usual bound holds again.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio

from tests.faults.load import (
    MODEL, Load, Scraper, assert_legacy_answers, assert_p99_within_bound, legacy_answer, remote, write_config,
)
from tests.support.gateway import GatewayProcess
from tests.support.kserve import Behaviour, scale_by

pytestmark = pytest.mark.solo

MIB = 1 << 20
MAX_MESSAGE_BYTES = 256 * MIB  # above a 200 MiB tensor and its message's framing
QUEUE_BYTES = 64 * MIB  # the engine's hand-off queue (the default): neither large request with its answer fits


async def infer_large(url: str, mib: int) -> None:
    x = np.arange(mib * MIB // 4, dtype=np.float32).reshape(-1, 4)
    options = [("grpc.max_send_message_length", 1 << 30), ("grpc.max_receive_message_length", 1 << 30)]
    async with triton_aio.InferenceServerClient(url, channel_args=options) as client:
        tensor = triton_aio.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = await client.infer(MODEL, [tensor], client_timeout=300)
        assert result.as_numpy("y").tobytes() == legacy_answer(x), f"the {mib} MiB answer is not the legacy's"


async def test_64_and_200_mib_requests_are_answered_exactly_beside_small_ones_and_their_shadow_skip_is_counted(
        tmp_path, model_server):
    legacy_url, _ = await model_server(Behaviour(scale_by(2.0)))
    candidate_url, candidate = await model_server(Behaviour(scale_by(2.0)))
    pair = {"legacy": remote(legacy_url, 300), "candidate": remote(candidate_url, 300), "shadow_percent": 100}
    gateway = GatewayProcess(write_config(tmp_path / "shadow.yaml", pair, max_message_bytes=MAX_MESSAGE_BYTES,
                                          engine={"queue_bytes": QUEUE_BYTES}))
    await gateway.start()
    metric = Scraper(gateway)
    try:
        url = f"127.0.0.1:{gateway.grpc_port}"
        async with Load(url) as load:
            baseline = await load.phase()
            saturated = await metric("shadowserve_shadow_skipped_total", model="m", reason="saturated")
            mark = load.mark()
            start = asyncio.get_running_loop().time()
            for mib in (64, 200):
                await infer_large(url, mib)
            large_s = asyncio.get_running_loop().time() - start
            await metric.until_equal("shadowserve_shadow_skipped_total", saturated + 2, model="m", reason="saturated")
            fault = await load.more(mark)
            matches = await metric("shadowserve_comparisons_total", model="m", verdict="match")
            await metric.until("shadowserve_comparisons_total", matches + 20, model="m", verdict="match")
            recovery = await load.phase()
        assert gateway.process.returncode is None
    finally:
        await gateway.stop()
    assert_legacy_answers(load.outcomes)
    assert_p99_within_bound(baseline, fault, allowance_s=large_s)
    assert_p99_within_bound(baseline, recovery)
