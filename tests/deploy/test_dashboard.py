"""dashboards/: the committed JSON is what dashboards/generate.py produces, and it is fleet-aware.

The dashboard's queries run against a real Prometheus in tests/server/test_prometheus.py.
"""

from __future__ import annotations

import json
import re

from tests.deploy.support import REPO, run_script

GENERATOR = REPO / "dashboards" / "generate.py"
DASHBOARD = REPO / "dashboards" / "shadowserve.json"


def test_the_committed_json_is_the_generators_output(tmp_path):
    result = run_script(GENERATOR, "--check")
    assert result.returncode == 0, result.stderr
    stale = tmp_path / "generate.py"
    stale.write_text(GENERATOR.read_text().replace('"title": "shadowserve: legacy vs candidate"', '"title": "renamed"'))
    (tmp_path / "shadowserve.json").write_text(DASHBOARD.read_text())
    assert run_script(stale, "--check").returncode == 1, "--check notices a JSON that is not the generator's"


def test_every_query_is_scoped_to_the_chosen_namespace_and_pods():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = [v["name"] for v in dashboard["templating"]["list"]]
    assert variables == ["datasource", "namespace", "pod", "model"]
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    for expr in exprs:
        for selector in re.findall(r"shadowserve_\w+\{([^}]*)\}", expr):
            assert 'namespace=~"$namespace"' in selector and 'pod=~"$pod"' in selector, expr
        assert "shadowserve_" in expr


def test_replicas_that_disagree_and_fleet_events_are_shown():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = {p["title"]: p for p in dashboard["panels"]}
    for title in ("Shadow % (lowest / highest replica)", "Serve % (lowest / highest replica)"):
        assert [t["expr"].split(" ")[0] for t in panels[title]["targets"]] == ["min", "max"], "not hidden behind max"
    per_replica = panels["Rollout state per replica"]
    assert all("by (namespace, pod" in t["expr"] for t in per_replica["targets"])
    assert "shadowserve_rollout_info" in panels["Distinct rollout states across replicas"]["targets"][0]["expr"]
    annotations = {a["name"]: a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a}
    assert "shadowserve_rollbacks_total" in annotations["Rollbacks"]
    assert "shadowserve_config_reloads_total" in annotations["Config changes"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
