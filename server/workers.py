"""`serve --workers N`: N gateway processes on one port (SO_REUSEPORT), one /metrics adding them up.

Workers are forked before any gRPC, framework or metrics object exists: gRPC and the runtimes are
not fork-safe once started. Percentages live in shared memory so one change routes every worker.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
from pathlib import Path

from server.config import Config, host_port

log = logging.getLogger("shadowserve.workers")


def _worker(index: int, config: Config, config_path: Path, routing) -> None:
    from server import loop_load
    from server.app import Gateway

    # Worker 0 alone watches the file; through the shared routing table its changes reach all.
    gateway = Gateway(config, config_path=config_path if index == 0 else None, routing=routing, serve_metrics=False)
    loop_load.run(gateway.serve_forever())


def run_workers(config: Config, config_path: Path, count: int) -> int:
    """Fork `count` workers, serve their summed metrics, and stop them all when one exits or on SIGTERM."""
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not metrics_dir:
        metrics_dir = tempfile.mkdtemp(prefix="shadowserve-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    for stale in Path(metrics_dir).glob("*.db"):
        stale.unlink()
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before the multiprocess directory was set")

    from server.dispatch import initial_routing

    routing = initial_routing(config.models, shared=True)
    children: list[int] = []
    for index in range(count):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _worker(index, config, config_path, routing)
            except BaseException:
                log.exception("worker %d failed", index)
                code = 1
            finally:
                os._exit(code)
        children.append(pid)
    log.info("started %d workers: %s", count, children)

    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    host, port = host_port(config.server.metrics_listen)
    start_http_server(port, host, registry=registry)

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
        pid, status = os.wait()
        alive.discard(pid)
        multiprocess.mark_process_dead(pid)
        code = os.waitstatus_to_exitcode(status)
        if alive and code not in (0, -signal.SIGTERM, -signal.SIGINT):
            log.error("worker %d exited with %s; stopping the others", pid, code)
            exit_code = 1
            forward(signal.SIGTERM, None)
    return exit_code
