"""`serve --workers 2`: two primaries on one port, one shadow engine, one control plane, one /metrics."""

from __future__ import annotations

import re
import socket
import subprocess
import sys

import grpc
import numpy as np
import yaml
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from tests.server.test_end_to_end import wait_for
from tests.support.gateway import GatewayProcess
from tests.support.kserve import Behaviour, scale_by


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


async def test_two_workers_share_port_metrics_and_one_control_plane(tmp_path, model_server):
    legacy_url, legacy = await model_server(Behaviour(scale_by(2.0)))
    candidate_url, candidate = await model_server(Behaviour(scale_by(3.0)))
    remote = lambda url: {"runtime": "remote", "url": url, "model": "m"}  # noqa: E731
    config = {
        "server": {"grpc_listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0",
                   "workers": 2},
        "models": [{"name": "m", "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
                    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
                    "legacy": remote(legacy_url), "candidate": remote(candidate_url), "shadow_percent": 100}],
    }
    path = tmp_path / "shadow.yaml"
    path.write_text(yaml.safe_dump(config))
    gateway = GatewayProcess(path)
    await gateway.start()
    try:
        url = f"127.0.0.1:{gateway.grpc_port}"
        answers = await infer_on_fresh_channels(url, 40)
        assert set(answers) == {np.full((1, 2), 2.0, np.float32).tobytes()}
        await wait_for(lambda: value(gateway.scrape(), r'shadowserve_comparisons_total\{model="m",verdict="mismatch"\}') == 40)
        text = gateway.scrape()
        assert value(text, r'shadowserve_requests_total\{code="OK",model="m",served_by="legacy"\}') == 40
        served_per_worker = re.findall(r"^shadowserve_backend_latency_seconds_count\{model=\"m\",role=\"legacy\"\} (\S+)", text, re.M)
        assert len(served_per_worker) == 1  # summed into one sample across processes
        assert legacy.calls == 40 and candidate.calls == 40
            # One control plane: its window (what the guard judges) holds the traffic of both workers.
        status = (await gateway.ctl_json("status", "m"))["pairs"][0]
        assert int(status["window"]["samples"]) == 40 and status["window"]["match_rate"] == 0

        await gateway.ctl("set", "m", "--serve", "100")
        answers = await infer_on_fresh_channels(url, 30)
        assert set(answers) == {np.full((1, 2), 3.0, np.float32).tobytes()}  # every worker follows
        assert value(gateway.scrape(), r'shadowserve_serve_percent\{model="m"\}') == 100
    finally:
        await gateway.stop()
    assert gateway.process.returncode == 0, "".join(gateway.output)
    output = "".join(gateway.output)
    assert output.count("serving ['m']") == 3, output  # each worker's front on the shared port, and the gateway's line


def test_a_metrics_or_admin_port_another_process_holds_fails_start_up_naming_the_key(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = f"127.0.0.1:{holder.getsockname()[1]}"
        for key in ("metrics_listen", "admin_listen"):
            listens = {"grpc_listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0"}
            config = {"server": {**listens, key: taken},
                      "models": [{"name": "m", "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
                                  "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
                                  "legacy": {"runtime": "remote", "url": "127.0.0.1:1", "model": "m"}}]}
            path = tmp_path / f"{key}.yaml"
            path.write_text(yaml.safe_dump(config))
            result = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--config", str(path)],
                                    capture_output=True, text=True, timeout=120)
            assert result.returncode == 2, result.stderr[-2000:]
            assert f"shadowserve: server.{key}: cannot listen on {taken}: Address already in use" in result.stderr
