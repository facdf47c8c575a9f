"""Canary analysis rules: per-metric verdicts, interval verdicts, and the running decision.

Pure: numbers in, verdicts out. Prometheus (``tasks/metrics.py``) fills an
:class:`IntervalObservation` per analysis interval, canary against stable; the release flow
feeds each :class:`IntervalVerdict` to an :class:`AnalysisRun`, which says what to do next.

Rules (docs/analysis.md explains them with numbers):

* A metric is **Inconclusive** when the canary has no data, or (for traffic metrics) fewer
  requests than the policy's ``min_requests`` in the interval. Missing data is never a pass.
* **Fail** when the canary is above the rule's absolute ``max``.
* **Fail** when the canary is above ``max_vs_stable`` x stable *and* above the metric's noise
  floor *and*, where the counts allow a statistical test, the canary is significantly worse
  than stable (one-sided Fisher exact test on 5xx counts; one-sided Mann-Whitney U on the
  latency histograms). An exceedance that the test calls noise passes, with the p-value in
  the reason.
* An interval is Fail if any metric fails, else Inconclusive if any is, else Pass.
* The run rolls back when failures > ``failure_limit`` or inconclusive intervals >
  ``inconclusive_limit`` (both counted over the whole release); a step needs
  ``analyses_per_step`` passing intervals before its weight is raised.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field
from scipy import special, stats

from core.catalog import CanaryPolicy, MetricRule, MetricRules

DEFAULT_ALPHA = 0.01
"""Significance level of the one-sided tests (a false-alarm rate of 1% per test)."""

TRAFFIC_METRICS = frozenset({"error_ratio", "p99_latency_seconds"})
# Metrics whose value follows the load on a pod: compared only between tracks that carry
# comparable load per pod.
LOAD_SENSITIVE = frozenset({"p99_latency_seconds"})
"""Metrics that mean nothing without enough requests in the interval."""

NOISE_FLOORS: dict[str, float] = {
    "error_ratio": 0.005,  # half a percent of 5xx
    "p99_latency_seconds": 0.025,  # 25 ms
    "restarts": 0.0,
    "cpu": 0.05,  # cores
    "memory": 32 * 1024 * 1024,  # bytes
    "business": 0.0,
}
"""Below these canary values a *relative* bound never fails: ratios of tiny numbers are
noise (two idle containers can differ 5x in CPU). Absolute bounds always apply."""

LatencyBuckets = list[tuple[float, float]]
"""A cumulative histogram as Prometheus keeps it: ``(le, count of requests <= le)``,
sorted by ``le``, the last ``le`` usually ``inf``."""


class Verdict(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"

    @property
    def label(self) -> str:
        """For people: Pass, Fail, Inconclusive."""
        return self.value.capitalize()


class Decision(StrEnum):
    CONTINUE = "continue"  # analyse again at the same weight
    NEXT_STEP = "next_step"  # commit the next canary weight
    PROMOTE = "promote"  # every step passed: make the canary the stable
    ROLLBACK = "rollback"


class _Model(BaseModel):
    # "constants": the +Inf bucket bound survives a JSON round trip (persisted results).
    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="constants")


class TrackObservation(_Model):
    """What one track (canary or stable) did in one interval."""

    requests: float | None = Field(default=None, description="Requests in the window.")
    errors: float | None = Field(default=None, description="5xx responses in the window.")
    latency_buckets: LatencyBuckets | None = Field(
        default=None, description="Cumulative latency histogram increase over the window."
    )
    values: dict[str, float | None] = Field(
        default_factory=dict, description="Metric name -> value (None: no data)."
    )


class IntervalObservation(_Model):
    end: datetime
    window_seconds: float
    canary: TrackObservation
    stable: TrackObservation


class MetricVerdict(_Model):
    metric: str
    verdict: Verdict
    canary: float | None
    stable: float | None
    threshold: str
    reason: str
    p_value: float | None = None


class IntervalVerdict(_Model):
    end: datetime
    window_seconds: float
    verdict: Verdict
    reason: str
    metrics: list[MetricVerdict]
    canary_requests: float | None
    stable_requests: float | None


class MetricSource(Protocol):
    """Anything that can say what canary and stable did in a window ending at ``end``."""

    def observe(self, end: datetime, window_seconds: float) -> IntervalObservation: ...


# --- statistics ----------------------------------------------------------------------------


def fisher_greater(
    canary_errors: float, canary_requests: float, stable_errors: float, stable_requests: float
) -> float | None:
    """One-sided Fisher exact p-value for "the canary's error rate is higher than stable's".

    ``None`` when the counts cannot support a test (no requests on a side).
    """
    ce, cn = round(canary_errors), round(canary_requests)
    se, sn = round(stable_errors), round(stable_requests)
    if cn <= 0 or sn <= 0:
        return None
    ce, se = min(max(ce, 0), cn), min(max(se, 0), sn)
    table = [[ce, cn - ce], [se, sn - se]]
    result = stats.fisher_exact(table, alternative="greater")
    return float(result.pvalue)


def _bin_counts(buckets: LatencyBuckets) -> list[float]:
    counts, previous = [], 0.0
    for _, cumulative in buckets:
        # Counter resets or float noise can make a cumulative series dip: clamp at zero.
        counts.append(max(cumulative - previous, 0.0))
        previous = max(cumulative, previous)
    return counts


def align_buckets(a: LatencyBuckets, b: LatencyBuckets) -> tuple[LatencyBuckets, LatencyBuckets]:
    """Put two histograms on the union of their bounds.

    Exporters normally expose every bucket, but a series that never moved may be missing;
    a missing bound takes the cumulative count of the nearest bound below it (0 if none),
    the lower end of what it can be.
    """
    edges = sorted({le for le, _ in a} | {le for le, _ in b})

    def fill(h: LatencyBuckets) -> LatencyBuckets:
        known, out, last = dict(h), [], 0.0
        for le in edges:
            last = known.get(le, last)
            out.append((le, last))
        return out

    return fill(a), fill(b)


def mann_whitney_greater(canary: LatencyBuckets, stable: LatencyBuckets) -> float | None:
    """One-sided Mann-Whitney U p-value for "canary latencies are stochastically larger".

    Works on the histograms directly: every request in a bucket is a tie at that bucket's
    rank, so U and its tie-corrected variance come from the bin counts (the same numbers
    ``scipy.stats.mannwhitneyu(..., method="asymptotic")`` gives on the expanded samples,
    without materialising one number per request). ``None`` when a side is empty.
    """
    if not canary or not stable:
        return None
    canary, stable = align_buckets(canary, stable)
    c, s = _bin_counts(canary), _bin_counts(stable)
    c = [float(round(x)) for x in c]
    s = [float(round(x)) for x in s]
    n1, n2 = sum(c), sum(s)
    if n1 <= 0 or n2 <= 0:
        return None
    u, stable_below = 0.0, 0.0
    for ci, si in zip(c, s, strict=True):
        u += ci * (stable_below + 0.5 * si)
        stable_below += si
    n = n1 + n2
    ties = sum((ci + si) ** 3 - (ci + si) for ci, si in zip(c, s, strict=True))
    variance = n1 * n2 / 12.0 * ((n + 1) - ties / (n * (n - 1))) if n > 1 else 0.0
    if variance <= 0:
        return 1.0 if u <= n1 * n2 / 2 else 0.0
    z = (u - n1 * n2 / 2.0 - 0.5) / math.sqrt(variance)
    return float(stats.norm.sf(z))


def histogram_quantile(q: float, buckets: LatencyBuckets) -> float | None:
    """Prometheus' ``histogram_quantile`` on one cumulative histogram (linear in a bucket)."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for le, cumulative in buckets:
        if cumulative >= rank:
            if math.isinf(le):
                return lower_bound  # Prometheus answers the last finite bound
            in_bucket = cumulative - lower_count
            if in_bucket <= 0:
                return le
            return lower_bound + (le - lower_bound) * (rank - lower_count) / in_bucket
        lower_bound, lower_count = le, cumulative
    return lower_bound


# --- per-metric rules ----------------------------------------------------------------------


def describe_threshold(rule: MetricRule) -> str:
    parts = []
    if rule.max is not None:
        parts.append(f"<= {rule.max:g}")
    if rule.max_vs_stable is not None:
        parts.append(f"<= {rule.max_vs_stable:g}x stable")
    if rule.min is not None:
        parts.append(f">= {rule.min:g}")
    if rule.min_vs_stable is not None:
        parts.append(f">= {rule.min_vs_stable:g}x stable")
    return ", ".join(parts) or "reported only"


def _fmt(value: float | None) -> str:
    return "no data" if value is None else f"{value:.4g}"


def _usable(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else value


def _p_value(metric: str, canary: TrackObservation, stable: TrackObservation) -> float | None:
    if metric == "error_ratio":
        if None in (canary.errors, canary.requests, stable.errors, stable.requests):
            return None
        return fisher_greater(
            canary.errors or 0.0,
            canary.requests or 0.0,
            stable.errors or 0.0,
            stable.requests or 0.0,
        )
    if metric == "p99_latency_seconds" and canary.latency_buckets and stable.latency_buckets:
        return latency_p_value(canary.latency_buckets, stable.latency_buckets)
    return None


def tail_greater(canary: LatencyBuckets, stable: LatencyBuckets, cut: float) -> float | None:
    """One-sided Fisher p-value for "more canary requests than stable ones are slower than
    ``cut``" (counts above the histogram bound ``cut``)."""
    canary, stable = align_buckets(canary, stable)

    def above(h: LatencyBuckets) -> tuple[float, float]:
        total = h[-1][1]
        at_cut = max((c for le, c in h if le <= cut), default=0.0)
        return total - at_cut, total

    c_above, c_total = above(canary)
    s_above, s_total = above(stable)
    return fisher_greater(c_above, c_total, s_above, s_total)


def latency_p_value(canary: LatencyBuckets, stable: LatencyBuckets) -> float | None:
    """Is the canary slower? Two one-sided tests, Bonferroni-combined:

    * Mann-Whitney U catches a shift of the whole distribution;
    * a tail test catches a regression of a few percent of requests (what moves a P99
      without moving the median): Fisher on the share of requests above the first bucket
      bound at or over the stable's P99.
    """
    p_values = [mann_whitney_greater(canary, stable)]
    stable_p99 = histogram_quantile(0.99, stable)
    if stable_p99 is not None:
        edges = sorted({le for le, _ in canary} | {le for le, _ in stable})
        cut = next((le for le in edges if le >= stable_p99 and not math.isinf(le)), None)
        if cut is not None:
            p_values.append(tail_greater(canary, stable, cut))
    known = [p for p in p_values if p is not None]
    return min(1.0, min(known) * len(known)) if known else None


def judge_metric(
    metric: str,
    rule: MetricRule,
    canary: TrackObservation,
    stable: TrackObservation,
    *,
    min_requests: int,
    alpha: float = DEFAULT_ALPHA,
) -> MetricVerdict:
    """Judge one metric of one interval, canary against stable."""
    threshold = describe_threshold(rule)
    c_value = _usable(canary.values.get(metric))
    s_value = _usable(stable.values.get(metric))

    def verdict(v: Verdict, reason: str, p: float | None = None) -> MetricVerdict:
        return MetricVerdict(
            metric=metric,
            verdict=v,
            canary=c_value,
            stable=s_value,
            threshold=threshold,
            reason=reason,
            p_value=p,
        )

    if rule.min is not None or rule.min_vs_stable is not None:
        return _judge_lower(metric, rule, canary, stable, verdict, alpha=alpha)
    if rule.max is None and rule.max_vs_stable is None:
        return verdict(Verdict.PASS, "no bound configured (reported only)")
    traffic = metric in TRAFFIC_METRICS
    c_requests = canary.requests or 0.0
    if traffic and c_requests < min_requests:
        return verdict(
            Verdict.INCONCLUSIVE,
            f"canary served {c_requests:.0f} requests, fewer than the {min_requests} needed",
        )
    if c_value is None:
        return verdict(Verdict.INCONCLUSIVE, "no data for the canary")
    if rule.max is not None and c_value > rule.max:
        return verdict(Verdict.FAIL, f"canary {_fmt(c_value)} > max {rule.max:g}")
    if rule.max_vs_stable is None:
        return verdict(Verdict.PASS, f"canary {_fmt(c_value)} within max {rule.max:g}")

    stable_known = s_value is not None and (not traffic or (stable.requests or 0.0) >= min_requests)
    if not stable_known or s_value is None:
        if rule.max is not None:
            return verdict(
                Verdict.PASS,
                f"canary {_fmt(c_value)} within max {rule.max:g}; "
                "stable has too little data for the relative bound",
            )
        return verdict(Verdict.INCONCLUSIVE, "stable has no data to compare with")

    bound = rule.max_vs_stable * s_value
    floor = NOISE_FLOORS.get(metric, 0.0)
    if c_value <= bound:
        return verdict(
            Verdict.PASS,
            f"canary {_fmt(c_value)} <= {rule.max_vs_stable:g}x stable {_fmt(s_value)}",
        )
    if c_value <= floor:
        return verdict(
            Verdict.PASS,
            f"canary {_fmt(c_value)} above {rule.max_vs_stable:g}x stable {_fmt(s_value)} "
            f"but under the noise floor {floor:g}",
        )
    p = _p_value(metric, canary, stable)
    if p is not None and p >= alpha:
        return verdict(
            Verdict.PASS,
            f"canary {_fmt(c_value)} > {rule.max_vs_stable:g}x stable {_fmt(s_value)} "
            f"but not significant (p={p:.3g} >= {alpha:g}): noise at this traffic",
            p,
        )
    detail = f"; p={p:.3g}" if p is not None else ""
    return verdict(
        Verdict.FAIL,
        f"canary {_fmt(c_value)} > {rule.max_vs_stable:g}x stable {_fmt(s_value)}{detail}",
        p,
    )


def total_key(metric: str) -> str:
    """Where a ratio metric's count (``MetricRule.total_query``) is kept in ``values``."""
    return f"{metric}:total"


def fisher_less(
    canary_hits: float, canary_total: float, stable_hits: float, stable_total: float
) -> float | None:
    """One-sided Fisher p-value for "the canary's ratio is lower than stable's"."""
    return fisher_greater(
        canary_total - canary_hits, canary_total, stable_total - stable_hits, stable_total
    )


def _judge_lower(
    metric: str,
    rule: MetricRule,
    canary: TrackObservation,
    stable: TrackObservation,
    verdict: Callable[..., MetricVerdict],
    *,
    alpha: float,
) -> MetricVerdict:
    """A metric that must not drop (a business ratio): ``min`` and ``min_vs_stable``.

    Below ``min_vs_stable`` x stable fails only when a one-sided Fisher test on the counts
    (``total_query``: e.g. tasks planned, the ratio being the completed share) says the
    canary is really lower; without counts, below the bound is a Fail.
    """
    c_value = _usable(canary.values.get(metric))
    s_value = _usable(stable.values.get(metric))
    if c_value is None:
        return verdict(Verdict.INCONCLUSIVE, "no data for the canary")
    if rule.min is not None and c_value < rule.min:
        return verdict(Verdict.FAIL, f"canary {_fmt(c_value)} < min {rule.min:g}")
    if rule.min_vs_stable is None:
        return verdict(Verdict.PASS, f"canary {_fmt(c_value)} within min {rule.min:g}")
    if s_value is None:
        if rule.min is not None:
            return verdict(
                Verdict.PASS,
                f"canary {_fmt(c_value)} within min {rule.min:g}; stable has no data for "
                "the relative bound",
            )
        return verdict(Verdict.INCONCLUSIVE, "stable has no data to compare with")
    bound = rule.min_vs_stable * s_value
    if c_value >= bound:
        return verdict(
            Verdict.PASS,
            f"canary {_fmt(c_value)} >= {rule.min_vs_stable:g}x stable {_fmt(s_value)}",
        )
    c_total = _usable(canary.values.get(total_key(metric)))
    s_total = _usable(stable.values.get(total_key(metric)))
    p = None
    if c_total and s_total:
        p = fisher_less(c_value * c_total, c_total, s_value * s_total, s_total)
    if p is not None and p >= alpha:
        return verdict(
            Verdict.PASS,
            f"canary {_fmt(c_value)} < {rule.min_vs_stable:g}x stable {_fmt(s_value)} "
            f"but not significant (p={p:.3g} >= {alpha:g}; {c_total:.0f} vs {s_total:.0f})",
            p,
        )
    detail = f"; p={p:.3g} on {c_total:.0f} vs {s_total:.0f}" if p is not None else ""
    return verdict(
        Verdict.FAIL,
        f"canary {_fmt(c_value)} < {rule.min_vs_stable:g}x stable {_fmt(s_value)}{detail}",
        p,
    )


def enabled_rules(rules: MetricRules) -> list[tuple[str, MetricRule]]:
    """The metrics a service is judged on, in a fixed order."""
    out = []
    for name in MetricRules.model_fields:
        rule = getattr(rules, name)
        if rule is not None:
            out.append((name, rule))
    return out


def combine(verdicts: Iterable[MetricVerdict]) -> tuple[Verdict, str]:
    """Worst verdict wins: Fail over Inconclusive over Pass; the reason lists the culprits."""
    items = list(verdicts)
    if not items:
        return Verdict.INCONCLUSIVE, "no metrics to judge"
    for worst in (Verdict.FAIL, Verdict.INCONCLUSIVE):
        bad = [m for m in items if m.verdict == worst]
        if bad:
            return worst, "; ".join(f"{m.metric}: {m.reason}" for m in bad)
    return Verdict.PASS, "all metrics within bounds"


def without_cross_load_bounds(rules: MetricRules) -> MetricRules:
    """The rules for an interval judged against stable's *earlier* interval (at 100 % the
    stable track serves nothing): each canary pod now carries the whole traffic, stable's
    pods carried a share of it then, so a relative latency bound compares two loads, not
    two builds. Seen on the sandbox: a good build at 100 % showed P99 0.45-0.50 s against
    stable's 0.24 s at 50 % and was rolled back. Such a metric keeps its absolute bound
    (and its relative bound at every step where both tracks serve); where it has no
    absolute bound, its relative one stays."""
    changes: dict[str, MetricRule] = {}
    for name in LOAD_SENSITIVE:
        rule = getattr(rules, name, None)
        if rule is not None and rule.max is not None and rule.max_vs_stable is not None:
            changes[name] = rule.model_copy(update={"max_vs_stable": None})
    return rules.model_copy(update=changes)


def judge_interval(
    observation: IntervalObservation,
    rules: MetricRules,
    policy: CanaryPolicy,
    *,
    alpha: float = DEFAULT_ALPHA,
) -> IntervalVerdict:
    """Judge one analysis interval, canary against stable, on every enabled metric."""
    metrics = [
        judge_metric(
            name,
            rule,
            observation.canary,
            observation.stable,
            min_requests=policy.min_requests,
            alpha=alpha,
        )
        for name, rule in enabled_rules(rules)
    ]
    overall, reason = combine(metrics)
    return IntervalVerdict(
        end=observation.end,
        window_seconds=observation.window_seconds,
        verdict=overall,
        reason=reason,
        metrics=metrics,
        canary_requests=observation.canary.requests,
        stable_requests=observation.stable.requests,
    )


def no_data_interval(end: datetime, window_seconds: float, reason: str) -> IntervalVerdict:
    """An Inconclusive interval for when nothing could be measured (e.g. Prometheus down):
    it counts towards the inconclusive limit like any interval without data."""
    return IntervalVerdict(
        end=end,
        window_seconds=window_seconds,
        verdict=Verdict.INCONCLUSIVE,
        reason=f"no data: {reason}",
        metrics=[],
        canary_requests=None,
        stable_requests=None,
    )


def judge_track(
    observation: TrackObservation,
    rules: MetricRules,
    *,
    min_requests: int,
    end: datetime,
    window_seconds: float,
    track: Literal["canary", "stable"] = "stable",
) -> IntervalVerdict:
    """One track on its own (staging check, post-release watch): absolute bounds only.
    Its request count is recorded as the track's (a watch of production's stable track
    says "stable requests", not "canary").

    Metrics with only a relative bound are reported, not judged: there is nothing to
    compare with.
    """
    metrics = []
    for name, rule in enabled_rules(rules):
        absolute = MetricRule(
            max=rule.max, min=rule.min, query=rule.query, total_query=rule.total_query
        )
        metrics.append(
            judge_metric(name, absolute, observation, TrackObservation(), min_requests=min_requests)
        )
    overall, reason = combine(metrics)
    return IntervalVerdict(
        end=end,
        window_seconds=window_seconds,
        verdict=overall,
        reason=reason,
        metrics=metrics,
        canary_requests=observation.requests if track == "canary" else None,
        stable_requests=observation.requests if track == "stable" else None,
    )


# --- the running analysis ------------------------------------------------------------------


class AnalysisRun(BaseModel):
    """The canary's progress over intervals: which step, how many passes, failures, and
    inconclusive intervals so far. ``record`` each interval's verdict; it answers what to do.

    Bounded: at most ``len(steps) * analyses_per_step + failure_limit + inconclusive_limit
    + 1`` intervals before it promotes or rolls back.
    """

    model_config = ConfigDict(extra="forbid")

    steps: list[int]
    analyses_per_step: int
    failure_limit: int
    inconclusive_limit: int
    step_index: int = 0
    passes_in_step: int = 0
    failures: int = 0
    inconclusives: int = 0
    history: list[IntervalVerdict] = Field(default_factory=list)
    decision: Decision | None = None
    reason: str = ""

    @classmethod
    def start(cls, policy: CanaryPolicy) -> AnalysisRun:
        return cls(
            steps=list(policy.steps),
            analyses_per_step=policy.analyses_per_step,
            failure_limit=policy.failure_limit,
            inconclusive_limit=policy.inconclusive_limit,
        )

    @property
    def weight(self) -> int:
        """The canary weight (percent) being analysed now."""
        return self.steps[min(self.step_index, len(self.steps) - 1)]

    @property
    def finished(self) -> bool:
        return self.decision in (Decision.PROMOTE, Decision.ROLLBACK)

    @property
    def max_intervals(self) -> int:
        return (
            len(self.steps) * self.analyses_per_step
            + self.failure_limit
            + self.inconclusive_limit
            + 1
        )

    def record(self, interval: IntervalVerdict) -> Decision:
        """Count one interval's verdict and decide."""
        if self.finished:
            raise ValueError(f"analysis already ended: {self.decision} ({self.reason})")
        self.history.append(interval)
        if interval.verdict == Verdict.FAIL:
            self.failures += 1
            if self.failures > self.failure_limit:
                return self._set(
                    Decision.ROLLBACK,
                    f"{self.failures} failed intervals > failure limit {self.failure_limit} "
                    f"at {self.weight}%: {interval.reason}",
                )
            return self._set(
                Decision.CONTINUE, f"failed interval {self.failures}: {interval.reason}"
            )
        if interval.verdict == Verdict.INCONCLUSIVE:
            self.inconclusives += 1
            if self.inconclusives > self.inconclusive_limit:
                return self._set(
                    Decision.ROLLBACK,
                    f"{self.inconclusives} inconclusive intervals > inconclusive limit "
                    f"{self.inconclusive_limit} at {self.weight}%: {interval.reason}",
                )
            return self._set(
                Decision.CONTINUE, f"inconclusive interval {self.inconclusives}: {interval.reason}"
            )
        self.passes_in_step += 1
        if self.passes_in_step < self.analyses_per_step:
            return self._set(
                Decision.CONTINUE,
                f"{self.passes_in_step}/{self.analyses_per_step} passing intervals at "
                f"{self.weight}%",
            )
        if self.step_index + 1 >= len(self.steps):
            return self._set(Decision.PROMOTE, f"every step passed up to {self.weight}%")
        self.step_index += 1
        self.passes_in_step = 0
        return self._set(Decision.NEXT_STEP, f"step passed; next weight {self.weight}%")

    def _set(self, decision: Decision, reason: str) -> Decision:
        self.decision, self.reason = decision, reason
        return decision


def run_analysis(
    source: MetricSource,
    ends: Sequence[datetime],
    window_seconds: float,
    rules: MetricRules,
    policy: CanaryPolicy,
    *,
    alpha: float = DEFAULT_ALPHA,
) -> AnalysisRun:
    """Drive an :class:`AnalysisRun` over the given interval ends until it ends (a helper
    for simulations and tests; the release flow records intervals one by one as it waits)."""
    run = AnalysisRun.start(policy)
    for end in ends:
        observation = source.observe(end, window_seconds)
        run.record(judge_interval(observation, rules, policy, alpha=alpha))
        if run.finished:
            break
    return run


# --- early abort: a sequential, anytime-valid test -----------------------------------------
#
# Checked as data arrives within an interval (every ``policy.early_abort_check``), on the
# counts since the current weight step began. Each check computes e-values: mixture
# likelihood ratios that are non-negative supermartingales under the null, so by Ville's
# inequality the chance that one *ever* exceeds 1/a is at most a, however often it is looked
# at. The release's alpha is split (Bonferroni) over the steps below 100 % and the two
# signals. docs/analysis.md has the derivation and bench/canary_sim.py the simulation.

TAIL_RATIO = 2.0
"""Null bound of the slow-request test: canary share of slow requests <= 2 x stable's."""

TAIL_SHARE = 0.01
"""Share of requests above the cut a canary may have under the null (the cut is at or above
``max_vs_stable`` x stable's P99, so a canary within its P99 bound has at most 1 % above)."""


def log_e_value(successes: npt.ArrayLike, trials: npt.ArrayLike, p0: npt.ArrayLike) -> Any:
    """Log of the mixture e-value for "the success probability is above ``p0``".

    ``successes`` of ``trials`` Bernoulli draws; the alternative's probability is mixed
    uniformly over ``(p0, 1)``:

        E = [ integral_{p0}^{1} p^x (1-p)^(n-x) dp / (1-p0) ] / [ p0^x (1-p0)^(n-x) ]

    For every true p <= p0 this is a non-negative supermartingale in the draws (each
    component ratio is), so P(sup E >= 1/a) <= a. Works elementwise on arrays; counts are
    rounded (Prometheus' ``increase`` extrapolates).
    """
    x = np.rint(np.asarray(successes, dtype=float))
    n = np.rint(np.asarray(trials, dtype=float))
    x = np.clip(x, 0.0, np.maximum(n, 0.0))
    n = np.maximum(n, x)
    p = np.clip(np.asarray(p0, dtype=float), 1e-12, 1.0 - 1e-12)
    a, b = x + 1.0, n - x + 1.0
    with np.errstate(divide="ignore"):
        upper = np.log(special.betaincc(a, b, p))
    log_integral = special.betaln(a, b) + upper - np.log1p(-p)
    log_null = x * np.log(p) + (n - x) * np.log1p(-p)
    return np.where(n > 0, log_integral - log_null, 0.0)


def split_null_share(
    canary_requests: npt.ArrayLike, stable_requests: npt.ArrayLike, ratio: float
) -> Any:
    """Under "the canary's event rate <= ``ratio`` x stable's", the highest chance that an
    event (a 5xx, a slow request) came from the canary, given the requests each served.
    Elementwise on arrays."""
    c = np.asarray(canary_requests, dtype=float)
    total = c + np.asarray(stable_requests, dtype=float)
    w = np.divide(c, total, out=np.ones_like(total), where=total > 0)
    return np.where(w < 1.0, ratio * w / (ratio * w + (1.0 - w) + 1e-300), 1.0)


def sequential_log_e(
    canary_requests: npt.ArrayLike,
    canary_events: npt.ArrayLike,
    stable_requests: npt.ArrayLike,
    stable_events: npt.ArrayLike,
    *,
    ratio: float,
    floor: float,
) -> Any:
    """Log e-value of "the canary's events (5xx, slow requests) are worse": the smaller of
    (a) the canary's share of all events is above what "canary rate <= ``ratio`` x stable's"
    allows, and (b) the canary's event probability is above ``floor``. Rejecting needs both,
    so the pair is as valid as either. Elementwise on arrays (the simulation checks
    thousands of releases at once with this same function)."""
    c_e = np.asarray(canary_events, dtype=float)
    s_e = np.asarray(stable_events, dtype=float)
    share = split_null_share(canary_requests, stable_requests, ratio)
    relative = log_e_value(c_e, c_e + s_e, share)
    absolute = log_e_value(c_e, canary_requests, floor)
    return np.minimum(relative, absolute)


class SequentialCheck(_Model):
    """One look of the early abort at the counts since the step began."""

    abort: bool
    metric: str | None = None
    log_e: dict[str, float] = Field(default_factory=dict, description="Signal -> log e-value.")
    log_threshold: float
    reason: str


def canary_pod_trouble(pods: Sequence[Mapping[str, Any]]) -> str | None:
    """What the canary's live Pods say about restarts: containers that restarted, exited,
    or wait to be restarted (CrashLoopBackOff). None when every container runs untroubled.
    The canary pods are new with the release, so any restart is the release's."""
    found: list[str] = []
    for pod in pods:
        name = str((pod.get("metadata") or {}).get("name", "?"))
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            restarts = int(status.get("restartCount") or 0)
            state = status.get("state") or {}
            last = (status.get("lastState") or {}).get("terminated") or state.get("terminated")
            waiting = (state.get("waiting") or {}).get("reason")
            if not restarts and not last and waiting not in ("CrashLoopBackOff", "Error"):
                continue
            what = [f"restarted {restarts} time(s)"]
            if last:
                what.append(f"exited {last.get('reason', '?')} (code {last.get('exitCode', '?')})")
            if waiting:
                what.append(f"now {waiting}")
            found.append(f"{name}: {', '.join(what)}")
    return "; ".join(found) or None


def explained_stop(reason: str, trouble: str | None) -> str:
    """A stop whose canary pods restarted or exited names the restarts first: a crash loop
    is why its requests fail, and that is what the operator must fix. The decision stays
    the judge's (the interval analysis or the sequential test); the pods only explain it."""
    return f"on restarts: canary pods {trouble}; {reason}" if trouble else reason


def explained_by_restarts(check: SequentialCheck, trouble: str | None) -> SequentialCheck:
    """:func:`explained_stop` for an early abort."""
    if not check.abort or not trouble:
        return check
    return check.model_copy(update={"reason": explained_stop(check.reason, trouble)})


def early_abort_tests(policy: CanaryPolicy) -> int:
    """How many sequential tests share the release's alpha: two signals per step below 100%
    (at 100 % stable serves nothing to compare with)."""
    return 2 * max(1, sum(1 for step in policy.steps if step < 100))


LATENCY_CUT_FLOOR = 0.1
"""The early abort calls a request slow only above 100 ms, however fast stable is: on a
shared machine a few ms of jitter is not overwhelming evidence (+150 ms still is)."""


def latency_cut(stable: LatencyBuckets, ratio: float) -> float | None:
    """The slow-request cut: the first finite bucket bound at or above ``ratio`` x stable's
    P99 and at or above ``LATENCY_CUT_FLOOR`` (``None`` when stable has no latency data)."""
    p99 = histogram_quantile(0.99, stable)
    if p99 is None:
        return None
    edges = sorted({le for le, _ in stable if not math.isinf(le)})
    return next((le for le in edges if le >= max(ratio * p99, LATENCY_CUT_FLOOR)), None)


def slow_requests(buckets: LatencyBuckets, cut: float) -> tuple[float, float]:
    """(requests slower than ``cut``, all requests) of a cumulative histogram."""
    total = buckets[-1][1]
    at_cut = max((c for le, c in buckets if le <= cut), default=0.0)
    return max(total - at_cut, 0.0), total


def sequential_check(
    canary: TrackObservation,
    stable: TrackObservation,
    rules: MetricRules,
    policy: CanaryPolicy,
    *,
    cut: float | None = None,
) -> SequentialCheck:
    """Is the evidence since the step began overwhelming enough to stop the canary now?

    Per signal, an intersection of two e-value tests at the per-test level
    ``early_abort_alpha / early_abort_tests(policy)`` (both must reject):

    * 5xx: (a) of all 5xx since the step began, the canary's share is above what
      "canary rate <= ``max_vs_stable`` x stable's" allows (``split_null_share``), and (b) the
      canary's 5xx probability is above the noise floor (0.5 %);
    * slow requests above ``cut`` (default :func:`latency_cut` of stable's histogram with
      the P99 rule's ``max_vs_stable``): (a) the canary's share of them is above what "canary
      slow rate <= 2 x stable's" allows, and (b) more than 1 % of the canary's requests are
      slow (what its P99 being within the bound forbids).

    Both (a) and (b) are anytime-valid, so the combined false-alarm rate over a whole
    release, checked as often as one likes, is at most ``early_abort_alpha``.
    """
    alpha = policy.early_abort_alpha
    tests = early_abort_tests(policy)
    log_threshold = math.log(tests / alpha) if alpha else math.inf
    if alpha is None:
        return SequentialCheck(abort=False, log_threshold=log_threshold, reason="early abort off")
    c_n, s_n = canary.requests or 0.0, stable.requests or 0.0
    if c_n <= 0 or s_n <= 0:
        return SequentialCheck(
            abort=False, log_threshold=log_threshold, reason="no traffic on one track yet"
        )
    logs: dict[str, float] = {}
    reasons: dict[str, str] = {}
    error_rule = rules.error_ratio
    if canary.errors is not None and stable.errors is not None:
        ratio = error_rule.max_vs_stable or 1.0
        c_e, s_e = canary.errors, stable.errors
        logs["error_ratio"] = float(
            sequential_log_e(c_n, c_e, s_n, s_e, ratio=ratio, floor=NOISE_FLOORS["error_ratio"])
        )
        reasons["error_ratio"] = (
            f"5xx canary {c_e:.0f}/{c_n:.0f} vs stable {s_e:.0f}/{s_n:.0f} "
            f"(null: <= {ratio:g}x stable and <= {NOISE_FLOORS['error_ratio']:g})"
        )
    if canary.latency_buckets and stable.latency_buckets:
        c_b, s_b = align_buckets(canary.latency_buckets, stable.latency_buckets)
        p99_ratio = rules.p99_latency_seconds.max_vs_stable or 1.0
        where = cut if cut is not None else latency_cut(s_b, p99_ratio)
        if where is not None:
            c_slow, c_total = slow_requests(c_b, where)
            s_slow, s_total = slow_requests(s_b, where)
            logs["p99_latency_seconds"] = float(
                sequential_log_e(
                    c_total, c_slow, s_total, s_slow, ratio=TAIL_RATIO, floor=TAIL_SHARE
                )
            )
            reasons["p99_latency_seconds"] = (
                f"requests slower than {where:g}s: canary {c_slow:.0f}/{c_total:.0f} vs "
                f"stable {s_slow:.0f}/{s_total:.0f} (null: <= {TAIL_RATIO:g}x stable and "
                f"<= {TAIL_SHARE:.0%})"
            )
    crossed = [m for m, value in logs.items() if value >= log_threshold]
    if crossed:
        metric = max(crossed, key=lambda m: logs[m])
        return SequentialCheck(
            abort=True,
            metric=metric,
            log_e=logs,
            log_threshold=log_threshold,
            reason=f"early abort on {metric}: e-value {math.exp(min(logs[metric], 700)):.3g} "
            f">= {tests / alpha:.3g} (false-alarm rate <= {alpha:g} per release); "
            f"{reasons[metric]}",
        )
    best = max(logs.values(), default=0.0)
    return SequentialCheck(
        abort=False,
        log_e=logs,
        log_threshold=log_threshold,
        reason=f"evidence e^{best:.2f} below e^{log_threshold:.2f}",
    )
