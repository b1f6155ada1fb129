"""Helpers for the deployment tests: the repository's paths, kustomize rendering, the CLI and `serve` as processes."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.ports import free_port

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
OVERLAYS = sorted(path.name for path in (DEPLOY / "k8s" / "overlays").iterdir() if path.is_dir())


def render(overlay: str) -> list[dict]:
    """`kubectl kustomize` of one overlay, as a list of objects."""
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with kustomize) is needed to render deploy/k8s"
    result = subprocess.run([kubectl, "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"overlay {overlay} does not render:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(objects: list[dict], kind: str, name: str) -> dict:
    matches = [obj for obj in objects if obj["kind"] == kind and obj["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def shadowserve(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The `shadowserve` command of this checkout, run as a separate process."""
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def run_script(path: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """A Python script of the repository (a generator, say), run with this interpreter."""
    return subprocess.run([sys.executable, str(path), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


@dataclasses.dataclass
class Served:
    """A gateway started with `shadowserve serve` in its own process."""

    process: subprocess.Popen
    config_path: Path
    log_path: Path
    grpc: str
    metrics: str
    admin: str

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def grpc_serving(address: str) -> bool:
    """The gateway's grpc.health.v1 status is SERVING (every legacy model loaded)."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


@contextlib.contextmanager
def serving(config: dict, workdir: Path, *cli_args: str, command: list[str] | None = None,
            startup_timeout_s: float = 180, attempts: int = 3) -> Iterator[Served]:
    """`shadowserve [cli_args] serve --config FILE` on free loopback ports; stopped with SIGTERM afterwards.

    `command` replaces `python -m server.cli` (an installed `shadowserve`, say).
    """
    for attempt in range(attempts):
        ports = {key: f"127.0.0.1:{free_port()}" for key in ("grpc_listen", "metrics_listen", "admin_listen")}
        config = {**config, "server": {**config.get("server", {}), **ports}}
        config_path = workdir / "shadow.yaml"
        config_path.write_text(yaml.safe_dump(config))
        log_path = workdir / f"gateway-{attempt}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [*(command or [sys.executable, "-m", "server.cli"]), *cli_args, "serve", "--config", str(config_path)],
                cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        served = Served(process, config_path, log_path, ports["grpc_listen"], ports["metrics_listen"], ports["admin_listen"])
        deadline = time.monotonic() + startup_timeout_s
        while process.poll() is None and not grpc_serving(served.grpc):
            assert time.monotonic() < deadline, f"the gateway did not become ready:\n{served.log[-3000:]}"
            time.sleep(0.2)
        if process.poll() is None:
            break
        if "address already in use" not in served.log.lower() or attempt == attempts - 1:
            raise AssertionError(f"the gateway exited with {process.returncode}:\n{served.log[-3000:]}")
    try:
        yield served
    finally:
        stop(process)


def stop(process: subprocess.Popen, timeout_s: float = 30) -> int:
    """SIGTERM twice (the second skips the drain), wait, then SIGKILL the process group if anything is left."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return process.wait()
