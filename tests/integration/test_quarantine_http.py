"""Quarantine files and the DORA reader over the GitHub twin's HTTP git remote (basic auth
by token through askpass), as the sandbox and a real platform reach the manifests repo."""

from __future__ import annotations

import pytest

from core import quarantine as q
from core.errors import GitOpsError
from tasks.dora import read_history
from tasks.quarantine import QuarantineRepo
from tests.integration.test_gitops_http import Twin, remote
from tests.integration.test_gitops_http import twin as twin
from tests.unit.test_quarantine import DIGEST, entry

pytestmark = pytest.mark.integration


def test_quarantine_and_lift_over_http_with_a_token(twin: Twin, tmp_path):
    repo = QuarantineRepo(
        url=twin.url, branch="main", workspace=tmp_path, token=twin.token, timeout=30
    )
    assert repo.quarantine("api-gateway", entry()) is not None
    assert repo.read("api-gateway").find(DIGEST) == entry()
    assert q.path_of("api-gateway") in remote(twin, "ls-tree", "-r", "--name-only", "main")
    repo.lift("api-gateway", DIGEST, by="alice", reason="checked by hand")
    assert repo.read("api-gateway").find(DIGEST) is None
    for path in tmp_path.rglob("*"):  # the token is in no file we left behind
        if path.is_file():
            assert twin.token.encode() not in path.read_bytes(), path


def test_a_wrong_token_is_an_error_naming_the_remote(twin: Twin, tmp_path):
    repo = QuarantineRepo(
        url=twin.url, branch="main", workspace=tmp_path, token="wrong", timeout=30
    )
    with pytest.raises(GitOpsError, match=r"127\.0\.0\.1"):
        repo.read("api-gateway")


def test_the_dora_reader_reads_over_http(twin: Twin, tmp_path):
    history = read_history(
        manifests_url=twin.url.replace("http://", f"http://x-access-token:{twin.token}@"),
        branch="main",
        overlays={"api-gateway": "serving/api-gateway/overlays/production"},
        source_repos={},
        cache=tmp_path,
        timeout=30,
    )
    assert history.deployments == []  # the seeded repo: no release yet
