"""A real Prometheus scrapes the gateway's /metrics and sees the comparison metrics."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import numpy as np
import tritonclient.grpc.aio as triton_aio

from server.demo.mxnet_models import synthetic_images
from tests.conftest import running_gateway
from tests.server.test_end_to_end import classifier_config
from tests.support.prometheus import prometheus_scraping, query, wait_for_value


async def test_prometheus_scrapes_every_contract_metric(demo_models, tmp_path):
    images, _ = synthetic_images(10, np.random.default_rng(9))
    async with running_gateway(classifier_config(demo_models, demo_models.buggy_torch)) as gateway:
        async with triton_aio.InferenceServerClient(f"127.0.0.1:{gateway.grpc_port}") as client:
            for index in range(10):
                tensor = triton_aio.InferInput("image", [1, 3, 32, 32], "FP32")
                tensor.set_data_from_numpy(images[index : index + 1])
                await client.infer("classifier", [tensor])
        with prometheus_scraping([f"127.0.0.1:{gateway.metrics_port}"], tmp_path) as url:
            await asyncio.to_thread(
                wait_for_value, url, 'sum(shadowserve_comparisons_total{model="classifier"})', 10.0
            )
            checks = {
                'shadowserve_requests_total{model="classifier",code="OK",served_by="legacy"}': 10,
                'sum(shadowserve_top1_agreement_total{model="classifier",output="probabilities"})': 10,
                'shadowserve_backend_latency_seconds_count{model="classifier",role="candidate"}': 10,
                'shadowserve_divergence_count{model="classifier",output="probabilities",measure="cosine"}': 10,
                'shadowserve_shadow_percent{model="classifier"}': 100,
                'shadowserve_shadow_skipped_total{model="classifier",reason="saturated"}': 0,
                'shadowserve_stage{model="classifier",stage="shadow"}': 1,
                'shadowserve_candidate_circuit_open{model="classifier"}': 0,
                'shadowserve_event_loop_busy_ratio': 0,  # pytest's loop cannot be timed (tests/server/test_loop_load.py)
            }
            for promql, expected in checks.items():
                result = await asyncio.to_thread(query, url, promql)
                assert result and float(result[0]["value"][1]) == expected, (promql, result)
            p99 = await asyncio.to_thread(query, url, 'histogram_quantile(0.99, sum by (le) '
                                          '(shadowserve_backend_latency_seconds_bucket{role="legacy"}))')
            assert 0 < float(p99[0]["value"][1]) < 5
            await asyncio.sleep(1.5)  # rate() needs two scrapes in its range
            await asyncio.to_thread(check_dashboard_queries, url)


EVENTS_THIS_RUN_NEVER_HAD = ("backend_errors", "fallbacks", "rollbacks", "config_reloads")


def check_dashboard_queries(url: str) -> None:
    """Every query of the shipped Grafana dashboard runs on a real Prometheus and finds the series it charts."""
    dashboard = json.loads((Path(__file__).parents[2] / "dashboards" / "shadowserve.json").read_text())
    model_variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "model")
    metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", model_variable["definition"]).groups()
    assert query(url, f"count by ({label}) ({metric})"), "the model variable would list nothing"
    empty = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            promql = target["expr"].replace("$model", "classifier")
            if not query(url, promql) and not any(event in promql for event in EVENTS_THIS_RUN_NEVER_HAD):
                empty.append((panel["title"], promql))
    assert not empty, empty
