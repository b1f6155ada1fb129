"""Process life: SIGTERM drains, a second signal stops at once, and a dead worker is restarted."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from server.config import ServerConfig
from tests.server.test_workers import infer_on_fresh_channels, value
from tests.support.gateway import LEGACY, X, GatewayProcess, eventually
from tests.support.kserve import Behaviour, scale_by

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
FRESH_CHANNELS = 6  # with --workers 2, enough new connections to reach both workers
DRAIN_S = 8.0  # long enough for the checks made during the drain on a loaded machine
LEGACY_OF_ONES = np.full((1, 2), 2.0, np.float32).tobytes()  # what infer_on_fresh_channels gets from the legacy


def remote(url: str) -> dict:
    return {"runtime": "remote", "url": url, "model": "m", "timeout_s": 300}


def write_config(tmp_path: Path, legacy: dict, **server) -> Path:
    config = {
        "server": {"grpc_listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0",
                   **server},
        "models": [{"name": "m", "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
                    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
                    "legacy": legacy}],
    }
    path = tmp_path / "shadow.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def health_on_fresh_channels(port: int) -> set:
    """Every status seen for "" and "m", one new connection per check; None where the check failed."""
    seen = set()
    for _ in range(FRESH_CHANNELS):
        for service in ("", "m"):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                try:
                    reply = await health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service=service), timeout=10)
                    seen.add(reply.status)
                except grpc.aio.AioRpcError:
                    seen.add(None)
    return seen


async def health_is(port: int, status: int) -> bool:
    return await health_on_fresh_channels(port) == {status}


async def until(check: Callable[[], bool], timeout_s: float) -> None:
    async def checked() -> bool:
        return check()

    await eventually(checked, timeout_s)


async def refused(port: int) -> bool:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            await service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=10)
        except grpc.aio.AioRpcError as exc:
            return exc.code() == grpc.StatusCode.UNAVAILABLE
        return False


async def infer(port: int) -> bytes:
    async with triton_aio.InferenceServerClient(f"127.0.0.1:{port}") as client:
        tensor = triton_aio.InferInput("x", [1, 2], "FP32")
        tensor.set_data_from_numpy(X)
        return (await client.infer("m", [tensor], client_timeout=300)).as_numpy("y").tobytes()


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def reaped(pid: int) -> bool:
    """Gone with all its threads, and so its sockets (a zombie leader's threads may still hold them)."""
    return not Path(f"/proc/{pid}").exists()


def logged_pid(gateway: GatewayProcess, pattern: str) -> int:
    return int(re.search(pattern, "".join(gateway.output)).group(1))


async def hold_one_request(gateway: GatewayProcess, legacy: Behaviour) -> asyncio.Task:
    """A request in flight, waiting in the legacy until `legacy.gate` is set."""
    legacy.gate.clear()
    calls = legacy.calls
    held = asyncio.get_running_loop().create_task(infer(gateway.grpc_port))
    await until(lambda: legacy.calls > calls, 60)
    return held


async def exited(gateway: GatewayProcess, timeout_s: float = 60) -> int:
    await asyncio.wait_for(gateway.process.wait(), timeout_s)
    return gateway.process.returncode


def test_drain_keys_and_their_defaults():
    assert (ServerConfig().drain_s, ServerConfig().grace_s) == (5.0, 10.0)
    assert ServerConfig.model_validate({"drain_s": 0, "grace_s": 30}).grace_s == 30


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_turns_health_off_keeps_answering_for_drain_s_then_finishes_in_flight_and_exits_0(
        tmp_path, model_server, workers):
    url, legacy = await model_server(Behaviour(scale_by(2.0), gate=asyncio.Event()))
    legacy.gate.set()
    gateway = GatewayProcess(write_config(tmp_path, remote(url), workers=workers, drain_s=DRAIN_S, grace_s=300))
    await gateway.start()
    try:
        port = gateway.grpc_port
        engine = logged_pid(gateway, r"shadow engine running, pid (\d+)")
        assert await health_on_fresh_channels(port) == {SERVING}

        gateway.process.send_signal(signal.SIGTERM)
        await eventually(lambda: health_is(port, NOT_SERVING), 60)
        assert set(await infer_on_fresh_channels(f"127.0.0.1:{port}", FRESH_CHANNELS)) == {LEGACY_OF_ONES}
        assert await infer(port) == LEGACY

        held = await hold_one_request(gateway, legacy)
        await eventually(lambda: refused(port), 120)  # drain_s is over: new RPCs are refused
        assert not held.done() and gateway.process.returncode is None
        assert alive(engine), "the shadow engine stopped before the primaries were done"
        legacy.gate.set()
        assert await held == LEGACY
        assert await exited(gateway) == 0, "".join(gateway.output)
    finally:
        legacy.gate.set()
        await gateway.stop()


@pytest.mark.parametrize("workers, second", [(1, signal.SIGTERM), (1, signal.SIGINT), (2, signal.SIGTERM)])
async def test_a_second_signal_stops_at_once(tmp_path, model_server, workers, second):
    url, legacy = await model_server(Behaviour(scale_by(2.0), gate=asyncio.Event()))
    legacy.gate.set()
    gateway = GatewayProcess(write_config(tmp_path, remote(url), workers=workers, drain_s=600, grace_s=600))
    await gateway.start()
    try:
        gateway.process.send_signal(signal.SIGTERM)
        await eventually(lambda: health_is(gateway.grpc_port, NOT_SERVING), 60)
        held = await hold_one_request(gateway, legacy)

        gateway.process.send_signal(second)
        assert await exited(gateway, 120) == 0, "".join(gateway.output)  # far less than drain_s or grace_s
        with pytest.raises(InferenceServerException):
            await held  # cancelled, not waited for
    finally:
        legacy.gate.set()
        await gateway.stop()


async def test_a_killed_worker_is_restarted_and_counted_while_the_other_keeps_serving(tmp_path, model_server):
    url, legacy = await model_server(Behaviour(scale_by(2.0)))
    gateway = GatewayProcess(write_config(tmp_path, remote(url), workers=2))
    await gateway.start()
    try:
        address = f"127.0.0.1:{gateway.grpc_port}"
        match = re.search(r"started 2 workers: \[(\d+), (\d+)\]", "".join(gateway.output))
        killed, other = int(match.group(1)), int(match.group(2))
        os.kill(killed, signal.SIGKILL)
        await until(lambda: reaped(killed), 60)
        assert set(await infer_on_fresh_channels(address, 20)) == {LEGACY_OF_ONES}

        await until(lambda: "".join(gateway.output).count("worker serving") == 3, 120)  # two, then the new one
        restarted = logged_pid(gateway, r"restarted worker 0 as (\d+)")
        assert alive(restarted) and alive(other)
        assert set(await infer_on_fresh_channels(address, 20)) == {LEGACY_OF_ONES}
        assert value(await gateway.metrics(), "shadowserve_worker_restarts_total") == 1
    finally:
        await gateway.stop()
    assert gateway.process.returncode == 0, "".join(gateway.output)


def test_a_worker_that_cannot_start_stops_the_gateway_instead_of_restarting(tmp_path):
    (tmp_path / "broken.pt").write_bytes(b"not a model")
    path = write_config(tmp_path, {"runtime": "torch", "path": "broken.pt"}, workers=2)
    env = {key: value for key, value in os.environ.items() if key != "PROMETHEUS_MULTIPROC_DIR"}
    result = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--config", str(path)], env=env,
                            capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "could not start" in output and "restarted worker" not in output, output
