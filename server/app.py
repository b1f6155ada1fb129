"""The running gateway: config -> metrics -> dispatcher -> gRPC front and /metrics endpoint."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from prometheus_client import CollectorRegistry, start_http_server

from server.admin import start_admin_server
from server.config import Config, host_port
from server.dispatch import Dispatcher
from server.grpc_front import start_grpc_server, update_health
from server.metrics import Metrics
from server.reload import ConfigWatcher
from server.rollout import RolloutController

log = logging.getLogger("shadowserve")

HEALTH_REFRESH_S = 1.0


class Gateway:
    """One gateway process. `await start()`, then `await stop()`; ports are known after start."""

    def __init__(self, config: Config, registry: CollectorRegistry | None = None, config_path: Path | None = None,
                 routing: np.ndarray | None = None, serve_metrics: bool = True):
        self.config = config
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = Metrics(self.registry, enabled=config.server.metrics)
        self.dispatcher = Dispatcher.from_config(config.models, config.server, self.metrics, routing)
        self.serve_metrics = serve_metrics
        self.rollout = RolloutController(self.dispatcher)
        self.watcher = ConfigWatcher(config_path, config, self.rollout, self.metrics) if config_path else None
        self.grpc_port = self.metrics_port = self.admin_port = 0
        self._servers: list[grpc.aio.Server] = []
        self._http: Any = None
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        server = self.config.server
        await self.dispatcher.start()
        front, self.grpc_port, health = await start_grpc_server(self.dispatcher, server.grpc_listen, server.max_message_bytes)
        admin, self.admin_port = await start_admin_server(self.rollout, server.admin_listen, server.admin_allow_remote)
        self._servers = [front, admin]
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._refresh_health(health)))
        if self.watcher is not None:
            self._tasks.append(loop.create_task(self.watcher.run(server.config_poll_s)))
        if self.serve_metrics:
            host, port = host_port(server.metrics_listen)
            self._http, _ = start_http_server(port, host, registry=self.registry)
            self.metrics_port = self._http.server_port
        log.info("serving %s: gRPC port %d, metrics port %d, admin port %d",
                 sorted(self.dispatcher.pairs), self.grpc_port, self.metrics_port, self.admin_port)

    async def _refresh_health(self, health: Any) -> None:
        while True:
            await update_health(health, self.dispatcher)
            await asyncio.sleep(HEALTH_REFRESH_S)

    async def stop(self, grace_s: float = 5.0) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*(server.stop(grace_s) for server in self._servers))
        await self.dispatcher.close()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()

    async def serve_forever(self) -> None:
        """Run until SIGINT/SIGTERM, then drain in-flight requests."""
        await self.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down")
        await self.stop()
