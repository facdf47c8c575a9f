"""The sandbox as a user meets it: ``sandbox up/status/down``, Argo CD syncing what is pushed
to the manifests repo, Argo CD's refusals, a failing PostSync hook, and the signed push
webhook a ``git push`` delivers."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import docker
import httpx
import pytest
import yaml

from sandbox import engine, launcher, registry
from sandbox.procs import pid_alive, stop_pidfile
from sandbox.runtime import state_label
from tasks.gitcmd import run_git, split_credentials
from tests.conftest import SESSION_DIR
from tests.fixtures_sandbox import SandboxHandle
from tests.matrix import full_matrix

pytestmark = [pytest.mark.integration, pytest.mark.sandbox]

MANIFESTS = "robotics-k8s-manifests"
STAGING = "serving/api-gateway/overlays/staging"
PRODUCTION = "serving/api-gateway/overlays/production"


def _port_free(port: int) -> bool:
    """Nothing listens on the port (closed connections may linger in TIME_WAIT)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@full_matrix
def test_up_status_down_leaves_nothing_behind() -> None:
    state = SESSION_DIR / "sandbox-updown"
    lines: list[str] = []
    try:
        sb = launcher.up(state, argocd_poll_seconds=1.0, echo=lines.append)
        # Prometheus reports its target up only after the first scrape (1 s): poll, bounded.
        deadline = time.monotonic() + 30
        parts = launcher.status(state)
        while [p for p in parts if not p.ok] and time.monotonic() < deadline:
            time.sleep(1)
            parts = launcher.status(state)
        assert [p for p in parts if not p.ok] == [], parts
        assert {p.part for p in parts} >= {"prefect server", "argo cd", "app api-gateway-staging"}
        env_file = (state / "env").read_text()
        assert f"export PREFECT_API_URL={sb.prefect_api_url}" in env_file
        assert f"export ROBOTICS_CD_ARGOCD_URL={sb.argocd_url}" in env_file
        pids = [
            int(p.read_text())
            for p in (
                state / "twin.pid",
                state / "prefect" / "server.pid",
                state / "registry" / "registry.pid",
                state / "prometheus" / "prometheus.pid",
            )
        ]
        assert all(pid_alive(pid) for pid in pids)
        again = launcher.up(state, argocd_poll_seconds=1.0, echo=lines.append)
        assert again.ports == sb.ports  # idempotent: the same parts, reused
        assert int((state / "twin.pid").read_text()) == pids[0]
    finally:
        launcher.down(state)
    assert not any(pid_alive(pid) for pid in pids)
    down_parts = {p.part for p in launcher.status(state) if not p.ok}
    assert down_parts >= {"prefect server", "registry", "twin process", "argo cd", "prometheus"}
    ports = [*sb.ports.values(), int(sb.registry.rsplit(":", 1)[1])]
    ports.append(int(sb.prometheus_url.rsplit(":", 1)[1]))
    ports.append(int(sb.prefect_api_url.rsplit(":", 1)[1].split("/")[0]))
    assert all(_port_free(p) for p in ports), [p for p in ports if not _port_free(p)]
    client = docker.from_env()
    try:
        label = f"robotics-cd.sandbox={state_label(state)}"
        assert client.containers.list(all=True, filters={"label": label}) == []
        assert client.networks.list(filters={"label": label}) == []
    finally:
        client.close()
    launcher.down(state, purge=True)
    assert not state.exists()


def _push_api_image(sandbox: SandboxHandle, marker: str) -> str:
    """A new robotics-api image whose /v1/status reports ``marker`` as its version."""
    bare = sandbox.git_base / "robotics-api.git"
    client = engine.docker_client()
    try:
        with (SESSION_DIR / f"api-{marker}").open("wb") as tar:
            tar.write(
                subprocess.run(
                    ["git", "--git-dir", str(bare), "archive", "--format=tar", "main"],
                    capture_output=True,
                    check=True,
                ).stdout
            )
        build = SESSION_DIR / f"api-build-{marker}"
        build.mkdir()
        subprocess.run(["tar", "-x", "-C", str(build), "-f", str(tar.name)], check=True)
        client.images.build(
            path=str(build), tag=f"sandbox-test/api:{marker}", buildargs={"GIT_SHA": marker}
        )
    finally:
        client.close()
    reg = registry.Registry(sandbox.registry, *sandbox.registry_auth, home=sandbox.state_dir)
    registry.push_image(reg, f"sandbox-test/api:{marker}", "robotics-serving/api-gateway", marker)
    return marker


def _set_image_tag(kustomization: Path, name: str, tag: str) -> str:
    doc = yaml.safe_load(kustomization.read_text())
    for image in doc["images"]:
        if image["name"] == name:
            image["newTag"] = tag
            image.pop("digest", None)  # an earlier release may have pinned one
    return yaml.safe_dump(doc, sort_keys=False)


def test_staging_syncs_a_pushed_tag_and_runs_it(sandbox: SandboxHandle, tmp_path: Path) -> None:
    tag = _push_api_image(sandbox, f"test-{secrets.token_hex(3)}")
    work = sandbox.clone(MANIFESTS, tmp_path / "manifests")
    kustomization = work / STAGING / "kustomization.yaml"
    sha = sandbox.commit_and_push(
        work,
        f"deploy(staging): api-gateway:{tag}",
        {f"{STAGING}/kustomization.yaml": _set_image_tag(kustomization, "api-gateway", tag)},
    )

    app = sandbox.wait_synced("api-gateway-staging", sha, timeout=90)

    state = app["status"]["operationState"]
    assert state["operation"]["initiatedBy"].get("automated") is True
    hooks = [r for r in state["syncResult"]["resources"] if r.get("hookType") == "PostSync"]
    assert [(r["name"], r["hookPhase"]) for r in hooks] == [("smoke-test", "Succeeded")]
    assert app["status"]["history"][-1]["revision"] == sha
    assert any(img.endswith(f":{tag}") for img in app["status"]["summary"]["images"])
    # The new image serves staging traffic through the ingress router.
    deadline = time.monotonic() + 30
    version = ""
    while time.monotonic() < deadline and version != tag:
        response = httpx.get(
            f"{sandbox.ingress['staging']}/v1/status",
            headers={"Host": "api.robotics.local"},
            timeout=5,
        )
        if response.status_code == 200:
            version = response.json().get("version", "")
        time.sleep(0.5)
    assert version == tag


def _branch_commit(
    sandbox: SandboxHandle, tmp_path: Path, branch: str, files: dict[str, str]
) -> str:
    work = sandbox.clone(MANIFESTS, tmp_path / branch.replace("/", "-"))
    sandbox.git("checkout", "-q", "-b", branch, cwd=work)
    return sandbox.commit_and_push(work, f"test: {branch}", files, ref=f"HEAD:refs/heads/{branch}")


def _production_kustomization(sandbox: SandboxHandle, tmp_path: Path) -> dict[str, Any]:
    text = sandbox.git(
        "--git-dir",
        str(sandbox.git_base / f"{MANIFESTS}.git"),
        "show",
        f"main:{PRODUCTION}/kustomization.yaml",
    )
    return dict(yaml.safe_load(text))


def _sync(sandbox: SandboxHandle, app: str, **body: Any) -> httpx.Response:
    with sandbox.argocd() as client:
        return client.post(f"/api/v1/applications/{app}/sync", json=body)


def test_production_syncs_by_hand_to_a_given_revision(
    sandbox: SandboxHandle, tmp_path: Path
) -> None:
    marker = secrets.token_hex(3)
    doc = _production_kustomization(sandbox, tmp_path)
    doc["commonAnnotations"] = {"sandbox.test/marker": marker}
    sha = _branch_commit(
        sandbox,
        tmp_path,
        f"test/manual-{marker}",
        {f"{PRODUCTION}/kustomization.yaml": yaml.safe_dump(doc, sort_keys=False)},
    )

    assert _sync(sandbox, "api-gateway-production", revision=sha, prune=True).status_code == 200
    busy = _sync(sandbox, "api-gateway-production", revision=sha)
    app = sandbox.wait_operation_done("api-gateway-production")

    assert busy.status_code == 400
    assert busy.json()["message"] == "another operation is already in progress"
    state = app["status"]["operationState"]
    assert state["phase"] == "Succeeded", state
    assert state["syncResult"]["revision"] == sha
    assert state["operation"]["initiatedBy"] == {"username": "admin"}
    # main is still the target: a sync to a side revision leaves the app OutOfSync, as in Argo CD.
    assert app["status"]["sync"]["status"] == "OutOfSync"
    deployment = _kubectl_json(sandbox, "get", "deploy", "api-gateway", "-n", "production")
    assert deployment["metadata"]["annotations"]["sandbox.test/marker"] == marker

    main = sandbox.git("--git-dir", str(sandbox.git_base / f"{MANIFESTS}.git"), "rev-parse", "main")
    assert _sync(sandbox, "api-gateway-production", prune=True).status_code == 200
    sandbox.wait_synced("api-gateway-production", main)
    deployment = _kubectl_json(sandbox, "get", "deploy", "api-gateway", "-n", "production")
    assert "sandbox.test/marker" not in deployment["metadata"].get("annotations", {})


def _kubectl_json(sandbox: SandboxHandle, *args: str) -> dict[str, Any]:
    out = subprocess.run(
        [
            sandbox.env["ROBOTICS_CD_KUBECTL"],
            "--kubeconfig",
            str(sandbox.kubeconfig),
            *args,
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return dict(json.loads(out))


def test_automated_staging_refuses_explicit_revision_and_rollback(
    sandbox: SandboxHandle,
) -> None:
    sha = "0123456789abcdef0123456789abcdef01234567"
    refused = _sync(sandbox, "api-gateway-staging", revision=sha)
    assert refused.status_code == 400
    assert refused.json() == {
        "error": f"Cannot sync to {sha}: auto-sync currently set to main",
        "code": 9,
        "message": f"Cannot sync to {sha}: auto-sync currently set to main",
    }
    with sandbox.argocd() as client:
        rollback = client.post("/api/v1/applications/api-gateway-staging/rollback", json={"id": 0})
        missing = client.get("/api/v1/applications/no-such-app")
        anonymous = httpx.get(f"{sandbox.argocd_url}/api/v1/applications/api-gateway-staging")
    assert rollback.status_code == 400
    assert rollback.json()["message"] == "rollback cannot be initiated when auto-sync is enabled"
    assert missing.status_code == 404
    assert missing.json()["code"] == 5
    assert anonymous.status_code == 401


def test_failing_postsync_hook_fails_the_operation(sandbox: SandboxHandle, tmp_path: Path) -> None:
    doc = _production_kustomization(sandbox, tmp_path)
    doc.setdefault("patches", []).append({"path": "patch-broken-smoke.yaml"})
    broken = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "smoke-test"},
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "smoke-test",
                            "env": [
                                {"name": "BASE_URL", "value": "http://api-gateway:8000/no-such"},
                                {"name": "DEADLINE_SECONDS", "value": "1"},
                            ],
                        }
                    ]
                }
            }
        },
    }
    sha = _branch_commit(
        sandbox,
        tmp_path,
        f"test/broken-hook-{secrets.token_hex(3)}",
        {
            f"{PRODUCTION}/kustomization.yaml": yaml.safe_dump(doc, sort_keys=False),
            f"{PRODUCTION}/patch-broken-smoke.yaml": yaml.safe_dump(broken, sort_keys=False),
        },
    )
    try:
        assert _sync(sandbox, "api-gateway-production", revision=sha).status_code == 200
        app = sandbox.wait_operation_done("api-gateway-production", timeout=90)
        state = app["status"]["operationState"]
        assert state["phase"] == "Failed"
        assert state["message"] == "one or more synchronization tasks completed unsuccessfully"
        hook = next(r for r in state["syncResult"]["resources"] if r["name"] == "smoke-test")
        assert (hook["kind"], hook["hookType"], hook["hookPhase"]) == ("Job", "PostSync", "Failed")
    finally:
        main = sandbox.git(
            "--git-dir", str(sandbox.git_base / f"{MANIFESTS}.git"), "rev-parse", "main"
        )
        sandbox.wait_operation_done("api-gateway-production", timeout=90)
        _sync(sandbox, "api-gateway-production", prune=True)
        sandbox.wait_synced("api-gateway-production", main, timeout=90)


class _Receiver(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[dict[str, str], bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append((dict(self.headers), body))
        self.send_response(202)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[tuple[dict[str, str], bytes]]]]:
    _Receiver.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/github", _Receiver.received
    finally:
        server.shutdown()
        server.server_close()


def test_git_push_delivers_a_signed_push_webhook(
    sandbox: SandboxHandle, tmp_path: Path, receiver: tuple[str, list[Any]]
) -> None:
    url, received = receiver
    secret = secrets.token_urlsafe(16)
    with sandbox.github() as gh:
        created = gh.post(
            "/repos/robotics/robotics-api/hooks",
            json={
                "config": {"url": url, "content_type": "json", "secret": secret},
                "events": ["push"],
            },
        )
    assert created.status_code == 201
    work = sandbox.clone("robotics-api", tmp_path / "api")
    branch = f"test/webhook-{secrets.token_hex(3)}"
    sandbox.git("checkout", "-q", "-b", branch, cwd=work)
    sha = sandbox.commit_and_push(
        work, "docs: webhook test", {"NOTES.md": "hello\n"}, ref=f"HEAD:refs/heads/{branch}"
    )

    deadline = time.monotonic() + 20
    pushes: list[tuple[dict[str, str], bytes]] = []
    while time.monotonic() < deadline and not pushes:
        pushes = [r for r in list(received) if r[0].get("X-GitHub-Event") == "push"]
        time.sleep(0.1)
    assert len(pushes) == 1
    headers, body = pushes[0]
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["X-Hub-Signature-256"], expected)
    assert re.fullmatch(r"[0-9a-f-]{36}", headers["X-GitHub-Delivery"])
    assert headers["User-Agent"].startswith("GitHub-Hookshot/")
    payload = json.loads(body)
    assert payload["ref"] == f"refs/heads/{branch}"
    assert payload["after"] == sha
    assert payload["created"] is True and payload["deleted"] is False
    assert payload["repository"]["full_name"] == "robotics/robotics-api"
    assert payload["head_commit"]["id"] == sha
    assert payload["commits"][-1]["added"] == ["NOTES.md"]
    assert any(r[0].get("X-GitHub-Event") == "ping" for r in received)


def test_staging_self_heals_drift(sandbox: SandboxHandle) -> None:
    before = sandbox.wait_app(
        "api-gateway-staging",
        lambda a: a["status"].get("sync", {}).get("status") == "Synced" and not a.get("operation"),
        what="synced before the drift",
    )
    wanted = _kubectl_json(sandbox, "get", "deploy", "api-gateway", "-n", "staging")["spec"][
        "replicas"
    ]
    subprocess.run(
        [
            sandbox.env["ROBOTICS_CD_KUBECTL"],
            "--kubeconfig",
            str(sandbox.kubeconfig),
            "scale",
            "deploy/api-gateway",
            "-n",
            "staging",
            f"--replicas={wanted + 2}",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    # The last entry's id, not the count: history is capped (10), and e2e releases may
    # have filled it in the same session.
    last_id = (before["status"].get("history") or [{}])[-1].get("id", -1)

    app = sandbox.wait_app(
        "api-gateway-staging",
        lambda a: (
            (a["status"].get("history") or [{}])[-1].get("id", -1) > last_id
            and not a.get("operation")
        ),
        timeout=60,
        what="a self-heal sync",
    )

    assert app["status"]["operationState"]["phase"] == "Succeeded"
    live = _kubectl_json(sandbox, "get", "deploy", "api-gateway", "-n", "staging")
    assert live["spec"]["replicas"] == wanted


def test_production_rolls_back_to_a_history_entry(sandbox: SandboxHandle) -> None:
    app = sandbox.wait_operation_done("api-gateway-production")
    entry = app["status"]["history"][0]
    with sandbox.argocd() as client:
        response = client.post(
            "/api/v1/applications/api-gateway-production/rollback",
            json={"id": entry["id"], "prune": True},
        )
        unknown = client.post(
            "/api/v1/applications/api-gateway-production/rollback", json={"id": 999}
        )
    assert response.status_code == 200, response.text
    assert unknown.status_code == 400
    app = sandbox.wait_operation_done("api-gateway-production")
    state = app["status"]["operationState"]
    assert state["phase"] == "Succeeded"
    assert state["syncResult"]["revision"] == entry["revision"]
    assert app["status"]["history"][-1]["revision"] == entry["revision"]
    # Leave production at main for the tests that follow.
    main = sandbox.git("--git-dir", str(sandbox.git_base / f"{MANIFESTS}.git"), "rev-parse", "main")
    _sync(sandbox, "api-gateway-production", prune=True)
    sandbox.wait_synced("api-gateway-production", main)


def test_an_operation_survives_a_twin_restart(sandbox: SandboxHandle) -> None:
    main = sandbox.git("--git-dir", str(sandbox.git_base / f"{MANIFESTS}.git"), "rev-parse", "main")
    sandbox.wait_operation_done("api-gateway-production")
    assert _sync(sandbox, "api-gateway-production", prune=True).status_code == 200
    config = json.loads((sandbox.state_dir / "twin-config.json").read_text())
    old_pid = int((sandbox.state_dir / "twin.pid").read_text())

    stop_pidfile(sandbox.state_dir / "twin.pid")
    launcher.start_twin(sandbox.state_dir, config)

    assert int((sandbox.state_dir / "twin.pid").read_text()) != old_pid
    app = sandbox.wait_synced("api-gateway-production", main, timeout=90)
    assert app["status"]["operationState"]["operation"]["initiatedBy"] == {"username": "admin"}


def test_the_catalog_resolves_to_the_sandbox(
    sandbox: SandboxHandle, sandbox_env: dict[str, str]
) -> None:
    from core.catalog import load_catalog
    from core.settings import get_settings

    catalog = load_catalog(None)
    settings = get_settings()
    service = catalog.services["api-gateway"]
    assert service.repo == f"{sandbox_env['ROBOTICS_CD_GIT_BASE']}/robotics-api.git"
    assert catalog.defaults.push_registry == sandbox_env["ROBOTICS_CD_PUSH_REGISTRY"]
    assert service.environments["staging"].endpoint == sandbox_env["ROBOTICS_CD_INGRESS_STAGING"]
    assert settings.argocd_url == sandbox_env["ROBOTICS_CD_ARGOCD_URL"]
    assert settings.github_api_url == sandbox_env["ROBOTICS_CD_GITHUB_API_URL"]
    # The product reaches the repos over the GitHub twin's HTTP git, with the token.
    assert catalog.defaults.manifests_repo.startswith(sandbox.info.github_url)
    for url in (service.repo, catalog.defaults.manifests_repo):
        clean, creds = split_credentials(url, sandbox.github_token)
        heads = run_git(
            ["ls-remote", "--", clean, "refs/heads/main"],
            cwd=Path("/"),
            remote=clean,
            timeout=30,
            credentials=creds,
        )
        assert heads.code == 0, heads.output
        assert re.match(r"^[0-9a-f]{40}\trefs/heads/main$", heads.stdout.strip())
        refused = run_git(["ls-remote", "--", clean], cwd=Path("/"), remote=clean, timeout=30)
        assert refused.code != 0  # no token, no access


def test_live_resource_of_an_app(sandbox: SandboxHandle) -> None:
    query = {
        "namespace": "staging",
        "resourceName": "api-gateway",
        "version": "v1",
        "kind": "Deployment",
        "group": "apps",
    }
    with sandbox.argocd() as client:
        found = client.get("/api/v1/applications/api-gateway-staging/resource", params=query)
        foreign = client.get("/api/v1/applications/api-gateway-production/resource", params=query)
    assert found.status_code == 200
    manifest = json.loads(found.json()["manifest"])
    assert (manifest["kind"], manifest["metadata"]["namespace"]) == ("Deployment", "staging")
    assert "status" in manifest
    assert foreign.status_code == 404
