"""Backends load at start-up; one that is not there yet (or serves something else) is retried in the background."""

from __future__ import annotations

import asyncio
import logging

from adapters.base import Backend
from server.errors import ConfigError

log = logging.getLogger("shadowserve.loading")

MAX_RETRY_S = 30.0


class Loader:
    """Loads backends; failures are retried with a pause that doubles from `retry_s` up to 30 s."""

    def __init__(self, retry_s: float) -> None:
        self.retry_s = retry_s
        self._tasks: set[asyncio.Task] = set()

    async def load(self, model: str, role: str, backend: Backend, required: bool) -> None:
        """First attempt now. A `required` backend whose files or tensors do not fit the config stops start-up."""
        try:
            await backend.load()
            log.info("model %s: %s backend loaded %s", model, role, backend.describe())
            return
        except ConfigError as exc:
            if required:
                raise ConfigError(f"model {model!r} {role}: {exc}") from exc
            log.error("model %s: %s backend does not fit the configuration: %s; retrying in the background",
                      model, role, exc)
        except Exception as exc:
            log.warning("model %s: %s backend not ready (%s); retrying in the background", model, role, exc)
        task = asyncio.get_running_loop().create_task(self._retry(model, role, backend))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _retry(self, model: str, role: str, backend: Backend) -> None:
        delay = self.retry_s
        while not backend.ready:
            await asyncio.sleep(delay)
            try:
                await backend.load()
                log.info("model %s: %s backend loaded %s", model, role, backend.describe())
            except ConfigError as exc:  # reachable, but serving something the pair cannot use
                log.error("model %s: %s backend does not fit the configuration: %s", model, role, exc)
                delay = MAX_RETRY_S
            except Exception as exc:
                log.warning("model %s: %s backend still not ready: %s", model, role, exc)
                delay = min(delay * 2, MAX_RETRY_S)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
