"""The loop's busy share: what shadow calls are shed on when the primary needs the gateway's CPU."""

from __future__ import annotations

import asyncio
import time

import pytest

from server import loop_load
from server.config import ServerConfig
from server.dispatch import Dispatcher
from server.loop_load import LoopLoad

pytestmark = pytest.mark.solo


def measure(work) -> list[float]:
    """Busy shares reported while `work` runs on a loop started by `loop_load.run`."""
    updates: list[float] = []

    async def main() -> None:
        load = LoopLoad(updates.append)
        load.start()
        assert load.measured
        await work()
        load.stop()

    loop_load.run(main())
    return updates


def test_the_busy_share_is_the_share_of_wall_time_not_spent_waiting_averaged_over_periods():
    updates: list[float] = []
    load = LoopLoad(updates.append)
    now = idle = 0.0
    for busy_share in (0.75, 0.75, 0.75, 0.75, 0.0, 0.0):  # periods of 0.1 s of wall time
        now += 0.1
        idle += 0.1 * (1 - busy_share)
        load.update(now, idle)
    assert updates[:4] == pytest.approx([0.75] * 4)  # the first period sets it, steady periods keep it
    assert updates[4:] == pytest.approx([0.375, 0.1875])  # each period moves it half-way (SMOOTHING)
    load.update(now, idle)  # no wall time passed: nothing to report
    assert len(updates) == 6


def test_a_loop_held_by_callbacks_reads_busy():
    async def blocked() -> None:
        end = time.perf_counter() + 0.8
        while time.perf_counter() < end:
            time.sleep(0.03)  # a callback that holds the loop
            await asyncio.sleep(0.01)

    updates = measure(blocked)
    assert len(updates) >= 2 and max(updates) > 0.3, updates


def test_a_waiting_loop_reads_idle():
    async def waiting() -> None:
        await asyncio.sleep(0.5)

    updates = measure(waiting)
    assert len(updates) >= 1 and max(updates) < 0.2, updates


async def test_a_loop_it_cannot_time_reads_zero():
    load = LoopLoad()
    load.start()  # pytest's own loop, not started by loop_load.run
    await asyncio.sleep(0.25)
    assert not load.measured and load.busy == 0.0
    load.stop()


def test_the_share_of_shadow_calls_shed_grows_with_how_far_the_loop_is_past_the_threshold():
    dispatcher = Dispatcher([], ServerConfig(shed_shadow_from_loop_busy=0.8))
    shed_share = {}
    for busy in (0.79, 0.85, 0.9, 0.97):
        dispatcher.loop_load.busy = busy
        shed_share[busy] = sum(dispatcher._overloaded() for _ in range(4000)) / 4000
    assert shed_share[0.79] == 0.0 and shed_share[0.9] == shed_share[0.97] == 1.0, shed_share
    assert 0.44 < shed_share[0.85] < 0.56, shed_share

    unshed = Dispatcher([], ServerConfig(shed_shadow_from_loop_busy=None))
    unshed.loop_load.busy = 1.0
    assert not any(unshed._overloaded() for _ in range(100))
