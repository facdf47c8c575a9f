"""The one backoff rule of the client loops (core.backoff)."""

from __future__ import annotations

from core.backoff import Backoff


def test_delays_grow_by_the_factor_up_to_the_cap() -> None:
    backoff = Backoff(base_delay=5, factor=2, max_delay=30)
    assert [backoff.delay(n) for n in range(5)] == [5, 10, 20, 30, 30]


def test_jitter_spreads_each_wait_over_half_to_one_and_a_half() -> None:
    backoff = Backoff(base_delay=1, max_delay=2, jitter=True)
    waits = [backoff.delay(3) for _ in range(200)]  # capped at 2 s before the spread
    assert all(1.0 <= w <= 3.0 for w in waits)
    assert len(set(waits)) > 100  # racers do not retry in step


def test_attempts_count_the_first_try() -> None:
    assert Backoff(retries=0).attempts == 1
    assert Backoff(retries=3).attempts == 4


def test_a_long_loop_stays_finite() -> None:
    assert Backoff(base_delay=0.2, max_delay=2.0).delay(10_000) == 2.0
