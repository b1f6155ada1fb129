"""Captures made the way the gateway makes them: real backends answer, `server.compare` judges, `Capture` writes."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from prometheus_client import CollectorRegistry

from adapters import create_backend
from server.capture import Capture
from server.compare import compare
from server.config import CaptureConfig, ModelPairConfig
from server.demo.mxnet_models import port_weights, save_torchscript, synthetic_images, torch_port
from server.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
TENSORS = {
    "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 3, 32, 32]}],
    "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 6], "class_scores": True}],
}


@dataclasses.dataclass(frozen=True)
class Ports:
    """The legacy MXNet classifier and PyTorch ports of it, faithful or with one classic bug each."""

    legacy: dict[str, Any]
    faithful: Path
    bgr: Path
    logits: Path
    weights: dict[str, np.ndarray]


@pytest.fixture(scope="session")
def nudged_port(ports, tmp_path_factory) -> Path:
    """A port whose weights are off by 0.1%, as a different BatchNorm epsilon folds in: close, never bit-exact."""
    rng = np.random.default_rng(0)
    nudged = {name: (w * (1 + 1e-3 * rng.standard_normal(w.shape))).astype(np.float32) for name, w in ports.weights.items()}
    return save_torchscript(torch_port(nudged), tmp_path_factory.mktemp("nudged") / "nudged.pt")


def uncertain_images(count: int, seed: int) -> np.ndarray:
    """Noise the classifier is unsure about: its scores sit far from 0 and 1, where small errors show."""
    return np.random.default_rng(seed).normal(0, 0.6, size=(count, 3, 32, 32)).astype(np.float32)


@pytest.fixture(scope="session")
def ports(demo_models, tmp_path_factory) -> Ports:
    weights = port_weights(demo_models.faithful_torch)
    logits = save_torchscript(torch_port(weights, softmax=False), tmp_path_factory.mktemp("ports") / "logits.pt")
    legacy = {"runtime": "mxnet", "symbol": str(demo_models.symbol), "params": str(demo_models.params),
              "tensor_names": {"image": "data"}, "input_names": ["data"]}
    return Ports(legacy, demo_models.faithful_torch, demo_models.buggy_torch, logits, weights)


def pair_spec(ports: Ports, candidate: Path, name: str = "classifier", **extra: Any) -> dict[str, Any]:
    return {"name": name, **TENSORS, "legacy": ports.legacy, "candidate": {"runtime": "torch", "path": str(candidate)},
            "shadow_percent": 100, **extra}


def write_config(path: Path, *pairs: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"models": list(pairs)}))
    return path


class UnhurriedCapture(Capture):
    """Room in the write queue for every record a test offers, so none is dropped as queue_full."""

    queue_size = 100_000


async def capture_pair(folder: Path, spec: dict[str, Any], images: np.ndarray, registry: CollectorRegistry | None = None,
                       **capture: Any) -> int:
    """Answer each image with the pair's real legacy and candidate, compare, offer to a Capture; records kept."""
    pair = ModelPairConfig.model_validate(spec)
    settings = CaptureConfig(dir=folder, **{"max_per_second": 1e6, "matches_percent": 100, **capture})
    writer = UnhurriedCapture(settings, pair.name, Metrics(registry or CollectorRegistry()))
    names = [output.name for output in pair.outputs]
    legacy = create_backend(pair.legacy, pair.inputs, pair.outputs)
    candidate = create_backend(pair.candidate, pair.inputs, pair.outputs)
    await legacy.load()
    await candidate.load()
    kept = 0
    try:
        for index in range(len(images)):
            inputs = {"image": images[index : index + 1]}
            legacy_out, candidate_out = await legacy.infer(inputs), await candidate.infer(inputs)
            comparison = compare(legacy_out, candidate_out, names, frozenset(["probabilities"]), pair.atol, pair.rtol,
                                 pair.top_k)
            kept += writer.offer(inputs=inputs, legacy=legacy_out, candidate=candidate_out, comparison=comparison,
                                 stage="shadow", request_id=f"req-{index}", routing_key=f"user-{index % 7}",
                                 time_unix=1_700_000_000.0 + index)
    finally:
        writer.close()
        await legacy.close()
        await candidate.close()
    return kept


def images(count: int, seed: int) -> np.ndarray:
    return synthetic_images(count, np.random.default_rng(seed))[0]


def shadowserve(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """The real command line, in its own process."""
    return subprocess.run([sys.executable, "-m", "server.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@dataclasses.dataclass(frozen=True)
class Captured:
    folder: Path
    kept: int  # records the capture kept
    buggy_config: Path  # the pair with the port that was captured
    fixed_config: Path  # the same pair with the faithful port


def _capture_of(ports: Ports, folder: Path, candidate: Path, **capture: Any) -> Captured:
    import asyncio

    kept = asyncio.run(capture_pair(folder / "capture", pair_spec(ports, candidate), images(60, seed=3), **capture))
    return Captured(folder / "capture", kept, write_config(folder / "buggy.yaml", pair_spec(ports, candidate)),
                    write_config(folder / "fixed.yaml", pair_spec(ports, ports.faithful)))


@pytest.fixture(scope="session")
def bgr_capture(ports, tmp_path_factory) -> Captured:
    """Mismatches of the RGB/BGR-swapped port, captured as the gateway would (no matches kept)."""
    return _capture_of(ports, tmp_path_factory.mktemp("bgr"), ports.bgr, matches_percent=0)


@pytest.fixture(scope="session")
def logits_capture(ports, tmp_path_factory) -> Captured:
    """Mismatches of the port that returns logits instead of probabilities."""
    return _capture_of(ports, tmp_path_factory.mktemp("logits"), ports.logits, matches_percent=0)


@pytest.fixture(scope="session")
def faithful_capture(ports, tmp_path_factory) -> Captured:
    """The faithful port: everything matches, kept as control samples."""
    return _capture_of(ports, tmp_path_factory.mktemp("faithful"), ports.faithful, matches_percent=100)
