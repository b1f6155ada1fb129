"""What replay and diagnose work on: the config's pair, its captured records, its real backends."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import AsyncIterator, Iterator

import numpy as np

from adapters import create_backend
from adapters.base import Backend
from server.capture import CapturedRecord, read_records
from server.config import BackendConfig, Config, ModelPairConfig
from server.errors import ShadowServeError
from server.insight import InsightError


def select_pair(config: Config, model: str | None) -> ModelPairConfig:
    """The pair `--model` names, or the config's only one; it must have a candidate."""
    names = [pair.name for pair in config.models]
    if model is not None:
        pair = next((pair for pair in config.models if pair.name == model), None)
        if pair is None:
            raise InsightError(f"no model {model!r} in the config; it has {names}")
    elif len(config.models) == 1:
        pair = config.models[0]
    else:
        raise InsightError(f"the config has several models {names}; pick one with --model")
    if pair.candidate is None:
        raise InsightError(f"model {pair.name!r} has no candidate in the config")
    return pair


def pair_records(folder: str | Path, pair: ModelPairConfig) -> list[CapturedRecord]:
    """The captured records of `pair`; an error names the models the folder holds instead."""
    records = read_records(folder, pair.name)
    if not records:
        present = sorted({record.model for record in read_records(folder)})
        held = f"it holds records of {present}" if present else "it holds no records"
        raise InsightError(f"{folder}: no captured records of model {pair.name!r}; {held}")
    return records


@contextlib.asynccontextmanager
async def loaded(config: BackendConfig, pair: ModelPairConfig) -> AsyncIterator[Backend]:
    """A real backend of the pair, loaded in this process and closed after use."""
    backend = create_backend(config, pair.inputs, pair.outputs)
    await backend.load()
    try:
        yield backend
    finally:
        await backend.close()


async def timed_infer(backend: Backend, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray] | None, float, str]:
    """(outputs or None, seconds, error text) of one call: a failing call is an outcome, not an exception."""
    start = time.perf_counter()
    try:
        outputs = await backend.infer(inputs)
    except ShadowServeError as exc:
        return None, time.perf_counter() - start, error_text(exc)
    return outputs, time.perf_counter() - start, ""


def error_text(exc: BaseException) -> str:
    """One line: the error and the last line of the runtime's own error under it (a run of this tool shows both)."""
    text = f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__
    if cause is not None and str(cause).strip():
        text += f" ({type(cause).__name__}: {str(cause).strip().splitlines()[-1]})"
    return text


@contextlib.contextmanager
def quiet_backend_errors() -> Iterator[None]:
    """Keep expected backend failures (a transform the candidate rejects) out of the log."""
    adapters_log = logging.getLogger("shadowserve.adapters")
    silence = lambda record: False  # noqa: E731
    adapters_log.addFilter(silence)
    try:
        yield
    finally:
        adapters_log.removeFilter(silence)
