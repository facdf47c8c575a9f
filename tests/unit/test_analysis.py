"""Canary analysis rules on plain numbers."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from scipy import stats

from core.analysis import (
    AnalysisRun,
    Decision,
    IntervalObservation,
    TrackObservation,
    Verdict,
    fisher_greater,
    histogram_quantile,
    judge_interval,
    judge_metric,
    judge_track,
    mann_whitney_greater,
    no_data_interval,
    run_analysis,
)
from core.catalog import CanaryPolicy, MetricRule, MetricRules

BOUNDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf")]
RULES = MetricRules()
POLICY = CanaryPolicy(
    steps=[50, 100], analyses_per_step=1, failure_limit=1, inconclusive_limit=2, min_requests=50
)
T0 = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def histogram(latencies: list[float]) -> list[tuple[float, float]]:
    return [(le, float(sum(1 for x in latencies if x <= le))) for le in BOUNDS]


def track(
    requests: int,
    error_rate: float,
    latency: float,
    *,
    restarts: float = 0,
    cpu: float = 0.2,
    memory: float = 100e6,
    seed: int = 1,
) -> TrackObservation:
    rng = random.Random(seed)
    errors = round(requests * error_rate)
    latencies = [latency * rng.uniform(0.5, 1.5) for _ in range(requests)]
    buckets = histogram(latencies)
    return TrackObservation(
        requests=requests,
        errors=errors,
        latency_buckets=buckets,
        values={
            "error_ratio": errors / requests if requests else None,
            "p99_latency_seconds": histogram_quantile(0.99, buckets),
            "restarts": restarts,
            "cpu": cpu,
            "memory": memory,
        },
    )


def interval(canary: TrackObservation, stable: TrackObservation, i: int = 0):
    obs = IntervalObservation(
        end=T0 + timedelta(seconds=10 * i), window_seconds=10, canary=canary, stable=stable
    )
    return judge_interval(obs, RULES, POLICY)


def by_metric(verdict, name):
    return next(m for m in verdict.metrics if m.metric == name)


def test_healthy_canary_passes():
    v = interval(track(300, 0.0, 0.02, seed=1), track(900, 0.0, 0.02, seed=2))
    assert v.verdict == Verdict.PASS, v.reason
    assert {m.metric for m in v.metrics} == {
        "error_ratio",
        "p99_latency_seconds",
        "restarts",
        "cpu",
        "memory",
    }


def test_thirty_percent_5xx_fails_on_error_ratio():
    v = interval(track(300, 0.30, 0.02, seed=1), track(900, 0.0, 0.02, seed=2))
    assert v.verdict == Verdict.FAIL
    m = by_metric(v, "error_ratio")
    assert m.verdict == Verdict.FAIL
    assert m.canary == pytest.approx(0.30)
    assert "max 0.05" in m.reason


def test_plus_300ms_fails_on_p99():
    v = interval(track(300, 0.0, 0.32, seed=1), track(900, 0.0, 0.02, seed=2))
    m = by_metric(v, "p99_latency_seconds")
    assert m.verdict == Verdict.FAIL, m.reason
    assert m.p_value is not None and m.p_value < 1e-6
    assert v.verdict == Verdict.FAIL
    # The error metric is untouched by latency.
    assert by_metric(v, "error_ratio").verdict == Verdict.PASS


def test_no_traffic_is_inconclusive_never_pass():
    empty = TrackObservation(requests=0, errors=0, values={"restarts": 0, "cpu": 0.0})
    v = interval(empty, empty)
    assert v.verdict == Verdict.INCONCLUSIVE
    assert by_metric(v, "error_ratio").verdict == Verdict.INCONCLUSIVE
    assert "fewer than the 50 needed" in by_metric(v, "error_ratio").reason


def test_missing_series_is_inconclusive():
    v = interval(TrackObservation(), TrackObservation())
    assert v.verdict == Verdict.INCONCLUSIVE
    assert by_metric(v, "restarts").reason == "no data for the canary"


def test_no_traffic_rolls_back_after_the_inconclusive_limit():
    run = AnalysisRun.start(POLICY)
    empty = TrackObservation(requests=0)
    decisions = [run.record(interval(empty, empty, i)) for i in range(3)]
    assert decisions == [Decision.CONTINUE, Decision.CONTINUE, Decision.ROLLBACK]
    assert "3 inconclusive intervals > inconclusive limit 2" in run.reason
    assert run.finished and run.weight == 50
    with pytest.raises(ValueError, match="already ended"):
        run.record(interval(empty, empty, 4))


def test_failures_roll_back_after_the_failure_limit():
    run = AnalysisRun.start(POLICY)
    bad = track(300, 0.3, 0.02)
    good = track(900, 0.0, 0.02, seed=2)
    assert run.record(interval(bad, good, 0)) == Decision.CONTINUE
    assert run.record(interval(bad, good, 1)) == Decision.ROLLBACK
    assert "2 failed intervals > failure limit 1" in run.reason
    assert "error_ratio" in run.reason


def test_healthy_run_steps_then_promotes():
    policy = CanaryPolicy(steps=[10, 50, 100], analyses_per_step=2, min_requests=50)
    run = AnalysisRun.start(policy)
    ok = interval(track(300, 0.0, 0.02), track(900, 0.0, 0.02, seed=2))
    decisions = [run.record(ok) for _ in range(6)]
    assert decisions == [
        Decision.CONTINUE,
        Decision.NEXT_STEP,
        Decision.CONTINUE,
        Decision.NEXT_STEP,
        Decision.CONTINUE,
        Decision.PROMOTE,
    ]
    assert run.weight == 100 and run.failures == 0


def test_inconclusive_interval_does_not_count_as_a_pass():
    policy = CanaryPolicy(steps=[50, 100], analyses_per_step=1, inconclusive_limit=5)
    run = AnalysisRun.start(policy)
    empty = TrackObservation(requests=0)
    assert run.record(interval(empty, empty)) == Decision.CONTINUE
    assert run.weight == 50 and run.passes_in_step == 0


def test_run_is_bounded():
    run = AnalysisRun.start(CanaryPolicy())
    assert run.max_intervals == 4 * 3 + 1 + 2 + 1


def test_restart_fails_even_without_traffic():
    canary = TrackObservation(requests=0, values={"restarts": 2})
    v = interval(canary, TrackObservation(requests=0, values={"restarts": 0}))
    assert by_metric(v, "restarts").verdict == Verdict.FAIL
    assert v.verdict == Verdict.FAIL


def test_relative_bound_with_noise_is_not_a_failure():
    # 3 errors in 100 vs 1% on stable: 3x the stable ratio, but well within chance.
    canary = TrackObservation(requests=100, errors=3, values={"error_ratio": 0.03})
    stable = TrackObservation(requests=9000, errors=90, values={"error_ratio": 0.01})
    m = judge_metric(
        "error_ratio", MetricRule(max=0.05, max_vs_stable=2.0), canary, stable, min_requests=50
    )
    assert m.verdict == Verdict.PASS
    assert "not significant" in m.reason and m.p_value is not None and m.p_value > 0.01


def test_relative_bound_with_enough_evidence_fails():
    canary = TrackObservation(requests=5000, errors=150, values={"error_ratio": 0.03})
    stable = TrackObservation(requests=9000, errors=90, values={"error_ratio": 0.01})
    m = judge_metric(
        "error_ratio", MetricRule(max=0.05, max_vs_stable=2.0), canary, stable, min_requests=50
    )
    assert m.verdict == Verdict.FAIL
    assert m.p_value is not None and m.p_value < 1e-6


def test_relative_only_metric_without_stable_is_inconclusive():
    m = judge_metric(
        "cpu",
        MetricRule(max_vs_stable=3.0),
        TrackObservation(values={"cpu": 0.5}),
        TrackObservation(),
        min_requests=0,
    )
    assert m.verdict == Verdict.INCONCLUSIVE


def test_relative_bound_ignores_values_under_the_noise_floor():
    m = judge_metric(
        "cpu",
        MetricRule(max_vs_stable=3.0),
        TrackObservation(values={"cpu": 0.004}),
        TrackObservation(values={"cpu": 0.0005}),
        min_requests=0,
    )
    assert m.verdict == Verdict.PASS and "noise floor" in m.reason


def test_cpu_far_above_stable_fails():
    m = judge_metric(
        "cpu",
        MetricRule(max_vs_stable=3.0),
        TrackObservation(values={"cpu": 1.2}),
        TrackObservation(values={"cpu": 0.2}),
        min_requests=0,
    )
    assert m.verdict == Verdict.FAIL and m.p_value is None


def test_nan_is_no_data():
    m = judge_metric(
        "p99_latency_seconds",
        MetricRule(max=1.0),
        TrackObservation(requests=500, values={"p99_latency_seconds": float("nan")}),
        TrackObservation(),
        min_requests=50,
    )
    assert m.verdict == Verdict.INCONCLUSIVE


def test_single_track_uses_absolute_bounds_only():
    healthy = judge_track(track(300, 0.0, 0.02), RULES, min_requests=50, end=T0, window_seconds=30)
    assert healthy.verdict == Verdict.PASS
    assert by_metric(healthy, "cpu").reason == "no bound configured (reported only)"
    broken = judge_track(track(300, 0.2, 0.02), RULES, min_requests=50, end=T0, window_seconds=30)
    assert broken.verdict == Verdict.FAIL
    idle = judge_track(
        TrackObservation(requests=3), RULES, min_requests=50, end=T0, window_seconds=30
    )
    assert idle.verdict == Verdict.INCONCLUSIVE


def test_mann_whitney_on_histograms_matches_scipy_on_samples():
    rng = np.random.default_rng(7)
    a = rng.lognormal(-3.5, 0.6, 400)
    b = rng.lognormal(-3.4, 0.6, 1500)
    ours = mann_whitney_greater(histogram(list(a)), histogram(list(b)))
    # The same samples, binned to their bucket's upper bound, through scipy.
    edges = np.array(BOUNDS)
    binned_a = edges[np.searchsorted(edges, a)]
    binned_b = edges[np.searchsorted(edges, b)]
    expected = stats.mannwhitneyu(
        binned_a, binned_b, alternative="greater", method="asymptotic"
    ).pvalue
    assert ours == pytest.approx(expected, rel=1e-9)


def test_mann_whitney_aligns_buckets_missing_on_one_side():
    slow = [(0.5, 200.0), (float("inf"), 200.0)]  # the lower buckets never moved
    fast = [(0.025, 300.0), (0.5, 300.0), (float("inf"), 300.0)]
    p = mann_whitney_greater(slow, fast)
    assert p is not None and p < 1e-9
    assert mann_whitney_greater(fast, slow) == pytest.approx(1.0)


def test_mann_whitney_needs_data():
    assert (
        mann_whitney_greater([(0.1, 0), (float("inf"), 0)], [(0.1, 5), (float("inf"), 5)]) is None
    )


def test_fisher_matches_scipy_and_refuses_empty_sides():
    assert fisher_greater(3, 100, 90, 9000) == pytest.approx(
        stats.fisher_exact([[3, 97], [90, 8910]], alternative="greater").pvalue
    )
    assert fisher_greater(0, 0, 1, 10) is None


def test_histogram_quantile_like_prometheus():
    buckets = [(0.1, 50.0), (0.2, 100.0), (float("inf"), 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.198)
    assert histogram_quantile(0.99, [(0.1, 0.0), (float("inf"), 0.0)]) is None
    assert histogram_quantile(0.99, [(0.1, 1.0), (float("inf"), 10.0)]) == 0.1


class FakeSource:
    """A MetricSource over plain numbers: canary healthy until ``bad_from``."""

    def __init__(self, bad_from: int) -> None:
        self.bad_from = bad_from
        self.calls = 0

    def observe(self, end, window_seconds):
        i = self.calls
        self.calls += 1
        rate = 0.3 if i >= self.bad_from else 0.0
        return IntervalObservation(
            end=end,
            window_seconds=window_seconds,
            canary=track(300, rate, 0.02, seed=i),
            stable=track(900, 0.0, 0.02, seed=100 + i),
        )


def test_run_analysis_over_a_source_rolls_back_soon_after_the_first_bad_interval():
    source = FakeSource(bad_from=1)
    policy = CanaryPolicy(steps=[25, 50, 100], analyses_per_step=2, min_requests=50)
    ends = [T0 + timedelta(seconds=10 * i) for i in range(20)]
    run = run_analysis(source, ends, 10, RULES, policy)
    assert run.decision == Decision.ROLLBACK
    assert source.calls == 3  # 1 good, then 2 bad: failures 2 > limit 1


def test_verdicts_survive_a_json_round_trip():
    v = interval(track(300, 0.0, 0.02), track(900, 0.0, 0.02, seed=2))
    obs = IntervalObservation(
        end=T0, window_seconds=10, canary=track(300, 0.0, 0.02), stable=TrackObservation()
    )
    assert type(v).model_validate_json(v.model_dump_json()) == v
    again = IntervalObservation.model_validate_json(obs.model_dump_json())
    assert again.canary.latency_buckets is not None
    assert again.canary.latency_buckets[-1] == (float("inf"), 300.0)


def test_no_data_interval_counts_as_inconclusive():
    run = AnalysisRun.start(POLICY)
    down = no_data_interval(T0, 10, "Prometheus at http://prom unreachable")
    assert [run.record(down) for _ in range(3)][-1] == Decision.ROLLBACK
    assert "no data: Prometheus" in run.reason


def test_a_slow_tail_fails_on_p99_though_the_median_is_unchanged():
    # 3 % of canary requests take +300 ms: the median does not move, P99 does.
    rng = random.Random(3)
    base = [0.02 * rng.uniform(0.5, 1.5) for _ in range(1000)]
    slow = [x + (0.3 if i % 33 == 0 else 0.0) for i, x in enumerate(base)]
    canary_buckets = histogram(slow)
    stable_buckets = histogram([0.02 * rng.uniform(0.5, 1.5) for _ in range(9000)])
    blind = mann_whitney_greater(canary_buckets, stable_buckets)
    assert blind is not None and blind > 0.01  # blind to it
    canary = TrackObservation(
        requests=1000,
        latency_buckets=canary_buckets,
        values={"p99_latency_seconds": histogram_quantile(0.99, canary_buckets)},
    )
    stable = TrackObservation(
        requests=9000,
        latency_buckets=stable_buckets,
        values={"p99_latency_seconds": histogram_quantile(0.99, stable_buckets)},
    )
    m = judge_metric(
        "p99_latency_seconds",
        MetricRule(max=1.0, max_vs_stable=1.5),
        canary,
        stable,
        min_requests=50,
    )
    assert m.verdict == Verdict.FAIL, m.reason
    assert m.p_value is not None and m.p_value < 1e-6


def test_at_full_weight_latency_is_judged_on_its_absolute_bound_only() -> None:
    from core.analysis import without_cross_load_bounds
    from core.catalog import MetricRule, MetricRules

    rules = MetricRules(
        p99_latency_seconds=MetricRule(max=1.0, max_vs_stable=1.5),
        cpu=MetricRule(max_vs_stable=3.0),
    )
    full = without_cross_load_bounds(rules)
    assert full.p99_latency_seconds.max == 1.0 and full.p99_latency_seconds.max_vs_stable is None
    assert full.error_ratio == rules.error_ratio  # load-independent: still relative
    assert full.cpu == rules.cpu
    # With no absolute bound the relative one stays: never left unjudged.
    only_relative = MetricRules(p99_latency_seconds=MetricRule(max_vs_stable=1.5))
    assert without_cross_load_bounds(only_relative) == only_relative
