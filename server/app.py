"""The running gateway: config -> metrics -> dispatcher -> gRPC front, /metrics, and its shadow engine."""

from __future__ import annotations

import asyncio
import gc
import logging
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, disable_created_metrics

from server.config import Config, host_port
from server.dispatch import Dispatcher
from server.exposition import GatewayRegistry, start_metrics_server
from server.grpc_front import start_grpc_server, update_health
from server.handoff import HandoffWriter, SharedState
from server.metrics import Metrics
from server.supervisor import EngineProcess

log = logging.getLogger("shadowserve")

HEALTH_REFRESH_S = 1.0
disable_created_metrics()  # nobody reads the `_created` series; every scrape would carry one per counter


def new_shared_state(config: Config, workers: int = 1) -> SharedState:
    percentages = [(model.shadow_percent, model.serve_percent) for model in config.models]
    return SharedState.create(percentages, workers, config.server.engine.queue_bytes)


def settle_heap() -> None:
    """Move what start-up built (runtimes, models, modules) out of the collector's reach for good.

    A full collection scans every tracked object; with torch or MXNet loaded that took 165 ms, and it
    stalled every request in flight. Frozen, those objects are never scanned again.
    """
    gc.collect()
    gc.freeze()


class Gateway:
    """One primary process. `await start()`, then `await stop()`; ports are known after start.

    Alone, it starts its own shadow engine. As one of `--workers N`, it is given the shared state, its
    ring and the engine's wake-up pipe by the process that runs the engine (`server/workers.py`).
    """

    def __init__(self, config: Config, registry: CollectorRegistry | None = None, config_path: Path | None = None,
                 shared: SharedState | None = None, worker: int = 0, wake_fd: int | None = None,
                 serve_metrics: bool = True, log_level: str = "INFO"):
        self.config = config
        own_registry = registry if registry is not None else CollectorRegistry()
        self.metrics = Metrics(own_registry, enabled=config.server.metrics)
        self.engine: EngineProcess | None = None
        self._metrics_dir: str | None = None
        if shared is None:
            shared = new_shared_state(config)
            self._metrics_dir = tempfile.mkdtemp(prefix="shadowserve-engine-metrics-")
            self.engine = EngineProcess(config, config_path, shared, self.metrics, self._metrics_dir, log_level)
            wake_fd = self.engine.wake_write
            self.registry: CollectorRegistry = GatewayRegistry(own_registry, self._metrics_dir)
        else:
            self.registry = own_registry
        self.shared = shared
        assert wake_fd is not None
        self.dispatcher = Dispatcher.from_config(config.models, config.server, self.metrics, shared.routes,
                                                 HandoffWriter(shared.rings[worker], wake_fd), shared.engine_address)
        if self.engine is None:  # a worker of `serve`: the process that forked it replaces it if its loop hangs
            watch = shared.loop_watch(worker)
            for pair in self.dispatcher.pairs.values():
                pair.legacy.run_on_loop_when_fast(watch)
        self.serve_metrics = serve_metrics
        self.grpc_port = self.metrics_port = 0
        self._servers: list[grpc.aio.Server] = []
        self._health: Any = None
        self._http: Any = None
        self._tasks: list[asyncio.Task] = []

    @property
    def admin_port(self) -> int:
        return self.engine.admin_port if self.engine is not None else 0

    async def start(self) -> None:
        """Start everything; a start that fails stops what it started (the engine is a process of its own)."""
        try:
            await self._start()
        except BaseException:
            await self.stop(grace_s=0)
            raise

    async def _start(self) -> None:
        server = self.config.server
        if self.engine is not None:
            await asyncio.to_thread(self.engine.start)
        await self.dispatcher.start()
        front, self.grpc_port, self._health = await start_grpc_server(
            self.dispatcher, server.grpc_listen, server.max_message_bytes, server.tls)
        self._servers = [front]
        self._tasks.append(asyncio.get_running_loop().create_task(self._refresh_health(self._health)))
        if self.serve_metrics:
            host, port = host_port(server.metrics_listen)
            self._http = start_metrics_server(host, port, self.registry)
            self.metrics_port = self._http.server_port
        if self.engine is None:  # one of several workers: the process that runs the engine tells the rest
            log.info("worker serving %s: gRPC port %d", sorted(self.dispatcher.pairs), self.grpc_port)
        else:
            log.info("serving %s: gRPC port %d, metrics port %d, admin port %d",
                     sorted(self.dispatcher.pairs), self.grpc_port, self.metrics_port, self.admin_port)

    async def _refresh_health(self, health: Any) -> None:
        while True:
            await update_health(health, self.dispatcher)
            await asyncio.sleep(HEALTH_REFRESH_S)

    async def stop(self, grace_s: float | None = None) -> None:
        """Refuse new RPCs, give those in flight `grace_s` (default: server.grace_s), then close everything."""
        if grace_s is None:
            grace_s = self.config.server.grace_s
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*(server.stop(grace_s) for server in self._servers))
        await self.dispatcher.close()
        if self.engine is not None:
            await asyncio.to_thread(self.engine.stop)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self._metrics_dir is not None:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)

    async def serve_forever(self) -> None:
        await self.start()
        await self.serve_until_signalled()

    async def serve_until_signalled(self) -> None:
        """Serve until SIGTERM or SIGINT, then drain; a second signal stops at once.

        Draining: health turns NOT_SERVING for every service name while requests are still answered for
        server.drain_s; then new RPCs are refused and those in flight get server.grace_s to finish.
        """
        settle_heap()
        loop = asyncio.get_running_loop()
        signals: asyncio.Queue[int] = asyncio.Queue()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, signals.put_nowait, sig)
        await signals.get()
        server = self.config.server
        log.info("draining: health NOT_SERVING, answering for %gs more, then %gs for requests in flight",
                 server.drain_s, server.grace_s)
        await self._health.enter_graceful_shutdown()
        second = loop.create_task(signals.get())
        await asyncio.wait([second], timeout=server.drain_s)
        stopping = loop.create_task(self.stop(0 if second.done() else server.grace_s))
        await asyncio.wait([stopping, second], return_when=asyncio.FIRST_COMPLETED)
        if not stopping.done():
            log.warning("second signal: cancelling requests in flight")
            await asyncio.gather(*(front.stop(0) for front in self._servers))
        await stopping
        second.cancel()
