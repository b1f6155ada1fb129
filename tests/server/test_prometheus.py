"""A real Prometheus scrapes a gateway run by `shadowserve serve`, and every dashboard query finds its series."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton_grpc
import yaml

from server.demo.mxnet_models import synthetic_images
from tests.deploy.support import serving, shadowserve
from tests.server.test_end_to_end import classifier_config
from tests.support.prometheus import prometheus_scraping, query, wait_for_value

DASHBOARD = Path(__file__).parents[2] / "dashboards" / "shadowserve.json"
FLEET = {"namespace": "test", "pod": "gateway-0"}  # what the Prometheus Operator adds to every series
# Nothing in this run fails or falls back; those panels chart events it never had.
EVENTS_THIS_RUN_NEVER_HAD = ("backend_errors", "fallbacks")


def test_prometheus_scrapes_every_contract_metric_and_the_dashboard_reads_them(demo_models, tmp_path):
    config = classifier_config(demo_models, demo_models.buggy_torch)
    config["server"] = {"config_poll_s": 0.2}
    images, _ = synthetic_images(10, np.random.default_rng(9))
    with serving(config, tmp_path) as gateway, prometheus_scraping([gateway.metrics], tmp_path, labels=FLEET) as url:
        with triton_grpc.InferenceServerClient(gateway.grpc) as client:
            for index in range(10):
                tensor = triton_grpc.InferInput("image", [1, 3, 32, 32], "FP32")
                tensor.set_data_from_numpy(images[index : index + 1])
                client.infer("classifier", [tensor])
        wait_for_value(url, 'sum(shadowserve_comparisons_total{model="classifier"})', 10.0)
        checks = {
            'shadowserve_requests_total{model="classifier",code="OK",served_by="legacy"}': 10,
            'sum(shadowserve_top1_agreement_total{model="classifier",output="probabilities"})': 10,
            'shadowserve_backend_latency_seconds_count{model="classifier",role="candidate"}': 10,
            'shadowserve_divergence_count{model="classifier",output="probabilities",measure="cosine"}': 10,
            'shadowserve_shadow_percent{model="classifier"}': 100,
            'shadowserve_shadow_skipped_total{model="classifier",reason="saturated"}': 0,
            'shadowserve_stage{model="classifier",stage="shadow"}': 1,
            'shadowserve_candidate_circuit_open{model="classifier"}': 0,
            # counters alerts read exist at zero before the first event, so increase() sees it
            'shadowserve_rollbacks_total{model="classifier",reason="manual"}': 0,
            'shadowserve_fallbacks_total{model="classifier",reason="timeout"}': 0,
            'shadowserve_config_reloads_total{result="applied"}': 0,
            'count(shadowserve_build_info{namespace="test",pod="gateway-0"})': 1,
        }
        for promql, expected in checks.items():
            result = query(url, promql)
            assert result and float(result[0]["value"][1]) == expected, (promql, result)
        p99 = query(url, 'histogram_quantile(0.99, sum by (le) (shadowserve_backend_latency_seconds_bucket{role="legacy"}))')
        assert 0 < float(p99[0]["value"][1]) < 5

        # The events the dashboard annotates: a rollback with ctl, then an edit of the config file.
        rollback = shadowserve("ctl", "--admin", gateway.admin, "rollback", "classifier")
        assert rollback.returncode == 0, rollback.stdout + rollback.stderr
        wait_for_value(url, 'shadowserve_rollbacks_total{model="classifier",reason="manual"}', 1.0)
        edited = yaml.safe_load(gateway.config_path.read_text())
        edited["models"][0]["shadow_percent"] = 50
        gateway.config_path.write_text(yaml.safe_dump(edited))
        wait_for_value(url, 'shadowserve_config_reloads_total{result="applied"}', 1.0)
        wait_for_value(url, 'shadowserve_shadow_percent{model="classifier"}', 50.0)
        check_dashboard_queries(url, metrics_text(gateway.metrics))


def metrics_text(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
        return reply.read().decode()


def substitute(promql: str, values: dict[str, str]) -> str:
    return re.sub(r"\$(\w+)", lambda match: values.get(match.group(1), match.group(0)), promql)


def check_dashboard_queries(url: str, exported: str) -> None:
    """Every query of the shipped Grafana dashboard runs on a real Prometheus and finds the series it charts.

    Variables take the values this run's series carry; rates need two scrapes in their range, so
    queries are retried for a few seconds before one counts as empty.
    """
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"] if v["type"] == "query"}
    values = {"model": "classifier", **FLEET}
    for name, variable in variables.items():
        metric_selector, label = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["definition"]).groups()
        found = {item["metric"].get(label) for item in query(url, f"count by ({label}) ({substitute(metric_selector, values)})")}
        assert values[name] in found, f"the {name} variable would not list {values[name]}: {found}"

    queries = [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel.get("targets", [])]
    queries += [(f"annotation {item['name']}", item["expr"]) for item in dashboard["annotations"]["list"] if "expr" in item]
    assert len(queries) >= 25
    deadline = time.monotonic() + 15
    empty = [(title, substitute(expr, values)) for title, expr in queries]
    while empty and time.monotonic() < deadline:
        empty = [(title, promql) for title, promql in empty if not query(url, promql)]
        time.sleep(0.5)
    expected_empty = [(title, promql) for title, promql in empty
                      if any(event in promql for event in EVENTS_THIS_RUN_NEVER_HAD) or not_exported(promql, exported)]
    assert empty == expected_empty, [item for item in empty if item not in expected_empty]


def not_exported(promql: str, exported: str) -> bool:
    """The query reads a metric family this gateway does not export at all (yet): nothing to chart."""
    families = set(re.findall(r"^# TYPE (\w+) ", exported, re.M))
    return any(name not in families and re.sub(r"_(total|bucket|count|sum)$", "", name) not in families
               for name in re.findall(r"shadowserve_[a-z0-9_]+", promql))
