"""GitHub statuses/deployments and chat notifications against the sandbox's GitHub twin,
served over HTTP, with the token and webhooks in real Prefect Secret blocks."""

from __future__ import annotations

import secrets
import subprocess
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from prefect.blocks.system import Secret

from core.errors import GitHubError
from sandbox.faults import FAULTS, FaultInjector, HttpFault
from sandbox.github import GitHubTwin, Store, build_app
from sandbox.procs import free_port
from tasks.github import create_deployment, github_client, set_commit_status, set_deployment_status
from tasks.notify import send_chat

pytestmark = pytest.mark.integration
REPO = "robotics/robotics-api"


@pytest.fixture(scope="module")
def twin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, str]]:
    """(base URL, token, sha of a commit in robotics/robotics-api)."""
    base = tmp_path_factory.mktemp("github")
    bare = base / "git" / "robotics-api.git"
    work = base / "work"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(bare)], check=True)
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
    (work / "README").write_text("hi\n")
    git = ["git", "-C", str(work), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "add", "README"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "first"], check=True)
    subprocess.run([*git, "push", "-q", str(bare), "main"], check=True)
    sha = subprocess.run(
        [*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()

    port = free_port()
    token = secrets.token_hex(20)
    app = GitHubTwin(
        base_url=f"http://127.0.0.1:{port}",
        git_base=base / "git",
        owner="robotics",
        token=token,
        webhook_url="",
        webhook_secret="",
        store=Store(base / "recorded.json"),
    )
    server = uvicorn.Server(
        uvicorn.Config(
            FaultInjector(build_app(app), target="github"),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="off",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline:
            raise TimeoutError("GitHub twin did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", token, sha
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def configured(twin, prefect_server, monkeypatch) -> Iterator[tuple[str, str]]:
    """Settings point at the twin; the token and the webhooks live in Secret blocks."""
    url, token, sha = twin
    suffix = secrets.token_hex(4)
    token_block, chat_block = f"gh-token-{suffix}", f"chat-{suffix}"
    Secret(value=token).save(token_block, overwrite=True)
    Secret(
        value={
            "feishu": f"{url}/chat/feishu/open-apis/bot/v2/hook/FEISHU-{suffix}",
            "dingtalk": f"{url}/chat/dingtalk/robot/send?access_token=DING-{suffix}",
            "slack": f"{url}/chat/slack/services/T0/B0/SLACK-{suffix}",
        }
    ).save(chat_block, overwrite=True)
    monkeypatch.setenv("ROBOTICS_CD_GITHUB_API_URL", url)
    monkeypatch.setenv("ROBOTICS_CD_GITHUB_TOKEN_BLOCK", token_block)
    monkeypatch.setenv("ROBOTICS_CD_CHAT_WEBHOOKS_BLOCK", chat_block)
    yield url, sha
    FAULTS.clear_http("github")


def recorded(url: str) -> dict:
    return httpx.get(f"{url}/_twin/recorded", timeout=5).json()


def test_commit_status_reaches_github(configured) -> None:
    url, sha = configured
    assert set_commit_status.fn(
        REPO, sha, "success", "robotics-cd/release", "staging verified", "http://ui/run/1"
    )
    status = next(s for s in recorded(url)["statuses"] if s["context"] == "robotics-cd/release")
    assert (status["sha"], status["state"], status["target_url"]) == (
        sha,
        "success",
        "http://ui/run/1",
    )


def test_deployment_is_created_once_per_run_with_statuses(configured) -> None:
    url, sha = configured
    run_id = secrets.token_hex(8)
    payload = {"run_id": run_id, "image": "reg/api-gateway@sha256:" + "a" * 64}
    first = create_deployment.fn(REPO, "main", "staging", "api-gateway to staging", payload)
    again = create_deployment.fn(REPO, "main", "staging", "api-gateway to staging", payload)
    assert first is not None and first == again
    assert set_deployment_status.fn(
        REPO, first, "success", log_url="http://ui/runs/flow-run/x", description="verified"
    )
    data = recorded(url)
    mine = [d for d in data["deployments"] if d["payload"].get("run_id") == run_id]
    assert len(mine) == 1 and mine[0]["sha"] == sha
    statuses = [s for s in data["deployment_statuses"] if s.get("deployment_id", first) == first]
    assert any(s.get("log_url") == "http://ui/runs/flow-run/x" for s in statuses)


def test_github_503_is_retried(configured) -> None:
    url, sha = configured
    FAULTS.add_http(HttpFault(target="github", path_prefix="/repos/", status=503, count=2))
    with github_client(backoff_seconds=0.05) as gh:
        gh.set_commit_status(REPO, sha, "pending", "robotics-cd/retry")
    assert any(s["context"] == "robotics-cd/retry" for s in recorded(url)["statuses"])


def test_github_outage_does_not_fail_unless_required(configured) -> None:
    _, sha = configured
    FAULTS.add_http(HttpFault(target="github", path_prefix="/repos/", status=503))
    with github_client(backoff_seconds=0.01) as gh:
        assert not set_commit_status.fn(REPO, sha, "success", "robotics-cd/outage", client=gh)
    with github_client(backoff_seconds=0.01) as gh, pytest.raises(GitHubError, match="HTTP 503"):
        set_commit_status.fn(REPO, sha, "success", "robotics-cd/outage", required=True, client=gh)


def test_chat_reaches_every_platform_in_its_shape(configured) -> None:
    url, _ = configured
    reached = send_chat.fn(
        "api-gateway awaits approval",
        "**image** `api-gateway:20261127-abc1234`",
        link="http://ui/runs/flow-run/1",
    )
    assert reached == ["feishu", "dingtalk", "slack"]
    chats = {c["channel"]: c["body"] for c in recorded(url)["chat"]}
    assert chats["feishu"]["msg_type"] == "interactive"
    assert chats["dingtalk"]["msgtype"] == "markdown"
    assert chats["slack"]["blocks"][0]["type"] == "header"


def test_chat_sink_down_is_a_warning(prefect_server, monkeypatch) -> None:
    reached = send_chat.fn(
        "t", "x", webhooks={"slack": f"http://127.0.0.1:{free_port()}/chat/slack/TOKEN"}
    )
    assert reached == []


def test_chat_without_the_block_is_a_warning(prefect_server, monkeypatch) -> None:
    monkeypatch.setenv("ROBOTICS_CD_CHAT_WEBHOOKS_BLOCK", f"missing-{secrets.token_hex(4)}")
    assert send_chat.fn("t", "x") == []
