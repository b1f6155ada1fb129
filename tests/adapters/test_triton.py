"""The triton adapter against a real Triton Inference Server (nvidia-pytriton) serving the PyTorch port.

Triton runs in a child process (tests/support/triton.py) on a free loopback port, serving the
faithful port and the RGB/BGR-swapped one under Triton's own tensor names; the gateway maps the
pair's names to them with `tensor_names`.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import grpc
import mxnet as mx
import numpy as np
import pytest
import torch
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from adapters.triton import TritonBackend, triton_failure
from server.config import TensorConfig, TritonConfig
from server.demo.mxnet_models import synthetic_images
from server.errors import BackendError, BackendTimeout, ConfigError
from tests.conftest import running_gateway, sample
from tests.support.triton import start_triton

MODEL = "classifier"
FAITHFUL, BUGGY = "classifier_port", "classifier_port_bgr"
TRITON_NAMES = {"image": "INPUT__0", "probabilities": "OUTPUT__0"}
INPUTS = [TensorConfig(name="image", datatype="FP32", shape=[-1, 3, 32, 32])]
OUTPUTS = [TensorConfig(name="probabilities", datatype="FP32", shape=[-1, 6], class_scores=True)]
VERDICTS = ("match", "mismatch", "shape_mismatch")


@pytest.fixture(scope="module")
def triton(demo_models):
    """One real Triton for the module: start-up costs seconds."""
    server = start_triton({FAITHFUL: demo_models.faithful_torch, BUGGY: demo_models.buggy_torch})
    yield server
    assert server.stop() == 0, f"Triton did not stop cleanly:\n{server.log[-3000:]}"


def candidate_spec(url: str, model: str = FAITHFUL, **extra) -> dict:
    return {"runtime": "triton", "url": url, "model": model, "tensor_names": TRITON_NAMES, **extra}


def pair_config(demo_models, candidate: dict) -> dict:
    legacy = {"runtime": "mxnet", "symbol": str(demo_models.symbol), "params": str(demo_models.params),
              "tensor_names": {"image": "data"}, "input_names": ["data"]}
    return {"server": {"backend_retry_s": 0.1}, "models": [{
        "name": MODEL,
        "inputs": [tensor.model_dump() for tensor in INPUTS],
        "outputs": [tensor.model_dump() for tensor in OUTPUTS],
        "legacy": legacy,
        "candidate": candidate,
        "shadow_percent": 100,
    }]}


def direct_mxnet(demo_models, batches: list[np.ndarray]) -> list[np.ndarray]:
    """The legacy model called directly, batch by batch (MKL-DNN kernels depend on the batch size)."""
    net = mx.gluon.SymbolBlock.imports(str(demo_models.symbol), ["data"], str(demo_models.params))
    return [net(mx.nd.array(batch)).asnumpy() for batch in batches]


def direct_torch(path, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.jit.load(str(path))(torch.from_numpy(images)).numpy()


async def ask_gateway(gateway, batches: list[np.ndarray]) -> list[np.ndarray]:
    async with triton_aio.InferenceServerClient(f"127.0.0.1:{gateway.grpc_port}") as client:
        answers = []
        for batch in batches:
            tensor = triton_aio.InferInput("image", list(batch.shape), "FP32")
            tensor.set_data_from_numpy(batch)
            answers.append((await client.infer(MODEL, [tensor])).as_numpy("probabilities"))
        return answers


async def wait_for(predicate, timeout_s: float = 30.0, what: str = "condition") -> None:
    """Comparisons and retries happen after the reply: poll, boundedly."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"{what} not reached in {timeout_s:g}s"
        await asyncio.sleep(0.02)


def refusing_socket() -> socket.socket:
    """A loopback port of our own that refuses connections: bound, not listening, so nothing else can take it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


class TcpRelay:
    """A loopback TCP relay to a real server: connections are refused until `open()`, then relayed."""

    def __init__(self, target: str) -> None:
        self._socket = refusing_socket()
        self.url = "127.0.0.1:%d" % self._socket.getsockname()[1]
        self._target = target.rsplit(":", 1)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._relay, sock=self._socket)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._socket.close()
        for writer in list(self._writers):
            writer.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(self._target[0], int(self._target[1]))
        self._writers |= {writer, upstream_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(1 << 16):
                    sink.write(data)
                    await sink.drain()
            except ConnectionError:
                pass
            finally:
                sink.close()
                self._writers.discard(sink)

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))


def counts(registry, name: str, label: str, values, **labels) -> dict[str, float]:
    return {value: sample(registry, name, model=MODEL, **{label: value}, **labels) for value in values}


def verdicts(registry) -> dict[str, float]:
    return counts(registry, "shadowserve_comparisons_total", "verdict", VERDICTS)


def top1(registry, agree: str) -> float:
    return sample(registry, "shadowserve_top1_agreement_total", model=MODEL, output="probabilities", agree=agree)


def image_batches(seed: int, sizes: list[int]) -> list[np.ndarray]:
    images, _ = synthetic_images(sum(sizes), np.random.default_rng(seed))
    edges = np.cumsum([0, *sizes])
    return [images[start:end] for start, end in zip(edges[:-1], edges[1:])]


# -- the gateway with a real Triton candidate ---------------------------------------------


async def test_gateway_returns_the_legacy_answer_and_triton_candidate_matches(demo_models, triton):
    batches = image_batches(11, [1, 1, 1, 1, 4])
    expected = direct_mxnet(demo_models, batches)
    async with running_gateway(pair_config(demo_models, candidate_spec(triton.url))) as gateway:
        assert gateway.dispatcher.pairs[MODEL].candidate.ready
        answers = await ask_gateway(gateway, batches)
        for got, want in zip(answers, expected):
            assert got.dtype == np.float32 and got.shape == want.shape
            assert got.tobytes() == want.tobytes()  # byte for byte the MXNet legacy's answer

        registry = gateway.registry
        await wait_for(lambda: sample(registry, "shadowserve_comparisons_total", model=MODEL, verdict="match") == 5,
                       what="5 matching comparisons")
        assert verdicts(registry) == {
            "match": 5, "mismatch": 0, "shape_mismatch": 0}
        assert sample(registry, "shadowserve_backend_latency_seconds_count", model=MODEL, role="candidate") == 5
        assert sample(registry, "shadowserve_backend_latency_seconds_sum", model=MODEL, role="candidate") > 0
        assert top1(registry, "true") == 8 and top1(registry, "false") == 0
        assert counts(registry, "shadowserve_shadow_skipped_total", "reason", ("error", "timeout", "saturated")) == {
            "error": 0, "timeout": 0, "saturated": 0}
        assert sample(registry, "shadowserve_requests_total", model=MODEL, code="OK", served_by="legacy") == 5


async def test_buggy_port_on_triton_is_reported_as_mismatch(demo_models, triton):
    """The negative control: the same path with the RGB/BGR-swapped port must not read as a match."""
    batches = image_batches(12, [4, 4, 4])
    expected = direct_mxnet(demo_models, batches)
    async with running_gateway(pair_config(demo_models, candidate_spec(triton.url, BUGGY))) as gateway:
        answers = await ask_gateway(gateway, batches)
        assert all(got.tobytes() == want.tobytes() for got, want in zip(answers, expected))
        registry = gateway.registry
        await wait_for(lambda: sum(verdicts(registry).values()) == 3, what="3 comparisons")
        assert verdicts(registry) == {
            "match": 0, "mismatch": 3, "shape_mismatch": 0}
        assert top1(registry, "false") >= 1  # red and blue squares swap classes under an RGB/BGR swap


async def test_unknown_triton_model_serves_legacy_and_skips_candidate_while_retrying(demo_models, triton, caplog):
    caplog.set_level(logging.WARNING, logger="shadowserve.dispatch")
    batches = image_batches(13, [1, 2, 1])
    expected = direct_mxnet(demo_models, batches)
    async with running_gateway(pair_config(demo_models, candidate_spec(triton.url, "no_such_model"))) as gateway:
        assert not gateway.dispatcher.pairs[MODEL].candidate.ready
        answers = await ask_gateway(gateway, batches)
        assert all(got.tobytes() == want.tobytes() for got, want in zip(answers, expected))

        registry = gateway.registry
        await wait_for(lambda: sample(registry, "shadowserve_shadow_skipped_total", model=MODEL, reason="error") == 3,
                       60.0, "the shadow engine counting the three hand-offs as skipped")
        assert verdicts(registry) == {
            "match": 0, "mismatch": 0, "shape_mismatch": 0}
        assert sample(registry, "shadowserve_backend_latency_seconds_count", model=MODEL, role="candidate") == 0
        assert sample(registry, "shadowserve_requests_total", model=MODEL, code="OK", served_by="legacy") == 3

        # The first failure is logged with Triton's own reason, then the load is retried in the background.
        await wait_for(lambda: any("still not ready" in r.getMessage() for r in caplog.records), 60.0, "a retry")
        failures = [r.getMessage() for r in caplog.records if "candidate backend" in r.getMessage()]
        assert "not ready" in failures[0] and "retrying in the background" in failures[0]
        for message in failures:
            assert "'no_such_model'" in message and "unknown model" in message, message
        assert not gateway.dispatcher.pairs[MODEL].candidate.ready


async def test_unreachable_triton_serves_legacy_until_a_retry_connects(demo_models, triton, caplog):
    caplog.set_level(logging.WARNING, logger="shadowserve.dispatch")
    relay = TcpRelay(triton.url)  # nothing listens on its port until it opens
    batches = image_batches(14, [1, 1, 1])
    expected = direct_mxnet(demo_models, batches)
    try:
        async with running_gateway(pair_config(demo_models, candidate_spec(relay.url))) as gateway:
            pair = gateway.dispatcher.pairs[MODEL]
            assert not pair.candidate.ready
            answers = await ask_gateway(gateway, batches[:2])
            assert all(got.tobytes() == want.tobytes() for got, want in zip(answers, expected))
            registry = gateway.registry
            await wait_for(lambda: sample(registry, "shadowserve_shadow_skipped_total", model=MODEL, reason="error") == 2,
                           60.0, "the shadow engine counting both hand-offs as skipped")
            assert sample(registry, "shadowserve_backend_latency_seconds_count", model=MODEL, role="candidate") == 0
            await wait_for(lambda: any("still not ready" in r.getMessage() for r in caplog.records), 60.0, "a retry")
            failures = [r.getMessage() for r in caplog.records if "candidate backend" in r.getMessage()]
            assert len(failures) >= 2 and all("failed to connect" in message for message in failures), failures

            await relay.open()  # Triton is reachable from now on: the next background retries load it
            await wait_for(lambda: pair.candidate.ready, 60.0, "the candidate loaded by the retry")
            # The shadow engine retries on its own schedule: shadow requests until one is compared.
            deadline = asyncio.get_running_loop().time() + 60
            while sample(registry, "shadowserve_comparisons_total", model=MODEL, verdict="match") == 0:
                assert asyncio.get_running_loop().time() < deadline, "no comparison once Triton was reachable"
                assert (await ask_gateway(gateway, batches[2:]))[0].tobytes() == expected[2].tobytes()
                await asyncio.sleep(0.2)
            assert sample(registry, "shadowserve_shadow_skipped_total", model=MODEL, reason="error") >= 2
            assert sample(registry, "shadowserve_backend_latency_seconds_count", model=MODEL, role="candidate") >= 1
    finally:
        await relay.close()


# -- the adapter alone, against the same real Triton --------------------------------------


def backend(url: str, model: str = FAITHFUL, inputs=INPUTS, outputs=OUTPUTS, **extra) -> TritonBackend:
    config = TritonConfig(runtime="triton", url=url, model=model, **{"tensor_names": TRITON_NAMES, **extra})
    return TritonBackend(config, inputs, outputs)


async def test_adapter_maps_tensor_names_and_returns_the_torch_port_output(demo_models, triton):
    candidate = backend(triton.url)
    await candidate.load()
    try:
        assert candidate.ready and candidate.describe() == {"runtime": "triton", "url": triton.url, "model": FAITHFUL}
        images = image_batches(15, [3])[0]
        outputs = await candidate.infer({"image": images})
        assert list(outputs) == ["probabilities"]
        assert outputs["probabilities"].dtype == np.float32 and outputs["probabilities"].shape == (3, 6)
        want = direct_torch(demo_models.faithful_torch, images)
        np.testing.assert_allclose(outputs["probabilities"], want, rtol=0, atol=1e-6)
    finally:
        await candidate.close()
    assert not candidate.ready


async def test_adapter_load_names_triton_tensors_when_the_mapping_is_missing(triton):
    candidate = backend(triton.url, tensor_names={})
    with pytest.raises(ConfigError, match=r"INPUT__0.*\['image'\]"):
        await candidate.load()
    assert not candidate.ready
    await candidate.close()


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"inputs": {"datatype": "FP64"}}, r"input 'INPUT__0' is FP32, the pair declares FP64"),
        ({"inputs": {"shape": [-1, 3, 64, 64]}}, r"input 'INPUT__0' has shape \[-1, 3, 32, 32\], the pair declares \[-1, 3, 64, 64\]"),
        ({"outputs": {"shape": [-1, 6, 1]}}, r"output 'OUTPUT__0' has shape \[-1, 6\], the pair declares \[-1, 6, 1\]"),
    ],
)
async def test_adapter_load_rejects_tensors_triton_does_not_serve(triton, change, pattern):
    inputs, outputs = ([t.model_copy(update=change.get(kind, {})) for t in tensors]
                       for kind, tensors in (("inputs", INPUTS), ("outputs", OUTPUTS)))
    candidate = backend(triton.url, inputs=inputs, outputs=outputs)
    with pytest.raises(ConfigError, match=pattern):
        await candidate.load()
    assert not candidate.ready
    await candidate.close()


@pytest.mark.parametrize(
    ("where", "code", "text"),
    [("unknown_model", grpc.StatusCode.NOT_FOUND, "unknown model"), ("unreachable", grpc.StatusCode.UNAVAILABLE, "")],
)
async def test_adapter_load_failure_keeps_tritons_status(triton, where, code, text):
    refusing = refusing_socket()
    unreachable = "127.0.0.1:%d" % refusing.getsockname()[1]
    url, model = (triton.url, "no_such_model") if where == "unknown_model" else (unreachable, FAITHFUL)
    candidate = backend(url, model)
    with pytest.raises(BackendError) as raised:
        await candidate.load()
    assert raised.value.code == code and url in str(raised.value) and text in str(raised.value)
    assert not candidate.ready
    await candidate.close()
    refusing.close()


async def test_adapter_load_retry_connects_at_once_when_triton_comes_back(triton):
    """A failed load must not leave the next one failing fast in gRPC's reconnect backoff."""
    relay = TcpRelay(triton.url)
    candidate = backend(relay.url)
    try:
        with pytest.raises(BackendError, match="Connection refused") as raised:
            await candidate.load()
        assert raised.value.code == grpc.StatusCode.UNAVAILABLE
        await relay.open()
        await candidate.load()  # immediately, well inside gRPC's first reconnect backoff (~1 s)
        assert candidate.ready
        assert (await candidate.infer({"image": np.zeros((1, 3, 32, 32), np.float32)}))["probabilities"].shape == (1, 6)
    finally:
        await candidate.close()
        await relay.close()


async def test_adapter_infer_errors_carry_tritons_status(triton):
    candidate = backend(triton.url, timeout_s=5.0)
    await candidate.load()
    try:
        too_big = np.zeros((17, 3, 32, 32), np.float32)  # Triton serves max_batch_size 16
        with pytest.raises(BackendError) as raised:
            await candidate.infer({"image": too_big})
        assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT and "batch" in str(raised.value)
        with pytest.raises(BackendTimeout):
            await candidate.infer({"image": too_big[:1]}, timeout_s=1e-4)
        # The adapter still works after both failures.
        assert (await candidate.infer({"image": too_big[:2]}))["probabilities"].shape == (2, 6)
    finally:
        await candidate.close()


async def test_adapter_streams_concurrent_calls_to_triton_and_matches_each_answer(demo_models, triton):
    candidate = backend(triton.url, timeout_s=10.0)
    candidate.over_stream = True  # as the shadow engine calls it
    await candidate.load()
    try:
        batches = image_batches(16, [1, 2, 3, 4])
        answers = await asyncio.gather(*(candidate.infer({"image": images}) for images in batches))
        for images, answer in zip(batches, answers):
            want = direct_torch(demo_models.faithful_torch, images)
            np.testing.assert_allclose(answer["probabilities"], want, rtol=0, atol=1e-6)
        assert await candidate._stream.serves_streams()
        with pytest.raises(BackendError) as raised:  # Triton answers an error on the stream with the call's id
            await candidate.infer({"image": np.zeros((17, 3, 32, 32), np.float32)})
        assert not isinstance(raised.value, BackendTimeout) and "batch" in str(raised.value)
    finally:
        await candidate.close()


# -- the status mapping alone ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code"),
    [
        ("StatusCode.NOT_FOUND", grpc.StatusCode.NOT_FOUND),
        ("StatusCode.INVALID_ARGUMENT", grpc.StatusCode.INVALID_ARGUMENT),
        ("StatusCode.RESOURCE_EXHAUSTED", grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("StatusCode.UNAVAILABLE", grpc.StatusCode.UNAVAILABLE),
        ("StatusCode.NOT_A_CODE", grpc.StatusCode.UNAVAILABLE),
        (None, grpc.StatusCode.UNAVAILABLE),
    ],
)
def test_triton_failure_restores_the_grpc_status(status, code):
    error = triton_failure("Triton at h:1 model 'm'", InferenceServerException("the reason", status=status))
    assert type(error) is BackendError
    assert error.code == code
    assert str(error) == "Triton at h:1 model 'm': the reason"


def test_triton_failure_keeps_a_deadline_a_timeout():
    exceeded = InferenceServerException("Deadline Exceeded", status="StatusCode.DEADLINE_EXCEEDED")
    error = triton_failure("Triton at h:1", exceeded)
    assert isinstance(error, BackendTimeout) and error.code == grpc.StatusCode.DEADLINE_EXCEEDED
