"""Memory that large messages took goes back to the operating system once they are answered."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging

log = logging.getLogger("shadowserve")

LARGE_MESSAGE_BYTES = 16 << 20
TRIM_DELAY_S = 0.5  # after the reply is serialized and sent, and after a burst rather than within it


def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: its allocator keeps what it keeps
        return None


class MemoryReturner:
    """After a large message, hands glibc's free pages back (malloc_trim), off the event loop.

    Without it, the arenas that held a 200 MiB request stay resident: RSS grew by about its size
    per large request, five times over, and never came down.
    """

    def __init__(self, threshold_bytes: int = LARGE_MESSAGE_BYTES, delay_s: float = TRIM_DELAY_S) -> None:
        self.threshold_bytes, self.delay_s = threshold_bytes, delay_s
        self._trim = _malloc_trim()
        self._scheduled: asyncio.TimerHandle | None = None

    def handled(self, message_bytes: int) -> None:
        if self._trim is None or message_bytes < self.threshold_bytes or self._scheduled is not None:
            return
        self._scheduled = asyncio.get_running_loop().call_later(self.delay_s, self._start)

    def _start(self) -> None:
        self._scheduled = None
        asyncio.get_running_loop().run_in_executor(None, self._trim, 0)
