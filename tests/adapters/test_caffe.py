"""The Caffe legacy runtime: real .prototxt + .caffemodel files, real OpenCV-DNN execution, PyTorch
ports as candidates, a real gateway driven by tritonclient over gRPC on loopback.

Tolerances of a `match`:
- `lenet` keeps the project's defaults (atol 1e-5, rtol 1e-4). Its output is probabilities, where
  OpenCV and the PyTorch port agree to ~1e-11.
- `bnnet` uses atol 2e-4. OpenCV and PyTorch sum the convolutions in different orders (and OpenCV
  folds BatchNorm + Scale into the weights), which leaves float32 differences of up to 6.7e-6 in
  `features`. Its head (weights up to ~30, biases up to ~90 that nearly cancel) amplifies them to
  5.3e-5 on `logits`, the worst over 512 images. 2e-4 leaves ~4x headroom for other CPUs' SIMD
  paths and is still 50x below the least any buggy port diverges per request (floor pooling, > 1e-2
  on logits).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio

from adapters.caffe import CaffeTransform, PycaffeExecutor
from adapters.caffe_files import CaffeGraph, read_mean_file, read_prototxt
from server.config import parse_config
from server.demo.caffe_models import write_caffemodel, write_mean_file
from server.demo.mxnet_models import synthetic_images
from server.errors import ConfigError
from tests.conftest import running_gateway, sample
from tests.server.test_demo import summary_rows
from tests.support.caffe_nets import (
    BNNET_PROTOTXT,
    CaffeNetFiles,
    write_bnnet,
    write_lenet,
)

BNNET_ATOL = 2e-4


@pytest.fixture(scope="session")
def lenet(tmp_path_factory) -> CaffeNetFiles:
    return write_lenet(tmp_path_factory.mktemp("caffe-lenet"))


@pytest.fixture(scope="session")
def bnnet(tmp_path_factory) -> CaffeNetFiles:
    return write_bnnet(tmp_path_factory.mktemp("caffe-bnnet"))


def images_for(count: int, seed: int = 7) -> np.ndarray:
    return synthetic_images(count, np.random.default_rng(seed))[0]


async def infer(client, model: str, batch: np.ndarray, outputs: list[str]) -> dict[str, np.ndarray]:
    tensor = triton_aio.InferInput("image", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    result = await client.infer(model, [tensor])
    return {name: result.as_numpy(name) for name in outputs}


async def drive(gateway, model: str, images: np.ndarray, batch: int, outputs: list[str]) -> dict[str, np.ndarray]:
    """Send `images` in batches, one request each, and return the answers concatenated."""
    async with triton_aio.InferenceServerClient(f"127.0.0.1:{gateway.grpc_port}") as client:
        answers = [await infer(client, model, images[i : i + batch], outputs) for i in range(0, len(images), batch)]
    return {name: np.concatenate([answer[name] for answer in answers]) for name in outputs}


async def compared(gateway, model: str, expected: int, timeout_s: float = 10.0) -> dict[str, float]:
    """Comparisons run after each reply: wait for `expected` of them, then return the verdict counts."""
    registry = gateway.registry
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    verdicts = ("match", "mismatch", "shape_mismatch")
    while sum(sample(registry, "shadowserve_comparisons_total", model=model, verdict=v) for v in verdicts) < expected:
        assert loop.time() < deadline, f"{model}: fewer than {expected} comparisons recorded"
        await asyncio.sleep(0.02)
    return {v: sample(registry, "shadowserve_comparisons_total", model=model, verdict=v) for v in verdicts}


def top1(gateway, model: str, agree: str) -> float:
    return sample(gateway.registry, "shadowserve_top1_agreement_total", model=model, output="probabilities", agree=agree)


def divergence_at_most(gateway, model: str, output: str, bound: str) -> float:
    """How many comparisons had a max |legacy - candidate| of at most `bound` (a histogram bucket)."""
    return sample(gateway.registry, "shadowserve_divergence_bucket", model=model, output=output, measure="max_abs", le=bound)


def direct_opencv(files: CaffeNetFiles, images: np.ndarray, layers: list[str]) -> list[np.ndarray]:
    """The model run by hand with cv2.dnn, the legacy service's preprocessing written out in numpy."""
    net = cv2.dnn.readNetFromCaffe(str(files.prototxt), str(files.caffemodel))
    net.enableWinograd(False)
    net.setInput(files.preprocess(images), "data")
    return [outputs[0] for outputs in net.forwardAndRetrieve(layers)]


# -- the legacy answer ------------------------------------------------------------------------


async def test_legacy_answers_exactly_as_a_direct_opencv_call_for_any_batch_size(lenet):
    images = images_for(1 + 2 + 5 + 16, seed=3)
    config = {"models": [{**lenet.pair(), "legacy": {**lenet.legacy, "threads": 2}}]}
    async with running_gateway(config) as gateway:
        async with triton_aio.InferenceServerClient(f"127.0.0.1:{gateway.grpc_port}") as client:
            bounds = [(0, 1), (1, 3), (3, 8), (8, 24)]
            # Concurrent requests: two inference threads, each with its own OpenCV net.
            answers = await asyncio.gather(*(infer(client, "lenet", images[a:b], ["probabilities"]) for a, b in bounds))
        for (a, b), answer in zip(bounds, answers):
            expected = direct_opencv(lenet, images[a:b], ["prob"])[0]
            assert answer["probabilities"].shape == (b - a, 6)
            assert answer["probabilities"].tobytes() == expected.tobytes()
        assert await compared(gateway, "lenet", 4) == {"match": 4, "mismatch": 0, "shape_mismatch": 0}


async def test_operators_see_which_executor_really_ran(lenet, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "caffe", None)  # no pycaffe on this host, whatever is installed
    caplog.set_level(logging.INFO)
    async with running_gateway({"models": [{**lenet.pair(), "expose_backend_details": True}]}) as gateway, \
            triton_aio.InferenceServerClient(f"127.0.0.1:{gateway.grpc_port}") as client:
        metadata = await client.get_model_metadata("lenet")
        parameters = (await client.get_model_config("lenet")).config.parameters
    assert metadata.platform == "shadowserve (legacy=caffe/opencv, candidate=torch)"
    assert parameters["legacy_runtime"].string_value == "caffe"
    assert parameters["legacy_executor"].string_value == "opencv"
    assert parameters["legacy_executor_version"].string_value == cv2.__version__
    assert parameters["legacy_preprocessing"].string_value.startswith("channel_swap=[2, 1, 0], mean_values=[")
    assert "executor auto chose opencv (pycaffe unavailable: ModuleNotFoundError" in caplog.text
    assert "legacy backend loaded {'runtime': 'caffe', 'executor': 'opencv'" in caplog.text


async def test_any_named_blob_is_an_output_with_caffe_in_place_meaning(bnnet):
    images = images_for(6, seed=4)
    outputs = ["probabilities", "logits", "features"]
    async with running_gateway({"models": [bnnet.pair(atol=BNNET_ATOL)]}) as gateway:
        answer = await drive(gateway, "bnnet", images, 6, outputs)
    # `res` is last written in place by layer res_relu: Caffe's blob holds the value after the ReLU.
    after_relu, before_relu, logits, prob = direct_opencv(bnnet, images, ["res_relu", "res", "ip1", "prob"])
    assert answer["features"].tobytes() == after_relu.tobytes()
    assert answer["features"].min() == 0.0 and before_relu.min() < 0.0
    assert answer["logits"].tobytes() == logits.tobytes()
    assert answer["probabilities"].tobytes() == prob.tobytes()


# -- a faithful port matches; each classic migration bug shows in the metrics -------------------


@pytest.mark.parametrize("net", ["lenet", "bnnet"])
async def test_faithful_port_matches_on_every_request(net, request):
    files: CaffeNetFiles = request.getfixturevalue(net)
    images = images_for(40, seed=5)
    atol = BNNET_ATOL if net == "bnnet" else 1e-5
    async with running_gateway({"models": [files.pair(atol=atol)]}) as gateway:
        for batch in (1, 3, 8):
            await drive(gateway, net, images[:24], batch, ["probabilities"])
        requests = 24 + 8 + 3
        assert await compared(gateway, net, requests) == {"match": requests, "mismatch": 0, "shape_mismatch": 0}
        assert top1(gateway, net, "true") == 3 * 24 and top1(gateway, net, "false") == 0
        for output in (tensor["name"] for tensor in files.outputs):
            assert divergence_at_most(gateway, net, output, "0.001") == requests


async def run_migration_bug(files: CaffeNetFiles, bug: str, atol: float) -> tuple[dict[str, float], float, float, object]:
    """Shadow 64 images, 8 per request, through a port with `bug`; returns verdicts and top-1 counts."""
    images = images_for(64, seed=6)
    async with running_gateway({"models": [files.pair(bug, atol=atol)]}) as gateway:
        await drive(gateway, files.name, images, 8, ["probabilities"])
        verdicts = await compared(gateway, files.name, 8)
        return verdicts, top1(gateway, files.name, "true"), top1(gateway, files.name, "false"), gateway


async def test_floor_instead_of_ceil_pooling_is_caught(bnnet):
    verdicts, agree, disagree, gateway = await run_migration_bug(bnnet, "floor_pooling", BNNET_ATOL)
    assert verdicts == {"match": 0, "mismatch": 8, "shape_mismatch": 0}
    assert divergence_at_most(gateway, "bnnet", "logits", "0.01") == 0  # every request off by more than 1e-2
    assert disagree >= 8 and agree + disagree == 64


async def test_bgr_rgb_swap_is_caught(lenet):
    verdicts, agree, disagree, gateway = await run_migration_bug(lenet, "rgb_bgr", 1e-5)
    assert verdicts == {"match": 0, "mismatch": 8, "shape_mismatch": 0}
    assert divergence_at_most(gateway, "lenet", "probabilities", "0.1") == 0
    assert disagree >= 32 and agree + disagree == 64  # colour decides the class: half or more flip


async def test_forgotten_mean_subtraction_is_caught(bnnet):
    verdicts, agree, disagree, gateway = await run_migration_bug(bnnet, "no_mean", BNNET_ATOL)
    assert verdicts == {"match": 0, "mismatch": 8, "shape_mismatch": 0}
    assert divergence_at_most(gateway, "bnnet", "features", "0.1") == 0
    assert disagree >= 16 and agree + disagree == 64


async def test_transposed_inner_product_weight_is_caught(lenet):
    verdicts, agree, disagree, gateway = await run_migration_bug(lenet, "transposed_ip", 1e-5)
    assert verdicts == {"match": 0, "mismatch": 8, "shape_mismatch": 0}
    assert divergence_at_most(gateway, "lenet", "probabilities", "0.1") == 0
    assert disagree >= 16 and agree + disagree == 64


# -- executors ----------------------------------------------------------------------------------


def stand_in_pycaffe() -> types.ModuleType:
    """A STAND-IN for the user's pycaffe, to test only how the pycaffe executor drives it.

    It computes nothing real: its "prob" is the first six input values, times two, written into a
    buffer it reuses, as Caffe reuses blob memory. It records what it was asked to do.
    """
    caffe = types.ModuleType("caffe")
    caffe.TEST, caffe.__version__ = 1, "stand-in-1.0"
    caffe.nets = []

    class Blob:
        def __init__(self, *shape: int) -> None:
            self.data = np.zeros(shape, np.float32)

        def reshape(self, *shape: int) -> None:
            self.data = np.zeros(shape, np.float32)

    class Net:
        def __init__(self, prototxt: str, caffemodel: str, phase: int) -> None:
            self.args = (prototxt, caffemodel, phase)
            self.blobs = {"data": Blob(1, 3, 32, 32), "prob": Blob(1, 6)}
            self.calls: list[tuple] = []
            caffe.nets.append(self)

        def reshape(self) -> None:
            self.blobs["prob"].reshape(self.blobs["data"].data.shape[0], 6)
            self.calls.append(("reshape", self.blobs["data"].data.shape))

        def forward(self, blobs=None, **inputs):
            assert not inputs, "inputs go through net.blobs[...].data"
            data = self.blobs["data"].data
            self.calls.append(("forward", tuple(blobs), data.copy()))
            self.blobs["prob"].data[...] = stand_in_scores(data)
            return {name: self.blobs[name].data for name in blobs}

    caffe.Net = Net
    return caffe


def stand_in_scores(data: np.ndarray) -> np.ndarray:
    return data.reshape(len(data), -1)[:, :6] * np.float32(2)


async def test_pycaffe_executor_wiring_against_a_stand_in_module(lenet, monkeypatch):
    caffe = stand_in_pycaffe()
    monkeypatch.setitem(sys.modules, "caffe", caffe)
    images = images_for(7, seed=8)
    pair = {**lenet.pair(), "candidate": None, "shadow_percent": 0, "expose_backend_details": True}
    async with running_gateway({"models": [pair]}) as gateway:
        answer = await drive(gateway, "lenet", images, 5, ["probabilities"])
        async with triton_aio.InferenceServerClient(f"127.0.0.1:{gateway.grpc_port}") as client:
            parameters = (await client.get_model_config("lenet")).config.parameters
    assert parameters["legacy_executor"].string_value == "pycaffe"  # auto prefers the user's own Caffe
    assert parameters["legacy_executor_version"].string_value == "stand-in-1.0"
    (net,) = caffe.nets
    assert net.args == (str(lenet.prototxt), str(lenet.caffemodel), caffe.TEST)
    kinds = [call[0] for call in net.calls]
    assert kinds == ["forward", "reshape", "forward", "reshape", "forward"]  # warm-up at 1, then 5, then 2
    warm_up, first, second = (call for call in net.calls if call[0] == "forward")
    assert warm_up[1] == ("prob",) and not warm_up[2].any()
    assert first[1] == ("prob",) and np.array_equal(first[2], lenet.preprocess(images[:5]))
    assert np.array_equal(second[2], lenet.preprocess(images[5:]))
    assert np.array_equal(answer["probabilities"], stand_in_scores(lenet.preprocess(images)))


def test_pycaffe_results_are_copies_of_caffe_reused_blobs(lenet):
    caffe = stand_in_pycaffe()
    graph = CaffeGraph.from_net(read_prototxt(lenet.prototxt), lenet.prototxt)
    executor = PycaffeExecutor(caffe, graph, lenet.caffemodel, ["prob"])
    first = executor.forward({"data": np.ones((2, 3, 32, 32), np.float32)})["prob"]
    executor.forward({"data": np.full((2, 3, 32, 32), 5, np.float32)})
    assert np.array_equal(first, np.full((2, 6), 2, np.float32))


async def test_executor_opencv_is_used_even_where_pycaffe_imports(lenet, monkeypatch):
    caffe = stand_in_pycaffe()
    monkeypatch.setitem(sys.modules, "caffe", caffe)
    pair = lenet.pair(legacy={"executor": "opencv"})
    async with running_gateway({"models": [pair]}) as gateway:
        await drive(gateway, "lenet", images_for(4), 4, ["probabilities"])
        assert await compared(gateway, "lenet", 1) == {"match": 1, "mismatch": 0, "shape_mismatch": 0}
        assert gateway.dispatcher.pairs["lenet"].legacy.describe()["executor"] == "opencv"
    assert caffe.nets == []


async def test_pycaffe_asked_for_but_not_importable_fails_start_up(lenet, monkeypatch):
    monkeypatch.setitem(sys.modules, "caffe", None)
    with pytest.raises(ConfigError, match=r"model 'lenet' legacy: executor 'pycaffe' was asked for, but `import caffe` failed"):
        async with running_gateway({"models": [lenet.pair(legacy={"executor": "pycaffe"})]}):
            pass


async def test_pycaffe_load_error_fails_start_up_naming_the_files(lenet, monkeypatch):
    caffe = stand_in_pycaffe()

    def refuse(prototxt: str, caffemodel: str, phase: int):
        raise RuntimeError("Could not open file")

    caffe.Net = refuse
    monkeypatch.setitem(sys.modules, "caffe", caffe)
    message = await start_fails(lenet, executor="pycaffe")
    assert f"pycaffe cannot load {lenet.prototxt} / {lenet.caffemodel}: Could not open file" in message


# -- bad model files fail start-up, naming the file and the layer ----------------------------


async def start_fails(files: CaffeNetFiles, **legacy) -> str:
    with pytest.raises(ConfigError) as failure:
        async with running_gateway({"models": [files.pair(legacy=legacy)]}):
            pass
    message = str(failure.value)
    assert message.startswith(f"model '{files.name}' legacy: ")
    return message


def test_missing_model_file_is_named_by_the_config_check(lenet, tmp_path):
    missing = tmp_path / "gone.caffemodel"
    with pytest.raises(ConfigError, match=rf"models\[0\]\.legacy\.caffemodel: .*file not found: {missing}"):
        parse_config({"models": [lenet.pair(legacy={"caffemodel": str(missing)})]}, "test config")


async def test_model_file_gone_by_load_time_is_named(lenet, tmp_path):
    caffemodel = tmp_path / "lenet.caffemodel"
    caffemodel.write_bytes(lenet.caffemodel.read_bytes())
    config = parse_config({"models": [lenet.pair(legacy={"caffemodel": str(caffemodel)})]}, "test config")
    caffemodel.unlink()
    from prometheus_client import CollectorRegistry

    from server.app import Gateway

    gateway = Gateway(config, registry=CollectorRegistry())
    with pytest.raises(ConfigError, match=rf"model 'lenet' legacy: caffemodel {caffemodel} not found"):
        await gateway.start()
    # The failed start stopped the engine it had started, and removed the engine's metrics folder.
    assert gateway.engine.process.poll() is not None and not Path(gateway._metrics_dir).exists()


async def test_prototxt_that_does_not_parse_names_file_line_and_layer(lenet, tmp_path):
    prototxt = tmp_path / "broken.prototxt"
    prototxt.write_text(lenet.prototxt.read_text().replace("num_output: 16 kernel_size: 3", "num_output: 16 kernel_size: three"))
    message = await start_fails(lenet, prototxt=str(prototxt))
    assert f"prototxt {prototxt} does not parse at line 6, in layer 'conv2'" in message


@pytest.mark.parametrize(
    ("layer", "blobs", "expected"),
    [
        ("ip1", [np.zeros((64, 400), np.float32), np.zeros(64, np.float32)],
         "layer 'ip1' (InnerProduct) weight blob 0 has shape [64, 400]; prototxt {prototxt} needs [64, 576]"),
        ("conv2", [np.zeros((16, 3, 3, 3), np.float32), np.zeros(16, np.float32)],
         "layer 'conv2' (Convolution) weight blob 0 has shape [16, 3, 3, 3]; prototxt {prototxt} needs [16, 8, 3, 3]"),
        ("conv1", [np.zeros((8, 3, 5, 5), np.float32)],
         "layer 'conv1' (Convolution) has 1 weight blob(s); prototxt {prototxt} needs 2"),
        ("ip2", [], "layer 'ip2' (InnerProduct) has no weights; prototxt {prototxt} needs 2 blob(s)"),
    ],
    ids=["ip1-shape", "conv2-in-channels", "conv1-no-bias", "ip2-missing"],
)
async def test_weights_that_disagree_with_the_prototxt_name_file_and_layer(lenet, tmp_path, layer, blobs, expected):
    weights = {**lenet.weights, layer: blobs}
    if not blobs:
        del weights[layer]
    caffemodel = write_caffemodel(lenet.prototxt, weights, tmp_path / "bad.caffemodel")
    message = await start_fails(lenet, caffemodel=str(caffemodel))
    assert f"caffemodel {caffemodel}: " + expected.format(prototxt=lenet.prototxt) in message


async def test_layer_opencv_cannot_run_is_named(lenet, tmp_path):
    prototxt = tmp_path / "python_layer.prototxt"
    prototxt.write_text(lenet.prototxt.read_text().replace('name: "relu3" type: "ReLU"', 'name: "relu3" type: "Python"'))
    message = await start_fails(lenet, prototxt=str(prototxt), executor="opencv")
    assert f"OpenCV cannot load {prototxt} / {lenet.caffemodel}" in message
    assert 'layer "relu3" of type "Python"' in message


async def test_lrn_k_that_opencv_ignores_is_refused_not_silently_run(bnnet, tmp_path):
    prototxt = tmp_path / "lrn_k2.prototxt"
    prototxt.write_text(BNNET_PROTOTXT.replace("beta: 0.75 }", "beta: 0.75 k: 2 }"))
    caffemodel = write_caffemodel(prototxt, bnnet.weights, tmp_path / "lrn_k2.caffemodel")
    message = await start_fails(bnnet, prototxt=str(prototxt), caffemodel=str(caffemodel))
    assert f"prototxt {prototxt}: layer 'norm' (LRN) sets k: 2; OpenCV's LRN ignores k" in message
    assert "executor 'pycaffe'" in message


async def test_caffemodel_that_is_not_one_is_named(lenet):
    message = await start_fails(lenet, caffemodel=str(lenet.prototxt))
    assert f"caffemodel {lenet.prototxt} is not a binary Caffe NetParameter" in message


async def test_unknown_output_blob_lists_the_blobs(lenet):
    message = await start_fails(lenet, tensor_names={"image": "data", "probabilities": "probs"})
    assert f"prototxt {lenet.prototxt} has no blob 'probs'" in message and "'prob'" in message


async def test_output_declared_other_than_fp32_is_refused(lenet):
    pair = {**lenet.pair(), "outputs": [{**lenet.outputs[0], "datatype": "FP16"}]}
    with pytest.raises(ConfigError, match="model 'lenet' legacy: Caffe blobs are FP32; output 'prob' is declared FP16"):
        async with running_gateway({"models": [pair]}):
            pass


async def test_blob_read_before_any_layer_writes_it_is_named(lenet, tmp_path):
    prototxt = tmp_path / "dangling.prototxt"
    prototxt.write_text(lenet.prototxt.read_text().replace('bottom: "pool2" top: "ip1"', 'bottom: "pool3" top: "ip1"'))
    message = await start_fails(lenet, prototxt=str(prototxt))
    assert f"prototxt {prototxt}: layer 'ip1' (InnerProduct) reads blob 'pool3'" in message


# -- the legacy side's preprocessing -------------------------------------------------------------


@pytest.mark.parametrize("legacy_dims", [False, True], ids=["shape", "num-channels-height-width"])
def test_binaryproto_mean_file_reads_back_exactly(tmp_path, legacy_dims):
    mean = np.random.default_rng(0).uniform(0, 255, size=(3, 4, 5)).astype(np.float32)
    path = write_mean_file(mean, tmp_path / "mean.binaryproto", legacy_dims=legacy_dims)
    assert read_mean_file(path).tobytes() == mean.tobytes()


def caffe_config(lenet: CaffeNetFiles, **transform):
    return parse_config({"models": [lenet.pair(legacy=transform)]}, "test config").models[0].legacy


def test_transform_is_caffe_io_transformer_order(lenet, tmp_path):
    mean_image = np.random.default_rng(1).normal(100, 10, size=(3, 32, 32)).astype(np.float32)
    mean_file = write_mean_file(mean_image, tmp_path / "mean.binaryproto")
    batch = np.random.default_rng(2).uniform(0, 1, size=(2, 3, 32, 32)).astype(np.float32)
    per_channel = CaffeTransform.from_config(
        caffe_config(lenet, channel_swap=[2, 0, 1], raw_scale=255.0, mean_values=[1.0, 2.0, 3.0], input_scale=0.5),
        (None, 3, 32, 32))
    expected = (batch[:, [2, 0, 1]] * np.float32(255) - np.array([1, 2, 3], np.float32).reshape(3, 1, 1)) * np.float32(0.5)
    assert per_channel(batch).tobytes() == expected.tobytes()
    image = CaffeTransform.from_config(caffe_config(lenet, channel_swap=None, mean_values=None, mean_file=str(mean_file)),
                                       (None, 3, 32, 32))
    assert image(batch).tobytes() == (batch - mean_image).tobytes()
    assert image.summary() == "mean_file=mean.binaryproto"


@pytest.mark.parametrize(
    ("transform", "message"),
    [
        ({"channel_swap": [0, 0, 1]}, r"channel_swap \[0, 0, 1\] is not an order of the input's 3 channels"),
        ({"channel_swap": [1, 0]}, r"channel_swap \[1, 0\] is not an order of the input's 3 channels"),
        ({"mean_values": [1.0, 2.0]}, r"mean_values has 2 values for an input of 3 channels"),
    ],
)
def test_transform_settings_that_cannot_apply_are_refused(lenet, transform, message):
    with pytest.raises(ConfigError, match=message):
        CaffeTransform.from_config(caffe_config(lenet, **transform), (None, 3, 32, 32))


def test_mean_file_of_another_size_suggests_per_channel_means(lenet, tmp_path):
    mean = np.stack([np.full((8, 8), value, np.float32) for value in (104.0, 117.0, 123.0)])
    mean_file = write_mean_file(mean, tmp_path / "imagenet_mean.binaryproto")
    config = caffe_config(lenet, mean_values=None, mean_file=str(mean_file))
    with pytest.raises(ConfigError, match=r"is 8x8, the input is 32x32; .* per-channel means \[104.0, 117.0, 123.0\]"):
        CaffeTransform.from_config(config, (None, 3, 32, 32))


# -- the demo -----------------------------------------------------------------------------------


async def test_caffe_demo_faithful_port_matches_and_rgb_port_does_not(capsys):
    from server.demo import run_demo

    assert await run_demo(requests=40, legacy="caffe") == 0
    rows = summary_rows(capsys.readouterr().out)
    faithful, buggy = rows["classifier"], rows["classifier_bgr"]
    assert int(faithful["compared"]) > 0 and faithful["match"] == "100.0%" and faithful["top-1 agree"] == "100.0%"
    assert float(buggy["match"].rstrip("%")) < 80.0 and float(buggy["top-1 agree"].rstrip("%")) < 80.0

