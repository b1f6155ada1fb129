"""tritonclient -> gateway -> real MXNet legacy + real PyTorch candidate, over real gRPC."""

from __future__ import annotations

import asyncio
import queue

import mxnet as mx
import numpy as np
import tritonclient.grpc as triton_grpc
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from server.demo.mxnet_models import synthetic_images
from tests.conftest import running_gateway, sample

TENSORS = {
    "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 3, 32, 32]}],
    "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 6], "class_scores": True}],
}


def classifier_config(models, candidate_path, name="classifier", **extra):
    legacy = {"runtime": "mxnet", "symbol": str(models.symbol), "params": str(models.params),
              "tensor_names": {"image": "data"}, "input_names": ["data"]}
    return {"models": [{"name": name, **TENSORS, "legacy": legacy,
                        "candidate": {"runtime": "torch", "path": str(candidate_path)},
                        "shadow_percent": 100, **extra}]}


def direct_mxnet(models, images: np.ndarray) -> np.ndarray:
    net = mx.gluon.SymbolBlock.imports(str(models.symbol), ["data"], str(models.params))
    return net(mx.nd.array(images)).asnumpy()


async def wait_for(predicate, timeout_s: float = 30.0) -> None:
    """Comparisons run after the reply: poll briefly for their metrics."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_sync_and_aio_clients_get_the_legacy_answer_exactly(demo_models):
    images, _ = synthetic_images(12, np.random.default_rng(3))
    # MKL-DNN kernels depend on the batch size, so the direct call uses the same batches.
    expected = np.concatenate([direct_mxnet(demo_models, images[i : i + 1]) for i in range(6)] + [direct_mxnet(demo_models, images[6:])])
    async with running_gateway(classifier_config(demo_models, demo_models.faithful_torch)) as gateway:
        url = f"127.0.0.1:{gateway.grpc_port}"
        async with triton_aio.InferenceServerClient(url) as client:
            answers = []
            for index in range(6):
                tensor = triton_aio.InferInput("image", [1, 3, 32, 32], "FP32")
                tensor.set_data_from_numpy(images[index : index + 1])
                result = await client.infer("classifier", [tensor], request_id=f"aio-{index}")
                assert result.get_response().id == f"aio-{index}"
                answers.append(result.as_numpy("probabilities"))

        def sync_batch() -> np.ndarray:
            client = triton_grpc.InferenceServerClient(url)
            tensor = triton_grpc.InferInput("image", [6, 3, 32, 32], "FP32")
            tensor.set_data_from_numpy(images[6:])
            result = client.infer("classifier", [tensor], outputs=[triton_grpc.InferRequestedOutput("probabilities")])
            client.close()
            return result.as_numpy("probabilities")

        answers.append(await asyncio.to_thread(sync_batch))
        got = np.concatenate(answers)
        assert got.dtype == np.float32 and got.shape == (12, 6)
        assert got.tobytes() == expected.tobytes()  # byte for byte the legacy's answer

        registry = gateway.registry
        await wait_for(lambda: sample(registry, "shadowserve_comparisons_total", model="classifier", verdict="match") == 7)
        assert sample(registry, "shadowserve_requests_total", model="classifier", code="OK", served_by="legacy") == 7
        assert sample(registry, "shadowserve_top1_agreement_total", model="classifier", output="probabilities", agree="true") == 12
        assert sample(registry, "shadowserve_top1_agreement_total", model="classifier", output="probabilities", agree="false") == 0
        for role in ("legacy", "candidate"):
            assert sample(registry, "shadowserve_backend_latency_seconds_count", model="classifier", role=role) == 7
        assert sample(registry, "shadowserve_divergence_count", model="classifier", output="probabilities", measure="max_abs") == 7
        assert sample(registry, "shadowserve_shadow_percent", model="classifier") == 100


async def test_buggy_port_shows_as_mismatch_and_top1_disagreement(demo_models):
    images, _ = synthetic_images(40, np.random.default_rng(4))
    async with running_gateway(classifier_config(demo_models, demo_models.buggy_torch)) as gateway:
        async with triton_aio.InferenceServerClient(f"127.0.0.1:{gateway.grpc_port}") as client:
            tensor = triton_aio.InferInput("image", [40, 3, 32, 32], "FP32")
            tensor.set_data_from_numpy(images)
            result = await client.infer("classifier", [tensor])
        assert np.array_equal(result.as_numpy("probabilities"), direct_mxnet(demo_models, images))
        registry = gateway.registry
        await wait_for(lambda: sample(registry, "shadowserve_comparisons_total", model="classifier", verdict="mismatch") == 1)
        disagree = sample(registry, "shadowserve_top1_agreement_total", model="classifier", output="probabilities", agree="false")
        assert 10 <= disagree <= 40  # red and blue classes flip under an RGB/BGR swap; green ones need not


async def test_typed_contents_and_streaming_clients(demo_models):
    images, _ = synthetic_images(3, np.random.default_rng(5))
    expected = np.concatenate([direct_mxnet(demo_models, images[i : i + 1]) for i in range(3)])
    async with running_gateway(classifier_config(demo_models, demo_models.faithful_torch)) as gateway:
        url = f"127.0.0.1:{gateway.grpc_port}"
        import grpc

        async with grpc.aio.insecure_channel(url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            request = pb.ModelInferRequest(model_name="classifier", id="typed")
            tensor = request.inputs.add(name="image", datatype="FP32", shape=[1, 3, 32, 32])
            tensor.contents.fp32_contents.extend(images[0].ravel().tolist())
            response = await stub.ModelInfer(request)
        assert response.id == "typed" and response.outputs[0].name == "probabilities"
        assert list(response.outputs[0].shape) == [1, 6]
        assert np.frombuffer(response.raw_output_contents[0], np.float32).tobytes() == expected[0].tobytes()

        def stream() -> dict[str, np.ndarray]:
            results: queue.Queue = queue.Queue()
            client = triton_grpc.InferenceServerClient(url)
            client.start_stream(callback=lambda result, error: results.put((result, error)))
            for index in range(3):
                tensor = triton_grpc.InferInput("image", [1, 3, 32, 32], "FP32")
                tensor.set_data_from_numpy(images[index : index + 1])
                client.async_stream_infer("classifier", [tensor], request_id=str(index))
            bad = triton_grpc.InferInput("image", [1, 3, 32, 32], "FP32")
            bad.set_data_from_numpy(images[:1])
            client.async_stream_infer("no_such_model", [bad], request_id="bad")
            answers, errors = {}, []
            for _ in range(4):
                result, error = results.get(timeout=20)
                if error is not None:
                    errors.append(str(error))
                else:
                    answers[result.get_response().id] = result.as_numpy("probabilities")
            client.stop_stream()
            client.close()
            assert len(errors) == 1 and "unknown model 'no_such_model'" in errors[0]
            return answers

        answers = await asyncio.to_thread(stream)
        assert sorted(answers) == ["0", "1", "2"]
        for index in range(3):
            assert answers[str(index)].tobytes() == expected[index : index + 1].tobytes()


async def test_metadata_config_readiness_and_statistics(demo_models):
    config = classifier_config(demo_models, demo_models.faithful_torch, expose_backend_details=True)
    async with running_gateway(config) as gateway:
        async with triton_aio.InferenceServerClient(f"127.0.0.1:{gateway.grpc_port}") as client:
            assert await client.is_server_live() and await client.is_server_ready()
            assert await client.is_model_ready("classifier")
            metadata = await client.get_model_metadata("classifier")
            assert [t.name for t in metadata.inputs] == ["image"] and list(metadata.inputs[0].shape) == [-1, 3, 32, 32]
            assert metadata.outputs[0].datatype == "FP32"
            assert "legacy=mxnet" in metadata.platform and "candidate=torch" in metadata.platform
            config = (await client.get_model_config("classifier")).config
            assert config.parameters["legacy_runtime"].string_value == "mxnet"
            assert config.parameters["candidate_runtime"].string_value == "torch"  # loaded in the shadow engine
            assert config.parameters["stage"].string_value == "shadow"
            tensor = triton_aio.InferInput("image", [1, 3, 32, 32], "FP32")
            tensor.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.float32))
            await client.infer("classifier", [tensor])
            stats = (await client.get_inference_statistics("classifier")).model_stats[0]
            assert stats.inference_stats.success.count == 1 and stats.inference_stats.fail.count == 0

        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service="classifier"))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
