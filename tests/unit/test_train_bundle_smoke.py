"""A release train's bundle smoke test (issue 22, "What the train does" step 1): the paths
the catalog's ``bundle_smoke`` names, requested on staging once every service of the train
runs there; every URL and status in the record, and any failure ends the train before its
approval. Against a local HTTP server that routes by Host, as the staging ingress does."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anyio
import pytest

from core.catalog import load_catalog
from core.errors import VerificationFailed
from core.release import ReleaseRecord, plan_release
from core.settings import get_settings
from core.train import TrainRecord, bundle_from_args, plan_train, render_train_record
from flows.release_train import Train, bundle_smoke
from sandbox.procs import free_port
from tasks import smoke

GW = "127.0.0.1:5000/robotics-serving/api-gateway:20261207-abc1234@sha256:" + "a9" * 32
FP = "127.0.0.1:5000/robotics-fleet/fleet-planner:20261207-def5678@sha256:" + "f1" * 32
PATH = "/v1/fleet/plan?robot=bundle-smoke"  # services.yaml: api-gateway's bundle_smoke


class Staging:
    """The staging ingress: the gateway's call to the planner answers ``status``."""

    def __init__(self) -> None:
        self.status = 200
        self.hits: list[tuple[str, str]] = []


@pytest.fixture
def staging(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Staging, str]]:
    state = Staging()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.hits.append((self.headers.get("Host", ""), self.path))
            code = state.status if self.path == PATH else 404
            body = b'{"ok":true}' if code == 200 else b'{"ok":false,"error":"planner down"}'
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    monkeypatch.delenv("ROBOTICS_CD_CATALOG", raising=False)
    monkeypatch.setenv("ROBOTICS_CD_INGRESS_STAGING", url)
    # The task's body, with a short deadline (the flow's call keeps its 60 s).
    monkeypatch.setattr(
        smoke,
        "bundle_smoke_test",
        functools.partial(smoke.bundle_smoke_test.fn, deadline_seconds=0.6, interval_seconds=0.2),
    )
    yield state, url
    server.shutdown()


def train_and_record() -> tuple[Train, TrainRecord]:
    settings = get_settings()
    catalog = load_catalog(settings.catalog)
    plan = plan_train(
        catalog, bundle_from_args("fleet-v2", [f"api-gateway={GW}", f"fleet-planner={FP}"], "v2")
    )
    record = TrainRecord(
        name="fleet-v2",
        flow_run_id="run-7",
        reason="v2",
        order=plan.order,
        started_at=datetime.now(UTC),
        services={
            s.service: ReleaseRecord.start(
                plan_release(catalog, s.service, s.image, "a" * 40), "run-7"
            )
            for s in plan.services
        },
    )
    return Train(plan, catalog, settings), record


def run(train: Train, record: TrainRecord) -> Any:
    return anyio.run(bundle_smoke, train, record)


def test_the_shipped_catalog_names_the_gateways_call_to_the_planner() -> None:
    catalog = load_catalog(None)
    assert catalog.service("api-gateway").bundle_smoke == [PATH]
    assert "fleet-planner" in catalog.service("api-gateway").depends_on


def test_a_passing_bundle_smoke_test_is_recorded_with_each_url_and_status(staging) -> None:
    state, url = staging
    train, record = train_and_record()
    run(train, record)
    assert state.hits == [("api.robotics.local", PATH)]  # through the staging ingress
    (entry,) = record.bundle_smoke
    assert entry["service"] == "api-gateway" and entry["ok"] is True
    assert entry["url"] == f"{url}{PATH}" and entry["status"] == 200
    text = render_train_record(record)
    assert "Bundle smoke test (staging): 1/1 passed" in text
    assert f"api-gateway: GET {url}{PATH} (Host: api.robotics.local) → 200 ok" in text


def test_a_failing_bundle_smoke_test_ends_the_train_naming_the_url_and_status(staging) -> None:
    state, url = staging
    state.status = 502
    train, record = train_and_record()
    with pytest.raises(VerificationFailed) as info:
        run(train, record)
    message = str(info.value)
    assert f"api-gateway: GET {url}{PATH} (Host: api.robotics.local) → 502" in message
    assert "production untouched" in message
    (entry,) = record.bundle_smoke
    assert entry["ok"] is False and entry["status"] == 502 and entry["attempts"] > 1
    text = render_train_record(record)
    assert "Bundle smoke test (staging): 0/1 passed" in text
    assert f"GET {url}{PATH} (Host: api.robotics.local) → 502 FAILED" in text
