"""Smoke tests through an environment's ingress: each catalog ``smoke`` path must answer
2xx, retried within a deadline (a freshly synced service may still be starting)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import httpx
from prefect import task
from pydantic import BaseModel, ConfigDict

from core.catalog import EnvironmentTarget
from core.errors import InvalidInput, VerificationFailed
from tasks.logs import run_logger


class SmokeResult(BaseModel):
    """One path's outcome, for the release record."""

    model_config = ConfigDict(frozen=True)
    path: str
    status: int | None
    latency_ms: float | None
    attempts: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def check_paths(paths: Sequence[str]) -> list[str]:
    if not paths:
        raise InvalidInput("no smoke paths: the catalog's 'smoke' list is empty")
    for path in paths:
        if not path.startswith("/") or "://" in path or any(c.isspace() for c in path):
            raise InvalidInput(f"smoke path {path!r} must be an absolute path like /healthz")
    return list(paths)


def probe(client: httpx.Client, host: str, path: str) -> tuple[int | None, float, str | None]:
    """One GET: (status, latency in ms, error text)."""
    started = time.monotonic()
    try:
        response = client.get(path, headers={"Host": host})
    except httpx.HTTPError as exc:
        return None, (time.monotonic() - started) * 1000, f"{type(exc).__name__}: {exc}"
    latency = (time.monotonic() - started) * 1000
    if 200 <= response.status_code < 300:
        return response.status_code, latency, None
    return response.status_code, latency, response.text[:200].strip() or None


def smoke_path(
    client: httpx.Client, host: str, path: str, *, deadline: float, interval: float
) -> SmokeResult:
    """Probe ``path`` until it answers 2xx or the monotonic ``deadline`` passes."""
    attempts = 0
    while True:
        attempts += 1
        status, latency, error = probe(client, host, path)
        result = SmokeResult(
            path=path, status=status, latency_ms=round(latency, 1), attempts=attempts, error=error
        )
        if result.ok or time.monotonic() + interval > deadline:
            return result
        time.sleep(interval)


def probe_all(
    target: EnvironmentTarget,
    paths: Sequence[str],
    *,
    deadline_seconds: float = 60.0,
    interval_seconds: float = 1.0,
    request_timeout: float = 5.0,
    verify_tls: bool = True,
    transport: httpx.BaseTransport | None = None,
) -> list[SmokeResult]:
    """GET every path on ``target.base_url`` with ``Host: target.host``, each retried until
    2xx or the deadline; every path's outcome, failed ones included (nothing raised for a
    non-2xx answer: :func:`run_smoke` and the callers that keep the failures decide)."""
    checked = check_paths(paths)
    if deadline_seconds <= 0:
        raise InvalidInput(f"smoke deadline must be positive, got {deadline_seconds}")
    deadline = time.monotonic() + deadline_seconds
    with httpx.Client(
        base_url=target.base_url,
        timeout=request_timeout,
        verify=verify_tls,
        transport=transport,
        follow_redirects=False,
    ) as client:
        return [
            smoke_path(client, target.host, p, deadline=deadline, interval=interval_seconds)
            for p in checked
        ]


def describe_failures(
    target: EnvironmentTarget, results: Sequence[SmokeResult], *, deadline_seconds: float
) -> str:
    """What failed, for an error message: each path's status (or 'no answer') and why."""
    lines = [
        f"GET {r.path} → {r.status or 'no answer'} after {r.attempts} tries"
        + (f" ({r.error})" if r.error else "")
        for r in results
        if not r.ok
    ]
    return (
        f"smoke tests failed on {target.host} via {target.base_url} "
        f"within {deadline_seconds:g}s: " + "; ".join(lines)
    )


def run_smoke(
    target: EnvironmentTarget,
    paths: Sequence[str],
    *,
    deadline_seconds: float = 60.0,
    interval_seconds: float = 1.0,
    request_timeout: float = 5.0,
    verify_tls: bool = True,
    transport: httpx.BaseTransport | None = None,
) -> list[SmokeResult]:
    """GET every path on ``target.base_url`` with ``Host: target.host``; all must be 2xx."""
    results = probe_all(
        target,
        paths,
        deadline_seconds=deadline_seconds,
        interval_seconds=interval_seconds,
        request_timeout=request_timeout,
        verify_tls=verify_tls,
        transport=transport,
    )
    if any(not r.ok for r in results):
        raise VerificationFailed(
            describe_failures(target, results, deadline_seconds=deadline_seconds)
            + ". Check the pods' logs and the ingress of this environment."
        )
    return results


@task(name="smoke-tests")
def smoke_test(
    target: EnvironmentTarget,
    paths: Sequence[str],
    *,
    deadline_seconds: float = 60.0,
    interval_seconds: float = 1.0,
    request_timeout: float = 5.0,
    verify_tls: bool = True,
) -> list[SmokeResult]:
    """Smoke-test an environment through its ingress; VerificationFailed lists failures."""
    results = run_smoke(
        target,
        paths,
        deadline_seconds=deadline_seconds,
        interval_seconds=interval_seconds,
        request_timeout=request_timeout,
        verify_tls=verify_tls,
    )
    run_logger("robotics_cd.smoke").info(
        "smoke tests passed on %s: %s",
        target.host,
        ", ".join(f"{r.path} {r.status} {r.latency_ms:.0f}ms" for r in results),
    )
    return results


@task(name="bundle-smoke-tests")
def bundle_smoke_test(
    target: EnvironmentTarget,
    paths: Sequence[str],
    *,
    deadline_seconds: float = 60.0,
    interval_seconds: float = 1.0,
    request_timeout: float = 5.0,
) -> list[SmokeResult]:
    """A release train's bundle smoke test on one service's ``bundle_smoke`` paths: every
    path's outcome, failures included (the train records each URL and status, then ends)."""
    results = probe_all(
        target,
        paths,
        deadline_seconds=deadline_seconds,
        interval_seconds=interval_seconds,
        request_timeout=request_timeout,
    )
    run_logger("robotics_cd.smoke").info(
        "bundle smoke test on %s: %s",
        target.host,
        ", ".join(f"{r.path} {r.status or 'no answer'}" for r in results),
    )
    return results
