"""`serve`: N primary processes (`--workers`, default 1) on one port (SO_REUSEPORT), one shadow engine, one /metrics.

This process forks the workers before any gRPC, framework or metrics object exists (gRPC and the
runtimes are not fork-safe once started), then starts the shadow engine, which holds the one control
plane: every worker hands its shadowed requests to it and follows the routing table it writes, so
one guard judges all traffic and `ctl` reaches the whole gateway. /metrics adds every process up and
is rendered here, so a scrape takes no CPU or GIL time from a process that serves requests. A worker
that dies, or whose event loop an inference holds past the time the worker gave (`LoopWatch`), is
forked again from here: this process never starts gRPC or a runtime itself.
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

from server.config import Config, address_family, host_port
from server.errors import ConfigError

log = logging.getLogger("shadowserve.workers")


EXIT_START_FAILED = 3  # a worker that cannot start would fail again: the gateway stops instead of restarting it


def _worker(index: int, config: Config, shared, wake_fd: int) -> int:
    from setproctitle import setproctitle

    from server import loop_load
    from server.app import Gateway
    from server.supervisor import die_with_parent

    setproctitle(f"shadowserve: worker {index}")
    die_with_parent(signal.SIGTERM)  # drains like any SIGTERM

    async def serve() -> int:
        try:
            gateway = Gateway(config, shared=shared, worker=index, wake_fd=wake_fd, serve_metrics=False)
            await gateway.start()
        except Exception:
            log.exception("worker %d failed to start", index)
            return EXIT_START_FAILED
        await gateway.serve_until_signalled()
        return 0

    return loop_load.run(serve())


def _fork(index: int, config: Config, shared, wake_fd: int, close_fds: tuple[int, ...]) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the supervisor's handlers, until the gateway sets its own
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for fd in close_fds:
            os.close(fd)
        code = _worker(index, config, shared, wake_fd)
    except BaseException:
        log.exception("worker %d failed", index)
    finally:
        os._exit(code)


def _reserve_port(listen: str) -> tuple[socket.socket, str]:
    """Bind the front's port once here (port 0: the kernel picks it), so every worker binds the same one."""
    host, port = host_port(listen)
    family = address_family(host)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))  # bound, never listening: it only holds the port for the workers
    bound = sock.getsockname()[1]
    return sock, f"[{host}]:{bound}" if family == socket.AF_INET6 else f"{host}:{bound}"


def _refuse_a_taken_port(key: str, listen: str) -> None:
    """Fail start-up naming `key` when another process holds its port, before anything is forked."""
    host, port = host_port(listen)
    if port == 0:
        return
    family = address_family(host)
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no owner
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"server.{key}: cannot listen on {listen}: {exc.strerror}") from None


def run_workers(config: Config, config_path: Path, count: int, log_level: str = "INFO") -> int:
    """Fork `count` workers and the engine and serve their summed metrics.

    A worker that dies is forked again after a pause that doubles while it keeps dying. SIGTERM and SIGINT
    go to the workers, which drain; the engine stops once they are all gone.
    """
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not metrics_dir:
        metrics_dir = tempfile.mkdtemp(prefix="shadowserve-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    for stale in Path(metrics_dir).glob("*.db"):
        stale.unlink()
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before the multiprocess directory was set")

    from server.app import new_shared_state

    for key in ("metrics_listen", "admin_listen"):
        _refuse_a_taken_port(key, getattr(config.server, key))
    reserved, grpc_listen = _reserve_port(config.server.grpc_listen)
    config = config.model_copy(update={"server": config.server.model_copy(update={"grpc_listen": grpc_listen})})
    shared = new_shared_state(config, count)
    wake_read, wake_write = os.pipe()
    children = {_fork(index, config, shared, wake_write, (wake_read,)): index for index in range(count)}
    log.info("started %d workers: %s", count, list(children))

    stopping = False

    def forward(signum, _frame) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)  # before the engine starts: a signal from now on drains
    signal.signal(signal.SIGINT, forward)

    from prometheus_client import CollectorRegistry, multiprocess

    from server.exposition import GatewayRegistry, start_metrics_server
    from server.metrics import Metrics
    from server.supervisor import MAX_BACKOFF_S, STABLE_S, EngineProcess

    metrics = Metrics(CollectorRegistry(), enabled=config.server.metrics)
    engine = EngineProcess(config, config_path, shared, metrics, metrics_dir, log_level, wake=(wake_read, wake_write))
    engine.start()
    registry = GatewayRegistry(CollectorRegistry(), metrics_dir)  # reads again when a dead worker's files go
    host, port = host_port(config.server.metrics_listen)
    http = start_metrics_server(host, port, registry)
    log.info("serving %s: gRPC port %s, metrics port %d, admin port %d",
             sorted(model.name for model in config.models), host_port(grpc_listen)[1], http.server_port, engine.admin_port)

    exit_code = 0
    first_backoff = config.server.worker_restart_backoff_s
    backoff = [first_backoff] * count
    started = [time.monotonic()] * count
    restart_at: dict[int, float] = {}
    while children or (restart_at and not stopping):
        time.sleep(0.2)  # only the workers are reaped here; the engine's monitor reaps the engine
        now = time.monotonic()
        for index in shared.hung_workers(now):
            pid = next((pid for pid, serving in children.items() if serving == index), None)
            shared.loop_watch(index).free()
            if pid is not None:
                log.error("worker %d: an inference has held its event loop past the legacy's timeout_s; "
                          "replacing the worker", pid)
                os.kill(pid, signal.SIGKILL)
        for pid, index in list(children.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if not done:
                continue
            del children[pid]
            multiprocess.mark_process_dead(pid)
            shared.loop_watch(index).free()  # it may have died during a call on its loop: not its successor's
            code = os.waitstatus_to_exitcode(status)
            if code == EXIT_START_FAILED:
                log.error("worker %d could not start; stopping the others", pid)
                exit_code = 1
                forward(signal.SIGTERM, None)
            elif not stopping:
                if now - started[index] > STABLE_S:
                    backoff[index] = first_backoff
                log.error("worker %d exited with %s; restarting it in %gs", pid, code, backoff[index])
                restart_at[index] = now + backoff[index]
                backoff[index] = min(backoff[index] * 2, MAX_BACKOFF_S)
        for index, due in list(restart_at.items()):
            if now >= due and not stopping:
                del restart_at[index]
                pid = _fork(index, config, shared, wake_write, (wake_read, http.socket.fileno()))
                children[pid] = index
                if stopping:  # the signal came while it was forked
                    os.kill(pid, signal.SIGTERM)
                started[index] = now
                metrics.worker_restarts.inc()
                log.info("restarted worker %d as %d", index, pid)
    engine.stop()
    reserved.close()
    return exit_code
