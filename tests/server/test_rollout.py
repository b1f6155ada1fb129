"""Phased rollout: deterministic routing, live flips by CLI and file, guard rollback, canary fallback."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio
import yaml

from protos import admin_pb2 as pb
from protos import admin_pb2_grpc
from server.admin import start_admin_server
from server.config import ServerConfig
from server.dispatch import ROUTING_BUCKETS, routing_bucket
from server.errors import ConfigError
from tests.conftest import running_gateway, sample
from tests.server.test_end_to_end import wait_for
from tests.support.kserve import Behaviour, scale_by

TENSORS = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
           "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2], "class_scores": True}]}
X = np.array([[1.0, 2.0]], np.float32)
LEGACY, CANDIDATE = (X * 2).tobytes(), (X * 2.000001).tobytes()  # tell the sides apart, still within tolerance


def pair_config(legacy_url: str, candidate_url: str, **extra) -> dict:
    remote = lambda url: {"runtime": "remote", "url": url, "model": "m", "timeout_s": 1.0}  # noqa: E731
    return {"name": "m", **TENSORS, "legacy": remote(legacy_url), "candidate": remote(candidate_url), **extra}


@pytest.fixture
async def backends(model_server):
    legacy_url, legacy = await model_server(Behaviour(scale_by(2.0)))
    candidate_url, candidate = await model_server(Behaviour(scale_by(2.000001)))
    return legacy_url, legacy, candidate_url, candidate


async def ask(client, key: str | None = None) -> str:
    tensor = triton_aio.InferInput("x", [1, 2], "FP32")
    tensor.set_data_from_numpy(X)
    result = await client.infer("m", [tensor], parameters={"routing_key": key} if key else None)
    return "legacy" if result.as_numpy("y").tobytes() == LEGACY else "candidate"


async def admin_status(gateway, include_history: bool = False) -> pb.StatusResponse:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.admin_port}") as channel:
        return await admin_pb2_grpc.ShadowAdminStub(channel).Status(pb.StatusRequest(include_history=include_history))


def admin_stub(gateway):
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.admin_port}")
    return channel, admin_pb2_grpc.ShadowAdminStub(channel)


def test_buckets_are_uniform_and_stable():
    keys = [f"user-{i}" for i in range(20_000)]
    buckets = np.array([routing_bucket(key) for key in keys])
    assert buckets.min() >= 0 and buckets.max() < ROUTING_BUCKETS
    for percent in (1, 10, 20, 50):
        share = np.mean(buckets < percent * 100)
        # binomial standard deviation at n=20000 is at most 0.35 points; 1.5 points is > 4 sigma
        assert abs(share * 100 - percent) < 1.5, (percent, share)
    assert routing_bucket("user-7") == buckets[7]  # same key, same bucket (blake2b: same on every replica)
    at_10 = {key for key, b in zip(keys, buckets) if b < 1000}
    at_20 = {key for key, b in zip(keys, buckets) if b < 2000}
    assert at_10 < at_20  # raising the percentage only adds keys


async def test_served_share_and_key_stickiness_through_the_gateway(backends):
    legacy_url, _, candidate_url, _ = backends
    async with running_gateway({"models": [pair_config(legacy_url, candidate_url, serve_percent=10)]}) as gateway:
        async with triton_aio.InferenceServerClient(f"127.0.0.1:{gateway.grpc_port}") as client:
            keys = [f"session-{i}" for i in range(300)]
            first = {key: await ask(client, key) for key in keys}
            assert sample(gateway.registry, "shadowserve_comparisons_total", model="m", verdict="mismatch") == 0
            assert {key: await ask(client, key) for key in keys[:60]} == {key: first[key] for key in keys[:60]}
            expected = {key: "candidate" if routing_bucket(key) < 1000 else "legacy" for key in keys}
            assert first == expected
            channel, admin = admin_stub(gateway)
            await admin.SetPercentages(pb.SetPercentagesRequest(model="m", serve_percent=20))
            second = {key: await ask(client, key) for key in keys}
            await channel.close()
        assert all(second[key] == "candidate" for key in keys if first[key] == "candidate")
        share = sum(side == "candidate" for side in second.values()) / len(keys)
        assert 0.12 < share < 0.28  # 20% of 300 keys: sd is 2.3 points
        registry = gateway.registry
        served = sample(registry, "shadowserve_requests_total", model="m", code="OK", served_by="candidate")
        assert served == sum(s == "candidate" for s in first.values()) * 1 + sum(
            first[k] == "candidate" for k in keys[:60]) + sum(s == "candidate" for s in second.values())
        assert sample(registry, "shadowserve_serve_percent", model="m") == 20
        assert sample(registry, "shadowserve_stage", model="m", stage="canary") == 1
        assert sample(registry, "shadowserve_stage", model="m", stage="shadow") == 0


async def test_live_flips_by_ctl_and_by_file_under_load(backends, tmp_path):
    legacy_url, _, candidate_url, _ = backends
    path = tmp_path / "shadow.yaml"
    config = {"server": {"grpc_listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0",
                         "config_poll_s": 0.1, "max_unjudged_served": 10_000},  # cutover answers all from the candidate
              "models": [pair_config(legacy_url, candidate_url, shadow_percent=100)]}
    path.write_text(yaml.safe_dump(config))
    from prometheus_client import CollectorRegistry

    from server.app import Gateway
    from server.config import load_config

    gateway = Gateway(load_config(path), CollectorRegistry(), config_path=path)
    await gateway.start()
    answers: list[tuple[float, str]] = []  # (when the request was sent, which side answered)
    failures: list[BaseException] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def load(client) -> None:
        while not stop.is_set():
            sent = loop.time()
            try:
                answers.append((sent, await ask(client)))
            except Exception as exc:  # any failure fails the test below
                failures.append(exc)

    def sent_after(moment: float) -> list[str]:
        return [side for sent, side in answers if sent > moment]

    def ctl(*args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "server.cli", "ctl", "--admin", f"127.0.0.1:{gateway.admin_port}", *args],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    try:
        async with triton_aio.InferenceServerClient(f"127.0.0.1:{gateway.grpc_port}") as client:
            workers = [loop.create_task(load(client)) for _ in range(4)]
            await wait_for(lambda: len(answers) >= 10, timeout_s=30)
            output = await asyncio.to_thread(ctl, "set", "m", "--serve", "100")
            assert "cutover" in output
            flipped_to_candidate = loop.time()  # the change applied before ctl's reply
            await wait_for(lambda: len(sent_after(flipped_to_candidate)) >= 10, timeout_s=30)
            # An edit, as an operator or a ConfigMap update makes: the percentages it changes apply.
            edited = loop.time()
            config["models"][0].update(shadow_percent=50, serve_percent=0)
            path.write_text(yaml.safe_dump(config))
            await wait_for(lambda: gateway.dispatcher.pairs["m"].serve_percent == 0, timeout_s=30)
            flipped_back = loop.time()
            await wait_for(lambda: len(sent_after(flipped_back)) >= 10, timeout_s=30)
            stop.set()
            await asyncio.gather(*workers)
        assert not failures, failures[:3]
        assert {side for sent, side in answers if flipped_to_candidate < sent < edited} == {"candidate"}
        assert set(sent_after(flipped_back)) == {"legacy"}
        # The engine counts a reload once it has routed by it; a primary can see the new routing first.
        await wait_for(lambda: sample(gateway.registry, "shadowserve_config_reloads_total", result="applied") >= 1)
        assert sample(gateway.registry, "shadowserve_config_reloads_total", result="applied") == 1

        path.write_text("models: [")  # a broken edit is rejected; the running config stays
        await wait_for(lambda: sample(gateway.registry, "shadowserve_config_reloads_total", result="rejected") == 1)
        config["models"][0]["shadow_percent"] = 250
        path.write_text(yaml.safe_dump(config))
        await wait_for(lambda: sample(gateway.registry, "shadowserve_config_reloads_total", result="rejected") == 2)
        assert gateway.dispatcher.pairs["m"].shadow_percent == 50

        history = await asyncio.to_thread(ctl, "status", "--history")
        assert "[cli] shadow -> cutover shadow 100 -> 100, serve 0 -> 100" in history
        assert "[file] cutover -> shadow shadow 100 -> 50, serve 100 -> 0 (config file changed)" in history
    finally:
        await gateway.stop(0.5)


GUARD = {"window": 50, "min_samples": 20, "max_mismatch_rate": 0.1}
# Judged every window/20 = 2 outcomes. After 40 matching outcomes the mismatch rate m/(40 + m) passes 10% at
# m = 5, so the guard rolls back at the 5th or 6th mismatched outcome.


def outcomes(gateway) -> float:
    return sum(sample(gateway.registry, "shadowserve_comparisons_total", model="m", verdict=verdict)
               for verdict in ("match", "mismatch", "shape_mismatch"))


async def test_guard_rolls_back_a_candidate_that_starts_disagreeing(backends):
    legacy_url, _, candidate_url, candidate = backends
    # Each request waits for its outcome, which bounds unjudged answers already; a starved engine must not
    # turn served requests into legacy fallbacks here.
    async with running_gateway({"server": {"max_unjudged_served": 10_000},
                                "models": [pair_config(legacy_url, candidate_url, shadow_percent=100, serve_percent=50,
                                                        guard=GUARD)]}) as gateway:
        pair = gateway.dispatcher.pairs["m"]
        async with triton_aio.InferenceServerClient(f"127.0.0.1:{gateway.grpc_port}") as client:
            for i in range(40):
                await ask(client, f"k{i}")
            await wait_for(lambda: outcomes(gateway) == 40)
            assert pair.stage == "canary"
            candidate.transform = scale_by(3.0)  # the candidate goes wrong mid-run
            for i in range(20):
                await ask(client, f"k{i}")
                await wait_for(lambda: outcomes(gateway) == 41 + i)  # this request's outcome reached the guard
                if pair.stage == "rolled_back":
                    break
            assert pair.stage == "rolled_back" and pair.serve_percent == 0 and pair.shadow_percent == 100
            assert sample(gateway.registry, "shadowserve_comparisons_total", model="m", verdict="mismatch") in (5, 6)
            assert {await ask(client, f"k{j}") for j in range(30)} == {"legacy"}
            mismatches_before = sample(gateway.registry, "shadowserve_comparisons_total", model="m", verdict="mismatch")
            await ask(client)
            await wait_for(lambda: sample(gateway.registry, "shadowserve_comparisons_total", model="m", verdict="mismatch")
                           > mismatches_before)  # shadowing continues
        assert sample(gateway.registry, "shadowserve_rollbacks_total", model="m", reason="mismatch_rate") == 1
        assert sample(gateway.registry, "shadowserve_stage", model="m", stage="rolled_back") == 1
        change = (await admin_status(gateway, include_history=True)).history[-1]
        assert change.source == "guard" and change.new_stage == "rolled_back" and change.reason.startswith("mismatch_rate: ")


async def test_guard_bounds_the_wrong_answers_a_canary_serves_whatever_the_request_rate(backends):
    """Served answers reach the guard at once, so how many wrong ones clients get does not grow with traffic."""
    legacy_url, _, candidate_url, candidate = backends
    clients = 8
    wrong = (X * 3).tobytes()
    # Shadow-only comparisons may wait 10 s to be batched; answers clients got from the candidate must not.
    async with running_gateway({"server": {"comparison": {"batch_s": 10}, "max_unjudged_served": 8},
                                "models": [pair_config(legacy_url, candidate_url, shadow_percent=100, serve_percent=100,
                                                       guard=GUARD)]}) as gateway:
        pair = gateway.dispatcher.pairs["m"]
        served_wrong = 0
        stop = asyncio.Event()

        async def load(client) -> None:
            nonlocal served_wrong
            tensor = triton_aio.InferInput("x", [1, 2], "FP32")
            tensor.set_data_from_numpy(X)
            while not stop.is_set():
                served_wrong += (await client.infer("m", [tensor])).as_numpy("y").tobytes() == wrong

        async with triton_aio.InferenceServerClient(f"127.0.0.1:{gateway.grpc_port}") as client:
            loop = asyncio.get_running_loop()
            workers = [loop.create_task(load(client)) for _ in range(clients)]
            await wait_for(lambda: outcomes(gateway) >= 60, timeout_s=30)
            candidate.transform = scale_by(3.0)
            await wait_for(lambda: pair.stage == "rolled_back", timeout_s=30)
            stop.set()
            await asyncio.gather(*workers)
        # At most 7 mismatched outcomes trip the guard (6 past a full window of matches, plus one for judging
        # every other outcome); beyond them, at most server.max_unjudged_served (8) answers not yet judged by a
        # shadow engine however slow, and one answer in flight per client.
        assert 1 <= served_wrong <= 7 + 8 + clients, served_wrong


async def test_guard_rolls_back_a_failing_candidate_and_canary_falls_back(backends):
    legacy_url, _, candidate_url, candidate = backends
    guard = {"window": 30, "min_samples": 10, "max_error_rate": 0.2}
    breaker = {"failures": 5, "open_s": 600, "max_open_s": 600}  # no probe can fall inside the test
    async with running_gateway({"models": [pair_config(legacy_url, candidate_url, serve_percent=100, guard=guard,
                                                        circuit_breaker=breaker)]}) as gateway:
        async with triton_aio.InferenceServerClient(f"127.0.0.1:{gateway.grpc_port}") as client:
            assert await ask(client) == "candidate"
            await wait_for(lambda: sample(gateway.registry, "shadowserve_comparisons_total", model="m", verdict="match") == 1)
            candidate.fail_with = grpc.StatusCode.INTERNAL
            answers = []
            for _ in range(15):
                canary = gateway.dispatcher.pairs["m"].serve_percent > 0
                answers.append(await ask(client))
                if canary:  # let the engine take this outcome in before the next request
                    samples = len(answers) + 1
                    await wait_for(lambda: engine_samples(gateway) == samples)
        assert answers == ["legacy"] * 15  # every failure during canary answered by the legacy
        # 5 failures open the candidate's circuit: the next 4 skip the candidate and count as its
        # failures, so 1 success + 9 failures still reach min_samples=10 and roll back there; the last
        # 6 requests went to the legacy directly, without a fallback.
        assert sample(gateway.registry, "shadowserve_fallbacks_total", model="m", reason="error") == 5
        assert sample(gateway.registry, "shadowserve_fallbacks_total", model="m", reason="circuit_open") == 4
        assert sample(gateway.registry, "shadowserve_backend_errors_total", model="m", role="candidate", code="INTERNAL") == 5
        assert sample(gateway.registry, "shadowserve_rollbacks_total", model="m", reason="error_rate") == 1
        assert gateway.dispatcher.pairs["m"].stage == "rolled_back"


def engine_samples(gateway) -> int:
    """Outcomes the engine has taken in: its window's sample count, read over the admin service."""
    with grpc.insecure_channel(f"127.0.0.1:{gateway.admin_port}") as channel:
        return admin_pb2_grpc.ShadowAdminStub(channel).Status(pb.StatusRequest(), timeout=10).pairs[0].window.samples


async def test_promote_walks_the_stages_and_admin_errors_are_clear(backends):
    legacy_url, _, candidate_url, _ = backends
    async with running_gateway({"models": [pair_config(legacy_url, candidate_url, canary_steps=[5, 50])]}) as gateway:
        channel, admin = admin_stub(gateway)
        stages = []
        for _ in range(4):
            reply = await admin.Promote(pb.PromoteRequest(model="m"))
            stages.append((reply.stage, reply.shadow_percent, reply.serve_percent))
        assert stages == [("shadow", 100, 0), ("canary", 100, 5), ("canary", 100, 50), ("cutover", 100, 100)]
        for call, request, code, text in (
            (admin.Promote, pb.PromoteRequest(model="m"), grpc.StatusCode.FAILED_PRECONDITION, "already at cutover"),
            (admin.SetPercentages, pb.SetPercentagesRequest(model="m", serve_percent=150), grpc.StatusCode.INVALID_ARGUMENT,
             "serve_percent must be between 0 and 100, got 150"),
            (admin.SetPercentages, pb.SetPercentagesRequest(model="m"), grpc.StatusCode.INVALID_ARGUMENT, "give shadow_percent"),
            (admin.Rollback, pb.RollbackRequest(model="nope"), grpc.StatusCode.NOT_FOUND, "unknown model 'nope'"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await call(request)
            assert failure.value.code() == code and text in failure.value.details()
        reply = await admin.Rollback(pb.RollbackRequest(model="m", reason="bad canary"))
        assert (reply.stage, reply.serve_percent, reply.last_rollback_reason) == ("rolled_back", 0, "bad canary")
        assert (await admin.Promote(pb.PromoteRequest(model="m"))).stage == "shadow"
        status = await admin.Status(pb.StatusRequest(include_history=True))
        assert [change.new_stage for change in status.history] == [
            "shadow", "canary", "canary", "cutover", "rolled_back", "shadow"]
        assert sample(gateway.registry, "shadowserve_rollbacks_total", model="m", reason="manual") == 1
        await channel.close()


async def test_admin_refuses_non_loopback_unless_allowed():
    with pytest.raises(ConfigError, match="admin_allow_remote"):
        await start_admin_server(None, ServerConfig.model_construct(admin_listen="0.0.0.0:0", admin_allow_remote=False))
