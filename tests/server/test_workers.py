"""`serve --workers 2`: two processes on one port, one /metrics that adds them up, one routing state."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import urllib.request

import grpc
import numpy as np
import yaml
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from tests.server.test_end_to_end import wait_for
from tests.support.kserve import Behaviour, scale_by
from tests.support.ports import free_port


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return reply.read().decode()


def value(text: str, pattern: str) -> float:
    match = re.search(rf"^{pattern} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


async def infer_on_fresh_channels(url: str, count: int) -> list[bytes]:
    answers = []
    for _ in range(count):  # a new connection each time, so the kernel spreads them over workers
        async with grpc.aio.insecure_channel(url) as channel:
            request = pb.ModelInferRequest(model_name="m")
            request.inputs.add(name="x", datatype="FP32", shape=[1, 2])
            request.raw_input_contents.append(np.ones((1, 2), np.float32).tobytes())
            response = await service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
            answers.append(response.raw_output_contents[0])
    return answers


async def test_two_workers_share_port_metrics_and_routing(tmp_path, model_server):
    legacy_url, legacy = await model_server(Behaviour(scale_by(2.0)))
    candidate_url, candidate = await model_server(Behaviour(scale_by(3.0)))
    grpc_port, metrics_port, admin_port = free_port(), free_port(), free_port()
    remote = lambda url: {"runtime": "remote", "url": url, "model": "m"}  # noqa: E731
    config = {
        "server": {"grpc_listen": f"127.0.0.1:{grpc_port}", "metrics_listen": f"127.0.0.1:{metrics_port}",
                   "admin_listen": f"127.0.0.1:{admin_port}", "workers": 2},
        "models": [{"name": "m", "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
                    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
                    "legacy": remote(legacy_url), "candidate": remote(candidate_url), "shadow_percent": 100}],
    }
    path = tmp_path / "shadow.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    process = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--config", str(path)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"127.0.0.1:{grpc_port}"

        async def ready() -> bool:
            try:
                async with grpc.aio.insecure_channel(url) as channel:
                    reply = await service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerReady(pb.ServerReadyRequest(), timeout=1)
                    return reply.ready
            except grpc.aio.AioRpcError:
                return False

        for _ in range(200):
            if await ready():
                break
            assert process.poll() is None, process.stdout.read()
            await asyncio.sleep(0.1)
        answers = await infer_on_fresh_channels(url, 40)
        assert set(answers) == {np.full((1, 2), 2.0, np.float32).tobytes()}
        await wait_for(lambda: value(scrape(metrics_port), r'shadowserve_comparisons_total\{model="m",verdict="mismatch"\}') == 40)
        text = scrape(metrics_port)
        assert value(text, r'shadowserve_requests_total\{code="OK",model="m",served_by="legacy"\}') == 40
        served_per_worker = re.findall(r"^shadowserve_backend_latency_seconds_count\{model=\"m\",role=\"legacy\"\} (\S+)", text, re.M)
        assert len(served_per_worker) == 1  # summed into one sample across processes
        assert legacy.calls == 40 and candidate.calls == 40

        ctl = subprocess.run([sys.executable, "-m", "server.cli", "ctl", "--admin", f"127.0.0.1:{admin_port}",
                              "set", "m", "--serve", "100"], capture_output=True, text=True, timeout=60)
        assert ctl.returncode == 0, ctl.stdout + ctl.stderr
        answers = await infer_on_fresh_channels(url, 30)
        assert set(answers) == {np.full((1, 2), 3.0, np.float32).tobytes()}  # every worker follows
        assert value(scrape(metrics_port), r'shadowserve_serve_percent\{model="m"\}') == 100
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert output.count("serving ['m']") == 2, output  # each worker started its own front on the shared port
