"""Rollout control: percentages flipped live, promotion through stages, rollback by hand or by guard."""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import time

from server.compare import Comparison
from server.config import GuardConfig, ModelPairConfig
from server.desired_state import DesiredState, Persistence
from server.dispatch import Dispatcher, ModelPair
from server.errors import FailedPrecondition, InvalidRequest
from server.metrics import ROLLBACK_REASONS
from server.window import WindowSummary

log = logging.getLogger("shadowserve.rollout")

HISTORY_SIZE = 500
GUARD_JUDGE_FRACTION = 20  # judge after every window/20 new outcomes: prompt, yet cheap at high rates


@dataclasses.dataclass(frozen=True)
class Change:
    time_unix: float
    model: str
    source: str  # cli | file | guard | api
    old_stage: str
    new_stage: str
    old_shadow_percent: float
    new_shadow_percent: float
    old_serve_percent: float
    new_serve_percent: float
    reason: str


def _check_percent(name: str, value: float | None) -> None:
    if value is not None and not 0 <= value <= 100:
        raise InvalidRequest(f"{name} must be between 0 and 100, got {value:g}")


class RolloutController:
    """The one place percentages change; every change is logged, kept in history and reflected in metrics.

    With a `desired_state` (a config file), changes are written into the file and guard rollbacks
    kept across restarts; without one (a gateway built from config data) they last while it runs.
    """

    def __init__(self, dispatcher: Dispatcher, desired_state: DesiredState | None = None) -> None:
        self.dispatcher = dispatcher
        self.history: collections.deque[Change] = collections.deque(maxlen=HISTORY_SIZE)
        self.last_rollback_reason: dict[str, str] = {}
        self.desired_state: DesiredState | None = None
        self.persistence: dict[str, Persistence] = {}  # what became of each model's latest change
        self._guards = {
            name: RollbackGuard(self, pair, pair.config.guard)
            for name, pair in dispatcher.pairs.items()
            if pair.config.guard is not None
        }
        dispatcher.comparison_listeners.append(self._on_outcome)
        if desired_state is not None:
            self.attach(desired_state)

    def attach(self, desired_state: DesiredState) -> None:
        """Follow a config file from now on, and restore the guard rollbacks it kept from before a restart."""
        self.desired_state = desired_state
        for model, reason in desired_state.rollbacks_in_force().items():
            pair = self.dispatcher.pairs.get(model)
            if pair is None or pair.candidate is None:
                desired_state.forget_rollback(model)
                continue
            self.last_rollback_reason[model] = reason
            log.warning("model %s: the guard rolled the candidate back before the restart (%s); it stays rolled back "
                        "until the percentages are changed", model, reason)
            self._apply(pair, pair.shadow_percent, 0.0, "guard", f"kept across a restart: {reason}", rolled_back=True,
                        persist=False)

    def pair(self, model: str) -> ModelPair:
        return self.dispatcher.pair(model)

    def set_percentages(
        self, model: str, shadow_percent: float | None, serve_percent: float | None, source: str, reason: str = ""
    ) -> ModelPair:
        pair = self.pair(model)
        _check_percent("shadow_percent", shadow_percent)
        _check_percent("serve_percent", serve_percent)
        if pair.candidate is None and (shadow_percent or serve_percent):
            raise FailedPrecondition(f"model {model!r} has no candidate backend to shadow or serve")
        shadow = pair.shadow_percent if shadow_percent is None else shadow_percent
        serve = pair.serve_percent if serve_percent is None else serve_percent
        self._apply(pair, shadow, serve, source, reason)
        return pair

    def promote(self, model: str, source: str, reason: str = "") -> ModelPair:
        pair = self.pair(model)
        if pair.candidate is None:
            raise FailedPrecondition(f"model {model!r} has no candidate backend to promote")
        steps = pair.config.canary_steps
        if pair.stage in ("off", "rolled_back"):
            shadow, serve = pair.shadow_percent or 100.0, 0.0
        elif pair.stage == "shadow":
            shadow, serve = pair.shadow_percent, steps[0]
        elif pair.stage == "canary":
            shadow, serve = pair.shadow_percent, next((step for step in steps if step > pair.serve_percent), 100.0)
        else:
            raise FailedPrecondition(f"model {model!r} is already at cutover")
        self._apply(pair, shadow, serve, source, reason or "promote")
        return pair

    def rollback(self, model: str, source: str, reason: str = "manual", detail: str = "") -> ModelPair:
        """Serve nothing from the candidate; `reason` is a metric label, `detail` what an operator reads."""
        pair = self.pair(model)
        if pair.candidate is None:
            raise FailedPrecondition(f"model {model!r} has no candidate backend to roll back")
        pair.metrics.rollback(reason if reason in ROLLBACK_REASONS else "manual")
        text = f"{reason}: {detail}" if detail else reason
        self.last_rollback_reason[pair.name] = text
        self._apply(pair, pair.shadow_percent, 0.0, source, text, rolled_back=True)
        return pair

    def _apply(self, pair: ModelPair, shadow: float, serve: float, source: str, reason: str, rolled_back: bool = False,
               persist: bool = True) -> None:
        old = (pair.stage, pair.shadow_percent, pair.serve_percent)
        pair.set_percentages(shadow, serve, rolled_back=rolled_back)
        change = Change(time.time(), pair.name, source, old[0], pair.stage, old[1], shadow, old[2], serve, reason)
        self.history.append(change)
        guard = self._guards.get(pair.name)
        if guard is not None:
            guard.restart()
        log.info(json.dumps({"event": "rollout_change", **dataclasses.asdict(change)}))
        state = self.desired_state
        if state is not None and persist and source != "file":  # a change read from the file is there already
            self.persistence[pair.name] = state.persist(pair.name, shadow, serve)
            if rolled_back and source == "guard":
                state.record_rollback(pair.name, reason)
            elif not rolled_back:  # a manual rollback on top keeps the guard's in force
                state.forget_rollback(pair.name)

    def _on_outcome(self, pair: ModelPair, comparison: Comparison | None) -> None:
        guard = self._guards.get(pair.name)
        if guard is not None and pair.serve_percent > 0:
            guard.judge()

    def apply_file(self, old: ModelPairConfig | None, new: ModelPairConfig) -> bool:
        """Apply the percentages a reloaded file sets, if the file changed them; True when applied."""
        percentages = (new.shadow_percent, new.serve_percent)
        if old is not None and (old.shadow_percent, old.serve_percent) == percentages:
            return False
        if self.desired_state is not None:
            self.desired_state.file_changed(new.name, *percentages)
        pair = self.pair(new.name)
        if (pair.shadow_percent, pair.serve_percent) == percentages:
            return False  # in force already: written by this gateway, or set here before the file caught up
        self.set_percentages(new.name, *percentages, "file", "config file changed")
        return True


class RollbackGuard:
    """Rolls a serving candidate back when the recent window breaches a threshold."""

    def __init__(self, controller: RolloutController, pair: ModelPair, config: GuardConfig) -> None:
        self.controller, self.pair, self.config = controller, pair, config
        self._start = self._last_judged = pair.window.outcomes_seen
        self._judge_every = max(1, config.window // GUARD_JUDGE_FRACTION)

    def restart(self) -> None:
        """Judge only what happens after a change, so old samples cannot trigger a new rollback."""
        self._start = self.pair.window.outcomes_seen

    def judge(self) -> None:
        seen = self.pair.window.outcomes_seen
        if seen - self._last_judged < self._judge_every:
            return
        self._last_judged = seen
        fresh = seen - self._start
        if fresh < self.config.min_samples:
            return
        breach = self.breach(self.pair.window.summary(last=min(fresh, self.config.window)))
        if breach is not None:
            reason, detail = breach
            log.warning("model %s: rolling back the candidate: %s", self.pair.name, detail)
            self.controller.rollback(self.pair.name, "guard", reason, detail)

    def breach(self, window: WindowSummary) -> tuple[str, str] | None:
        config = self.config
        if config.max_error_rate is not None and window.error_rate is not None and window.error_rate > config.max_error_rate:
            return "error_rate", f"candidate error rate {window.error_rate:.1%} > {config.max_error_rate:.1%}"
        if config.max_mismatch_rate is not None and window.match_rate is not None:
            mismatch = 1 - window.match_rate
            if mismatch > config.max_mismatch_rate:
                return "mismatch_rate", f"mismatch rate {mismatch:.1%} > {config.max_mismatch_rate:.1%}"
        if (config.min_top1_agreement is not None and window.top1_agreement is not None
                and window.top1_agreement < config.min_top1_agreement):
            return "top1_agreement", f"top-1 agreement {window.top1_agreement:.1%} < {config.min_top1_agreement:.1%}"
        p99 = window.latency_p99.get("candidate")
        if config.max_p99_latency_s is not None and p99 is not None and p99 > config.max_p99_latency_s:
            return "latency", f"candidate p99 {p99 * 1000:.1f} ms > {config.max_p99_latency_s * 1000:.1f} ms"
        return None
