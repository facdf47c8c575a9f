"""The ci flow on real parts: the session Prefect server, dockerd, a registry with htpasswd
auth, and the Trivy binary, against the sample service in a local bare repo."""

from __future__ import annotations

import asyncio
import io
import re
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import docker
import git
import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import State
from prefect.logging.handlers import APILogHandler
from prefect_docker import DockerRegistryCredentials

from core.catalog import ScanIgnore, ScanPolicy
from core.errors import (
    CheckFailed,
    ImageError,
    InvalidInput,
    RegistryAuthFailed,
    ScanGateFailed,
    ScannerUnavailable,
)
from core.images import parse_reference
from flows.ci import CIResult, ci
from sandbox.procs import free_port, wait_until
from tasks.checks import run_check
from tasks.images import (
    REVISION_LABEL,
    keep_rollback_target,
    push_image,
    verify_release_image,
)
from tasks.scan import scan_image
from tests.fixtures_engine import SEED, SERVICE, SampleService

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TAG_DATE = "20261120"  # the fixture's committer date
MAIN = "refs/heads/main"
SECRET_IN_ENV = "ENV AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYzq8EXAMPLE1\n"
PROBE = """#!/bin/sh
# Tries to get out of the check container; exits 0 only if every attempt fails.
escaped=0
echo "interfaces: $(ls /sys/class/net | tr '\\n' ' ')"
for nic in $(ls /sys/class/net); do
  [ "$nic" = lo ] || { echo "ESCAPE: network interface $nic"; escaped=1; }
done
if grep -q '^[^I]' /proc/net/route 2>/dev/null && [ "$(wc -l </proc/net/route)" -gt 1 ]; then
  echo "ESCAPE: a route exists"; escaped=1
fi
for target in "$REGISTRY_TARGET" 172.17.0.1:80; do
  if timeout 3 wget -q -O /dev/null "http://$target/v2/" 2>/dev/null; then
    echo "ESCAPE: reached $target"; escaped=1
  fi
done
env | sort
if env | grep -qi password; then echo "ESCAPE: a password variable is set"; escaped=1; fi
for f in /var/run/docker.sock /root/.docker/config.json "$HOME/.docker/config.json"; do
  [ -e "$f" ] && { echo "ESCAPE: $f exists"; escaped=1; }
done
id
[ "$escaped" -eq 0 ] && echo "isolated: no network, no credentials"
exit "$escaped"
"""


# --- helpers -----------------------------------------------------------------------------


async def run_ci(sample: SampleService, **params: Any) -> tuple[State, UUID]:
    params = {"service": sample.service, "sha": sample.sha, "ref": MAIN, "event": "push", **params}
    state = await ci(**params, return_state=True)
    run_id = state.state_details.flow_run_id
    assert run_id is not None
    return state, run_id


async def logs_of(flow_run_id: UUID) -> str:
    """Every log line of a flow run and its tasks, once the log handler has flushed."""
    await APILogHandler.aflush()
    lines: list[str] = []
    async with get_client() as client:
        while True:
            batch = await client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                offset=len(lines),
                limit=200,
            )
            lines += [log.message for log in batch]
            if len(batch) < 200:
                return "\n".join(lines)


async def wait_for_log(flow_run_id: UUID, needle: str, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = await logs_of(flow_run_id)
        if needle in text or time.monotonic() > deadline:
            return text
        await asyncio.sleep(0.5)


async def artifacts_of(flow_run_id: UUID) -> list[Any]:
    async with get_client() as client:
        return await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )


async def task_names(flow_run_id: UUID) -> list[str]:
    async with get_client() as client:
        runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return [r.name for r in runs]


def registry_get(sample: SampleService, path: str, accept: str = "") -> httpx.Response:
    reg = sample.registry
    headers = {"Accept": accept} if accept else {}
    return httpx.get(f"{reg.url}{path}", auth=(reg.username, reg.password), headers=headers)


def manifest(sample: SampleService, tag: str) -> httpx.Response:
    return registry_get(
        sample,
        f"/v2/{sample.image}/manifests/{tag}",
        accept="application/vnd.docker.distribution.manifest.v2+json",
    )


def tag_of(sample: SampleService) -> str:
    return f"{TAG_DATE}-{sample.sha[:7]}"


# --- tests -------------------------------------------------------------------------------


async def test_push_ships_a_labelled_image_and_a_rerun_reuses_it(sample_service_repo: Any) -> None:
    sample: SampleService = sample_service_repo()
    state, run_id = await run_ci(sample)
    result: CIResult = await state.result()

    tag = tag_of(sample)
    ref = parse_reference(result.image or "")
    assert (ref.registry, ref.repository, ref.tag) == (sample.registry.host, sample.image, tag)
    assert ref.digest == result.digest and result.tag == tag
    assert result.built and result.pushed and not result.reused

    # In the registry under the seed's tag scheme, with the digest we returned and the labels.
    found = manifest(sample, tag)
    assert found.status_code == 200
    assert found.headers["Docker-Content-Digest"] == result.digest
    config = registry_get(
        sample, f"/v2/{sample.image}/blobs/{found.json()['config']['digest']}"
    ).json()
    labels = config["config"]["Labels"]
    assert labels["org.opencontainers.image.revision"] == sample.sha
    assert labels["org.opencontainers.image.source"] == "https://github.com/robotics/robotics-api"
    assert labels["org.opencontainers.image.created"] == "2026-11-20T10:00:00Z"
    assert f"APP_VERSION={sample.sha}" in config["config"]["Env"]  # the GIT_SHA build arg

    # The summary and the scan table are on the run; the scan says the vuln scanner did not run.
    artifacts = {a.key: a for a in await artifacts_of(run_id)}
    summary = artifacts["ci-api-gateway"].data
    assert result.digest in summary and sample.sha in summary
    for stage in ("checkout", "lint", "unit", "integration", "build", "scan", "push"):
        assert f"| {stage} | passed |" in summary
    scan = next(a for k, a in artifacts.items() if (k or "").startswith("scan-"))
    assert "vulnerability scanner did NOT run" in scan.description
    assert "NOT RUN" in str(scan.data)

    # The image serves: /v1/status answers with the commit it was built from.
    client = docker.from_env()
    port = free_port()
    container = client.containers.run(
        result.image,
        detach=True,
        name=f"robotics-cd-ci-test-{uuid.uuid4().hex[:6]}",
        ports={"8000/tcp": ("127.0.0.1", port)},
    )
    try:
        wait_until(
            lambda: httpx.get(f"http://127.0.0.1:{port}/v1/status", timeout=2).status_code == 200,
            timeout=15,
            what="the sample service",
        )
        assert httpx.get(f"http://127.0.0.1:{port}/v1/status").json()["version"] == sample.sha
    finally:
        container.remove(force=True)
        client.close()

    # A second run for the same sha builds and pushes nothing and returns the same digest.
    again_state, again_id = await run_ci(sample)
    again: CIResult = await again_state.result()
    assert again.image == result.image and again.digest == result.digest
    assert again.reused and not again.built and not again.pushed
    names = await task_names(again_id)
    assert not any(n.startswith(("build", "push", "scan")) for n in names), names


async def test_failing_lint_stops_the_flow_before_anything_is_built(
    sample_service_repo: Any,
) -> None:
    sample: SampleService = sample_service_repo(files={"config/fail_rate": "lots\n"})
    state, run_id = await run_ci(sample)
    assert state.is_failed()
    with pytest.raises(CheckFailed) as caught:
        await state.result()
    assert caught.value.stage == "lint"
    assert "config/fail_rate must be an integer" in caught.value.tail
    assert manifest(sample, tag_of(sample)).status_code == 404
    names = await task_names(run_id)
    assert "lint" in names and not {"unit", "integration"} & set(names)
    assert not any(n.startswith(("build", "push", "find")) for n in names), names
    # The lint output streamed into the Prefect log.
    assert "config/fail_rate must be an integer" in await wait_for_log(run_id, "fail_rate must")


async def test_secret_in_dockerfile_env_fails_the_scan_gate(
    sample_service_repo: Any, tmp_path: Path
) -> None:
    seed = (SEED / "Dockerfile").read_text()
    bad = seed.replace("USER 65534:65534\n", SECRET_IN_ENV + "USER 65534:65534\n")
    sample: SampleService = sample_service_repo(files={"Dockerfile": bad})
    state, run_id = await run_ci(sample)
    with pytest.raises(ScanGateFailed) as caught:
        await state.result()
    assert "DS-0031" in str(caught.value)
    assert manifest(sample, tag_of(sample)).status_code == 404  # nothing pushed
    scan = next(a for a in await artifacts_of(run_id) if (a.key or "").startswith("scan-"))
    rows = [r for r in scan.data if isinstance(r, dict)] if isinstance(scan.data, list) else None
    text = str(scan.data)
    assert "DS-0031" in text and "CRITICAL" in text
    assert rows is None or any(r["id"] == "DS-0031" and r["gate"] == "FAIL" for r in rows)
    assert "wJalrXUtnFEMI" not in text  # the value itself is not repeated
    summary = next(a for a in await artifacts_of(run_id) if a.key == "ci-api-gateway").data
    assert "| scan | failed |" in summary and "| push |" not in summary

    # The commit's own .trivyignore cannot accept a CRITICAL finding (issue #24, item 8):
    # it is reported, not honoured. The catalog's allowlist, with a reason and an expiry
    # date, can; an expired entry cannot.
    accepted = tmp_path / "repo"
    accepted.mkdir()
    (accepted / "Dockerfile").write_text(bad)
    (accepted / ".trivyignore").write_text("# accepted: demo key, rotated\nDS-0031\n")
    image = f"{sample.registry.host}/{sample.image}:{tag_of(sample)}"
    with pytest.raises(ScanGateFailed) as self_accepted:
        await scan_image(
            image, repo_path=str(accepted), policy=ScanPolicy(allow_missing_vuln_db=True)
        )
    assert "not honoured for CRITICAL" in str(self_accepted.value)
    assert "scan.ignore" in str(self_accepted.value)

    def allow(expires: date) -> ScanPolicy:
        entry = ScanIgnore(id="DS-0031", reason="demo key, rotated on 2026-11-02", expires=expires)
        return ScanPolicy(allow_missing_vuln_db=True, ignore=[entry])

    today = datetime.now(UTC).date()
    report = await scan_image(image, repo_path=str(accepted), policy=allow(today))
    assert not report.blocking and report.ignored >= 1
    assert any(f.id == "DS-0031" and f.ruling == "allowlisted" for f in report.findings)
    with pytest.raises(ScanGateFailed, match="expired on"):
        await scan_image(image, repo_path=str(accepted), policy=allow(today - timedelta(days=1)))


async def test_wrong_registry_password_names_the_registry_and_leaks_nothing(
    sample_service_repo: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    sample: SampleService = sample_service_repo()
    wrong = f"wrong-{uuid.uuid4().hex}"
    block = f"registry-wrong-{uuid.uuid4().hex[:6]}"
    await DockerRegistryCredentials(
        username=sample.registry.username, password=wrong, registry_url=sample.registry.host
    ).asave(block)
    monkeypatch.setenv("ROBOTICS_CD_REGISTRY_BLOCK", block)

    state, run_id = await run_ci(sample)
    with pytest.raises(RegistryAuthFailed) as caught:
        await state.result()
    assert sample.registry.host in str(caught.value)
    assert manifest(sample, tag_of(sample)).status_code == 404
    # The same refusal when pushing: login fails, the registry is named, no password shown.
    local = f"{sample.registry.host}/{sample.image}:auth-test"
    docker.from_env().images.get("robotics-cd/busybox:latest").tag(local)
    with pytest.raises(RegistryAuthFailed) as at_push:
        await push_image(local, credentials_block=block)
    assert sample.registry.host in str(at_push.value) and wrong not in str(at_push.value)
    assert registry_get(sample, f"/v2/{sample.image}/tags/list").status_code == 404

    logs = await wait_for_log(run_id, "RegistryAuthFailed")
    assert "RegistryAuthFailed" in logs  # the failure itself is logged ...
    artifacts = str([(a.data, a.description) for a in await artifacts_of(run_id)])
    for secret in (wrong, sample.registry.password):  # ... without either password
        assert secret not in logs and secret not in artifacts and secret not in str(caught.value)


async def test_pull_request_runs_isolated_checks_and_builds_nothing(
    sample_service_repo: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    sample: SampleService = sample_service_repo(
        files={"scripts/probe.sh": PROBE},
        checks={"unit": ["sh scripts/test.sh unit", "sh scripts/probe.sh"]},
    )
    # A worker holding the registry password in its environment must not hand it down.
    monkeypatch.setenv("REGISTRY_PASSWORD", sample.registry.password)
    monkeypatch.setenv("REGISTRY_TARGET", sample.registry.host)
    state, run_id = await run_ci(sample, ref="refs/pull/7/head", event="pull_request", fork=True)
    result: CIResult = await state.result()
    assert result.image is None and not result.built and not result.pushed
    assert manifest(sample, tag_of(sample)).status_code == 404
    logs = await wait_for_log(run_id, "isolated: no network")
    assert "isolated: no network, no credentials" in logs
    assert "interfaces: lo" in logs
    assert sample.registry.password not in logs
    names = await task_names(run_id)
    assert {"lint", "unit", "integration"} <= set(names)
    assert not any(n.startswith(("build", "push", "find", "scan")) for n in names), names


async def test_the_probe_does_see_a_network_when_the_catalog_allows_one(
    sample_service_repo: Any, tmp_path: Any
) -> None:
    """Control for the test above: the same probe fails when checks.network is on."""
    (tmp_path / "probe.sh").write_text(PROBE)
    with pytest.raises(CheckFailed) as caught:
        await run_check(
            "unit",
            ["sh probe.sh"],
            str(tmp_path),
            image="robotics-cd/check-runner:latest",
            network=True,
            timeout=timedelta(seconds=30),
        )
    assert "ESCAPE: network interface eth0" in caught.value.tail


async def test_bad_input_is_refused_before_any_side_effect(sample_service_repo: Any) -> None:
    sample: SampleService = sample_service_repo()
    for params, needle in (
        ({"sha": "HEAD; rm -rf /"}, "invalid git sha"),
        ({"ref": "refs/heads/$(reboot)"}, "invalid git ref"),
        ({"service": "no-such-service"}, "unknown service"),
    ):
        state, run_id = await run_ci(sample, **params)
        with pytest.raises(InvalidInput, match=re.escape(needle)):
            await state.result()
        assert await task_names(run_id) == []


async def test_missing_vuln_db_fails_the_scan_unless_allowed(
    sample_service_repo: Any, tmp_path: Path
) -> None:
    sample: SampleService = sample_service_repo(
        scan={"fail_on": ["CRITICAL", "HIGH"], "allow_missing_vuln_db": False}
    )
    state, _ = await run_ci(sample)
    with pytest.raises(ScannerUnavailable) as caught:
        await state.result()
    message = str(caught.value)
    assert "no Trivy vulnerability DB" in message
    assert "vuln_db_repository" in message and "--download-db-only" in message
    assert manifest(sample, tag_of(sample)).status_code == 404

    # A configured mirror that lacks the DB: the message names it (Trivy got our registry
    # credentials through its environment; the password shows nowhere).
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "Dockerfile").write_text((SEED / "Dockerfile").read_text())
    mirror = f"{sample.registry.host}/aquasecurity/trivy-db:2"
    with pytest.raises(ScannerUnavailable) as from_mirror:
        await scan_image(
            f"{sample.registry.host}/{sample.image}:{tag_of(sample)}",
            repo_path=str(repo),
            policy=ScanPolicy(vuln_db_repository=mirror),
        )
    assert f"could not download it from {mirror}" in str(from_mirror.value)
    assert sample.registry.password not in str(from_mirror.value)


async def test_a_check_over_its_timeout_is_killed_and_fails_its_stage(
    base_images: list[str], engine_settings: None, tmp_path: Path
) -> None:
    (tmp_path / "README").write_text("x")
    started = time.monotonic()
    with pytest.raises(CheckFailed) as caught:
        await run_check(
            "integration",
            ["echo started; sleep 60"],
            str(tmp_path),
            image="robotics-cd/check-runner:latest",
            timeout=timedelta(seconds=2),
        )
    assert time.monotonic() - started < 20
    assert caught.value.exit_code is None and "timed out" in str(caught.value)
    assert "started" in caught.value.tail
    leftovers = docker.from_env().containers.list(
        all=True, filters={"label": "robotics-cd.stage=integration"}
    )
    assert not [c for c in leftovers if c.name.startswith("robotics-cd-check-")]


async def test_a_hand_made_push_run_of_a_pull_request_head_is_refused_before_build(
    sample_service_repo: Any, tmp_path: Path
) -> None:
    """``event`` and ``fork`` are parameters anyone with API access sets: the repository,
    not the caller, says whether a commit is on the release branch (issue #24, item 4)."""
    sample: SampleService = sample_service_repo()
    work = tmp_path / "pr"
    repo = git.Repo.clone_from(str(sample.bare), str(work))
    (work / "README.md").write_text("a pull request, not merged\n")
    repo.git.add(A=True)
    repo.git.commit("-q", "-m", "pr: not on main", author="Dev <dev@robotics.example>")
    pr_head = repo.head.commit.hexsha
    repo.git.push("origin", "HEAD:refs/pull/7/head")

    state, run_id = await run_ci(sample, sha=pr_head, ref=MAIN, event="push")
    with pytest.raises(InvalidInput) as caught:
        await state.result()
    assert f"commit {pr_head} is not on branch 'main'" in str(caught.value)
    names = await task_names(run_id)
    assert not any(n.startswith(("checkout", "lint", "build", "push", "scan")) for n in names)
    assert manifest(sample, f"{TAG_DATE}-{pr_head[:7]}").status_code == 404
    # (The same commit run as what it is, a pull request, is checked and ships nothing:
    # test_pull_request_runs_isolated_checks_and_builds_nothing.)


async def test_a_release_image_must_be_in_the_registry_and_pushed_by_ci(
    sample_service_repo: Any,
) -> None:
    """Issue #24, item 1: the exact digest in the registry, pushed by a completed ci run of
    the commit (or an operator's recorded reason); the rollback target kept by a tag."""
    sample: SampleService = sample_service_repo()
    state, run_id = await run_ci(sample)
    result: CIResult = await state.result()
    assert result.image and result.digest
    note = await verify_release_image(result.image, service=SERVICE, source_sha=sample.sha)
    assert note == f"provenance of {result.digest}: ci run {run_id}"

    # A digest the registry does not hold: refused, naming the image and the registry.
    ref = parse_reference(result.image)
    missing = str(ref.with_digest("sha256:" + "0" * 64))
    with pytest.raises(InvalidInput) as caught:
        await verify_release_image(missing, service=SERVICE, source_sha=sample.sha)
    assert f"image {missing} is not in registry {sample.registry.host}" in str(caught.value)

    # An image pushed by hand, its revision label forged to the commit: no ci run pushed it.
    forged_tag = f"{sample.registry.host}/{sample.image}:forged"
    dockerfile = f"FROM robotics-cd/busybox:latest\nLABEL {REVISION_LABEL}={sample.sha}\n"
    engine = docker.from_env()
    try:
        engine.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=forged_tag, rm=True)
    finally:
        engine.close()
    forged = await push_image(forged_tag)
    with pytest.raises(InvalidInput) as refused:
        await verify_release_image(forged.ref, service=SERVICE, source_sha=sample.sha)
    assert f"no completed ci run of {SERVICE} pushed {forged.digest}" in str(refused.value)
    overridden = await verify_release_image(
        forged.ref,
        service=SERVICE,
        source_sha=sample.sha,
        override_reason="hotfix built by the on-call engineer, INC-4711",
    )
    assert "override: hotfix built by the on-call engineer, INC-4711" in overridden

    # Before a canary: the stable image is tagged rollback-<service> (retention keeps it) ...
    kept = await keep_rollback_target(SERVICE, result.image)
    assert kept == f"{sample.registry.host}/{sample.image}:rollback-{SERVICE}@{result.digest}"
    tagged = manifest(sample, f"rollback-{SERVICE}")
    assert tagged.status_code == 200
    assert tagged.headers["Docker-Content-Digest"] == result.digest
    # ... and a stable image gone from the registry stops the canary before it starts.
    with pytest.raises(ImageError) as gone:
        await keep_rollback_target(SERVICE, missing)
    assert f"not in registry {sample.registry.host} any more" in str(gone.value)
