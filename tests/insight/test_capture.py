"""Capture: what is kept and dropped, the files it writes, the cap, and crashes mid-write."""

from __future__ import annotations

import json
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from server.capture import INDEX, Capture, find_record, read_records
from server.compare import MATCH, MISMATCH, compare
from server.config import CaptureConfig, parse_config
from server.errors import ConfigError
from server.metrics import Metrics
from tests.conftest import sample
from tests.insight.conftest import ROOT, capture_pair, images, pair_spec, shadowserve


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def dropped(registry: CollectorRegistry, reason: str, model: str = "classifier") -> float:
    return sample(registry, "shadowserve_capture_dropped_total", model=model, reason=reason)


@pytest.fixture(scope="module")
def answers(bgr_capture):
    """One real request of the RGB/BGR-swapped port: its input, both answers and their comparison."""
    tensors = read_records(bgr_capture.folder)[0].load()
    comparison = compare(tensors.legacy, tensors.candidate, ["probabilities"], frozenset(["probabilities"]))
    assert comparison.verdict == MISMATCH
    return dict(inputs=tensors.inputs, legacy=tensors.legacy, candidate=tensors.candidate, comparison=comparison)


def offer(writer: Capture, answers: dict, index: int = 0, comparison=None) -> bool:
    return writer.offer(**{**answers, "comparison": comparison or answers["comparison"]}, stage="shadow",
                        request_id=f"r{index}", routing_key=None, time_unix=1.0 + index)


async def test_real_mismatches_are_captured_with_inputs_answers_and_measures(ports, tmp_path):
    registry = CollectorRegistry()
    batch = images(30, seed=8)
    kept = await capture_pair(tmp_path / "cap", pair_spec(ports, ports.bgr), batch, registry, matches_percent=0)
    records = read_records(tmp_path / "cap")
    assert 0 < kept == len(records) < 30  # the swapped port agrees on some confident images, never kept
    assert sample(registry, "shadowserve_capture_records_total", model="classifier") == kept
    for record in records:
        tensors = record.load()
        index = int(record.meta["request_id"].removeprefix("req-"))
        np.testing.assert_array_equal(tensors.inputs["image"], batch[index : index + 1])
        again = compare(tensors.legacy, tensors.candidate, ["probabilities"], frozenset(["probabilities"]))
        assert record.verdict == again.verdict == MISMATCH
        measures = record.outputs["probabilities"]
        assert measures["max_abs"] == pytest.approx(again.outputs["probabilities"].max_abs)
        assert measures["class_scores"] is True and measures["top1_total"] == 1
        assert record.meta["stage"] == "shadow" and record.meta["routing_key"] == f"user-{index % 7}"
        assert record.meta["time_unix"] == 1_700_000_000.0 + index
    assert mode(tmp_path / "cap") == 0o700
    assert {mode(path) for path in (tmp_path / "cap").iterdir()} == {0o600}


async def test_capture_ls_and_show_print_differences_and_top_k(bgr_capture):
    records = read_records(bgr_capture.folder)
    listing = shadowserve("capture", "ls", bgr_capture.folder)
    assert listing.returncode == 0, listing.stderr
    assert all(record.id in listing.stdout for record in records)
    record = records[0]
    tensors = record.load()
    shown = shadowserve("capture", "show", "--json", bgr_capture.folder, record.id[:-2])  # a unique prefix will do
    assert shown.returncode == 0, shown.stderr
    described = json.loads(shown.stdout)["outputs"]["probabilities"]
    legacy, candidate = tensors.legacy["probabilities"][0], tensors.candidate["probabilities"][0]
    largest = described["largest_differences"][0]
    assert largest["index"] == [0, int(np.abs(candidate - legacy).argmax())]
    assert largest["abs_diff"] == pytest.approx(float(np.abs(candidate - legacy).max()))
    assert described["top_k"]["legacy"][0][0][0] == int(legacy.argmax())
    assert described["top_k"]["candidate"][0][0][0] == int(candidate.argmax())
    assert described["measures"]["rel_l2"] == pytest.approx(record.outputs["probabilities"]["rel_l2"])
    text = shadowserve("capture", "show", bgr_capture.folder, record.id)
    assert "largest differences" in text.stdout and f"row 0: legacy    {int(legacy.argmax())}:" in text.stdout
    missing = shadowserve("capture", "show", bgr_capture.folder, "nope")
    assert missing.returncode == 2 and "no record 'nope'" in missing.stderr


def test_matches_are_sampled_and_records_beyond_the_rate_are_dropped(answers, tmp_path):
    registry, now = CollectorRegistry(), [100.0]
    config = CaptureConfig(dir=tmp_path / "cap", max_per_second=4, matches_percent=0)
    writer = Capture(config, "classifier", Metrics(registry), clock=lambda: now[0])
    for reason in ("rate_limit", "queue_full", "cap", "error"):
        assert registry.get_sample_value("shadowserve_capture_dropped_total",
                                         {"model": "classifier", "reason": reason}) == 0.0  # exported from the start
    match = compare(answers["legacy"], answers["legacy"], ["probabilities"])
    assert match.verdict == MATCH
    assert not offer(writer, answers, comparison=match)  # no control sample asked for: not kept, not a drop
    kept = [offer(writer, answers, i) for i in range(6)]  # a burst of 6 at one instant: the bucket holds 4
    now[0] += 0.5  # refills 2
    kept += [offer(writer, answers, i) for i in range(6, 9)]
    writer.close()
    assert kept == [True] * 4 + [False] * 2 + [True] * 2 + [False]
    assert dropped(registry, "rate_limit") == 3
    assert len(read_records(tmp_path / "cap")) == 6
    assert sample(registry, "shadowserve_capture_records_total", model="classifier") == 6
    sampled = Capture(config.model_copy(update={"dir": tmp_path / "all", "matches_percent": 100}), "classifier",
                      Metrics(CollectorRegistry()))
    assert offer(sampled, answers, comparison=match)
    sampled.close()
    assert [record.verdict for record in read_records(tmp_path / "all")] == [MATCH]


def test_a_rate_below_one_a_second_still_writes_one_at_a_time(answers, tmp_path):
    now = [0.0]
    writer = Capture(CaptureConfig(dir=tmp_path / "cap", max_per_second=0.5), "classifier", Metrics(CollectorRegistry()),
                     clock=lambda: now[0])
    assert [offer(writer, answers, 0), offer(writer, answers, 1)] == [True, False]
    now[0] += 1.0
    assert not offer(writer, answers, 2)
    now[0] += 1.0
    assert offer(writer, answers, 3)
    writer.close()
    assert [r.meta["request_id"] for r in read_records(tmp_path / "cap")] == ["r0", "r3"]


def test_a_full_write_queue_is_a_counted_drop(answers, tmp_path):
    entered, release = threading.Event(), threading.Event()

    class StalledDisk(Capture):
        queue_size = 2

        def _write(self, job) -> None:
            entered.set()
            assert release.wait(60)
            super()._write(job)

    registry = CollectorRegistry()
    writer = StalledDisk(CaptureConfig(dir=tmp_path / "cap", max_per_second=100), "classifier", Metrics(registry))
    assert offer(writer, answers, 0)
    assert entered.wait(60)  # the writer holds the first record; the queue is empty again
    assert [offer(writer, answers, i) for i in (1, 2, 3)] == [True, True, False]
    release.set()
    writer.close()
    assert dropped(registry, "queue_full") == 1
    assert [r.meta["request_id"] for r in read_records(tmp_path / "cap")] == ["r0", "r1", "r2"]


def test_the_size_cap_holds_under_sustained_mismatches(answers, tmp_path):
    folder, usage = tmp_path / "cap", []

    class Measured(Capture):
        queue_size = 1000

        def _publish(self, temporary: Path, final: Path) -> None:
            super()._publish(temporary, final)
            usage.append(sum(p.stat().st_size for p in folder.iterdir() if not p.name.startswith(".")))

    probe = Capture(CaptureConfig(dir=tmp_path / "probe", max_per_second=100), "classifier", Metrics(CollectorRegistry()))
    offer(probe, answers)
    probe.close()
    record_bytes = sum(p.stat().st_size for p in (tmp_path / "probe").iterdir())
    cap = record_bytes * 10

    registry = CollectorRegistry()
    writer = Measured(CaptureConfig(dir=folder, max_bytes=cap, max_per_second=1e6), "classifier", Metrics(registry))
    for index in range(300):
        assert offer(writer, answers, index)
    writer.close()
    assert len(usage) == 300 and max(usage) <= cap  # after every record made visible, the folder fits
    records = read_records(folder)
    assert 5 <= len(records) <= 10
    assert [r.meta["request_id"] for r in records] == [f"r{i}" for i in range(300 - len(records), 300)]  # newest kept
    assert dropped(registry, "cap") == 300 - len(records)
    lines = (folder / INDEX).read_bytes().splitlines()
    assert len(lines) <= 2 * len(records) + 1  # the index is compacted as records rotate away
    assert sum(p.stat().st_size for p in folder.iterdir() if not p.name.startswith(".")) <= cap


WRITER = """
import os, signal, sys
import numpy as np
from prometheus_client import CollectorRegistry
from server.capture import Capture
from server.compare import compare
from server.config import CaptureConfig
from server.metrics import Metrics

folder, crash_at, point = sys.argv[1], int(sys.argv[2]), sys.argv[3]
written = [0]

class Crashing(Capture):
    queue_size = 100

    def _publish(self, temporary, final):
        if point == "before_rename" and written[0] == crash_at:
            os.kill(os.getpid(), signal.SIGKILL)  # the record is fsynced under its temporary name only
        super()._publish(temporary, final)

    def _append_index(self, line):
        if point == "before_index" and written[0] == crash_at:
            os.kill(os.getpid(), signal.SIGKILL)  # the record is in place, its index line not yet
        super()._append_index(line)
        written[0] += 1

writer = Crashing(CaptureConfig(dir=folder, max_per_second=1e6), "m", Metrics(CollectorRegistry()))
rng = np.random.default_rng(0)
for index in range(crash_at + 3):
    legacy, candidate = {"p": rng.random((1, 6), np.float32)}, {"p": rng.random((1, 6), np.float32)}
    writer.offer(inputs={"x": rng.random((1, 3, 32, 32), np.float32)}, legacy=legacy, candidate=candidate,
                 comparison=compare(legacy, candidate, ["p"]), stage="shadow", request_id=str(index),
                 routing_key=None, time_unix=float(index))
writer.close()
"""


@pytest.mark.parametrize("point", ["before_rename", "before_index"])
def test_a_writer_killed_mid_record_leaves_no_torn_record(tmp_path, point):
    folder = tmp_path / "cap"
    killed = subprocess.run([sys.executable, "-c", WRITER, str(folder), "3", point], cwd=ROOT, timeout=120,
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    records = read_records(folder)
    assert [r.meta["request_id"] for r in records] == ["0", "1", "2"]
    for record in records:
        assert record.load().inputs["x"].shape == (1, 3, 32, 32)  # every listed record is whole
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == (1 if point == "before_rename" else 0)

    with open(folder / INDEX, "ab") as index:
        index.write(b'{"id": "torn-by-a-cra')  # and a crash in the middle of an index line
    registry = CollectorRegistry()
    writer = Capture(CaptureConfig(dir=folder, max_per_second=100), "m", Metrics(registry))
    legacy = {"p": np.ones((1, 6), np.float32)}
    assert writer.offer(inputs={"x": np.zeros((1, 3, 32, 32), np.float32)}, legacy=legacy,
                        candidate={"p": np.zeros((1, 6), np.float32)}, comparison=compare(legacy, {"p": legacy["p"] * 0}, ["p"]),
                        stage="shadow", request_id="after", routing_key=None, time_unix=9.0)
    writer.close()
    assert not [p for p in folder.iterdir() if p.name.startswith(".tmp-")]  # cleaned at start
    expected = ["0", "1", "2", "3", "after"] if point == "before_index" else ["0", "1", "2", "after"]
    assert [r.meta["request_id"] for r in read_records(folder)] == expected  # a renamed record regains its line
    assert find_record(folder, read_records(folder)[-1].id).load().legacy["p"].tolist() == [[1.0] * 6]


def test_a_capture_folder_has_one_writer_and_owner_only_modes(tmp_path):
    folder = tmp_path / "cap"
    folder.mkdir(mode=0o755)
    first = Capture(CaptureConfig(dir=folder), "a", Metrics(CollectorRegistry()))
    assert mode(folder) == 0o700
    with pytest.raises(ConfigError, match="in use by another writer"):
        Capture(CaptureConfig(dir=folder), "b", Metrics(CollectorRegistry()))
    first.close()
    Capture(CaptureConfig(dir=folder), "b", Metrics(CollectorRegistry())).close()
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(ConfigError, match="capture.dir"):
        Capture(CaptureConfig(dir=blocked / "cap"), "c", Metrics(CollectorRegistry()))


def test_capture_config_keys(ports, tmp_path):
    spec = pair_spec(ports, ports.faithful, capture={"dir": "captures/classifier"})
    config = parse_config({"models": [spec]}, "test config", base_dir=tmp_path)
    capture = config.models[0].capture
    assert capture.dir == tmp_path / "captures/classifier"  # relative to the config file
    assert (capture.max_bytes, capture.max_per_second, capture.matches_percent) == (1_000_000_000, 10, 1)
    with pytest.raises(ConfigError, match=r"models\[0\]\.capture\.matches_percent"):
        parse_config({"models": [pair_spec(ports, ports.faithful, capture={"dir": "c", "matches_percent": 101})]}, "t")
    with pytest.raises(ConfigError, match=r"models\[0\]\.capture\.max_byte"):
        parse_config({"models": [pair_spec(ports, ports.faithful, capture={"dir": "c", "max_byte": 5})]}, "t")
    twins = [pair_spec(ports, ports.faithful, name=name, capture={"dir": "same"}) for name in ("a", "b")]
    with pytest.raises(ConfigError, match="share capture dirs"):
        parse_config({"models": twins}, "t", base_dir=tmp_path)
