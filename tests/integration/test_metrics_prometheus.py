"""Canary analysis against a real Prometheus scraping an exporter of ingress-nginx-shaped
metrics whose traffic the test controls (one namespace per scenario, all at once)."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from core.analysis import Verdict
from core.catalog import CanaryPolicy, MetricRules
from core.errors import MetricsError
from sandbox.procs import free_port, wait_until
from sandbox.prometheus import start_prometheus, stop_prometheus
from sandbox.runtime.metrics import RequestMetrics, restart_metrics
from tasks.metrics import analyse_interval, canary_window, staging_check
from tasks.prometheus import PrometheusClient

pytestmark = pytest.mark.integration

WINDOW = 5.0
POLICY = CanaryPolicy(steps=[50, 100], analyses_per_step=1, min_requests=50)


@dataclass
class Traffic:
    rps: float
    error_rate: float = 0.0
    latency: float = 0.02


# namespace -> track -> traffic
SCENARIOS: dict[str, dict[str, Traffic]] = {
    "good": {"canary": Traffic(40), "stable": Traffic(60)},
    "bad": {"canary": Traffic(40, error_rate=0.3), "stable": Traffic(60)},
    "slow": {"canary": Traffic(40, latency=0.32), "stable": Traffic(60)},
    "idle": {"canary": Traffic(0), "stable": Traffic(0)},
}
PODS = {"canary": "api-gateway-canary-7d9f8-abcde", "stable": "api-gateway-5c6b7-fghij"}


class IngressExporter:
    """Synthetic traffic recorded by the sandbox runtime's own exporter classes, so the
    labels are exactly the twin's (ingress-nginx's): ``ingress``/``service`` name the main
    Ingress, ``canary`` is the canary upstream (``<ns>-<svc>-canary-<port>``) or ``""``."""

    def __init__(self) -> None:
        self.requests = RequestMetrics()
        self.owed: dict[tuple[str, str], float] = defaultdict(float)
        self.sent: dict[tuple[str, str], int] = defaultdict(int)
        self.cpu: dict[tuple[str, str], float] = defaultdict(float)
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def tick(self, dt: float) -> None:
        for ns, tracks in SCENARIOS.items():
            for track, t in tracks.items():
                self.owed[(ns, track)] += t.rps * dt
                n = int(self.owed[(ns, track)])
                self.owed[(ns, track)] -= n
                canary = f"{ns}-api-gateway-canary-8000" if track == "canary" else ""
                for k in range(n):
                    sent = self.sent[(ns, track)]
                    self.sent[(ns, track)] = sent + 1
                    # Exactly error_rate of the requests fail, spread evenly.
                    failed = int((sent + 1) * t.error_rate) > int(sent * t.error_rate)
                    labels = {
                        "namespace": ns,
                        "ingress": "api-gateway",
                        "service": "api-gateway",
                        "canary": canary,
                        "host": "api.robotics.local",
                        "method": "GET",
                        "path": "/v1/work",
                        "status": "500" if failed else "200",
                    }
                    latency = t.latency * (0.8 if k % 2 else 1.2)
                    self.requests.observe(labels, latency)
                with self.lock:
                    self.cpu[(ns, track)] += 0.1 * dt

    def run(self) -> None:
        last = time.monotonic()
        while not self.stop.wait(0.1):
            now = time.monotonic()
            self.tick(now - last)
            last = now

    def render(self) -> str:
        pods = [
            {
                "metadata": {"namespace": ns, "name": PODS[track]},
                "status": {"containerStatuses": [{"name": "api-gateway", "restartCount": 0}]},
            }
            for ns in SCENARIOS
            for track in PODS
        ]
        lines = self.requests.render() + restart_metrics(pods)
        with self.lock:
            for (ns, track), v in sorted(self.cpu.items()):
                pod = f'namespace="{ns}",pod="{PODS[track]}",container="api-gateway"'
                lines.append(f"container_cpu_usage_seconds_total{{{pod}}} {v}")
                lines.append(f"container_memory_working_set_bytes{{{pod}}} 50000000")
        return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def exporter() -> Iterator[str]:
    exp = IngressExporter()
    port = free_port()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = exp.render().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threads = [
        threading.Thread(target=server.serve_forever, daemon=True),
        threading.Thread(target=exp.run, daemon=True),
    ]
    for t in threads:
        t.start()
    yield f"127.0.0.1:{port}"
    exp.stop.set()
    server.shutdown()


@pytest.fixture(scope="module")
def prometheus_url(exporter: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home: Path = tmp_path_factory.mktemp("prometheus")
    server = start_prometheus(home, [exporter])
    client = PrometheusClient(base_url=server.url)

    def enough_history() -> bool:
        # A full analysis window of scrapes for the scenario series.
        value = client.scalar(
            'min(count_over_time(nginx_ingress_controller_requests{namespace="good"}[10s]))'
        )
        return value is not None and value >= WINDOW + 2

    try:
        wait_until(enough_history, timeout=40, what="Prometheus scrapes of the test exporter")
        yield server.url
    finally:
        client.close()
        stop_prometheus(home)


def analyse(namespace: str, url: str):
    return analyse_interval.fn(
        "api-gateway",
        namespace,
        MetricRules(),
        POLICY,
        end_time=datetime.now(UTC),
        window_seconds=WINDOW,
        prometheus_url=url,
        scrape_lag_seconds=0,
    )


def metric(result, name):
    return next(m for m in result.analysis.metrics if m.metric == name)


def test_healthy_canary_passes(prometheus_url: str) -> None:
    result = analyse("good", prometheus_url)
    assert result.verdict == Verdict.PASS, result.analysis.reason
    assert result.observation.canary.requests == pytest.approx(40 * WINDOW, rel=0.35)
    assert result.observation.stable.requests == pytest.approx(60 * WINDOW, rel=0.35)
    assert metric(result, "cpu").canary == pytest.approx(0.1, rel=0.2)
    assert 'canary!=""' in result.queries["canary:requests"]


def test_a_canary_answering_500_fails_on_error_ratio(prometheus_url: str) -> None:
    result = analyse("bad", prometheus_url)
    assert result.verdict == Verdict.FAIL
    m = metric(result, "error_ratio")
    assert m.verdict == Verdict.FAIL
    assert m.canary == pytest.approx(0.3, abs=0.02)
    assert m.stable == 0


def test_a_slow_canary_fails_on_p99(prometheus_url: str) -> None:
    result = analyse("slow", prometheus_url)
    m = metric(result, "p99_latency_seconds")
    assert m.verdict == Verdict.FAIL, m.reason
    assert m.canary is not None and m.canary > 0.3
    assert m.stable is not None and m.stable < 0.05
    assert m.p_value is not None and m.p_value < 1e-6


def test_no_traffic_is_inconclusive(prometheus_url: str) -> None:
    result = analyse("idle", prometheus_url)
    assert result.verdict == Verdict.INCONCLUSIVE
    assert "fewer than the 50 needed" in metric(result, "error_ratio").reason


def test_unknown_service_has_no_data_and_is_inconclusive(prometheus_url: str) -> None:
    result = analyse("nowhere", prometheus_url)
    assert result.verdict == Verdict.INCONCLUSIVE
    assert result.observation.canary.requests is None


def test_staging_check_judges_one_track(prometheus_url: str) -> None:
    ok = staging_check.fn(
        "api-gateway",
        "good",
        MetricRules(),
        min_requests=50,
        window_seconds=WINDOW,
        prometheus_url=prometheus_url,
        scrape_lag_seconds=0,
    )
    assert ok.verdict == Verdict.PASS, ok.analysis.reason
    broken = staging_check.fn(
        "api-gateway",
        "bad",
        MetricRules(),
        min_requests=50,
        window_seconds=WINDOW,
        track="canary",
        prometheus_url=prometheus_url,
        scrape_lag_seconds=0,
    )
    assert broken.verdict == Verdict.FAIL


def test_canary_window_series_for_the_chart(prometheus_url: str) -> None:
    end = datetime.now(UTC)
    start = datetime.fromtimestamp(end.timestamp() - 6, UTC)
    window = canary_window.fn(
        "api-gateway",
        "bad",
        start=start,
        end=end,
        step_seconds=1,
        rate_window_seconds=3,
        prometheus_url=prometheus_url,
    )
    assert window.error_ratio["canary"] and window.error_ratio["stable"]
    assert all(v == pytest.approx(0.3, abs=0.05) for _, v in window.error_ratio["canary"])
    assert all(v < 0.05 for _, v in window.p99_latency_seconds["stable"])


def test_prometheus_down_can_count_as_inconclusive() -> None:
    result = analyse_interval.fn(
        "api-gateway",
        "good",
        MetricRules(),
        POLICY,
        window_seconds=WINDOW,
        prometheus_url=f"http://127.0.0.1:{free_port()}",
        scrape_lag_seconds=0,
        unavailable_is_inconclusive=True,
    )
    assert result.verdict == Verdict.INCONCLUSIVE
    assert result.analysis.reason.startswith("no data: Prometheus at http://127.0.0.1:")


def test_prometheus_down_is_a_metrics_error() -> None:
    with pytest.raises(MetricsError, match=r"Prometheus at http://127\.0\.0\.1:\d+ is unreachable"):
        analyse("good", f"http://127.0.0.1:{free_port()}")


def test_analyse_interval_as_a_task_in_a_flow(prometheus_url: str, prefect_server) -> None:
    from prefect import flow

    @flow(name="metrics-probe")
    def probe() -> tuple[Verdict, Verdict]:
        end = datetime.now(UTC)
        bad = analyse_interval(
            "api-gateway",
            "bad",
            MetricRules(),
            POLICY,
            end_time=end,
            window_seconds=WINDOW,
            prometheus_url=prometheus_url,
            scrape_lag_seconds=0,
        )
        staging = staging_check(
            "api-gateway",
            "good",
            MetricRules(),
            min_requests=50,
            end_time=end,
            window_seconds=WINDOW,
            prometheus_url=prometheus_url,
            scrape_lag_seconds=0,
        )
        return bad.verdict, staging.verdict

    assert probe() == (Verdict.FAIL, Verdict.PASS)
