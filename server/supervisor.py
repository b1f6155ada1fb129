"""Starts the shadow engine process, and restarts it with backoff when it dies or hangs.

Nothing here is on the request path: primaries write to shared memory whether the engine runs or not,
and a hand-off the engine cannot take is skipped and counted.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from server.config import Config
from server.handoff import SharedState
from server.metrics import Metrics

log = logging.getLogger("shadowserve.supervisor")

MAX_BACKOFF_S = 30.0
STABLE_S = 30.0  # an engine that ran this long before dying restarts after the first pause again
STOP_GRACE_S = 5.0
WATCH_S = 0.2  # how often the monitor looks at the heartbeat, and how soon it notices the gateway stopping

# The engine runs below the primaries. A parallel op waits for all its threads, and at low priority a waiting
# thread loses its core: on a busy machine one small torch inference took 60 ms instead of 1. So each inference
# (and each comparison's numpy call) keeps to one core; a backend's `threads` runs several at once.
ONE_CORE_PER_INFERENCE = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def die_with_parent(signum: int = signal.SIGKILL) -> None:
    """Ask the kernel to send `signum` to this process when its parent dies: no orphans after a kill -9."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signum)


class EngineProcess:
    """The gateway's shadow engine: one child process, kept running for as long as the gateway is."""

    def __init__(self, config: Config, config_path: Path | None, shared: SharedState, metrics: Metrics,
                 metrics_dir: str, log_level: str = "INFO", wake: tuple[int, int] | None = None) -> None:
        self.config, self.config_path, self.shared, self.metrics = config, config_path, shared, metrics
        self.metrics_dir = metrics_dir
        self.log_level = log_level
        self.settings = config.server.engine
        self.wake_read, self.wake_write = wake or os.pipe()  # primaries write one byte to wake the engine up
        os.set_blocking(self.wake_write, False)
        self.process: subprocess.Popen | None = None
        self.admin_port = 0
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._monitor: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> bool:
        """Start the engine and its monitor; True once the engine is ready, False if it did not start in time."""
        ready = self._spawn()
        self._monitor = threading.Thread(target=self._watch, name="engine-monitor", daemon=True)
        self._monitor.start()
        return ready

    def wait_ready(self, timeout_s: float) -> bool:
        return self._ready.wait(timeout_s)

    def _spawn(self) -> bool:
        self._ready.clear()
        self.metrics.engine_up.set(0)
        status_read, status_write = os.pipe()
        spec = {
            "config": self.config.model_dump(mode="json"),
            "config_path": str(self.config_path) if self.config_path else None,
            "shared": self.shared.describe(),
            "wake_fd": self.wake_read,
            "status_fd": status_write,
            "parent_pid": os.getpid(),
            "log_level": self.log_level,
        }
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=self.metrics_dir, **ONE_CORE_PER_INFERENCE)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server.engine"], stdin=subprocess.PIPE, env=env,
            pass_fds=(self.shared.fd, self.wake_read, status_write))
        os.close(status_write)
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(spec).encode())
        self.process.stdin.close()
        try:
            line = self._read_line(status_read, self.settings.start_timeout_s)
        finally:
            os.close(status_read)
        if not line:
            if self._stopping.is_set():  # the gateway is stopping: no engine is wanted any more
                return False
            log.error("the shadow engine (pid %d) did not start within %gs; serving without it",
                      self.process.pid, self.settings.start_timeout_s)
            return False
        self.admin_port = json.loads(line)["admin_port"]
        self.metrics.engine_up.set(1)
        self._ready.set()
        log.info("shadow engine running, pid %d, admin port %d", self.process.pid, self.admin_port)
        return True

    def _read_line(self, fd: int, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        data = b""
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or self._stopping.is_set():
                return ""
            if select.select([fd], [], [], min(left, 0.2))[0]:
                chunk = os.read(fd, 4096)
                if not chunk:  # the engine died before it was ready
                    return ""
                data += chunk
        return data.decode()

    def _watch(self) -> None:
        backoff = self.settings.restart_backoff_s
        started = time.monotonic()
        while not self._stopping.is_set():
            assert self.process is not None
            if not self._exits_within(self.process.pid, WATCH_S):
                if self._ready.is_set() and time.monotonic() - self.shared.heartbeat > self.settings.hang_s:
                    log.error("the shadow engine (pid %d) stopped answering for %gs; killing it",
                              self.process.pid, self.settings.hang_s)
                    self.process.kill()
                continue
            code = self.process.wait()
            if self._stopping.is_set():
                return
            self.metrics.engine_up.set(0)
            self._mark_dead(self.process.pid)
            if time.monotonic() - started > STABLE_S:
                backoff = self.settings.restart_backoff_s
            log.error("the shadow engine (pid %d) exited with %s; restarting it in %gs (shadowing is paused, "
                      "clients are not affected)", self.process.pid, code, backoff)
            if self._stopping.wait(backoff):
                return
            backoff = min(backoff * 2, MAX_BACKOFF_S)
            started = time.monotonic()
            self._spawn()
            self.metrics.engine_restarts.inc()  # once the new engine exists: a reader never sees a count without it

    @staticmethod
    def _exits_within(pid: int, timeout_s: float) -> bool:
        """Whether `pid` has exited or exits within `timeout_s`: one wake-up, where Popen.wait polls 50 times a second."""
        try:
            exited = os.pidfd_open(pid)
        except ProcessLookupError:
            return True
        try:
            return bool(select.select([exited], [], [], timeout_s)[0])
        finally:
            os.close(exited)

    def _mark_dead(self, pid: int) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, self.metrics_dir)

    def stop(self) -> None:
        self._stopping.set()
        if self._monitor is not None:  # first, so no restart it is making outlives the gateway
            self._monitor.join(STOP_GRACE_S)
        process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for fd in (self.wake_read, self.wake_write):
            try:
                os.close(fd)
            except OSError:
                pass
