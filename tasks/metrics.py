"""What the release asks Prometheus, and the analysis tasks: the PromQL templates, the
observation of a service's tracks, the interval judge, the canary chart's window and the
early-abort looks. The HTTP client is :mod:`tasks.prometheus`.

Canary and stable are told apart by what the service's traffic router exports
(``core.traffic``): ingress-nginx's ``canary`` label on ``nginx_ingress_controller_requests``
and its latency histogram, or Envoy Gateway's per-backend cluster statistics. Container metrics (restarts, CPU, memory) are selected by pod name: ``<deployment>-<rs>-<pod>``.

Every range window equals the analysis interval and is evaluated at the interval's end.
Templates are plain PromQL with ``{placeholder}`` tokens (only the names in
:data:`PLACEHOLDERS` are replaced, so PromQL's own braces are left alone); a catalog
``MetricRule.query`` replaces the default query of its metric.
"""

from __future__ import annotations

import math
import re
import time as _time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from core.analysis import (
    AnalysisRun,
    IntervalObservation,
    IntervalVerdict,
    LatencyBuckets,
    SequentialCheck,
    TrackObservation,
    Verdict,
    enabled_rules,
    histogram_quantile,
    judge_interval,
    judge_track,
    latency_cut,
    no_data_interval,
    sequential_check,
    total_key,
    without_cross_load_bounds,
)
from core.catalog import CanaryPolicy, MetricRules
from core.errors import InvalidInput, MetricsError
from core.traffic import QUERIES, Router, cluster_matcher
from tasks.caching import once_per_run
from tasks.logs import run_logger
from tasks.prometheus import PrometheusClient, Sample, Series, prom_float, prometheus

Track = Literal["canary", "stable"]

PLACEHOLDERS = (
    "namespace",
    "ingress",
    "canary_ingress",
    "service",
    "deployment",
    "track",
    "canary",
    "canary_matcher",
    "pod_regex",
    "cluster_matcher",
    "window",
)
_PLACEHOLDER = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")

_POD = 'namespace="{namespace}",pod=~"{pod_regex}"'

POD_TEMPLATES: dict[str, str] = {
    "restarts": f"sum(increase(kube_pod_container_status_restarts_total{{{_POD}}}[{{window}}]))",
    # Per pod, so one canary pod compares with the average stable pod.
    "cpu": f"avg(sum by (pod) (rate(container_cpu_usage_seconds_total{{{_POD}}}[{{window}}])))",
    "memory": (
        "avg(sum by (pod) (max_over_time("
        f"container_memory_working_set_bytes{{{_POD}}}[{{window}}])))"
    ),
}
"""Default PromQL for kube-state-metrics and cAdvisor metric names (the same on any router)."""


def templates_for(router: Router) -> dict[str, str]:
    """Every default template for a service on ``router``: its requests, errors and latency
    histogram (``core.traffic``) and the pod metrics. ``error_ratio`` is errors / requests and
    ``p99_latency_seconds`` is the 0.99 quantile of the ``latency_buckets`` histogram, both
    computed here from the same numbers the statistical tests use (unless the catalog gives
    the metric its own query)."""
    return {**QUERIES[router].templates(), **POD_TEMPLATES}


TEMPLATES = templates_for("ingress-nginx")
"""The templates of an ingress-nginx service (the default router)."""


def render(template: str, values: Mapping[str, str]) -> str:
    """Fill ``{placeholder}`` tokens; PromQL's own ``{...}`` selectors are left intact."""

    def fill(match: re.Match[str]) -> str:
        return values[match.group(1)]

    return _PLACEHOLDER.sub(fill, template)


def prom_duration(seconds: float) -> str:
    if seconds <= 0:
        raise InvalidInput(f"analysis window must be positive, got {seconds}s")
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"


@dataclass(frozen=True)
class Target:
    """Where a service's two tracks live in one environment."""

    service: str
    namespace: str
    ingress: str = ""
    canary_ingress: str = ""
    deployment: str = ""
    canary_deployment: str = ""
    router: Router = "ingress-nginx"
    route: str = ""  # gateway-api: the HTTPRoute (default: the service's name)

    @property
    def templates(self) -> dict[str, str]:
        return templates_for(self.router)

    def __post_init__(self) -> None:
        # Names as the manifests contract lays them out: <svc> and <svc>-canary.
        object.__setattr__(self, "ingress", self.ingress or self.service)
        object.__setattr__(self, "canary_ingress", self.canary_ingress or f"{self.service}-canary")
        object.__setattr__(self, "route", self.route or self.service)
        object.__setattr__(self, "deployment", self.deployment or self.service)
        object.__setattr__(
            self, "canary_deployment", self.canary_deployment or f"{self.service}-canary"
        )

    def placeholders(self, track: Track, window: str) -> dict[str, str]:
        deployment = self.canary_deployment if track == "canary" else self.deployment
        return {
            "namespace": self.namespace,
            "ingress": self.ingress,
            "canary_ingress": self.canary_ingress,
            "service": self.service,
            "deployment": deployment,
            "track": track,
            "canary": self.canary_ingress if track == "canary" else "",
            # Real ingress-nginx puts the canary's upstream name in the label, the sandbox
            # the canary Ingress name: "non-empty" selects the canary track with either.
            "canary_matcher": 'canary!=""' if track == "canary" else 'canary=""',
            # Names are DNS labels (no regex metacharacters); PromQL strings refuse "\-".
            "pod_regex": f"{deployment}-[a-z0-9]+-[a-z0-9]+",
            "cluster_matcher": cluster_matcher(self.namespace, self.route, track),
            "window": window,
        }


# --- observing a service -------------------------------------------------------------------


def buckets_from_samples(samples: list[Sample], le_seconds: float = 1.0) -> LatencyBuckets | None:
    """(upper bound in seconds, count) pairs; ``le_seconds`` converts the exporter's unit."""
    pairs = []
    for s in samples:
        le = s.labels.get("le")
        if le is None or math.isnan(s.value):
            continue
        pairs.append((prom_float(le) * le_seconds, s.value))
    if not pairs:
        return None
    pairs.sort()
    return pairs


class PrometheusSource:
    """A :class:`core.analysis.MetricSource` over Prometheus for one service's target."""

    def __init__(self, client: PrometheusClient, target: Target, rules: MetricRules) -> None:
        self.client, self.target, self.rules = client, target, rules
        self.queries: dict[str, str] = {}

    def track(self, track: Track, end: datetime, window_seconds: float) -> TrackObservation:
        values = self.target.placeholders(track, prom_duration(window_seconds))

        def run(name: str, template: str) -> float | None:
            promql = render(template, values)
            self.queries[f"{track}:{name}"] = promql
            return self.client.scalar(promql, end)

        templates = self.target.templates
        requests = run("requests", templates["requests"])
        errors = run("errors", templates["errors"])
        if errors is None and requests is not None:
            errors = 0.0  # requests seen, but no 5xx series has ever appeared
        bucket_query = render(templates["latency_buckets"], values)
        self.queries[f"{track}:latency_buckets"] = bucket_query
        buckets = buckets_from_samples(
            self.client.query(bucket_query, end), QUERIES[self.target.router].le_seconds
        )
        metric_values: dict[str, float | None] = {}
        for name, rule in enabled_rules(self.rules):
            if rule.query:
                metric_values[name] = run(name, rule.query)
                if rule.total_query:
                    metric_values[total_key(name)] = run(total_key(name), rule.total_query)
            elif name == "error_ratio":
                metric_values[name] = errors / requests if requests and errors is not None else None
            elif name == "p99_latency_seconds":
                metric_values[name] = histogram_quantile(0.99, buckets) if buckets else None
            elif name in templates:
                metric_values[name] = run(name, templates[name])
            else:
                metric_values[name] = None  # e.g. business without a query: no data
        return TrackObservation(
            requests=requests,
            errors=errors,
            latency_buckets=buckets,
            values=metric_values,
        )

    def observe(self, end: datetime, window_seconds: float) -> IntervalObservation:
        return IntervalObservation(
            end=end,
            window_seconds=window_seconds,
            canary=self.track("canary", end, window_seconds),
            stable=self.track("stable", end, window_seconds),
        )


class IntervalResult(BaseModel):
    """One analysis interval: what each track did, the queries asked, and the verdict."""

    model_config = ConfigDict(frozen=True)
    service: str
    namespace: str
    analysis: IntervalVerdict
    observation: IntervalObservation
    queries: dict[str, str]

    @property
    def verdict(self) -> Verdict:
        return self.analysis.verdict


def wait_for_interval_end(end_time: datetime, *, scrape_lag_seconds: float) -> None:
    """Block until ``end_time`` (plus the scrape lag) has passed: an interval is judged
    only once it is over and its last samples are scraped. Bounded by the interval itself."""
    if end_time.tzinfo is None:
        raise InvalidInput("end_time must be timezone-aware (UTC)")
    remaining = (end_time - datetime.now(UTC)).total_seconds() + scrape_lag_seconds
    if remaining > 0:
        _time.sleep(remaining)


def _end_and_window(end_time: datetime | None, window_seconds: float) -> datetime:
    if window_seconds <= 0:
        raise InvalidInput(f"window_seconds must be positive, got {window_seconds}")
    return end_time or datetime.now(UTC)


def new_analysis(policy: CanaryPolicy) -> AnalysisRun:
    """A fresh running analysis for a canary under ``policy`` (see core.analysis)."""
    return AnalysisRun.start(policy)


@task(name="analyse-interval", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def analyse_interval(
    service: str,
    namespace: str,
    rules: MetricRules,
    policy: CanaryPolicy,
    *,
    end_time: datetime | None = None,
    window_seconds: float,
    target: Target | None = None,
    prometheus_url: str | None = None,
    scrape_lag_seconds: float = 2.0,
    unavailable_is_inconclusive: bool = False,
    stable_baseline: TrackObservation | None = None,
) -> IntervalResult:
    """Judge one canary interval ``[end_time - window, end_time]`` against stable.

    ``stable_baseline``: what stable did in an earlier interval, judged against when stable
    itself serves too little now (at 100% every request goes to the canary, so relative
    bounds compare with the stable as it was at the previous weight).

    Waits for ``end_time`` if it is still ahead. When Prometheus cannot answer it raises
    MetricsError (after the task's retries), or, with ``unavailable_is_inconclusive``,
    returns an Inconclusive interval saying why: an outage then counts towards the
    inconclusive limit like any interval without data, and a long one rolls back.
    """
    end = _end_and_window(end_time, window_seconds)
    wait_for_interval_end(end, scrape_lag_seconds=scrape_lag_seconds)
    where = target or Target(service=service, namespace=namespace)
    with prometheus(prometheus_url) as client:
        source = PrometheusSource(client, where, rules)
        try:
            observation = source.observe(end, window_seconds)
        except MetricsError as exc:
            if not unavailable_is_inconclusive:
                raise
            run_logger("robotics_cd.metrics").warning(
                "%s/%s interval without data: %s", namespace, service, exc
            )
            return IntervalResult(
                service=service,
                namespace=namespace,
                analysis=no_data_interval(end, window_seconds, str(exc)),
                observation=IntervalObservation(
                    end=end,
                    window_seconds=window_seconds,
                    canary=TrackObservation(),
                    stable=TrackObservation(),
                ),
                queries=source.queries,
            )
    if stable_baseline is not None and (observation.stable.requests or 0.0) < policy.min_requests:
        observation = observation.model_copy(update={"stable": stable_baseline})
        rules = without_cross_load_bounds(rules)
    verdict = judge_interval(observation, rules, policy)
    run_logger("robotics_cd.metrics").info(
        "%s/%s interval ending %s: %s (%s)",
        namespace,
        service,
        end.isoformat(),
        verdict.verdict,
        verdict.reason,
    )
    return IntervalResult(
        service=service,
        namespace=namespace,
        analysis=verdict,
        observation=observation,
        queries=source.queries,
    )


def check_track(
    service: str,
    namespace: str,
    rules: MetricRules,
    *,
    min_requests: int,
    end_time: datetime | None = None,
    window_seconds: float,
    track: Track = "stable",
    target: Target | None = None,
    prometheus_url: str | None = None,
    scrape_lag_seconds: float = 2.0,
) -> IntervalResult:
    """Error ratio, P99 (and the other absolute bounds) of one track over a window, judged
    by the same rules as the canary (absolute bounds only: there is nothing to compare with).
    """
    end = _end_and_window(end_time, window_seconds)
    wait_for_interval_end(end, scrape_lag_seconds=scrape_lag_seconds)
    where = target or Target(service=service, namespace=namespace)
    with prometheus(prometheus_url) as client:
        source = PrometheusSource(client, where, rules)
        observed = source.track(track, end, window_seconds)
    verdict = judge_track(
        observed,
        rules,
        min_requests=min_requests,
        end=end,
        window_seconds=window_seconds,
        track=track,
    )
    empty = type(observed)()
    observation = IntervalObservation(
        end=end,
        window_seconds=window_seconds,
        canary=observed if track == "canary" else empty,
        stable=observed if track == "stable" else empty,
    )
    return IntervalResult(
        service=service,
        namespace=namespace,
        analysis=verdict,
        observation=observation,
        queries=source.queries,
    )


# Two tasks, one measurement: each with its own name in the UI and its own cache rule.
# The staging check is measured once per run (a run resumed after its approval keeps its
# answer); each window of the post-release watch (production's stable track) is new.
staging_check = task(
    name="staging-metrics", retries=2, retry_delay_seconds=2, cache_key_fn=once_per_run
)(check_track)
post_release_watch = task(
    name="post-release-watch", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE
)(check_track)


# --- the canary window, for the chart ------------------------------------------------------


class WindowSeries(BaseModel):
    """Error ratio and P99 of both tracks over the canary window (for the chart)."""

    model_config = ConfigDict(frozen=True)
    error_ratio: dict[str, list[tuple[float, float]]]
    p99_latency_seconds: dict[str, list[tuple[float, float]]]


def _points(series: list[Series]) -> list[tuple[float, float]]:
    if not series:
        return []
    return [(t, v) for t, v in series[0].points if not math.isnan(v)]


@task(name="canary-window", retries=2, retry_delay_seconds=2)
def canary_window(
    service: str,
    namespace: str,
    *,
    start: datetime,
    end: datetime,
    step_seconds: float = 5.0,
    rate_window_seconds: float = 10.0,
    target: Target | None = None,
    prometheus_url: str | None = None,
) -> WindowSeries:
    """Per-step error ratio and P99 of canary and stable between ``start`` and ``end``."""
    if end <= start:
        raise InvalidInput("canary window end must be after its start")
    where = target or Target(service=service, namespace=namespace)
    window = prom_duration(rate_window_seconds)
    errors: dict[str, list[tuple[float, float]]] = {}
    p99: dict[str, list[tuple[float, float]]] = {}
    with prometheus(prometheus_url) as client:
        for track in ("canary", "stable"):
            values = where.placeholders(track, window)  # type: ignore[arg-type]
            ratio = (
                f"({render(where.templates['errors'], values)} or vector(0)) / "
                f"{render(where.templates['requests'], values)}"
            )
            quantile = render(where.templates["p99_rate"], values)
            errors[track] = _points(client.query_range(ratio, start, end, step_seconds))
            p99[track] = _points(client.query_range(quantile, start, end, step_seconds))
    return WindowSeries(error_ratio=errors, p99_latency_seconds=p99)


# --- early abort: looks within an interval ------------------------------------------------


def _traffic(
    client: PrometheusClient, target: Target, track: Track, end: datetime, window: float
) -> TrackObservation:
    values = target.placeholders(track, prom_duration(window))
    requests = client.scalar(render(TEMPLATES["requests"], values), end)
    errors = client.scalar(render(TEMPLATES["errors"], values), end)
    if errors is None and requests is not None:
        errors = 0.0
    buckets = buckets_from_samples(client.query(render(TEMPLATES["latency_buckets"], values), end))
    return TrackObservation(requests=requests, errors=errors, latency_buckets=buckets)


def stable_latency_cut(
    service: str,
    namespace: str,
    rules: MetricRules,
    *,
    before: datetime,
    window_seconds: float,
    prometheus_url: str | None = None,
    target: Target | None = None,
) -> float | None:
    """The early abort's slow-request cut for a step, fixed before the step's data: from
    the stable track's latency histogram over the window ending at ``before``."""
    where = target or Target(service=service, namespace=namespace)
    with prometheus(prometheus_url) as client:
        stable = _traffic(client, where, "stable", before, window_seconds)
    if not stable.latency_buckets:
        return None
    return latency_cut(stable.latency_buckets, rules.p99_latency_seconds.max_vs_stable or 1.0)


def early_abort_check(
    service: str,
    namespace: str,
    rules: MetricRules,
    policy: CanaryPolicy,
    *,
    since: datetime,
    cut: float | None,
    now: datetime | None = None,
    prometheus_url: str | None = None,
    target: Target | None = None,
) -> SequentialCheck:
    """One look of the early abort: requests, 5xx and latency of both tracks since the step
    began (``since``), judged by :func:`core.analysis.sequential_check`. A plain function,
    not a task: the flow looks every few seconds and a task run per look would flood the
    Prefect API; a stop is recorded by the flow. Raises MetricsError when Prometheus does
    not answer (the flow logs it; the interval judge still judges the interval)."""
    end = now or datetime.now(UTC)
    window = max((end - since).total_seconds(), 1.0)
    where = target or Target(service=service, namespace=namespace)
    with prometheus(prometheus_url) as client:
        canary = _traffic(client, where, "canary", end, window)
        stable = _traffic(client, where, "stable", end, window)
    return sequential_check(canary, stable, rules, policy, cut=cut)
