"""`serve --workers N`: N primary processes on one port (SO_REUSEPORT), one shadow engine, one /metrics.

This process forks the workers before any gRPC, framework or metrics object exists (gRPC and the
runtimes are not fork-safe once started), then starts the shadow engine, which holds the one control
plane: every worker hands its shadowed requests to it and follows the routing table it writes, so
one guard judges all traffic and `ctl` reaches the whole gateway. /metrics adds every process up.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from server.config import Config, host_port

log = logging.getLogger("shadowserve.workers")


def _worker(index: int, config: Config, shared, wake_fd: int) -> None:
    from server import loop_load
    from server.app import Gateway
    from server.supervisor import die_with_parent

    die_with_parent(signal.SIGTERM)  # drains like any SIGTERM
    gateway = Gateway(config, shared=shared, worker=index, wake_fd=wake_fd, serve_metrics=False)
    loop_load.run(gateway.serve_forever())


def _reserve_port(listen: str) -> tuple[socket.socket, str]:
    """Bind the front's port once here (port 0: the kernel picks it), so every worker binds the same one."""
    host, port = host_port(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))  # bound, never listening: it only holds the port for the workers
    bound = sock.getsockname()[1]
    return sock, f"[{host}]:{bound}" if family == socket.AF_INET6 else f"{host}:{bound}"


def run_workers(config: Config, config_path: Path, count: int, log_level: str = "INFO") -> int:
    """Fork `count` workers and the engine, serve their summed metrics, and stop them all on SIGTERM."""
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not metrics_dir:
        metrics_dir = tempfile.mkdtemp(prefix="shadowserve-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    for stale in Path(metrics_dir).glob("*.db"):
        stale.unlink()
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before the multiprocess directory was set")

    from server.app import new_shared_state

    reserved, grpc_listen = _reserve_port(config.server.grpc_listen)
    config = config.model_copy(update={"server": config.server.model_copy(update={"grpc_listen": grpc_listen})})
    shared = new_shared_state(config, count)
    wake_read, wake_write = os.pipe()
    children: list[int] = []
    for index in range(count):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.close(wake_read)
                _worker(index, config, shared, wake_write)
            except BaseException:
                log.exception("worker %d failed", index)
                code = 1
            finally:
                os._exit(code)
        children.append(pid)
    log.info("started %d workers: %s", count, children)

    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    from server.metrics import Metrics
    from server.supervisor import EngineProcess

    metrics = Metrics(CollectorRegistry(), enabled=config.server.metrics)
    engine = EngineProcess(config, config_path, shared, metrics, metrics_dir, log_level, wake=(wake_read, wake_write))
    engine.start()
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    host, port = host_port(config.server.metrics_listen)
    http, _ = start_http_server(port, host, registry=registry)
    log.info("serving %s: gRPC port %s, metrics port %d, admin port %d",
             sorted(model.name for model in config.models), host_port(grpc_listen)[1], http.server_port, engine.admin_port)

    def forward(signum, _frame) -> None:
        for child in children:
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    exit_code = 0
    alive = set(children)
    while alive:
        time.sleep(0.2)  # only the workers are reaped here; the engine's monitor reaps the engine
        for pid in list(alive):
            done, status = os.waitpid(pid, os.WNOHANG)
            if not done:
                continue
            alive.discard(pid)
            multiprocess.mark_process_dead(pid)
            code = os.waitstatus_to_exitcode(status)
            if alive and code not in (0, -signal.SIGTERM, -signal.SIGINT):
                log.error("worker %d exited with %s; stopping the others", pid, code)
                exit_code = 1
                forward(signal.SIGTERM, None)
    engine.stop()
    reserved.close()
    return exit_code
