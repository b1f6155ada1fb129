"""CPU priority below the primaries', for work that must never delay an answer."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("shadowserve")


def run_when_idle(thread_id: int = 0) -> None:
    """Schedule a thread (0: the calling one), and threads it starts from now on, as SCHED_IDLE (Linux).

    Unlike `nice`, which only shares the core less, SCHED_IDLE gives it up at once to any primary
    that wakes: a request never waits behind this thread's time slice. Left as it is where not allowed.
    """
    try:
        os.sched_setscheduler(thread_id, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError) as exc:
        log.debug("SCHED_IDLE not available (%s)", exc)


def lower_this_process(nice: int, idle: bool) -> None:
    """Every thread running now (imports start some, e.g. numpy's BLAS pool) and every later one."""
    try:
        thread_ids = [int(task) for task in os.listdir("/proc/self/task")]
    except FileNotFoundError:  # no /proc: this thread only
        os.nice(nice)
        thread_ids = []
    for thread_id in thread_ids:
        os.setpriority(os.PRIO_PROCESS, thread_id, min(19, os.getpriority(os.PRIO_PROCESS, thread_id) + nice))
        if idle:
            run_when_idle(thread_id)
