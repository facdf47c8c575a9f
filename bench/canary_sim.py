"""Simulate canary releases to compare fixed thresholds with thresholds + statistical tests.

Each simulated release runs the catalog's default policy (steps 10/25/50/100 %, 3 analyses
per step, failure limit 1, inconclusive limit 2, min 100 requests) over synthetic traffic:
Poisson request counts, binomial 5xx, log-normal latencies binned into ingress-nginx's
histogram buckets, P99 read from the buckets as Prometheus does. The same
``core.analysis`` code judges every interval twice: with the tests (alpha 0.01) and with
thresholds alone (alpha = inf: every exceedance of a relative bound fails).

Run: ``.venv/bin/python -m bench.canary_sim [--releases 400] [--seed 1]``
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np

from core.analysis import (
    AnalysisRun,
    Decision,
    IntervalObservation,
    TrackObservation,
    histogram_quantile,
    judge_interval,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--releases", type=int, default=400)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print(f"{args.releases} simulated releases per cell; default policy; seed {args.seed}\n")
    print(
        "| scenario | rolled back, thresholds only | rolled back, thresholds + tests |\n"
        "|---|---|---|"
    )
    for scenario in SCENARIOS:
        cells = []
        for alpha in (math.inf, 0.01):
            rng = np.random.default_rng(args.seed)
            outcomes = [simulate(scenario, rng, alpha) for _ in range(args.releases)]
            back = [n for rolled, n in outcomes if rolled]
            share = len(back) / len(outcomes)
            after = f" (after {np.mean(back):.1f} intervals)" if back else ""
            cells.append(f"{share:.1%}{after}")
        print(f"| {scenario.name} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
