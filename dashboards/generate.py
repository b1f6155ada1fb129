"""The Grafana dashboard, as code: `python dashboards/generate.py` writes dashboards/shadowserve.json.

This file is the one source of the dashboard; the JSON is its output, committed so Grafana's
sidecar (deploy/k8s via dashboards/kustomization.yaml) and people importing by hand can use it.
`--check` fails when the committed JSON is not what this file produces.

Plain dictionaries, no library: the dashboard uses a handful of panel kinds, and the JSON stays
readable next to the code that makes it.

Fleet-aware: every query filters on `namespace` and `pod` (labels the Prometheus Operator adds;
`.*` also matches their absence outside Kubernetes), and per-replica views show replicas that
disagree instead of folding them into `max by (model)`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

TARGET = Path(__file__).resolve().parent / "shadowserve.json"

FLEET = 'namespace=~"$namespace",pod=~"$pod"'
SEL = FLEET + ',model=~"$model"'
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def target(expr: str, legend: str = "", instant: bool = False) -> dict[str, Any]:
    """One query; `panel` names it A, B, C... in order."""
    result: dict[str, Any] = {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend or "__auto"}
    if instant:
        result.update(instant=True, range=False, format="table")
    return result


def panel(kind: str, title: str, grid: tuple[int, int, int, int], targets: list[dict[str, Any]],
          description: str = "", unit: str | None = None, **extra: Any) -> dict[str, Any]:
    x, y, w, h = grid
    for index, item in enumerate(targets):
        item["refId"] = chr(ord("A") + index)
    result: dict[str, Any] = {
        "type": kind, "title": title, "description": description, "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": w, "h": h}, "targets": targets,
        "fieldConfig": {"defaults": {}, "overrides": []}, "options": {},
    }
    if unit:
        result["fieldConfig"]["defaults"]["unit"] = unit
    result.update(extra)
    return result


def row(title: str, y: int) -> dict[str, Any]:
    return {"type": "row", "title": title, "collapsed": False, "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []}


def thresholds(*steps: tuple[float | None, str]) -> dict[str, Any]:
    return {"mode": "absolute", "steps": [{"value": value, "color": color} for value, color in steps]}


def rollout_panels(y: int) -> list[dict[str, Any]]:
    distinct = panel(
        "stat", "Distinct rollout states across replicas", (0, y, 6, 5),
        [target(f"count by (model) (count by (model, stage, shadow_percent, serve_percent) "
                f"(shadowserve_rollout_info{{{SEL}}}))", "{{model}}"),
         target(f'count by (model) (count_values by (model) ("serve_percent", shadowserve_serve_percent{{{SEL}}}))',
                "{{model}} serve %")],
        "1 when every replica agrees on the stage and percentages; more means some replica was changed alone "
        "(ctl on one pod, a rollback by its guard) or has not seen the ConfigMap yet.",
    )
    distinct["fieldConfig"]["defaults"]["thresholds"] = thresholds((None, "green"), (2, "red"))
    per_replica = panel(
        "table", "Rollout state per replica", (6, y, 18, 5),
        [target(f"max by (namespace, pod, model, stage) (shadowserve_stage{{{SEL}}}) == 1", instant=True),
         target(f"max by (namespace, pod, model) (shadowserve_shadow_percent{{{SEL}}})", instant=True),
         target(f"max by (namespace, pod, model) (shadowserve_serve_percent{{{SEL}}})", instant=True),
         target(f"max by (namespace, pod, digest) (shadowserve_config_info{{{FLEET}}})", instant=True)],
        "One row per replica and model: the stage it is in and the percentages it applies, and the digest of "
        "the config file it runs. Rows that differ are replicas that disagree.",
        transformations=[{"id": "merge", "options": {}},
                         {"id": "organize", "options": {"excludeByName": {"Time": True}, "renameByName": {
                             "Value #A": "in stage", "Value #B": "shadow %", "Value #C": "serve %",
                             "Value #D": "config"}}}],
    )
    return [
        panel("stat", "Stage", (0, y + 5, 6, 4),
              [target(f"max by (model, stage) (shadowserve_stage{{{SEL}}}) == 1", "{{model}}: {{stage}}")],
              "The stage replicas report; two stages for one model means replicas disagree.",
              options={"textMode": "name"}),
        panel("stat", "Shadow % (lowest / highest replica)", (6, y + 5, 6, 4),
              [target(f"min by (model) (shadowserve_shadow_percent{{{SEL}}})", "{{model}} min"),
               target(f"max by (model) (shadowserve_shadow_percent{{{SEL}}})", "{{model}} max")]),
        panel("stat", "Serve % (lowest / highest replica)", (12, y + 5, 6, 4),
              [target(f"min by (model) (shadowserve_serve_percent{{{SEL}}})", "{{model}} min"),
               target(f"max by (model) (shadowserve_serve_percent{{{SEL}}})", "{{model}} max")],
              "Share of requests the candidate answers."),
        panel("stat", "Match rate (5m)", (18, y + 5, 6, 4),
              [target(f'sum by (model) (rate(shadowserve_comparisons_total{{{SEL},verdict="match"}}[5m])) '
                      f"/ sum by (model) (rate(shadowserve_comparisons_total{{{SEL}}}[5m]))", "{{model}}")],
              unit="percentunit"),
        distinct, per_replica,
    ]


def agreement_panels(y: int) -> list[dict[str, Any]]:
    return [
        panel("timeseries", "Comparison verdicts", (0, y, 12, 8),
              [target(f"sum by (model, verdict) (rate(shadowserve_comparisons_total{{{SEL}}}[1m]))",
                      "{{model}} {{verdict}}")], unit="reqps"),
        panel("timeseries", "Top-1 agreement", (12, y, 12, 8),
              [target(f'sum by (model, output) (rate(shadowserve_top1_agreement_total{{{SEL},agree="true"}}[5m])) '
                      f"/ sum by (model, output) (rate(shadowserve_top1_agreement_total{{{SEL}}}[5m]))",
                      "{{model}} {{output}}")],
              "Alert ShadowserveCandidateTop1Agreement: below 99% for 10 minutes.", unit="percentunit"),
        panel("timeseries", "Divergence p99 by measure", (0, y + 8, 12, 8),
              [target(f"histogram_quantile(0.99, sum by (le, model, output, measure) "
                      f"(rate(shadowserve_divergence_bucket{{{SEL}}}[5m])))", "{{model}} {{output}} {{measure}}")]),
        panel("timeseries", "Match rate by replica", (12, y + 8, 12, 8),
              [target(f'sum by (pod, model) (rate(shadowserve_comparisons_total{{{SEL},verdict="match"}}[5m])) '
                      f"/ sum by (pod, model) (rate(shadowserve_comparisons_total{{{SEL}}}[5m]))", "{{pod}} {{model}}")],
              "One replica apart from the others points at that pod (its node, its config), not the candidate.",
              unit="percentunit"),
    ]


def traffic_panels(y: int) -> list[dict[str, Any]]:
    latency = "histogram_quantile({q}, sum by (le, model, role) (rate(shadowserve_backend_latency_seconds_bucket{{{sel}}}[5m])))"
    return [
        panel("timeseries", "Requests by side and status", (0, y, 12, 8),
              [target(f"sum by (model, served_by, code) (rate(shadowserve_requests_total{{{SEL}}}[1m]))",
                      "{{model}} {{served_by}} {{code}}")], unit="reqps"),
        panel("timeseries", "Latency p50 / p99, legacy vs candidate", (12, y, 12, 8),
              [target(latency.format(q=0.5, sel=SEL), "{{model}} {{role}} p50"),
               target(latency.format(q=0.99, sel=SEL), "{{model}} {{role}} p99")],
              "Alert ShadowserveCandidateLatencyRegression: candidate p99 over 1.5x the legacy p99.", unit="s"),
        panel("timeseries", "Backend errors", (0, y + 8, 12, 8),
              [target(f"sum by (model, role, code) (rate(shadowserve_backend_errors_total{{{SEL}}}[1m]))",
                      "{{model}} {{role}} {{code}}")],
              "Alerts ShadowserveLegacyErrorRate and ShadowserveCandidateErrorRate.", unit="reqps"),
        panel("timeseries", "Fallbacks, rollbacks and config reloads", (12, y + 8, 12, 8),
              [target(f"sum by (model, reason) (increase(shadowserve_fallbacks_total{{{SEL}}}[5m]))",
                      "fallback {{model}} {{reason}}"),
               target(f"sum by (model, reason) (increase(shadowserve_rollbacks_total{{{SEL}}}[5m]))",
                      "rollback {{model}} {{reason}}"),
               target(f"sum by (result) (increase(shadowserve_config_reloads_total{{{FLEET}}}[5m]))",
                      "config {{result}}")]),
    ]


def shadow_health_panels(y: int) -> list[dict[str, Any]]:
    return [
        panel("timeseries", "Shadow calls skipped", (0, y, 12, 8),
              [target(f'sum by (model, reason) (rate(shadowserve_shadow_skipped_total{{{SEL},reason!="sampled_out"}}[1m]))',
                      "{{model}} {{reason}}"),
               target(f"sum by (model) (shadowserve_shadow_in_flight{{{SEL}}})", "{{model}} in flight"),
               target(f"max by (model) (shadowserve_candidate_circuit_open{{{SEL}}})", "{{model}} circuit open")],
              "Alerts ShadowserveShadowSkipped (over 10% of shadowed requests) and ShadowserveCandidateCircuitOpen."),
        panel("timeseries", "Event loop busy by replica", (12, y, 12, 8),
              [target(f"max by (pod) (shadowserve_event_loop_busy_ratio{{{FLEET}}})", "{{pod}}")],
              "Above server.shed_shadow_from_loop_busy, shadow calls are skipped as overloaded.", unit="percentunit"),
        panel("timeseries", "Shadow engine by replica", (0, y + 8, 12, 8),
              [target(f"max by (pod) (shadowserve_engine_up{{{FLEET}}})", "{{pod}} up"),
               target(f"sum by (pod) (increase(shadowserve_engine_restarts_total{{{FLEET}}}[15m]))", "{{pod}} restarts")],
              "Alerts ShadowserveShadowEngineDown and ShadowserveShadowEngineRestarts."),
        panel("table", "Builds running", (12, y + 8, 12, 8),
              [target(f"count by (version, python) (shadowserve_build_info{{{FLEET}}})", instant=True)],
              "Replicas per shadowserve version: more than one row during a rollout of the image."),
    ]


def variable(name: str, query: str) -> dict[str, Any]:
    return {
        "name": name, "label": name, "type": "query", "datasource": DATASOURCE,
        "query": {"query": query, "refId": name}, "definition": query,
        "includeAll": True, "multi": True, "allValue": ".*",
        "current": {"text": "All", "value": "$__all"}, "refresh": 2, "sort": 1,
    }


def annotation(name: str, expr: str, title: str, text: str, color: str) -> dict[str, Any]:
    return {"name": name, "datasource": DATASOURCE, "enable": True, "iconColor": color, "expr": expr,
            "step": "30s", "titleFormat": title, "textFormat": text, "useValueForTime": False}


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y = 0
    for title, make, height in (("Rollout", rollout_panels, 9), ("Agreement", agreement_panels, 16),
                                ("Traffic, latency and errors", traffic_panels, 16),
                                ("Shadow health", shadow_health_panels, 16)):
        panels.append(row(title, y))
        panels.extend(make(y + 1))
        y += height + 1
    for number, item in enumerate(panels, start=1):
        item["id"] = number
    return {
        "title": "shadowserve: legacy vs candidate",
        "uid": "shadowserve-overview",
        "description": "Generated by dashboards/generate.py; edit that file, not this JSON.",
        "schemaVersion": 39,
        "version": 2,
        "tags": ["shadowserve"],
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus"},
            variable("namespace", "label_values(shadowserve_build_info, namespace)"),
            variable("pod", 'label_values(shadowserve_build_info{namespace=~"$namespace"}, pod)'),
            variable("model", f"label_values(shadowserve_requests_total{{{FLEET}}}, model)"),
        ]},
        "annotations": {"list": [
            {"name": "Annotations & Alerts", "builtIn": 1, "type": "dashboard", "enable": True, "hide": True,
             "iconColor": "rgba(0, 211, 255, 1)", "datasource": {"type": "grafana", "uid": "-- Grafana --"}},
            annotation("Rollbacks",
                       f"sum by (model, reason) (increase(shadowserve_rollbacks_total{{{SEL}}}[1m])) > 0",
                       "rollback: {{model}}", "reason {{reason}}", "red"),
            annotation("Rollout changes",
                       f"count by (model) (changes(shadowserve_serve_percent{{{SEL}}}[1m]) > 0 "
                       f"or changes(shadowserve_shadow_percent{{{SEL}}}[1m]) > 0)",
                       "percentages changed: {{model}}", "on {{value}} replicas", "orange"),
            annotation("Config changes",
                       f"sum by (result) (increase(shadowserve_config_reloads_total{{{FLEET}}}[1m])) > 0",
                       "config file {{result}}", "an edit of the ConfigMap reached the replicas", "blue"),
        ]},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not TARGET.is_file() or TARGET.read_text() != text:
            print(f"{TARGET} is not what dashboards/generate.py produces: run python dashboards/generate.py",
                  file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
