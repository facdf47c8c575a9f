"""Smoke tests against a local HTTP server that routes by Host, like an ingress."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from core.catalog import EnvironmentTarget
from core.errors import InvalidInput, VerificationFailed
from sandbox.procs import free_port
from tasks.smoke import run_smoke, smoke_test

HOST = "api.robotics.local"


class Ingress:
    """Answers 2xx for HOST only; /v1/status starts healthy after ``ready_at``."""

    def __init__(self) -> None:
        self.ready_at = 0.0
        self.hits: list[tuple[str, str]] = []


@pytest.fixture
def ingress() -> Iterator[tuple[Ingress, str]]:
    state = Ingress()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            host = self.headers.get("Host", "")
            state.hits.append((host, self.path))
            if host != HOST:
                code = 404
            elif self.path == "/healthz":
                code = 200
            elif self.path == "/v1/status":
                code = 200 if time.monotonic() >= state.ready_at else 503
            else:
                code = 404
            body = b"ok" if code == 200 else b"not ready"
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield state, f"http://127.0.0.1:{port}"
    server.shutdown()


def target(endpoint: str) -> EnvironmentTarget:
    return EnvironmentTarget(
        path="serving/api-gateway/overlays/staging",
        argocd_app="api-gateway-staging",
        namespace="staging",
        host=HOST,
        endpoint=endpoint,
    )


def test_all_paths_2xx_with_the_host_header(ingress):
    state, url = ingress
    results = smoke_test.fn(target(url), ["/healthz", "/v1/status"], deadline_seconds=5)
    assert [(r.path, r.status, r.attempts) for r in results] == [
        ("/healthz", 200, 1),
        ("/v1/status", 200, 1),
    ]
    assert all(r.latency_ms is not None and r.latency_ms >= 0 for r in results)
    assert {h for h, _ in state.hits} == {HOST}


def test_a_path_that_becomes_ready_within_the_deadline_passes(ingress):
    state, url = ingress
    state.ready_at = time.monotonic() + 0.6
    results = run_smoke(target(url), ["/v1/status"], deadline_seconds=5, interval_seconds=0.2)
    assert results[0].status == 200 and results[0].attempts > 1


def test_failures_are_listed(ingress):
    state, url = ingress
    state.ready_at = time.monotonic() + 60
    started = time.monotonic()
    with pytest.raises(VerificationFailed) as info:
        run_smoke(
            target(url),
            ["/healthz", "/v1/status", "/missing"],
            deadline_seconds=1,
            interval_seconds=0.2,
        )
    assert time.monotonic() - started < 3
    message = str(info.value)
    assert "GET /v1/status → 503" in message and "GET /missing → 404" in message
    assert "/healthz" not in message


def test_nothing_listening_is_a_failure():
    with pytest.raises(VerificationFailed, match="no answer"):
        run_smoke(
            target(f"http://127.0.0.1:{free_port()}"),
            ["/healthz"],
            deadline_seconds=0.5,
            interval_seconds=0.2,
        )


def test_bad_paths_are_refused_before_any_request():
    for bad in ([], ["healthz"], ["http://evil/x"], ["/a b"]):
        with pytest.raises(InvalidInput):
            run_smoke(target("http://127.0.0.1:9"), bad)
