"""The candidate's circuit breaker: opens after failures in a row, probes after a pause, backs off."""

from __future__ import annotations

from server.breaker import CircuitBreaker
from server.config import CircuitBreakerConfig


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def breaker(**config) -> tuple[CircuitBreaker, Clock, list[bool]]:
    clock, changes = Clock(), []
    return CircuitBreaker(CircuitBreakerConfig(**config), changes.append, clock), clock, changes


def test_opens_after_failures_in_a_row_only():
    circuit, _, changes = breaker(failures=3)
    for _ in range(2):
        circuit.failed()
    circuit.succeeded()  # the run of failures is broken
    for _ in range(2):
        circuit.failed()
    assert circuit.allow() and not circuit.is_open and changes == []
    circuit.failed()
    assert circuit.is_open and not circuit.allow() and changes == [True]


def test_one_probe_after_the_pause_and_a_success_closes():
    circuit, clock, changes = breaker(failures=1, open_s=2.0)
    circuit.failed()
    clock.now += 1.9
    assert not circuit.allow()
    clock.now += 0.2
    assert circuit.allow()  # the probe
    assert not circuit.allow()  # no second call while the probe runs
    circuit.succeeded()
    assert not circuit.is_open and circuit.allow() and changes == [True, False]


def test_failed_probes_double_the_pause_up_to_the_cap_and_a_success_resets_it():
    circuit, clock, _ = breaker(failures=1, open_s=1.0, max_open_s=3.0)
    circuit.failed()
    pauses = []
    for _ in range(4):
        waited = 0.0
        while not circuit.allow():
            clock.now += 0.25
            waited += 0.25
        pauses.append(waited)
        circuit.failed()
    assert pauses == [1.0, 2.0, 3.0, 3.0]
    clock.now += 3.0
    assert circuit.allow()
    circuit.succeeded()
    circuit.failed()
    clock.now += 1.0
    assert circuit.allow()  # back to the first pause


def test_late_answers_of_calls_started_before_opening():
    circuit, _, changes = breaker(failures=2)
    circuit.failed()
    circuit.failed()
    circuit.failed()  # a call started before the circuit opened: no probe is spoiled, nothing changes
    assert circuit.is_open and changes == [True] and not circuit.allow()
    circuit.succeeded()  # the candidate did answer after all
    assert not circuit.is_open and changes == [True, False]


def test_without_config_it_never_opens():
    circuit = CircuitBreaker(None)
    for _ in range(100):
        circuit.failed()
    assert circuit.allow() and not circuit.is_open and circuit.failures == 100
