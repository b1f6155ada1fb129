"""deploy/prometheus: the rules load in Prometheus, and every alert fires in a promtool unit test."""

from __future__ import annotations

import re
import shutil
import subprocess

import yaml
from prometheus_client import CollectorRegistry

from server.metrics import Metrics
from tests.deploy.support import DEPLOY, REPO

RULES = DEPLOY / "prometheus" / "shadowserve.rules.yml"
TESTS = DEPLOY / "prometheus" / "shadowserve.rules.test.yml"
# Metrics of the shadow engine, named now and exported once it lands; alerts may read them already.
ENGINE_METRICS = {"shadowserve_engine_up", "shadowserve_engine_restarts_total", "shadowserve_rollout_info",
                  "shadowserve_config_info"}


def promtool(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    assert binary, "promtool is missing: `make system-deps` installs Debian's prometheus package"
    return subprocess.run([binary, *args], cwd=TESTS.parent, capture_output=True, text=True, timeout=120)


def alert_names() -> set[str]:
    return {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}


def test_rules_are_valid():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_passes_its_unit_tests():
    result = promtool("test", "rules", TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_test_that_makes_it_fire():
    fired = {case["alertname"] for test in yaml.safe_load(TESTS.read_text())["tests"]
             for case in test.get("alert_rule_test", []) if case.get("exp_alerts")}
    assert alert_names() - fired == set()
    assert len(alert_names()) >= 12


def test_promtool_tests_can_fail(tmp_path):
    """A rule that never fires fails its test: the unit tests above do assert something."""
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule["alert"] == "ShadowserveRollback":
                rule["expr"] = rule["expr"].replace("> 0", "> 1000")
    (tmp_path / RULES.name).write_text(yaml.safe_dump(rules))
    shutil.copy(TESTS, tmp_path / TESTS.name)
    binary = shutil.which("promtool")
    result = subprocess.run([binary, "test", "rules", TESTS.name], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "ShadowserveRollback" in result.stdout + result.stderr


def test_alerts_and_dashboard_read_only_metrics_the_gateway_exports():
    registry = CollectorRegistry()
    Metrics(registry)
    families = list(registry.collect())
    exported = {family.name + ("_total" if family.type == "counter" else "") for family in families}
    for source in (RULES, REPO / "dashboards" / "shadowserve.json"):
        used = set(re.findall(r"\bshadowserve_[a-z0-9_]+", source.read_text()))
        unknown = {name for name in used - exported - ENGINE_METRICS
                   if not re.sub(r"_(bucket|count|sum)$", "", name) in exported}
        assert not unknown, f"{source.name} reads metrics the gateway does not export: {sorted(unknown)}"
