"""The early abort (a sequential, anytime-valid test) and lower-bound (business) rules."""

from __future__ import annotations

import math

import numpy as np
from scipy import integrate

from core.analysis import (
    TrackObservation,
    Verdict,
    early_abort_tests,
    judge_metric,
    latency_cut,
    log_e_value,
    sequential_check,
    sequential_log_e,
    split_null_share,
    total_key,
)
from core.catalog import CanaryPolicy, MetricRule, MetricRules

POLICY = CanaryPolicy()
RULES = MetricRules()
EDGES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 1.0, math.inf]


def hist(counts: list[float]) -> list[tuple[float, float]]:
    return [(le, float(c)) for le, c in zip(EDGES, np.cumsum(counts), strict=True)]


def track(requests: float, errors: float, buckets: list[tuple[float, float]] | None = None):
    return TrackObservation(requests=requests, errors=errors, latency_buckets=buckets)


def test_log_e_value_is_the_mixture_integral():
    x, n, p0 = 7, 20, 0.1
    integral, _ = integrate.quad(lambda p: p**x * (1 - p) ** (n - x), p0, 1)
    expected = math.log(integral / (1 - p0)) - (x * math.log(p0) + (n - x) * math.log(1 - p0))
    assert math.isclose(float(log_e_value(x, n, p0)), expected, rel_tol=1e-6)
    assert float(log_e_value(0, 0, 0.3)) == 0.0  # no data, no evidence
    assert float(log_e_value(1, 100, 0.01)) < 0  # exactly the null rate: evidence against


def test_the_e_value_is_a_fair_bet_under_the_null():
    # E[e-value] <= 1 at the null's edge: the property Ville's inequality rests on.
    rng = np.random.default_rng(3)
    n, p0 = 60, 0.2
    draws = rng.binomial(n, p0, size=200_000)
    assert np.mean(np.exp(log_e_value(draws, n, p0))) < 1.05


def test_split_share_under_the_ratio_null():
    assert math.isclose(float(split_null_share(10, 90, 1.0)), 0.1)
    assert math.isclose(float(split_null_share(10, 90, 2.0)), 0.2 / 1.1)
    assert float(split_null_share(100, 0, 2.0)) == 1.0


def test_thirty_percent_5xx_is_stopped_within_seconds_of_traffic():
    # 20 rps, 10 % canary: after 20 s the canary served ~40 requests, 12 of them 5xx.
    canary, stable = track(40, 12), track(360, 4)
    check = sequential_check(canary, stable, RULES, POLICY)
    assert check.abort and check.metric == "error_ratio", check
    assert "early abort on error_ratio" in check.reason


def test_equal_tracks_never_abort():
    canary, stable = (
        track(200, 2, hist([0, 20, 150, 28, 2, 0, 0, 0, 0, 0, 0, 0, 0])),
        track(1800, 18, hist([0, 180, 1350, 250, 20, 0, 0, 0, 0, 0, 0, 0, 0])),
    )
    check = sequential_check(canary, stable, RULES, POLICY)
    assert not check.abort and set(check.log_e) == {"error_ratio", "p99_latency_seconds"}


def test_a_slow_canary_is_stopped_on_latency():
    stable_h = hist([0, 180, 1350, 250, 20, 0, 0, 0, 0, 0, 0, 0, 0])
    slow = hist([0, 0, 0, 0, 0, 0, 30, 0, 0, 0, 0, 0, 0])  # every request 150-200 ms
    check = sequential_check(track(30, 0, slow), track(1800, 0, stable_h), RULES, POLICY)
    assert check.abort and check.metric == "p99_latency_seconds", check


def test_tiny_error_rates_do_not_abort_even_if_all_in_the_canary():
    # 3 errors in 2000 canary requests, none in stable: below the 0.5 % floor.
    check = sequential_check(track(2000, 3), track(18000, 0), RULES, POLICY)
    assert not check.abort


def test_off_and_no_traffic():
    off = POLICY.model_copy(update={"early_abort_alpha": None})
    assert not sequential_check(track(20, 20), track(180, 0), RULES, off).abort
    assert not sequential_check(track(0, 0), track(180, 0), RULES, POLICY).abort


def test_alpha_is_shared_over_steps_below_100_and_two_signals():
    assert early_abort_tests(POLICY) == 6  # 10, 25, 50 %
    check = sequential_check(track(20, 0), track(180, 0), RULES, POLICY)
    assert math.isclose(check.log_threshold, math.log(6 / 0.01))


def test_latency_cut_is_a_bucket_bound_above_the_scaled_p99():
    stable_h = hist([0, 180, 1350, 250, 20, 0, 0, 0, 0, 0, 0, 0, 0])
    cut = latency_cut(stable_h, 1.5)
    assert cut == 0.1  # 1.5 x a P99 of ~50 ms is 75 ms: the next bound is 0.1
    slow_stable = hist([0, 0, 0, 0, 0, 0, 0, 0, 180, 1350, 250, 20, 0])
    assert latency_cut(slow_stable, 1.5) == 1.0  # P99 ~0.6 s: the first bound above 0.9 s
    fast_stable = hist([1000, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    assert latency_cut(fast_stable, 1.5) == 0.1  # never below the floor


def test_vectorised_form_matches_the_scalar_one():
    values = sequential_log_e(
        np.array([20.0, 200.0]), np.array([6.0, 2.0]), 180.0, 2.0, ratio=2.0, floor=0.005
    )
    assert values.shape == (2,) and values[0] > values[1]


# --- lower bounds: the business rule ------------------------------------------------------

BUSINESS = MetricRule(min=0.9, min_vs_stable=0.95)


def business(ratio: float | None, total: float | None) -> TrackObservation:
    return TrackObservation(values={"business": ratio, total_key("business"): total})


def test_a_lower_completed_ratio_fails_on_business():
    v = judge_metric("business", BUSINESS, business(0.7, 200), business(0.99, 800), min_requests=10)
    assert v.verdict == Verdict.FAIL and "< min 0.9" in v.reason


def test_a_relative_drop_with_counts_is_tested():
    rule = MetricRule(min_vs_stable=0.95)
    strong = judge_metric(
        "business", rule, business(0.9, 1000), business(0.99, 4000), min_requests=10
    )
    assert strong.verdict == Verdict.FAIL and strong.p_value is not None
    weak = judge_metric("business", rule, business(0.9, 10), business(0.99, 40), min_requests=10)
    assert weak.verdict == Verdict.PASS and "not significant" in weak.reason


def test_business_passes_when_equal_and_is_inconclusive_without_data():
    same = judge_metric(
        "business", BUSINESS, business(0.99, 200), business(0.99, 800), min_requests=10
    )
    assert same.verdict == Verdict.PASS
    none = judge_metric(
        "business", BUSINESS, business(None, None), business(0.99, 800), min_requests=10
    )
    assert none.verdict == Verdict.INCONCLUSIVE
    # At 100 % stable has nothing: the absolute bound still judges.
    alone = judge_metric(
        "business", BUSINESS, business(0.95, 200), business(None, None), min_requests=10
    )
    assert alone.verdict == Verdict.PASS and "no data for the relative bound" in alone.reason


def test_an_early_abort_of_a_crash_looping_canary_names_the_restarts_first() -> None:
    from core.analysis import SequentialCheck, canary_pod_trouble, explained_by_restarts

    crashing = {
        "metadata": {"name": "fleet-planner-canary-7d9-abcde"},
        "status": {
            "containerStatuses": [
                {
                    "restartCount": 2,
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                    "lastState": {"terminated": {"reason": "Error", "exitCode": 1}},
                }
            ]
        },
    }
    healthy = {
        "metadata": {"name": "fleet-planner-canary-7d9-fghij"},
        "status": {"containerStatuses": [{"restartCount": 0, "state": {"running": {}}}]},
    }
    trouble = canary_pod_trouble([healthy, crashing])
    assert trouble == (
        "fleet-planner-canary-7d9-abcde: restarted 2 time(s), exited Error (code 1), "
        "now CrashLoopBackOff"
    )
    assert canary_pod_trouble([healthy]) is None

    stop = SequentialCheck(
        abort=True, metric="error_ratio", log_threshold=6.0, reason="early abort on error_ratio"
    )
    named = explained_by_restarts(stop, trouble)
    assert named.abort and named.metric == "error_ratio"
    assert named.reason.startswith("on restarts: canary pods fleet-planner-canary-7d9-abcde")
    assert named.reason.endswith("early abort on error_ratio")
    # Untroubled pods, or no stop: the check is left as it is.
    assert explained_by_restarts(stop, None) == stop
    going_on = stop.model_copy(update={"abort": False})
    assert explained_by_restarts(going_on, trouble) == going_on


def test_an_interval_rollback_of_a_crash_looping_canary_names_the_restarts_first():
    """The interval judge may stop a crash-looping canary on its failing requests before the
    restart counter moves (seen on the Gateway API: Envoy answers 503 for a pod that is not
    ready); the stop then says why the requests failed."""
    from core.analysis import explained_stop

    judged = "2 failed intervals > failure limit 1 at 20%: error_ratio: canary 0.6 > max 0.05"
    trouble = "fleet-planner-canary-7d9-abcde: restarted 2 time(s), now CrashLoopBackOff"
    assert explained_stop(judged, trouble) == f"on restarts: canary pods {trouble}; {judged}"
    assert explained_stop(judged, None) == judged
