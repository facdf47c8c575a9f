"""Simulate canary releases: fixed thresholds vs thresholds + statistical tests, and the
early abort (a sequential, anytime-valid test looked at every 2 s) side by side with the
interval judge on the same traffic.

Each simulated release runs the catalog's default policy (steps 10/25/50/100 %, 3 analyses
per step, failure limit 1, inconclusive limit 2, min 100 requests) over synthetic traffic:
Poisson request counts, binomial 5xx, log-normal latencies binned into ingress-nginx's
histogram buckets, P99 read from the buckets as Prometheus does. The same
``core.analysis`` code judges every interval twice: with the tests (alpha 0.01) and with
thresholds alone (alpha = inf: every exceedance of a relative bound fails).

The second table simulates each release in 2 s slices: the early abort looks at the counts
since its step began after every slice (``core.analysis.sequential_log_e``, the function the
flow uses), the interval judge judges each whole interval (``judge_interval``), both on the
same requests. A/A rows give the false-alarm rate over thousands of releases.

Run: ``.venv/bin/python -m bench.canary_sim [--releases 400] [--seed 1] [--part thresholds|early|all]
[--scale 1.0]`` (``--scale`` multiplies the early-abort table's release counts).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
from scipy import stats

from core.analysis import (
    NOISE_FLOORS,
    TAIL_RATIO,
    TAIL_SHARE,
    AnalysisRun,
    Decision,
    IntervalObservation,
    LatencyBuckets,
    TrackObservation,
    early_abort_tests,
    histogram_quantile,
    judge_interval,
    latency_cut,
    sequential_log_e,
)
from core.catalog import CanaryPolicy, MetricRules

BUCKETS = np.array([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, math.inf])
RULES = MetricRules(cpu=None, memory=None)  # traffic metrics only; restarts always 0
POLICY = CanaryPolicy()
T0 = datetime(2026, 11, 27, tzinfo=UTC)


@dataclass(frozen=True)
class Scenario:
    name: str
    rps: float  # total requests per second through the ingress
    interval_s: float
    stable_error: float
    canary_error: float
    stable_median_s: float
    canary_extra_s: float  # added to a share of the canary's requests
    extra_share: float = 1.0  # that share (1.0: every request)
    sigma: float = 0.5  # log-normal shape of latencies


SCENARIOS = [
    Scenario("healthy, low traffic (20 rps)", 20, 60, 0.01, 0.01, 0.02, 0.0),
    Scenario("healthy, busy (200 rps)", 200, 60, 0.01, 0.01, 0.02, 0.0),
    Scenario("canary 5xx 30 %", 20, 60, 0.01, 0.30, 0.02, 0.0),
    Scenario("canary 5xx 3 % vs 1 %", 20, 60, 0.01, 0.03, 0.02, 0.0),
    Scenario("canary 5xx 3 % vs 1 %, busy", 200, 60, 0.01, 0.03, 0.02, 0.0),
    Scenario("canary +300 ms", 20, 60, 0.01, 0.01, 0.02, 0.3),
    Scenario("canary +60 ms, busy", 200, 60, 0.01, 0.01, 0.02, 0.06),
    Scenario("3 % of canary requests +300 ms, busy", 200, 60, 0.01, 0.01, 0.02, 0.3, 0.03),
    Scenario("3 % of canary requests +300 ms", 20, 60, 0.01, 0.01, 0.02, 0.3, 0.03),
    Scenario("canary 5xx 1.5 % vs 1 %, busy", 200, 60, 0.01, 0.015, 0.02, 0.0),
    Scenario("no traffic", 0, 60, 0.01, 0.01, 0.02, 0.0),
]


def track(
    rng: np.random.Generator,
    requests: int,
    error: float,
    median: float,
    extra: float,
    sigma: float,
    share: float = 1.0,
) -> TrackObservation:
    errors = int(rng.binomial(requests, error)) if requests else 0
    latencies = rng.lognormal(math.log(median), sigma, requests)
    latencies += extra * (rng.random(requests) < share)
    counts = np.searchsorted(BUCKETS, latencies, side="left")
    per_bucket = np.bincount(counts, minlength=len(BUCKETS))
    cumulative = np.cumsum(per_bucket)
    buckets = [(float(le), float(c)) for le, c in zip(BUCKETS, cumulative, strict=True)]
    return TrackObservation(
        requests=requests,
        errors=errors,
        latency_buckets=buckets,
        values={
            "error_ratio": errors / requests if requests else None,
            "p99_latency_seconds": histogram_quantile(0.99, buckets) if requests else None,
            "restarts": 0.0,
        },
    )


def simulate(scenario: Scenario, rng: np.random.Generator, alpha: float) -> tuple[bool, int]:
    """One release: (rolled back?, intervals judged)."""
    run = AnalysisRun.start(POLICY)
    for i in range(run.max_intervals):
        weight = run.weight / 100.0
        total = rng.poisson(scenario.rps * scenario.interval_s)
        canary_n = int(rng.binomial(total, weight))
        stable_n = total - canary_n
        observation = IntervalObservation(
            end=T0 + timedelta(seconds=scenario.interval_s * i),
            window_seconds=scenario.interval_s,
            canary=track(
                rng,
                canary_n,
                scenario.canary_error,
                scenario.stable_median_s,
                scenario.canary_extra_s,
                scenario.sigma,
                scenario.extra_share,
            ),
            stable=track(
                rng, stable_n, scenario.stable_error, scenario.stable_median_s, 0.0, scenario.sigma
            ),
        )
        decision = run.record(judge_interval(observation, RULES, POLICY, alpha=alpha))
        if decision in (Decision.ROLLBACK, Decision.PROMOTE):
            return decision == Decision.ROLLBACK, i + 1
    raise RuntimeError("analysis did not end within its bound")


# --- early abort (sequential test) side by side with the interval judge ---------------------

# The sandbox router's latency buckets (sandbox/runtime/metrics.py): finer between 0.1 and 1 s.
SANDBOX_BUCKETS = np.array(
    [
        0.005,
        0.01,
        0.025,
        0.05,
        0.1,
        0.15,
        0.2,
        0.25,
        0.3,
        0.4,
        0.5,
        0.75,
        1.0,
        2.5,
        5.0,
        10.0,
        math.inf,
    ]
)


@dataclass(frozen=True)
class SeqScenario:
    name: str
    rps: float
    interval_s: float
    canary_error: float
    canary_extra_s: float
    stable_error: float = 0.01
    median_s: float = 0.02
    sigma: float = 0.5
    check_s: float = 2.0
    releases: int = 300
    min_requests: int = 100  # per interval; the sandbox's e2e policy uses 10


SEQ_SCENARIOS = [
    SeqScenario(
        "A/A, sandbox (20 rps, 10 s intervals)", 20, 10, 0.01, 0.0, releases=5000, min_requests=10
    ),
    SeqScenario("A/A, default policy (20 rps, 60 s)", 20, 60, 0.01, 0.0, releases=2000),
    SeqScenario("A/A, busy (200 rps, 60 s)", 200, 60, 0.01, 0.0, releases=2000),
    SeqScenario("5xx 30 %, sandbox (20 rps, 10 s)", 20, 10, 0.30, 0.0, min_requests=10),
    SeqScenario("5xx 30 %, default policy (20 rps, 60 s)", 20, 60, 0.30, 0.0),
    SeqScenario("+150 ms, sandbox (20 rps, 10 s)", 20, 10, 0.01, 0.15, min_requests=10),
    SeqScenario("+150 ms, default policy (20 rps, 60 s)", 20, 60, 0.01, 0.15),
    SeqScenario("5xx 3 % vs 1 %, default policy (20 rps, 60 s)", 20, 60, 0.03, 0.0),
]


def _bucket_probabilities(median: float, sigma: float, extra: float) -> np.ndarray:
    """P(latency in each bucket) for a log-normal latency plus a fixed extra delay."""
    edges = np.concatenate([[0.0], SANDBOX_BUCKETS])
    shifted = np.clip(edges - extra, 1e-12, None)
    cdf = stats.lognorm.cdf(shifted, s=sigma, scale=median)
    cdf[0] = 0.0
    cdf[-1] = 1.0
    return np.diff(cdf)


def _histogram(counts: np.ndarray) -> LatencyBuckets:
    cumulative = np.cumsum(counts)
    return [(float(le), float(c)) for le, c in zip(SANDBOX_BUCKETS, cumulative, strict=True)]


@dataclass
class _Tracks:
    """Per-check counts of one interval: rows are checks, columns requests/5xx/buckets."""

    requests: np.ndarray
    errors: np.ndarray
    buckets: np.ndarray  # checks x buckets


def _draw(
    rng: np.random.Generator, n: np.ndarray, error: float, probabilities: np.ndarray
) -> _Tracks:
    return _Tracks(
        requests=n.astype(float),
        errors=rng.binomial(n, error).astype(float),
        buckets=rng.multinomial(n, probabilities).astype(float),
    )


def simulate_side_by_side(
    scenario: SeqScenario, rng: np.random.Generator, policy: CanaryPolicy
) -> tuple[float | None, float | None, str | None]:
    """One release judged both ways on the same traffic.

    Returns (early abort time, interval-judge rollback time, signal of the early abort);
    times in seconds from the canary's first request, ``None`` when that judge never stopped
    the canary (a promotion).
    """
    stable_p = _bucket_probabilities(scenario.median_s, scenario.sigma, 0.0)
    canary_p = _bucket_probabilities(scenario.median_s, scenario.sigma, scenario.canary_extra_s)
    checks = max(1, round(scenario.interval_s / scenario.check_s))
    run = AnalysisRun.start(policy)
    p99_rule = RULES.p99_latency_seconds.max_vs_stable or 1.0
    # The stable's last interval before the canary: where the slow-request cut comes from.
    base_n = rng.poisson(scenario.rps * scenario.interval_s)
    baseline = _histogram(rng.multinomial(base_n, stable_p).astype(float))
    early: float | None = None
    early_signal: str | None = None
    step_cum: list[np.ndarray] | None = None
    cut: float | None = None
    step_index = -1
    for i in range(run.max_intervals):
        if run.step_index != step_index:  # a new weight: the test starts afresh
            step_index = run.step_index
            step_cum = None
            cut = latency_cut(baseline, p99_rule)
        weight = run.weight / 100.0
        total = rng.poisson(scenario.rps * scenario.check_s, size=checks)
        canary_n = rng.binomial(total, weight)
        canary = _draw(rng, canary_n, scenario.canary_error, canary_p)
        stable = _draw(rng, total - canary_n, scenario.stable_error, stable_p)
        if early is None and weight < 1.0:
            cols = [canary.requests, canary.errors, stable.requests, stable.errors]
            cum = [np.cumsum(c) for c in cols]
            c_slow = s_slow = np.zeros(checks)
            if cut is not None:
                above = cut < SANDBOX_BUCKETS
                c_slow = np.cumsum(canary.buckets[:, above].sum(axis=1))
                s_slow = np.cumsum(stable.buckets[:, above].sum(axis=1))
            cum += [c_slow, s_slow]
            if step_cum is not None:
                cum = [c + prev[-1] for c, prev in zip(cum, step_cum, strict=True)]
            step_cum = cum
            c_n, c_e, s_n, s_e, c_sl, s_sl = cum
            error_rule = RULES.error_ratio.max_vs_stable or 1.0
            log_e = np.maximum(
                sequential_log_e(
                    c_n, c_e, s_n, s_e, ratio=error_rule, floor=NOISE_FLOORS["error_ratio"]
                ),
                sequential_log_e(c_n, c_sl, s_n, s_sl, ratio=TAIL_RATIO, floor=TAIL_SHARE)
                if cut is not None
                else np.full(checks, -np.inf),
            )
            threshold = math.log(early_abort_tests(policy) / (policy.early_abort_alpha or 1.0))
            crossed = np.nonzero(log_e >= threshold)[0]
            if crossed.size:
                k = int(crossed[0])
                early = i * scenario.interval_s + (k + 1) * scenario.check_s
                errors_e = sequential_log_e(
                    c_n[k],
                    c_e[k],
                    s_n[k],
                    s_e[k],
                    ratio=error_rule,
                    floor=NOISE_FLOORS["error_ratio"],
                )
                early_signal = "5xx" if float(errors_e) >= threshold else "latency"
        c_track = _interval_track(canary)
        s_track = _interval_track(stable)
        observation = IntervalObservation(
            end=T0 + timedelta(seconds=scenario.interval_s * (i + 1)),
            window_seconds=scenario.interval_s,
            canary=c_track,
            stable=s_track,
        )
        if (s_track.requests or 0.0) >= policy.min_requests:
            baseline = s_track.latency_buckets or baseline
        decision = run.record(judge_interval(observation, RULES, policy))
        if decision == Decision.ROLLBACK:
            return early, (i + 1) * scenario.interval_s, early_signal
        if decision == Decision.PROMOTE:
            return early, None, early_signal
    raise RuntimeError("analysis did not end within its bound")


def _interval_track(t: _Tracks) -> TrackObservation:
    requests = float(t.requests.sum())
    errors = float(t.errors.sum())
    buckets = _histogram(t.buckets.sum(axis=0))
    return TrackObservation(
        requests=requests,
        errors=errors,
        latency_buckets=buckets,
        values={
            "error_ratio": errors / requests if requests else None,
            "p99_latency_seconds": histogram_quantile(0.99, buckets) if requests else None,
            "restarts": 0.0,
        },
    )


def side_by_side_table(seed: int, scale: float) -> str:
    lines = [
        "| scenario | releases | early aborts | early abort after (median, max) | "
        "interval judge rolled back | interval judge after (median) |",
        "|---|---|---|---|---|---|",
    ]
    for scenario in SEQ_SCENARIOS:
        policy = POLICY.model_copy(
            update={
                "interval": timedelta(seconds=scenario.interval_s),
                "min_requests": scenario.min_requests,
            }
        )
        rng = np.random.default_rng(seed)
        n = max(10, round(scenario.releases * scale))
        results = [simulate_side_by_side(scenario, rng, policy) for _ in range(n)]
        early = [e for e, _, _ in results if e is not None]
        judged = [j for _, j, _ in results if j is not None]
        signals = sorted({s for _, _, s in results if s})
        early_cell = (
            f"{np.median(early):.0f} s, {max(early):.0f} s ({', '.join(signals)})" if early else "-"
        )
        judged_cell = f"{np.median(judged):.0f} s" if judged else "-"
        lines.append(
            f"| {scenario.name} | {n} | {len(early) / n:.2%} ({len(early)}) | {early_cell} | "
            f"{len(judged) / n:.1%} | {judged_cell} |"
        )
    return "\n".join(lines)


def thresholds_table(releases: int, seed: int) -> str:
    lines = [
        "| scenario | rolled back, thresholds only | rolled back, thresholds + tests |",
        "|---|---|---|",
    ]
    for scenario in SCENARIOS:
        cells = []
        for alpha in (math.inf, 0.01):
            rng = np.random.default_rng(seed)
            outcomes = [simulate(scenario, rng, alpha) for _ in range(releases)]
            back = [n for rolled, n in outcomes if rolled]
            share = len(back) / len(outcomes)
            after = f" (after {np.mean(back):.1f} intervals)" if back else ""
            cells.append(f"{share:.1%}{after}")
        lines.append(f"| {scenario.name} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--releases", type=int, default=400)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--part", choices=["thresholds", "early", "all"], default="all")
    parser.add_argument("--scale", type=float, default=1.0)
    args = parser.parse_args()
    if args.part in ("thresholds", "all"):
        print(f"{args.releases} simulated releases per cell; default policy; seed {args.seed}\n")
        print(thresholds_table(args.releases, args.seed))
        print()
    if args.part in ("early", "all"):
        alpha = POLICY.early_abort_alpha
        print(
            f"early abort (alpha {alpha} per release, looked at every 2 s) and the interval "
            f"judge on the same traffic; default policy steps {POLICY.steps}; seed {args.seed}\n"
        )
        print(side_by_side_table(args.seed, args.scale))


if __name__ == "__main__":
    main()
