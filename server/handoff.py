"""The seam between primaries and the shadow engine: one shared-memory file, no locks, no waiting.

The file (a memfd, inherited by forked workers and passed to the engine process) holds:
- the routing table: per model (shadow %, serve %, rolled back, candidate circuit open), written by
  the engine's control plane and read by every primary on every request;
- the engine's heartbeat, so a supervisor can tell a hung engine from a busy one;
- one hand-off ring per primary worker: single producer (the worker's event loop), single consumer
  (the engine). A primary never waits: when its ring is full the hand-off is skipped and counted.

Positions are 64-bit counters that only grow; the producer publishes its write position after the
record's bytes, the consumer its read position after it is done with them (x86-64 keeps stores in order).
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import os
import struct
import time
from typing import Iterator

import numpy as np

from server.tensors import V2_TO_NUMPY, v2_datatype

ROUTING_COLUMNS = 4  # shadow %, serve %, rolled back, circuit open
SHADOW, SERVE, ROLLED_BACK, CIRCUIT_OPEN = range(ROUTING_COLUMNS)

_ALIGN = 8
_WRAP = 0xFFFFFFFF
_RECORD_HEAD = struct.Struct("<I4x")  # body length; 8 bytes keep the body aligned
_HEAD = struct.Struct("<BHdddH")  # kind, model index, wall time, legacy and candidate seconds, request-id length
_TENSOR = struct.Struct("<HBBQ")  # name length, dtype length, ndim, byte count

# What a record asks of the engine.
SHADOW_CALL = 0  # the legacy answered: call the candidate, then compare
SERVED = 1  # the candidate answered the client and the legacy ran beside it: compare
SERVED_FAILED = 2  # a candidate call for a client failed or was skipped: a candidate failure for the guard
FAILURE_REASONS = ("timeout", "error", "circuit_open")


def _round_up(size: int) -> int:
    return (size + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclasses.dataclass
class Handoff:
    """One record read back by the engine: arrays are copies, the ring space is already reused."""

    kind: int
    model: int
    time_unix: float
    request_id: str
    inputs: dict[str, np.ndarray]
    legacy: dict[str, np.ndarray]
    candidate: dict[str, np.ndarray]
    legacy_s: float = math.nan  # how long the primary's legacy call took; NaN: none
    candidate_s: float = math.nan  # how long the primary's candidate call took (served records)
    reason: str = ""  # SERVED_FAILED: one of FAILURE_REASONS
    source: "Ring | None" = None  # the ring it came through

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for group in (self.inputs, self.legacy, self.candidate) for array in group.values())

    def judged(self) -> None:
        """A SERVED record's verdict reached the guard (or never will): its primary may serve one more."""
        if self.kind == SERVED and self.source is not None:
            self.source.judged()


class Ring:
    """A single-producer, single-consumer byte ring over a slice of the shared file."""

    def __init__(self, buffer: mmap.mmap, offset: int, size: int) -> None:
        # write, read, served answers handed over (by the primary), served answers judged (by the engine)
        self._positions = np.frombuffer(buffer, np.uint64, 4, offset)
        self._data = memoryview(buffer)[offset + 32: offset + 32 + size]
        self._bytes = np.frombuffer(buffer, np.uint8, size, offset + 32)
        self.size = size

    @staticmethod
    def footprint(size: int) -> int:
        return 32 + size

    @property
    def unjudged(self) -> int:
        """Candidate answers clients got through this ring's primary that the guard has not judged yet."""
        return int(self._positions[2]) - int(self._positions[3])

    def served(self, count: int = 1) -> None:
        """The primary gave a client a candidate answer (-1: whose hand-off will never come after all)."""
        self._positions[2] += count

    def judged(self) -> None:
        self._positions[3] += 1

    def forget_unjudged(self) -> None:
        """A new engine cannot judge what a dead one took: count it judged, so primaries do not wait for it."""
        self._positions[3] = self._positions[2]

    @property
    def used(self) -> int:
        return int(self._positions[0] - self._positions[1])

    # -- producer ------------------------------------------------------------------------------

    def put(self, kind: int, model: int, request_id: str, groups: tuple[dict[str, np.ndarray], ...],
            reason: str = "", legacy_s: float = math.nan, candidate_s: float = math.nan) -> bool:
        """Copy one record in; False (nothing written) when it does not fit now."""
        rid = (reason or request_id).encode()[:1024]
        groups = groups + ({},) * (3 - len(groups))
        parts = [[_tensor_header(name, array) for name, array in group.items()] for group in groups]
        length = _HEAD.size + len(rid)
        for group in parts:
            length += 2
            for header, array in group:
                length = _round_up(length + len(header)) + array.nbytes
        total = _round_up(_RECORD_HEAD.size + length)
        write, read = int(self._positions[0]), int(self._positions[1])
        offset = write % self.size
        tail = self.size - offset
        needed = total + (tail if tail < total else 0)  # a record never wraps: skip the tail when it does not fit
        if total > self.size // 2 or write + needed - read > self.size:
            return False
        if tail < total:
            _RECORD_HEAD.pack_into(self._data, offset, _WRAP)
            write += tail
            offset = 0
        position = offset + _RECORD_HEAD.size
        _RECORD_HEAD.pack_into(self._data, offset, length)
        _HEAD.pack_into(self._data, position, kind, model, time.time(), legacy_s, candidate_s, len(rid))
        position += _HEAD.size
        self._data[position: position + len(rid)] = rid
        position += len(rid)
        for group in parts:
            struct.pack_into("<H", self._data, position, len(group))
            position += 2
            for header, array in group:
                self._data[position: position + len(header)] = header
                position = _round_up(position + len(header))
                if array.nbytes:
                    self._bytes[position: position + array.nbytes] = array.reshape(-1).view(np.uint8)
                position += array.nbytes
        self._positions[0] = write + total
        return True

    # -- consumer ------------------------------------------------------------------------------

    def drain(self, limit: int = 1 << 30) -> Iterator[Handoff]:
        """Records in order, each released as soon as it is decoded."""
        count = 0
        while count < limit:
            write, read = int(self._positions[0]), int(self._positions[1])
            if read >= write:
                return
            offset = read % self.size
            tail = self.size - offset
            if _RECORD_HEAD.unpack_from(self._data, offset)[0] == _WRAP:
                self._positions[1] = read + tail
                continue
            (length,) = _RECORD_HEAD.unpack_from(self._data, offset)
            record = self._decode(offset + _RECORD_HEAD.size)
            self._positions[1] = read + _round_up(_RECORD_HEAD.size + length)
            count += 1
            yield record

    def _decode(self, position: int) -> Handoff:
        kind, model, when, legacy_s, candidate_s, rid_length = _HEAD.unpack_from(self._data, position)
        position += _HEAD.size
        text = bytes(self._data[position: position + rid_length]).decode(errors="replace")
        position += rid_length
        groups = []
        for _ in range(3):
            (count,) = struct.unpack_from("<H", self._data, position)
            position += 2
            group = {}
            for _ in range(count):
                name_length, dtype_length, ndim, nbytes = _TENSOR.unpack_from(self._data, position)
                position += _TENSOR.size
                name = bytes(self._data[position: position + name_length]).decode()
                position += name_length
                dtype = bytes(self._data[position: position + dtype_length]).decode()
                position += dtype_length
                shape = struct.unpack_from(f"<{ndim}q", self._data, position)
                position = _round_up(position + 8 * ndim)
                group[name] = _array(self._bytes[position: position + nbytes], dtype, shape)
                position += nbytes
            groups.append(group)
        failed = kind == SERVED_FAILED
        return Handoff(kind, model, when, "" if failed else text, *groups, legacy_s=legacy_s, candidate_s=candidate_s,
                       reason=text if failed else "", source=self)


def _tensor_header(name: str, array: np.ndarray) -> tuple[bytes, np.ndarray]:
    if array.dtype == object:  # BYTES tensors: length-prefixed elements, as KServe sends them
        from tritonclient.utils import serialize_byte_tensor

        shape = array.shape
        array, dtype = np.frombuffer(serialize_byte_tensor(array).item(), np.uint8), "O"
    else:
        shape, array, dtype = array.shape, np.ascontiguousarray(array), v2_datatype(array)
    name_bytes, dtype_bytes = name.encode(), dtype.encode()
    head = _TENSOR.pack(len(name_bytes), len(dtype_bytes), len(shape), array.nbytes) + name_bytes + dtype_bytes
    return head + struct.pack(f"<{len(shape)}q", *shape), array


def _array(data: np.ndarray, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == "O":
        from tritonclient.utils import deserialize_bytes_tensor

        return deserialize_bytes_tensor(data.tobytes()).reshape(shape)
    return data.view(V2_TO_NUMPY[dtype]).reshape(shape).copy()


def stage_of(shadow_percent: float, serve_percent: float) -> str:
    if serve_percent >= 100:
        return "cutover"
    if serve_percent > 0:
        return "canary"
    return "shadow" if shadow_percent > 0 else "off"


class Route:
    """One model's row of the routing table: what every primary follows, what the control plane sets."""

    def __init__(self, row: np.ndarray) -> None:
        self.row = row

    @property
    def shadow_percent(self) -> float:
        return float(self.row[SHADOW])

    @property
    def serve_percent(self) -> float:
        return float(self.row[SERVE])

    @property
    def rolled_back(self) -> bool:
        return bool(self.row[ROLLED_BACK])

    @property
    def stage(self) -> str:
        return "rolled_back" if self.rolled_back else stage_of(self.shadow_percent, self.serve_percent)

    @property
    def circuit_open(self) -> bool:
        return bool(self.row[CIRCUIT_OPEN])

    def set(self, shadow_percent: float, serve_percent: float, rolled_back: bool = False) -> None:
        self.row[[SHADOW, SERVE, ROLLED_BACK]] = (shadow_percent, serve_percent, float(rolled_back))

    def set_circuit_open(self, is_open: bool) -> None:
        self.row[CIRCUIT_OPEN] = float(is_open)


class Routed:
    """A model pair whose stage and percentages are its row of the routing table."""

    route: Route

    @property
    def shadow_percent(self) -> float:
        return self.route.shadow_percent

    @property
    def serve_percent(self) -> float:
        return self.route.serve_percent

    @property
    def stage(self) -> str:
        return self.route.stage


class SharedState:
    """The shared file: routing table, heartbeat, and per primary worker a loop watch and a ring."""

    def __init__(self, fd: int, models: int, rings: int, ring_bytes: int) -> None:
        ring_bytes = _round_up(ring_bytes)
        self.fd, self.models, self.ring_count, self.ring_bytes = fd, models, rings, ring_bytes
        routing_bytes = _round_up(max(1, models) * ROUTING_COLUMNS * 8)
        size = routing_bytes + 8 + rings * 8 + rings * Ring.footprint(ring_bytes)
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        self._buffer = mmap.mmap(fd, size)
        self.routing = np.frombuffer(self._buffer, np.float64, models * ROUTING_COLUMNS).reshape(models, ROUTING_COLUMNS)
        self._heartbeat = np.frombuffer(self._buffer, np.float64, 1, routing_bytes)
        self._hung_after = np.frombuffer(self._buffer, np.float64, rings, routing_bytes + 8)  # by worker; 0: not blocked
        start = routing_bytes + 8 + rings * 8
        self.rings = [Ring(self._buffer, start + i * Ring.footprint(ring_bytes), ring_bytes) for i in range(rings)]

    @classmethod
    def create(cls, percentages: list[tuple[float, float]], rings: int, ring_bytes: int) -> "SharedState":
        """A new file whose routing table starts at `percentages` (shadow, serve) per model."""
        fd = os.memfd_create("shadowserve-handoff", 0)  # pages are only taken as records use them
        state = cls(fd, len(percentages), rings, ring_bytes)
        for route, (shadow, serve) in zip(state.routes, percentages):
            route.set(shadow, serve)
        return state

    @property
    def routes(self) -> list[Route]:
        return [Route(row) for row in self.routing]

    def beat(self) -> None:
        self._heartbeat[0] = time.monotonic()

    @property
    def heartbeat(self) -> float:
        return float(self._heartbeat[0])

    def loop_watch(self, worker: int) -> "LoopWatch":
        return LoopWatch(self._hung_after[worker:worker + 1])

    def hung_workers(self, now: float) -> list[int]:
        """Workers whose event loop an inference has held past the time their `LoopWatch` gave."""
        return [worker for worker, after in enumerate(self._hung_after) if 0 < after < now]

    @property
    def engine_address(self) -> str:
        """Where the engine serves in-process candidates to primaries: a socket named after this shared file."""
        return f"unix-abstract:shadowserve-candidates-{os.fstat(self.fd).st_ino}"

    def describe(self) -> dict[str, int]:
        """What the engine process needs to map the same file (its descriptor is passed along)."""
        return {"fd": self.fd, "models": self.models, "rings": self.ring_count, "ring_bytes": self.ring_bytes}


class LoopWatch:
    """Where a worker tells the process that forked it that an inference holds its event loop, and until when.

    Past that time (monotonic, the same clock in every process) the worker counts as hung: the loop can
    answer nothing, not even health checks, and only a new worker serves again.
    """

    def __init__(self, slot: np.ndarray) -> None:
        self._slot = slot

    def blocked(self, hung_after: float) -> None:
        self._slot[0] = hung_after

    def free(self) -> None:
        self._slot[0] = 0.0


class HandoffWriter:
    """A primary's end: put records in its ring and wake the engine when the ring was empty."""

    def __init__(self, ring: Ring, wake_fd: int) -> None:
        self.ring = ring
        self.wake_fd = wake_fd
        os.set_blocking(wake_fd, False)

    def put(self, kind: int, model: int, request_id: str, groups: tuple[dict[str, np.ndarray], ...] = (),
            reason: str = "", legacy_s: float = math.nan, candidate_s: float = math.nan) -> bool:
        was_empty = self.ring.used == 0
        if not self.ring.put(kind, model, request_id, groups, reason, legacy_s, candidate_s):
            return False
        if was_empty:
            try:
                os.write(self.wake_fd, b"\0")
            except BlockingIOError:  # the engine has wake-ups enough waiting
                pass
        return True
