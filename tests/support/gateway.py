"""A real gateway in a process of its own, started as an operator does: `shadowserve serve --config FILE`."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any, Awaitable, Callable

import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

X = np.array([[1.0, 2.0]], np.float32)
LEGACY = (X * 2).tobytes()  # what the test legacy (y = 2x) answers for X
SERVING = re.compile(r"serving .*: gRPC port (\d+), metrics port (\d+), admin port (\d+)")


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def model_ready(client: triton_aio.InferenceServerClient, model: str = "m") -> bool:
    """Whether `model` is ready; not yet while the port refuses connections (a worker still loading its runtime)."""
    try:
        return await client.is_model_ready(model)
    except InferenceServerException as exc:
        if exc.status() != "StatusCode.UNAVAILABLE":
            raise
        return False


class GatewayProcess:
    """`shadowserve serve` in a process of its own; ports read back from its start-up log line."""

    def __init__(self, config: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = (),
                 client_tls: dict[str, Any] | None = None, ctl_args: tuple[str, ...] = ()) -> None:
        """`client_tls`: tritonclient's TLS arguments (ssl, root_certificates, ...); `ctl_args`: given to every ctl."""
        self.config, self.env, self.args = config, env, args
        self.client_tls, self.ctl_args = client_tls or {}, ctl_args
        self.output: list[str] = []
        self.process: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task | None = None

    async def start(self) -> None:
        """Start it and wait until model "m" is ready; a gateway that does not get there is stopped, not left behind."""
        env = {key: value for key, value in os.environ.items() if key != "PROMETHEUS_MULTIPROC_DIR"}
        self.output, self._drain = [], None
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server.cli", "serve", "--config", str(self.config), *self.args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env={**env, **(self.env or {})})
        try:
            await self._until_ready()
        except BaseException:
            await self.stop()
            raise

    async def _until_ready(self) -> None:
        while True:
            line = (await asyncio.wait_for(self.process.stdout.readline(), 120)).decode()
            assert line, "gateway exited:\n" + "".join(self.output)
            self.output.append(line)
            if match := SERVING.search(line):
                self.grpc_port, self.metrics_port, self.admin_port = map(int, match.groups())
                break
        self._drain = asyncio.get_running_loop().create_task(self._read_rest())
        async with self.client() as client:
            await eventually(lambda: model_ready(client), 120)

    async def _read_rest(self) -> None:
        while line := await self.process.stdout.readline():
            self.output.append(line.decode())

    async def stop(self) -> None:
        """SIGTERM, and a second one to skip the drain (`server.drain_s`) that only load balancers need."""
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            if self.process.returncode is None:
                self.process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(self.process.wait(), 30)
            if self._drain is not None:
                await self._drain

    def client(self) -> triton_aio.InferenceServerClient:
        return triton_aio.InferenceServerClient(f"127.0.0.1:{self.grpc_port}", **self.client_tls)

    async def sides(self, keys: list[str]) -> list[str]:
        """Which side answered each key: "legacy" or "candidate"."""
        async with self.client() as client:
            answers = []
            for key in keys:
                tensor = triton_aio.InferInput("x", [1, 2], "FP32")
                tensor.set_data_from_numpy(X)
                result = await client.infer("m", [tensor], parameters={"routing_key": key})
                answers.append("legacy" if result.as_numpy("y").tobytes() == LEGACY else "candidate")
            return answers

    async def ctl_run(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "server.cli", "ctl", "--admin", f"127.0.0.1:{self.admin_port}",
                   *self.ctl_args, *args]
        return await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=60,
                                       env={**os.environ, **(env or {})})

    async def ctl(self, *args: str, env: dict[str, str] | None = None) -> str:
        result = await self.ctl_run(*args, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    async def ctl_json(self, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
        return json.loads(await self.ctl("-o", "json", *args, env=env))

    async def pair(self, env: dict[str, str] | None = None) -> dict[str, Any]:
        return (await self.ctl_json("status", "m", env=env))["pairs"][0]

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as reply:
            return reply.read().decode()

    async def metrics(self) -> str:
        return await asyncio.to_thread(self.scrape)


