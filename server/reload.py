"""Watches the config file: edits (or a ConfigMap swap) apply new percentages to the running gateway."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from server.config import Config, load_config
from server.desired_state import DesiredState, file_digest
from server.errors import ConfigError, ShadowServeError
from server.metrics import Metrics
from server.rollout import RolloutController

log = logging.getLogger("shadowserve.reload")

LIVE_KEYS = {"shadow_percent", "serve_percent"}


class ConfigWatcher:
    """Polls the file's content (mtimes are unreliable across ConfigMap symlink swaps).

    The file is the controller's desired state: unless the controller follows one already, the
    watcher attaches it, so `ctl` changes are written back and kept guard rollbacks restored.
    """

    def __init__(self, path: Path, applied: Config, controller: RolloutController, metrics: Metrics) -> None:
        self.path, self.controller, self.metrics = path, controller, metrics
        if controller.desired_state is None:
            controller.attach(DesiredState(path, applied, metrics))
        self.state: DesiredState = controller.desired_state  # type: ignore[assignment]
        self._rejected: str | None = None

    @property
    def applied(self) -> Config:
        return self.state.config

    async def run(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self.check()

    def check(self) -> None:
        digest = file_digest(self.path)
        if digest is None or digest in (self.state.digest, self._rejected):
            return
        try:
            config = load_config(self.path)
            self._apply(config)
        except (ConfigError, ShadowServeError) as exc:
            self._rejected = digest  # reported once, not at every poll
            self.metrics.config_reloads.labels("rejected").inc()
            log.error("config edit rejected, the running config stays: %s", exc)
            return
        self.state.follow(digest, config)
        self.metrics.config_reloads.labels("applied").inc()

    def _apply(self, config: Config) -> None:
        old_models = {model.name: model for model in self.applied.models}
        new_names = {model.name for model in config.models}
        unknown = sorted(new_names - set(self.controller.dispatcher.pairs))
        if unknown:
            raise ConfigError(f"{self.path}: models {unknown} are new; adding models needs a restart")
        for model in config.models:
            if (model.shadow_percent or model.serve_percent) and self.controller.pair(model.name).candidate is None:
                raise ConfigError(f"{self.path}: model {model.name!r} gained a candidate; that needs a restart")
        for model in config.models:
            old = old_models.get(model.name)
            if old is not None:
                ignored = sorted(key for key in model.model_fields
                                 if key not in LIVE_KEYS and getattr(old, key) != getattr(model, key))
                if ignored:
                    log.warning("model %s: %s changed in %s; these apply at the next restart", model.name, ignored, self.path)
            if model.candidate is None and self.controller.pair(model.name).candidate is not None:
                continue  # removing a candidate needs a restart too; its percentages stay as they are
            self.controller.apply_file(old, model)
