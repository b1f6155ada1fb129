from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
from prometheus_client import CollectorRegistry

from server.app import Gateway
from server.config import parse_config

warnings.filterwarnings("ignore", category=DeprecationWarning)


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """A metric sample's value, 0 when it was never set."""
    return registry.get_sample_value(name, labels) or 0.0


@contextlib.asynccontextmanager
async def running_gateway(config: dict[str, Any], base_dir: Path | None = None) -> AsyncIterator[Gateway]:
    """A real gateway on free loopback ports with a fresh metrics registry."""
    config = dict(config)
    config.setdefault("server", {})
    ports = {"grpc_listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0"}
    config["server"] = {**ports, **config["server"]}
    gateway = Gateway(parse_config(config, "test config", base_dir), registry=CollectorRegistry())
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop(grace_s=0.5)


@pytest.fixture
async def model_server():
    """Starts real scripted KServe v2 model servers (tests/support/kserve.py); stops them after the test.

    `url, behaviour = await model_server(Behaviour(...), model="m")`
    """
    from tests.support.kserve import start_model_server

    servers = []

    async def start(behaviour=None, model: str = "m"):
        server, url, behaviour = await start_model_server(model, behaviour)
        servers.append(server)
        return url, behaviour

    yield start
    for server in servers:
        await server.stop(0)


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory):
    """The demo's real MXNet classifier and its PyTorch ports (faithful and RGB/BGR-swapped)."""
    from server.demo.mxnet_models import build_demo_models

    return build_demo_models(tmp_path_factory.mktemp("demo-models"))
