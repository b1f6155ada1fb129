"""The in-process runtimes on their own: MXNet export files, TorchScript and torch.export programs."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
import torch

from adapters import backend_class, base, create_backend
from server.config import MXNetConfig, TensorConfig, TorchConfig
from server.demo.mxnet_models import synthetic_images, torch_port
from server.errors import BackendError, BackendTimeout, ConfigError
from server.handoff import LoopWatch

IMAGE = TensorConfig(name="image", datatype="FP32", shape=[-1, 3, 32, 32])
PROBS = TensorConfig(name="probabilities", datatype="FP32", shape=[-1, 6], class_scores=True)


def mxnet_backend(models, **extra):
    config = MXNetConfig(runtime="mxnet", symbol=models.symbol, params=models.params, tensor_names={"image": "data"}, **extra)
    return create_backend(config, [IMAGE], [PROBS])


@pytest.fixture(scope="module")
def exported_program(demo_models, tmp_path_factory):
    """The faithful port as a torch.export program with a dynamic batch dimension."""
    weights = {name: tensor.numpy() for name, tensor in torch.jit.load(str(demo_models.faithful_torch)).state_dict().items()}
    eager = torch_port(weights)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(eager, (torch.zeros(2, 3, 32, 32),), dynamic_shapes=({0: batch},))
    path = tmp_path_factory.mktemp("export") / "port.pt2"
    torch.export.save(program, str(path))
    return path


async def test_mxnet_any_batch_size_matches_a_direct_call(demo_models):
    backend = mxnet_backend(demo_models)
    await backend.load()
    net = mx.gluon.SymbolBlock.imports(str(demo_models.symbol), ["data"], str(demo_models.params))
    for batch in (1, 5, 17):
        images, _ = synthetic_images(batch, np.random.default_rng(batch))
        outputs = await backend.infer({"image": images})
        assert list(outputs) == ["probabilities"]
        assert outputs["probabilities"].tobytes() == net(mx.nd.array(images)).asnumpy().tobytes()
    assert backend.describe() == {"runtime": "mxnet", "context": "cpu"}
    await backend.close()


async def test_torchscript_and_torch_export_programs_agree(demo_models, exported_program):
    images, _ = synthetic_images(7, np.random.default_rng(2))
    answers = []
    for path in (demo_models.faithful_torch, exported_program):
        backend = create_backend(TorchConfig(runtime="torch", path=path), [IMAGE], [PROBS])
        await backend.load()
        answers.append((backend.describe()["format"], (await backend.infer({"image": images}))["probabilities"]))
        await backend.close()
    assert [fmt for fmt, _ in answers] == ["torchscript", "torch.export"]
    np.testing.assert_allclose(answers[0][1], answers[1][1], atol=1e-6)
    assert answers[0][1].shape == (7, 6)


async def test_in_process_inference_has_a_deadline_and_a_call_past_it_never_runs(demo_models):
    backend = mxnet_backend(demo_models)
    await backend.load()
    ran = []
    run_blocking = backend.run_blocking
    backend.run_blocking = lambda inputs: ran.append(len(inputs)) or run_blocking(inputs)
    release = threading.Event()
    busy = backend._on_a_thread(release.wait)  # the one inference thread is busy until released
    images, _ = synthetic_images(1, np.random.default_rng(0))
    with pytest.raises(BackendTimeout, match="exceeded 0.05s"):
        await backend.infer({"image": images}, timeout_s=0.05)
    release.set()
    assert await busy is True
    assert (await backend.infer({"image": images}))["probabilities"].shape == (1, 6)
    assert ran == [1]  # the call that timed out while queued was dropped, not run late
    await backend.close()


class Timed:
    """Wraps a backend's `run_blocking`: how long each call takes (`seconds` per image), and where it ran."""

    def __init__(self, backend, watch_slot: np.ndarray) -> None:
        self.run_blocking, self.slot, self.seconds = backend.run_blocking, watch_slot, 0.0
        self.calls: list[tuple[bool, float]] = []  # (on the event loop's thread, the watch while running)
        self.loop_thread = threading.get_ident()
        backend.run_blocking = self

    def __call__(self, inputs):
        self.calls.append((threading.get_ident() == self.loop_thread, float(self.slot[0])))
        time.sleep(self.seconds * len(inputs["data"]))
        return self.run_blocking(inputs)

    def places(self) -> list[str]:
        return ["loop" if on_loop else "thread" for on_loop, _ in self.calls]


def watched(backend) -> Timed:
    """`backend` given a watch, as a worker of `serve` gives its legacy, with its calls timed."""
    timed = Timed(backend, np.zeros(1))
    backend.run_on_loop_when_fast(LoopWatch(timed.slot))
    return timed


async def test_a_watched_one_thread_backend_runs_calls_expected_to_be_fast_on_the_event_loop(demo_models, monkeypatch):
    monkeypatch.setattr(base, "ON_LOOP_UP_TO_S", 0.05)
    slot = np.zeros(1)
    backend = mxnet_backend(demo_models, timeout_s=7)
    await backend.load()
    timed = Timed(backend, slot)
    one, four = (synthetic_images(n, np.random.default_rng(n))[0] for n in (1, 4))
    await backend.infer({"image": one})
    assert timed.places() == ["thread"]  # not watched: never on the loop
    backend.run_on_loop_when_fast(LoopWatch(slot))
    before = time.monotonic()
    for _ in range(2):
        await backend.infer({"image": one})
    assert timed.places()[1:] == ["loop", "loop"]
    assert all(before + 7 + base.HUNG_GRACE_S <= hung_after <= time.monotonic() + 7 + base.HUNG_GRACE_S
               for _, hung_after in timed.calls[1:])  # the supervisor was told while each held the loop
    assert slot[0] == 0.0 and timed.calls[0][1] == 0.0
    timed.seconds = 0.03  # per image: one image is still under 0.05 s, four are not
    await backend.infer({"image": one})
    await backend.infer({"image": four})
    await backend.infer({"image": one})
    assert timed.places()[3:] == ["loop", "thread", "loop"]
    with pytest.raises(BackendTimeout, match="exceeded 0.01s"):  # ran to its end on the loop, then failed as late
        await backend.infer({"image": one}, timeout_s=0.01)
    assert timed.places()[6:] == ["loop"]
    timed.seconds = 0.1
    await backend.infer({"image": one})  # one slow call: the next few dozen go to the thread
    timed.seconds = 0.0
    while timed.places()[-1] == "thread" or len(timed.calls) == 8:
        assert len(timed.calls) < 1000, "back on the loop once fast calls have worn the slow one off"
        await backend.infer({"image": one})
    assert timed.places()[7] == "loop" and len(timed.calls) > 8 + 60  # 0.99 ** 60 > 0.5: still over 0.05 s
    await backend.close()


async def test_a_call_waits_for_the_thread_while_it_has_work_so_the_model_never_runs_twice_at_once(
        demo_models, monkeypatch):
    monkeypatch.setattr(base, "ON_LOOP_UP_TO_S", 0.05)  # a first, cold call may take more than 5 ms
    backend = mxnet_backend(demo_models)
    await backend.load()
    timed = watched(backend)
    images, _ = synthetic_images(1, np.random.default_rng(0))
    for _ in range(2):
        await backend.infer({"image": images})
    assert timed.places() == ["thread", "loop"]
    started, release = threading.Event(), threading.Event()
    busy = backend._on_a_thread(lambda: started.set() or release.wait())
    assert await asyncio.to_thread(started.wait, 30)
    waiting = asyncio.ensure_future(backend.infer({"image": images}))
    await asyncio.sleep(0.05)
    assert not waiting.done() and len(timed.calls) == 2  # queued behind the thread's work, not run on the loop
    release.set()
    assert (await waiting)["probabilities"].shape == (1, 6) and await busy is True
    assert timed.places() == ["thread", "loop", "thread"]
    await backend.close()


async def test_a_backend_of_several_threads_never_runs_on_the_event_loop(demo_models):
    backend = mxnet_backend(demo_models, threads=2)
    await backend.load()
    timed = watched(backend)
    images, _ = synthetic_images(1, np.random.default_rng(0))
    for _ in range(3):
        await backend.infer({"image": images})
    assert timed.places() == ["thread"] * 3
    await backend.close()


async def test_closing_answers_the_calls_still_queued(demo_models):
    backend = mxnet_backend(demo_models)
    await backend.load()
    started, release = threading.Event(), threading.Event()
    busy = backend._on_a_thread(lambda: started.set() or release.wait())
    assert await asyncio.to_thread(started.wait, 30)
    images, _ = synthetic_images(1, np.random.default_rng(0))
    queued = asyncio.ensure_future(backend.infer({"image": images}, timeout_s=60))
    await asyncio.sleep(0)
    await backend.close()
    with pytest.raises(BackendError, match="the mxnet backend is closing"):
        await asyncio.wait_for(queued, 5)
    release.set()
    assert await busy is True


async def test_broken_model_files_fail_load_with_the_file_named(demo_models, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a model")
    backend = create_backend(TorchConfig(runtime="torch", path=garbage), [IMAGE], [PROBS])
    with pytest.raises(ConfigError, match="garbage.pt is neither TorchScript"):
        await backend.load()

    truncated = tmp_path / "net-0000.params"
    truncated.write_bytes(demo_models.params.read_bytes()[:100])
    backend = create_backend(MXNetConfig(runtime="mxnet", symbol=demo_models.symbol, params=truncated,
                                         tensor_names={"image": "data"}), [IMAGE], [PROBS])
    with pytest.raises(ConfigError, match="net-0000.params failed to load"):
        await backend.load()

    backend = create_backend(MXNetConfig(runtime="mxnet", symbol=demo_models.symbol, params=demo_models.params,
                                         tensor_names={"image": "data"}), [IMAGE], [PROBS, PROBS.model_copy(update={"name": "extra"})])
    with pytest.raises(ConfigError, match="has 1 outputs .* the pair declares 2"):
        await backend.load()


def test_unknown_and_missing_runtimes_are_config_errors(monkeypatch):
    with pytest.raises(ConfigError, match="unknown runtime 'tensorflow'"):
        backend_class("tensorflow")
    import adapters

    monkeypatch.setitem(adapters.RUNTIMES, "ghost", "adapters.not_installed:Ghost")
    with pytest.raises(ConfigError, match="runtime 'ghost' is not installed here"):
        backend_class("ghost")


CHILD = """
import asyncio, os, sys
import numpy as np
from adapters import create_backend
from server.config import MXNetConfig, TensorConfig

async def main():
    image = TensorConfig(name="image", datatype="FP32", shape=[-1, 3, 32, 32])
    probs = TensorConfig(name="probabilities", datatype="FP32", shape=[-1, 6])
    config = MXNetConfig(runtime="mxnet", symbol=sys.argv[1], params=sys.argv[2], tensor_names={"image": "data"})
    backend = create_backend(config, [image], [probs])
    await backend.load()
    images = np.load(sys.argv[3])
    sys.stdout.buffer.write((await backend.infer({"image": images}))["probabilities"].tobytes())
    print(os.environ.get("MXNET_ENGINE_TYPE"), file=sys.stderr)
    await backend.close()

asyncio.run(main())
"""


@pytest.mark.parametrize("operator_choice", [None, "ThreadedEnginePerDevice"])
def test_a_cpu_mxnet_model_runs_its_ops_on_the_inference_thread_unless_the_operator_chose(
        demo_models, tmp_path, operator_choice):
    images, _ = synthetic_images(3, np.random.default_rng(4))
    np.save(tmp_path / "images.npy", images)
    env = {k: v for k, v in os.environ.items() if k != "MXNET_ENGINE_TYPE"}
    if operator_choice:
        env["MXNET_ENGINE_TYPE"] = operator_choice
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(demo_models.symbol), str(demo_models.params), str(tmp_path / "images.npy")],
        capture_output=True, env=env, cwd=Path(__file__).parents[2], timeout=120)
    assert child.returncode == 0, child.stderr.decode()[-2000:]
    assert child.stderr.decode().split()[-1] == (operator_choice or "NaiveEngine")
    if operator_choice is None:  # a line in MXNet's own format would break --log-format json
        assert b"start using engine" not in child.stderr, child.stderr.decode()
    net = mx.gluon.SymbolBlock.imports(str(demo_models.symbol), ["data"], str(demo_models.params))
    assert child.stdout == net(mx.nd.array(images)).asnumpy().tobytes()  # this process runs the threaded engine
