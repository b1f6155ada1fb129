"""How busy the event loop is: the share of wall time it spends running callbacks instead of waiting.

Shadow calls only use capacity the primary leaves over: while the loop is busier than a configured
share, dispatch skips (and counts) a growing share of new shadow calls, so the legacy path keeps its
throughput.
"""

from __future__ import annotations

import asyncio
import selectors
import time
import weakref
from typing import Any, Callable, Coroutine

PERIOD_S = 0.1
# Each period's share moves the reported one by this much: an average over the last few tenths of a second,
# so that one busy period alone does not shed shadow calls (dispatch sheds more the further past its
# threshold the loop is), while sustained overload does.
SMOOTHING = 0.5

_selectors: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, IdleTimingSelector]" = weakref.WeakKeyDictionary()


class IdleTimingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """The platform's selector, adding up the time the loop spends waiting in select()."""

    def __init__(self) -> None:
        super().__init__()
        self.idle_s = 0.0

    def select(self, timeout: float | None = None) -> list:
        start = time.perf_counter()
        try:
            return super().select(timeout)
        finally:
            self.idle_s += time.perf_counter() - start


def _timed_loop() -> asyncio.AbstractEventLoop:
    selector = IdleTimingSelector()
    loop = asyncio.SelectorEventLoop(selector)
    _selectors[loop] = selector
    return loop


def run(main: Coroutine[Any, Any, Any]) -> Any:
    """`asyncio.run(main)` on a loop whose busy share `LoopLoad` can measure."""
    with asyncio.Runner(loop_factory=_timed_loop) as runner:
        return runner.run(main)


class LoopLoad:
    """Busy share of the running loop, averaged over the last few tenths of a second, refreshed every `PERIOD_S`.

    On a loop not started by `run` (an embedding application's, a test's) nothing can be measured
    and `busy` stays 0.
    """

    def __init__(self, on_update: Callable[[float], None] = lambda busy: None) -> None:
        self.busy = 0.0
        self._on_update = on_update
        self._selector: IdleTimingSelector | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last = (0.0, 0.0)
        self._first = True

    @property
    def measured(self) -> bool:
        return self._selector is not None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._selector = _selectors.get(loop)
        if self._selector is not None:
            self._last = (time.perf_counter(), self._selector.idle_s)
            self._timer = loop.call_later(PERIOD_S, self._refresh)

    def _refresh(self) -> None:
        assert self._selector is not None
        self.update(time.perf_counter(), self._selector.idle_s)
        self._timer = asyncio.get_running_loop().call_later(PERIOD_S, self._refresh)

    def update(self, now: float, idle_s: float) -> None:
        """Fold in one period: wall clock `now` and the loop's total idle seconds so far."""
        wall = now - self._last[0]
        if wall > 0:
            share = min(1.0, max(0.0, 1.0 - (idle_s - self._last[1]) / wall))
            self.busy = share if self._first else self.busy + SMOOTHING * (share - self.busy)
            self._first = False
            self._on_update(self.busy)
        self._last = (now, idle_s)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
