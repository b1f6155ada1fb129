"""The running gateway: config -> metrics -> dispatcher -> gRPC front and /metrics endpoint."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, start_http_server

from server.config import Config
from server.dispatch import Dispatcher
from server.grpc_front import start_grpc_server, update_health
from server.metrics import Metrics

log = logging.getLogger("shadowserve")

HEALTH_REFRESH_S = 1.0


def _host_port(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class Gateway:
    """One gateway process. `await start()`, then `await stop()`; ports are known after start."""

    def __init__(self, config: Config, registry: CollectorRegistry | None = None, serve_metrics: bool = True):
        self.config = config
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.dispatcher = Dispatcher.from_config(config.models, config.server, self.metrics)
        self.serve_metrics = serve_metrics
        self.grpc_port = 0
        self.metrics_port = 0
        self._server: grpc.aio.Server | None = None
        self._http: Any = None
        self._health_task: asyncio.Task | None = None

    async def start(self) -> None:
        server = self.config.server
        await self.dispatcher.start()
        self._server, self.grpc_port, health = await start_grpc_server(
            self.dispatcher, server.grpc_listen, server.max_message_bytes
        )
        self._health_task = asyncio.get_running_loop().create_task(self._refresh_health(health))
        if self.serve_metrics:
            host, port = _host_port(server.metrics_listen)
            self._http, thread = start_http_server(port, host, registry=self.registry)
            self.metrics_port = self._http.server_port
        log.info("serving %s on gRPC port %d, metrics port %d", sorted(self.dispatcher.pairs), self.grpc_port, self.metrics_port)

    async def _refresh_health(self, health: Any) -> None:
        while True:
            await update_health(health, self.dispatcher)
            await asyncio.sleep(HEALTH_REFRESH_S)

    async def stop(self, grace_s: float = 5.0) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
        if self._server is not None:
            await self._server.stop(grace_s)
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
