"""A circuit breaker on the candidate: stop calling it while it keeps failing, probe now and then.

A failing candidate costs the gateway a full call per request (CPU, sockets, a slot of shadow work
in flight) for nothing but an error count. After `failures` failures in a row the circuit opens:
requests skip the candidate (counted, and recorded as candidate failures, so verdicts such as the
guard's error rate are what they would have been) until a pause has passed; then one request
probes it. A success closes the circuit; a failure reopens it for twice the pause, up to `max_open_s`.
"""

from __future__ import annotations

import time
from typing import Callable

from server.config import CircuitBreakerConfig


class CircuitBreaker:
    def __init__(self, config: CircuitBreakerConfig | None, on_change: Callable[[bool], None] = lambda is_open: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._on_change = on_change
        self._clock = clock
        self.failures = 0  # in a row
        self.is_open = False
        self._pause_s = config.open_s if config else 0.0
        self._probe_at = 0.0
        self._probing = False

    def allow(self) -> bool:
        """Whether to call the candidate now; a True while open is the one probe call."""
        if not self.is_open:
            return True
        if self._probing or self._clock() < self._probe_at:
            return False
        self._probing = True
        return True

    @property
    def paused(self) -> bool:
        """Open and still inside its pause: callers that cannot take the one probe should not call."""
        return self.is_open and self._clock() < self._probe_at

    def succeeded(self) -> None:
        self.failures = 0
        self._probing = False
        if self.is_open and self.config is not None:
            self._pause_s = self.config.open_s
            self._set(False)

    def failed(self) -> None:
        self.failures += 1
        config = self.config
        if config is None:
            return
        if self._probing or (self.is_open and self._clock() >= self._probe_at):  # a failed probe
            self._probing = False
            self._pause_s = min(self._pause_s * 2, config.max_open_s)
            self._probe_at = self._clock() + self._pause_s
        elif not self.is_open and self.failures >= config.failures:
            self._probe_at = self._clock() + self._pause_s
            self._set(True)

    def _set(self, is_open: bool) -> None:
        self.is_open = is_open
        self._on_change(is_open)
