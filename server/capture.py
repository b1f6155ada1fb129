"""Capture of compared requests to disk, for `shadowserve replay`, `diagnose` and `capture show`.

Layout of a capture folder (mode 0700, files 0600: inputs may hold user data):

    <id>.npz       one record: arrays `input/<name>`, `legacy/<name>`, `candidate/<name>` and `meta`
                   (the index line as a 0-d string), readable with numpy alone (`allow_pickle=False`)
    index.jsonl    one JSON object per record: id, verdict, measures per output, model, stage,
                   request id, routing key, timestamps

A record is written to a temporary file, fsynced and renamed into place; its index line is
appended only after that, so a crash leaves at most a temporary file (removed at the next start)
or a complete record whose index line is restored from its `meta`. Readers skip index lines
whose record is missing (rotated away) or that a crash left torn.
"""

from __future__ import annotations

import collections
import dataclasses
import fcntl
import itertools
import json
import logging
import math
import os
import queue
import random
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from server.compare import MATCH, Comparison
from server.config import CaptureConfig
from server.errors import ConfigError
from server.metrics import CAPTURE_DROP_REASONS, Metrics

log = logging.getLogger(__name__)

INDEX = "index.jsonl"
SUFFIX = ".npz"
SIDES = ("input", "legacy", "candidate")
_TEMPORARY = ".tmp-"
_LOCK = ".lock"


class CaptureError(Exception):
    """A capture folder or record cannot be read as asked."""


@dataclasses.dataclass(frozen=True)
class RecordTensors:
    inputs: dict[str, np.ndarray]
    legacy: dict[str, np.ndarray]
    candidate: dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class CapturedRecord:
    """One index entry; `load()` reads its arrays."""

    id: str
    path: Path
    meta: dict

    @property
    def model(self) -> str:
        return self.meta["model"]

    @property
    def verdict(self) -> str:
        return self.meta["verdict"]

    @property
    def outputs(self) -> dict[str, dict]:
        """Measures per output, as compared at capture time (non-finite values as null)."""
        return self.meta.get("outputs", {})

    def load(self) -> RecordTensors:
        try:
            with np.load(self.path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
        except (OSError, ValueError) as exc:
            raise CaptureError(f"record {self.id}: cannot read {self.path}: {exc}") from None
        sides: dict[str, dict[str, np.ndarray]] = {side: {} for side in SIDES}
        for key, array in arrays.items():
            side, _, name = key.partition("/")
            if side in sides:
                sides[side][name] = array
        return RecordTensors(sides["input"], sides["legacy"], sides["candidate"])


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def record_meta(record_id: str, model: str, stage: str, request_id: str, routing_key: str | None,
                time_unix: float, captured_unix: float, comparison: Comparison) -> dict:
    """The index line of a record: JSON-safe, non-finite measures as null."""
    outputs = {
        name: {**{measure: _finite(value) for measure, value in out.measures().items()},
               "within_tolerance": out.within_tolerance, "class_scores": out.top1_total > 0,
               "top1_agree": out.top1_agree, "top1_total": out.top1_total, "topk_overlap": _finite(out.topk_overlap)}
        for name, out in comparison.outputs.items()
    }
    return {"id": record_id, "file": record_id + SUFFIX, "model": model, "stage": stage, "request_id": request_id,
            "routing_key": routing_key, "verdict": comparison.verdict, "detail": comparison.detail,
            "time_unix": time_unix, "captured_unix": captured_unix, "outputs": outputs}


def read_records(folder: str | Path, model: str | None = None) -> list[CapturedRecord]:
    """Every complete record of a capture folder, oldest first (optionally of one model)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CaptureError(f"{folder}: no such capture folder")
    try:
        lines = (folder / INDEX).read_bytes().splitlines()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise CaptureError(f"{folder / INDEX}: cannot read: {exc.strerror}") from None
    records: dict[str, CapturedRecord] = {}
    for line in lines:
        try:
            meta = json.loads(line)
            record_id = meta["id"]
        except (ValueError, KeyError, TypeError):
            continue  # torn by a crash
        path = folder / (record_id + SUFFIX)
        if path.is_file() and (model is None or meta.get("model") == model):
            records[record_id] = CapturedRecord(record_id, path, meta)
    return [records[key] for key in sorted(records)]


def find_record(folder: str | Path, record_id: str) -> CapturedRecord:
    """The record whose id is `record_id`, or the only one it is a prefix of."""
    records = read_records(folder)
    exact = [record for record in records if record.id == record_id]
    found = exact or [record for record in records if record.id.startswith(record_id)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise CaptureError(f"{folder}: no record {record_id!r} (`shadowserve capture ls {folder}` lists them)")
    raise CaptureError(f"{folder}: {len(found)} records start with {record_id!r}; give more of the id")


@dataclasses.dataclass
class _Job:
    record_id: str
    arrays: dict[str, np.ndarray]
    meta: dict


def _storable(array: np.ndarray) -> np.ndarray:
    # A copy: the caller may reuse its buffers once `offer` returns. BYTES tensors (object arrays)
    # become fixed-width bytes, which numpy reads back without pickle.
    array = np.asarray(array)
    return array.astype(np.bytes_) if array.dtype == object else array.copy()


class Capture:
    """Writes compared requests of one model to `config.dir`, on its own thread.

    `offer` decides at once and never waits on disk: mismatches and shape mismatches are kept, matches
    only as a `matches_percent` control sample; a token bucket allows `max_per_second` records
    (bursts up to that many); a full write queue drops the record. Drops are counted in
    `shadowserve_capture_dropped_total`. The folder is held by one Capture at a time.
    """

    queue_size = 64

    def __init__(self, config: CaptureConfig, model: str, metrics: Metrics,
                 clock: Callable[[], float] = time.time) -> None:
        self.config, self.model, self.folder = config, model, Path(config.dir)
        self._clock = clock
        self._written = metrics.capture_records.labels(model)
        self._dropped = {reason: metrics.capture_dropped.labels(model, reason) for reason in CAPTURE_DROP_REASONS}
        self._random = random.Random()
        self._sequence = itertools.count()
        self._lock = threading.Lock()
        self._burst = max(1.0, config.max_per_second)  # below one a second, still one record at a time
        self._tokens, self._refilled = self._burst, clock()
        self._records: collections.OrderedDict[str, int] = collections.OrderedDict()  # id -> bytes, oldest first
        self._index_bytes = self._index_lines = 0
        self._open_folder()
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=self.queue_size)
        self._closed = False
        self._thread = threading.Thread(target=self._write_loop, name=f"capture-{model}", daemon=True)
        self._thread.start()

    # -- caller's side: decide, copy, enqueue ------------------------------------------------------

    def offer(self, *, inputs: dict[str, np.ndarray], legacy: dict[str, np.ndarray],
              candidate: dict[str, np.ndarray], comparison: Comparison, stage: str, request_id: str,
              routing_key: str | None, time_unix: float) -> bool:
        """Queue one compared request for writing; False when it is not kept (sampled out or dropped)."""
        if self._closed:
            return False
        if comparison.verdict == MATCH and self._random.random() * 100 >= self.config.matches_percent:
            return False
        if not self._take_token():
            self._dropped["rate_limit"].inc()
            return False
        now = self._clock()
        record_id = f"{int(now * 1000):013d}-{os.getpid()}-{next(self._sequence):08d}"
        arrays = {f"{side}/{name}": _storable(array)
                  for side, tensors in zip(SIDES, (inputs, legacy, candidate)) for name, array in tensors.items()}
        meta = record_meta(record_id, self.model, stage, request_id, routing_key, time_unix, now, comparison)
        try:
            self._queue.put_nowait(_Job(record_id, arrays, meta))
        except queue.Full:
            self._dropped["queue_full"].inc()
            return False
        return True

    def _take_token(self) -> bool:
        with self._lock:
            now = self._clock()
            refill = max(0.0, now - self._refilled) * self.config.max_per_second
            self._tokens = min(self._burst, self._tokens + refill)
            self._refilled = now
            if self._tokens < 1:
                return False
            self._tokens -= 1
            return True

    def close(self) -> None:
        """Write what is queued, then release the folder."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()
        for fd in (self._index_fd, self._folder_fd, self._lock_fd):
            os.close(fd)

    # -- writer thread -------------------------------------------------------------------------------

    def _open_folder(self) -> None:
        folder = self.folder
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(folder, 0o700)
            self._lock_fd = os.open(folder / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigError(f"model {self.model}: capture.dir {folder}: {exc.strerror}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise ConfigError(f"model {self.model}: capture.dir {folder} is in use by another writer; "
                              "give each model and gateway its own") from None
        self._folder_fd = os.open(folder, os.O_RDONLY)
        for leftover in folder.glob(_TEMPORARY + "*"):
            leftover.unlink(missing_ok=True)  # a write cut short; nobody else writes here (we hold the lock)
        for path in sorted(folder.glob("*" + SUFFIX)):
            self._records[path.name[: -len(SUFFIX)]] = path.stat().st_size
        index = folder / INDEX
        self._index_fd = os.open(index, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        content = index.read_bytes()
        lines = content.splitlines()
        indexed = set()
        for line in lines:
            try:
                indexed.add(json.loads(line)["id"])
            except (ValueError, KeyError, TypeError):
                pass
        if content and not content.endswith(b"\n"):
            os.write(self._index_fd, b"\n")  # ends a line a crash left torn, so the next one starts clean
        self._index_bytes, self._index_lines = os.fstat(self._index_fd).st_size, len(lines)
        for record_id in [r for r in self._records if r not in indexed]:
            self._restore_index_line(record_id)
        self._make_room(0)

    def _restore_index_line(self, record_id: str) -> None:
        """A record renamed into place whose index line a crash prevented: the line is in its `meta`."""
        path = self.folder / (record_id + SUFFIX)
        try:
            with np.load(path, allow_pickle=False) as data:
                line = str(data["meta"][()]).encode() + b"\n"
        except Exception:  # not a record this writer made: leave it out of the index and the count
            self._records.pop(record_id)
            return
        self._append_index(line)

    def _write_loop(self) -> None:
        while (job := self._queue.get()) is not None:
            try:
                self._write(job)
            except Exception as exc:
                self._dropped["error"].inc()
                log.warning("capture of %s to %s failed: %s", self.model, self.folder, exc)

    def _write(self, job: _Job) -> None:
        line = (json.dumps(job.meta, separators=(",", ":")) + "\n").encode()
        name = job.record_id + SUFFIX
        temporary = self.folder / f"{_TEMPORARY}{name}"
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as file:
                np.savez(file, meta=np.array(line[:-1].decode()), **job.arrays)
                file.flush()
                os.fsync(file.fileno())
            size = os.stat(temporary).st_size
            if size + len(line) > self.config.max_bytes:
                self._dropped["cap"].inc()
                log.warning("capture of %s: one record (%d bytes) exceeds capture.max_bytes", self.model, size)
                return
            self._make_room(size + len(line))
            self._publish(temporary, self.folder / name)
        finally:
            temporary.unlink(missing_ok=True)
        self._records[job.record_id] = size
        self._append_index(line)
        self._written.inc()

    def _publish(self, temporary: Path, final: Path) -> None:
        """Make a complete, fsynced record visible under its final name."""
        os.rename(temporary, final)
        os.fsync(self._folder_fd)

    def _append_index(self, line: bytes) -> None:
        os.write(self._index_fd, line)
        os.fsync(self._index_fd)
        self._index_bytes += len(line)
        self._index_lines += 1

    def _used(self) -> int:
        return sum(self._records.values()) + self._index_bytes

    def _make_room(self, needed: int) -> None:
        """Delete the oldest records until `needed` more bytes fit under max_bytes."""
        while self._used() + needed > self.config.max_bytes:
            dead_lines = self._index_lines - len(self._records)
            if dead_lines > 0 and (dead_lines >= len(self._records) or not self._records):
                self._compact_index()  # amortised: the index is rewritten only once half of it is dead
                continue
            if not self._records:
                return
            record_id, _ = self._records.popitem(last=False)
            (self.folder / (record_id + SUFFIX)).unlink(missing_ok=True)
            self._dropped["cap"].inc()

    def _compact_index(self) -> None:
        index = self.folder / INDEX
        kept = []
        for line in index.read_bytes().splitlines():
            try:
                if json.loads(line)["id"] in self._records:
                    kept.append(line + b"\n")
            except (ValueError, KeyError, TypeError):
                pass
        temporary = self.folder / f"{_TEMPORARY}{INDEX}"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(b"".join(kept))
            file.flush()
            os.fsync(file.fileno())
        os.rename(temporary, index)
        os.fsync(self._folder_fd)
        os.close(self._index_fd)
        self._index_fd = os.open(index, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._index_bytes, self._index_lines = sum(map(len, kept)), len(kept)
