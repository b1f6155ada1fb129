"""Every Prometheus metric the gateway exports, defined here and nowhere else.

Names and labels are a contract with the dashboards and alerts in `dashboards/` and `deploy/`.
"""

from __future__ import annotations

import math
import os
import platform
from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from server import build_version
from server.compare import MATCH, MEASURES, MISMATCH, SHAPE_MISMATCH, Comparison

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)
DIVERGENCE_BUCKETS = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0)
ROLES = ("legacy", "candidate")
VERDICTS = (MATCH, MISMATCH, SHAPE_MISMATCH)
SKIP_REASONS = ("sampled_out", "saturated", "overloaded", "timeout", "error", "circuit_open")
SHADOWED_SKIP_REASONS = SKIP_REASONS[1:]  # a shadowed request not compared; sampled_out ones were never shadowed
STAGES = ("off", "shadow", "canary", "cutover", "rolled_back")
ROLLBACK_REASONS = ("manual", "mismatch_rate", "top1_agreement", "error_rate", "latency")
# rate_limit and queue_full: never written; cap: deleted by rotation, or alone larger than the cap; error: write failed
CAPTURE_DROP_REASONS = ("rate_limit", "queue_full", "cap", "error")
FALLBACK_REASONS = ("not_ready", "timeout", "error", "circuit_open", "unjudged")
RELOAD_RESULTS = ("applied", "rejected")


class _Unrecorded:
    """Stands in for every metric family when metrics are off: each update does nothing."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def labels(self, *values: str) -> "_Unrecorded":
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    dec = set = observe = inc

    def remove(self, *values: str) -> None:
        pass


def _move_info(family: Gauge, old: tuple[str, ...] | None, new: tuple[str, ...]) -> None:
    """An info gauge shows one label set at 1: the old one goes (to 0 where processes share metrics files)."""
    if old == new:
        return
    if old is not None:
        family.labels(*old).set(0)
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # those files cannot drop a series
            family.remove(*old)
    family.labels(*new).set(1)


class Metrics:
    """The gateway's metric families, registered in `registry` (a fresh one per test).

    With `enabled=False` nothing is recorded or exported: only to measure what metrics cost.
    """

    def __init__(self, registry: CollectorRegistry, enabled: bool = True) -> None:
        self.registry = registry
        counter, gauge, histogram = (Counter, Gauge, Histogram) if enabled else (_Unrecorded,) * 3
        self.requests = counter(
            "shadowserve_requests_total", "Inference requests answered, by gRPC status code name.",
            ["model", "code", "served_by"], registry=registry)
        self.backend_latency = histogram(
            "shadowserve_backend_latency_seconds", "Latency of one backend call.",
            ["model", "role"], buckets=LATENCY_BUCKETS, registry=registry)
        self.backend_errors = counter(
            "shadowserve_backend_errors_total", "Backend calls that failed, by gRPC status code name.",
            ["model", "role", "code"], registry=registry)
        self.comparisons = counter(
            "shadowserve_comparisons_total", "Legacy/candidate answer pairs compared, by verdict.",
            ["model", "verdict"], registry=registry)
        self.divergence = histogram(
            "shadowserve_divergence", "Divergence of the candidate output from the legacy output.",
            ["model", "output", "measure"], buckets=DIVERGENCE_BUCKETS, registry=registry)
        self.top1_agreement = counter(
            "shadowserve_top1_agreement_total", "Rows of class-score outputs whose top-1 class agrees.",
            ["model", "output", "agree"], registry=registry)
        self.topk_overlap = histogram(
            "shadowserve_topk_overlap_ratio", "Share of the legacy top-k classes found in the candidate top-k.",
            ["model", "output"], buckets=(0.2, 0.4, 0.6, 0.8, 0.99, 1.0), registry=registry)
        self.shadow_skipped = counter(
            "shadowserve_shadow_skipped_total", "Requests not compared, by reason.",
            ["model", "reason"], registry=registry)
        self.shadow_in_flight = gauge(
            "shadowserve_shadow_in_flight", "Shadow calls running now.", ["model"],
            registry=registry, multiprocess_mode="livesum")
        self.shadow_percent = gauge(
            "shadowserve_shadow_percent", "Share of requests also sent to the shadow side.", ["model"],
            registry=registry, multiprocess_mode="mostrecent")
        self.serve_percent = gauge(
            "shadowserve_serve_percent", "Share of requests answered by the candidate.", ["model"],
            registry=registry, multiprocess_mode="mostrecent")
        self.stage = gauge(
            "shadowserve_stage", "Rollout stage of a model pair (1 for the current stage).", ["model", "stage"],
            registry=registry, multiprocess_mode="mostrecent")
        self.circuit_open = gauge(
            "shadowserve_candidate_circuit_open", "1 while the candidate's circuit breaker is open (calls skipped).",
            ["model"], registry=registry, multiprocess_mode="livemax")
        self.loop_busy = gauge(
            "shadowserve_event_loop_busy_ratio",
            "Share of time the event loop spends running callbacks instead of waiting, "
            "averaged over the last few tenths of a second.",
            registry=registry, multiprocess_mode="livemax")
        self.fallbacks = counter(
            "shadowserve_fallbacks_total", "Candidate-served requests answered by the legacy instead.",
            ["model", "reason"], registry=registry)
        self.rollbacks = counter(
            "shadowserve_rollbacks_total", "Rollbacks of the candidate, by reason.",
            ["model", "reason"], registry=registry)
        self.config_reloads = counter(
            "shadowserve_config_reloads_total", "Config file reloads, by result.", ["result"], registry=registry)
        self.rollout_info = gauge(
            "shadowserve_rollout_info", "1 for the stage and percentages this replica applies to a model pair "
            "(percentages as text like \"25\"); replicas disagree when a model shows more than one.",
            ["model", "stage", "shadow_percent", "serve_percent"], registry=registry, multiprocess_mode="mostrecent")
        self.config_info = gauge(
            "shadowserve_config_info", "1 for the config file content this replica applied: sha256 prefix, 12 hex digits.",
            ["digest"], registry=registry, multiprocess_mode="mostrecent")
        self._config_digest: tuple[str, ...] | None = None
        self.capture_records = counter(
            "shadowserve_capture_records_total", "Compared requests written to the capture folder.",
            ["model"], registry=registry)
        self.capture_dropped = counter(
            "shadowserve_capture_dropped_total",
            "Capture records dropped: rate_limit or queue_full before writing, cap when rotation deleted them "
            "(or one alone exceeds max_bytes), error when writing failed.",
            ["model", "reason"], registry=registry)
        for result in RELOAD_RESULTS:  # at zero from the start, so increase() sees the first one
            self.config_reloads.labels(result)
        self.build_info = gauge(
            "shadowserve_build_info", "Always 1; the labels say which build and Python this gateway runs.",
            ["version", "python"], registry=registry, multiprocess_mode="max")
        self.build_info.labels(build_version(), platform.python_version()).set(1)
        self.engine_restarts = counter(
            "shadowserve_engine_restarts_total", "Restarts of the shadow engine process after it died or hung.",
            registry=registry)
        self.engine_up = gauge(
            "shadowserve_engine_up", "1 while the shadow engine process runs and answers its heartbeat.",
            registry=registry, multiprocess_mode="max")
        self.legacy_up = gauge(
            "shadowserve_legacy_up", "1 while the model's legacy backend answers; 0 turns the model not ready "
            "(ModelReady, its grpc.health.v1 service) until it answers again.",
            ["model"], registry=registry, multiprocess_mode="livemin")
        self.worker_restarts = counter(
            "shadowserve_worker_restarts_total", "Restarts of primary worker processes (serve --workers N) after one died.",
            registry=registry)
        self.candidate_killed = counter(
            "shadowserve_candidate_killed_total",
            "In-process candidate inferences that ran past their deadline: the shadow engine running them is killed "
            "with them and restarted, since a thread cannot be stopped.", ["model"], registry=registry)

    def config_applied(self, digest: str) -> None:
        """The gateway now follows the config file whose content has this sha256 (hex)."""
        new = (digest[:12],)
        _move_info(self.config_info, self._config_digest, new)
        self._config_digest = new

    def for_model(self, model: str, outputs: Iterable[str], class_score_outputs: Iterable[str] = ()) -> "ModelMetrics":
        return ModelMetrics(self, model, tuple(outputs), tuple(class_score_outputs))


class ModelMetrics:
    """The metric children of one model pair, bound once so the hot path only increments."""

    def __init__(self, metrics: Metrics, model: str, outputs: tuple[str, ...], class_score_outputs: tuple[str, ...]):
        self.model = model
        self._metrics = metrics
        self.latency = {role: metrics.backend_latency.labels(model, role) for role in ROLES}
        self.comparisons = {verdict: metrics.comparisons.labels(model, verdict) for verdict in VERDICTS}
        self.skipped = {reason: metrics.shadow_skipped.labels(model, reason) for reason in SKIP_REASONS}
        self.divergence = {
            (output, measure): metrics.divergence.labels(model, output, measure)
            for output in outputs for measure in MEASURES
        }
        self.top1 = {
            (output, agree): metrics.top1_agreement.labels(model, output, agree)
            for output in class_score_outputs for agree in ("true", "false")
        }
        self.topk = {output: metrics.topk_overlap.labels(model, output) for output in class_score_outputs}
        self.in_flight = metrics.shadow_in_flight.labels(model)
        self.shadow_percent = metrics.shadow_percent.labels(model)
        self.serve_percent = metrics.serve_percent.labels(model)
        self.circuit_open = metrics.circuit_open.labels(model)
        self.circuit_open.set(0)
        self._rollout: tuple[str, ...] | None = None
        self._requests: dict[tuple[str, str], Counter] = {}
        self._errors: dict[tuple[str, str], Counter] = {}
        for served_by in ROLES:
            self._request_child("OK", served_by)
        for reason in FALLBACK_REASONS:  # counters alerts read exist at zero before the first event
            metrics.fallbacks.labels(model, reason)
        for reason in ROLLBACK_REASONS:
            metrics.rollbacks.labels(model, reason)

    def _request_child(self, code: str, served_by: str) -> Counter:
        child = self._requests.get((code, served_by))
        if child is None:
            child = self._requests[(code, served_by)] = self._metrics.requests.labels(self.model, code, served_by)
        return child

    def set_legacy_up(self, up: bool) -> None:
        """Bound on first use: a process that never calls the legacy (the engine) must not report it down."""
        self._metrics.legacy_up.labels(self.model).set(1 if up else 0)

    def request(self, code: str, served_by: str) -> None:
        self._request_child(code, served_by).inc()

    def backend_error(self, role: str, code: str) -> None:
        child = self._errors.get((role, code))
        if child is None:
            child = self._errors[(role, code)] = self._metrics.backend_errors.labels(self.model, role, code)
        child.inc()

    def comparison(self, comparison: Comparison) -> None:
        self.comparisons[comparison.verdict].inc()
        for output, result in comparison.outputs.items():
            for measure, value in result.measures().items():
                if math.isfinite(value):  # a NaN/inf would poison the histogram sum for good
                    self.divergence[(output, measure)].observe(value)
            if result.top1_total:
                self.top1[(output, "true")].inc(result.top1_agree)
                self.top1[(output, "false")].inc(result.top1_total - result.top1_agree)
                self.topk[output].observe(result.topk_overlap)

    def stage(self, current: str, shadow_percent: float, serve_percent: float) -> None:
        self.shadow_percent.set(shadow_percent)
        self.serve_percent.set(serve_percent)
        for stage in STAGES:
            self._metrics.stage.labels(self.model, stage).set(1 if stage == current else 0)
        rollout = (self.model, current, f"{shadow_percent:g}", f"{serve_percent:g}")
        _move_info(self._metrics.rollout_info, self._rollout, rollout)
        self._rollout = rollout

    def fallback(self, reason: str) -> None:
        self._metrics.fallbacks.labels(self.model, reason).inc()

    def rollback(self, reason: str) -> None:
        self._metrics.rollbacks.labels(self.model, reason).inc()
