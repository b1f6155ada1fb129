"""Memory that large requests took is handed back: a worker's RSS returns near its start after a burst."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio
import yaml

from bench.procs import cmdline, descendants, rss_bytes
from tests.support.gateway import GatewayProcess, eventually
from tests.support.kserve import Behaviour, scale_by, start_model_server

pytestmark = pytest.mark.solo

MIB = 1 << 20

def rss_mib(pid: int) -> float:
    return rss_bytes(pid) / MIB

async def test_rss_returns_within_100_mb_of_its_start_after_200_mib_requests(tmp_path):
    legacy, url, _ = await start_model_server("m", Behaviour(scale_by(2.0)))
    tensor = lambda name: [{"name": name, "datatype": "FP32", "shape": [-1, -1]}]  # noqa: E731
    config = {"server": {"grpc_listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0",
                         "max_message_bytes": 512 * MIB},
              "models": [{"name": "m", "inputs": tensor("x"), "outputs": tensor("y"),
                          "legacy": {"runtime": "remote", "url": url, "model": "m", "timeout_s": 120}}]}
    (tmp_path / "shadow.yaml").write_text(yaml.safe_dump(config))
    gateway = GatewayProcess(tmp_path / "shadow.yaml")
    await gateway.start()
    try:
        pid = next(pid for pid in descendants(gateway.process.pid) if b"shadowserve: worker" in cmdline(pid))
        start = rss_mib(pid)
        x = np.ones((1, 200 * MIB // 4), np.float32)
        async with gateway.client() as client:
            for _ in range(3):
                request = triton_aio.InferInput("x", list(x.shape), "FP32")
                request.set_data_from_numpy(x)
                result = await client.infer("m", [request], client_timeout=300)
                assert result.as_numpy("y")[0, :3].tolist() == [2.0, 2.0, 2.0]
            peak = rss_mib(pid)

            async def settled() -> bool:
                return rss_mib(pid) < start + 100

            await eventually(settled, timeout_s=60)
            assert await client.is_server_ready()
    finally:
        await gateway.stop()
        await legacy.stop(0)
    assert peak > start  # the requests did pass through this process
