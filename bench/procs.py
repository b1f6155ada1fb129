"""The processes of a benchmark run: start them on loopback ports they bind, place them on CPUs, read /proc.

Every backend, baseline and gateway runs in its own process, so none shares the load generator's
GIL and the CPU a gateway spends can be read from /proc for that process (and its worker children).
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable

import yaml

from tests.support.gateway import SERVING

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def all_cpus() -> set[int]:
    return set(range(os.cpu_count() or 1))


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (worker children of `serve --workers`)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    ppid = int(stat.read().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(parents.get(current, ()))
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process, all its threads included."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def cmdline(pid: int) -> bytes:
    """The process's command line as it shows in `ps`, titles set by the process included."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return file.read()
    except OSError:
        return b""


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * PAGE_BYTES
    except OSError:
        return 0


def private_rss_bytes(pid: int) -> int:
    """Resident memory of `pid` alone (RssAnon): without shared pages such as the hand-off ring's."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssAnon:"))
    except (OSError, StopIteration):
        return 0


def pin(pid: int, cpus: Iterable[int], with_descendants: bool = True) -> None:
    """Place every thread of `pid`, and of its descendants unless told not to, on `cpus` (new threads inherit it).

    The load generator pins itself with `with_descendants=False`: every server of the run is its child.
    """
    cpus = set(cpus)
    for process in descendants(pid) if with_descendants else [pid]:
        try:
            threads = os.listdir(f"/proc/{process}/task")
        except OSError:
            continue
        for thread in threads:
            try:
                os.sched_setaffinity(int(thread), cpus)
            except OSError:
                pass


class Process:
    """One child process with its log file; stopped by SIGTERM, then SIGKILL."""

    def __init__(self, name: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "w")
        child_env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        child_env.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, **(env or {}))
        self.popen = subprocess.Popen(argv, cwd=ROOT, env=child_env, stdout=subprocess.PIPE, stderr=self._log,
                                      start_new_session=True)
        self.pid = self.popen.pid

    def read_port(self, timeout_s: float) -> int:
        """The port a `bench.servers` process prints once it serves."""
        deadline = time.monotonic() + timeout_s
        line = b""
        while time.monotonic() < deadline and not line.endswith(b"\n"):
            ready, _, _ = select.select([self.popen.stdout], [], [], 0.1)
            if ready:
                chunk = os.read(self.popen.stdout.fileno(), 256)
                if not chunk:
                    break
                line += chunk
        if not line.startswith(b"PORT "):
            raise RuntimeError(f"{self.name} did not start: {self.log_tail()}")
        return int(line.split()[1])

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(pid) for pid in descendants(self.pid))

    def rss_bytes(self) -> int:
        return sum(rss_bytes(pid) for pid in descendants(self.pid))

    def private_rss_bytes(self) -> int:
        return sum(private_rss_bytes(pid) for pid in descendants(self.pid))

    def workers(self) -> list[int]:
        return descendants(self.pid)[1:]

    def log_tail(self, lines: int = 15) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def pause(self) -> None:
        """SIGSTOP every process of this server (it leads its own session)."""
        self._signal_all(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_all(signal.SIGCONT)

    def _signal_all(self, signum: int) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.pid, signum)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait(5)
        self._log.close()


def start_server(kind: str, workdir: Path, name: str, *args: str) -> Process:
    return Process(name, [sys.executable, "-m", "bench.servers", kind, *args], workdir)


class Gateway(Process):
    """`shadowserve serve --config ...` on loopback ports it binds itself; `read_ports` reads them from its log."""

    def __init__(self, name: str, models: list[dict], workdir: Path, workers: int = 1, **server: object) -> None:
        self.grpc_port = self.metrics_port = self.admin_port = 0
        listen = {key: "127.0.0.1:0" for key in ("grpc_listen", "metrics_listen", "admin_listen")}
        config = {"server": {**listen, "drain_s": 0, **server}, "models": models}  # nothing balances load onto it
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.argv = [sys.executable, "-m", "server.cli", "--log-level", "INFO", "serve",
                     "--config", str(self.config_path), "--workers", str(workers)]
        super().__init__(name, self.argv, workdir)

    def read_ports(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.popen.poll() is None:
            if match := SERVING.search(self.log_path.read_text(errors="replace")):
                self.grpc_port, self.metrics_port, self.admin_port = map(int, match.groups())
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not start: {self.log_tail()}")

    def resume_engine(self) -> None:
        """The shadow engine first: a supervisor that woke first would read its heartbeat as a hang."""
        for pid in descendants(self.pid):
            if cmdline(pid).startswith(b"shadowserve: shadow engine"):
                os.kill(pid, signal.SIGCONT)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def command(self) -> str:
        return " ".join(["shadowserve", *self.argv[3:]])
