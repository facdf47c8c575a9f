"""Webhook rules on GitHub's own example payloads (``tests/fixtures/octokit``).

Signatures agree with GitHub's published test vector and with ``@octokit/webhooks-methods``
(run with node); refs agree with ``git check-ref-format``; routing decides from the catalog.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from core.catalog import Catalog, parse_catalog
from core.errors import InvalidInput
from core.webhooks import (
    Targets,
    check_ref_format,
    compute_signature,
    parse_payload,
    path_matches,
    route,
    validate_delivery_id,
    verify_signature,
)

OCTOKIT = Path(__file__).parent.parent / "fixtures" / "octokit"
METHODS_VERSION = "6.0.0"
TRAINING_PATHS = ["src/**", "configs/**", "Dockerfile", "requirements.txt"]

# The octokit examples are about Codertocat/Hello-World with default branch master.
_CATALOG = """
defaults:
  push_registry: 127.0.0.1:5000
  pull_registry: 127.0.0.1:5000
  manifests_repo: file:///tmp/none/manifests.git
services:
  hello:
    repo: file:///tmp/none/hello.git
    github: {service_repo}
    branch: master
    image: robotics-serving/hello
    environments:
      staging: {{path: serving/hello/overlays/staging, argocd_app: hello-staging,
                 namespace: staging, host: hello.local}}
    approvers: [alice]
training:
  vision:
    repo: file:///tmp/none/train.git
    github: {training_repo}
    branch: master
    image: robotics-training/vision
"""


def make_catalog(*, service_repo: str, training_repo: str) -> Catalog:
    text = _CATALOG.format(service_repo=service_repo, training_repo=training_repo)
    return parse_catalog(text, env={})


SERVICE_CATALOG = make_catalog(service_repo="Codertocat/Hello-World", training_repo="x/train")
TRAINING_CATALOG = make_catalog(service_repo="x/api", training_repo="Codertocat/Hello-World")
TARGETS = Targets(ci="ci/ci", training_image="training-image/training-image")


def example(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((OCTOKIT / name).read_text())
    return data


def decide(event: str, data: dict[str, Any], catalog: Catalog = SERVICE_CATALOG):
    return route(event, parse_payload(event, data), catalog, TARGETS)


# --- signatures ----------------------------------------------------------------------------


def test_signature_matches_githubs_published_test_vector():
    expected = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    assert compute_signature("It's a Secret to Everybody", b"Hello, World!") == expected
    assert verify_signature("It's a Secret to Everybody", b"Hello, World!", expected)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "sha256=",
        "sha1=757107ea0eb2509fc211221cce984b8a37570b6d",
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e18",
        "sha256=ünïcödé",
    ],
)
def test_wrong_or_missing_signature_is_refused(header):
    assert not verify_signature("It's a Secret to Everybody", b"Hello, World!", header)


def test_empty_secret_never_verifies():
    assert not verify_signature("", b"x", compute_signature("", b"x"))


@pytest.fixture(scope="session")
def octokit_methods(tmp_path_factory) -> Path:
    """``@octokit/webhooks-methods`` installed with npm into a temp dir."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip("node/npm not installed: cannot cross-check with @octokit/webhooks-methods")
    where: Path = tmp_path_factory.mktemp("octokit")
    proc = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", f"@octokit/webhooks-methods@{METHODS_VERSION}"],
        cwd=where,
        capture_output=True,
        text=True,
        timeout=180,
    )
    if proc.returncode != 0:
        pytest.skip(f"npm could not install @octokit/webhooks-methods: {proc.stderr[-400:]}")
    return where


def test_signature_agrees_with_octokit_webhooks_methods(octokit_methods):
    body = (OCTOKIT / "push.json").read_text()
    secret = "robotics-cd test secret ✓"
    script = """
      const m = await import("@octokit/webhooks-methods");
      const [secret, body, ours] = JSON.parse(require("fs").readFileSync(0, "utf8"));
      const sig = await m.sign(secret, body);
      console.log(JSON.stringify({sig, verified: await m.verify(secret, body, ours)}));
    """
    ours = compute_signature(secret, body.encode())
    proc = subprocess.run(
        ["node", "-e", f"(async () => {{ {script} }})()"],
        cwd=octokit_methods,
        input=json.dumps([secret, body, ours]),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    theirs = json.loads(proc.stdout)
    assert theirs["sig"] == ours
    assert theirs["verified"] is True
    assert verify_signature(secret, body.encode(), theirs["sig"])


# --- git ref rules -------------------------------------------------------------------------

REFS = [
    "refs/heads/main",
    "refs/heads/feature/x-1",
    "refs/pull/2/head",
    "refs/tags/v1.2.3",
    "refs/heads/ünicode",
    "main",
    "refs/heads/a..b",
    "refs/heads/.hidden",
    "refs/heads/x.lock",
    "refs/heads/x.lock/y",
    "refs/heads/end.",
    "refs/heads/end/",
    "/refs/heads/x",
    "refs//heads/x",
    "refs/heads/a b",
    "refs/heads/a~1",
    "refs/heads/a^",
    "refs/heads/a:b",
    "refs/heads/a?",
    "refs/heads/a*",
    "refs/heads/a[b",
    "refs/heads/a\\b",
    "refs/heads/a@{1}",
    "refs/heads/@",
    "@",
    "refs/heads/tab\there",
    "refs/heads/del\x7f",
    "refs/heads/$(rm -rf ~)",
    "refs/heads/;touch x",
    "refs/heads/-rf",
    "refs/heads/a.b/c",
    "",
]


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
@pytest.mark.parametrize("ref", REFS)
def test_ref_rules_agree_with_git_check_ref_format(ref):
    git = subprocess.run(["git", "check-ref-format", ref], capture_output=True)
    assert check_ref_format(ref) == (git.returncode == 0)


# --- path filter ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "hit"),
    [
        ("src/train.py", True),
        ("src/models/deep/net.py", True),
        ("configs/a.yaml", True),
        ("configs/exp/b.yaml", True),
        ("Dockerfile", True),
        ("requirements.txt", True),
        ("README.md", False),
        ("docs/Dockerfile", False),
        ("srcx/a.py", False),
        ("tests/src/a.py", False),
        ("requirements.txt.bak", False),
    ],
)
def test_training_path_filter(path, hit):
    assert path_matches(path, TRAINING_PATHS) is hit


def test_glob_semantics_of_single_star_and_double_star():
    assert path_matches("a/b.py", ["a/*.py"])
    assert not path_matches("a/b/c.py", ["a/*.py"])
    assert path_matches("a/b/c.py", ["a/**/*.py"])
    assert path_matches("a/c.py", ["a/**/*.py"])
    assert path_matches("x/y/Dockerfile", ["**/Dockerfile"])
    assert path_matches("Dockerfile", ["**/Dockerfile"])
    assert path_matches("a.txt", ["?.txt"]) and not path_matches("ab.txt", ["?.txt"])


# --- routing: service repos ----------------------------------------------------------------


def test_push_to_default_branch_starts_ci():
    decision = decide("push", example("push.json"))
    (run,) = decision.runs
    assert run.deployment == "ci/ci"
    assert run.parameters == {
        "service": "hello",
        "sha": "6113728f27ae82c7b1a177c8d03f9e96e0adf246",
        "ref": "refs/heads/master",
        "event": "push",
        "fork": False,
    }
    assert run.idempotency_key("72d3162e-cc78-11e3-81ab-4c9367dc0958") == (
        "github-72d3162e-cc78-11e3-81ab-4c9367dc0958-ci/ci"
    )


def test_push_to_another_branch_starts_nothing():
    data = example("push.json")
    data["ref"] = "refs/heads/feature"
    decision = decide("push", data)
    assert not decision.starts_anything
    assert "not refs/heads/master" in decision.ignored


@pytest.mark.parametrize("name", ["push.tag-created.json", "push.tag-deleted.json"])
def test_tag_pushes_start_nothing(name):
    assert not decide("push", example(name)).starts_anything


def test_branch_deletion_starts_nothing():
    data = example("push.json")
    data.update(deleted=True, before=data["after"], after="0" * 40)
    decision = decide("push", data)
    assert not decision.starts_anything
    assert "deleted" in decision.ignored


def test_unknown_repository_is_ignored():
    data = example("push.json")
    data["repository"]["full_name"] = "someone/else"
    decision = decide("push", data)
    assert not decision.starts_anything
    assert "not in the catalog" in decision.ignored


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("after", "6113728f27ae82c7b1a177c8d03f9e96e0adf24; rm -rf /"),
        ("after", "HEAD"),
        ("ref", "refs/heads/master..x"),
        ("ref", "refs/heads/x y:z"),
    ],
)
def test_hostile_sha_or_ref_is_refused_before_anything_starts(field, value):
    data = example("push.json")
    data[field] = value
    with pytest.raises(InvalidInput):
        decide("push", data)


def test_shell_looking_but_git_valid_branch_is_just_another_branch():
    data = example("push.json")
    data["ref"] = "refs/heads/$(id)"
    assert not decide("push", data).starts_anything


def test_hostile_repository_name_is_refused():
    data = example("push.json")
    data["repository"]["full_name"] = "../../etc/passwd"
    with pytest.raises(InvalidInput):
        decide("push", data)


@pytest.mark.parametrize(
    "name",
    ["pull_request.opened.json", "pull_request.synchronize.json", "pull_request.reopened.json"],
)
def test_pull_request_starts_ci_in_check_mode(name):
    data = example(name)
    (run,) = decide("pull_request", data).runs
    assert run.deployment == "ci/ci"
    assert run.parameters == {
        "service": "hello",
        "sha": data["pull_request"]["head"]["sha"],
        "ref": "refs/pull/2/head",
        "event": "pull_request",
        "fork": False,
    }


def test_pull_request_from_a_fork_is_flagged():
    data = example("pull_request.opened.json")
    data["pull_request"]["head"]["repo"]["full_name"] = "mallory/Hello-World"
    data["pull_request"]["head"]["repo"]["fork"] = True
    (run,) = decide("pull_request", data).runs
    assert run.parameters["fork"] is True


def test_pull_request_from_a_deleted_fork_is_flagged():
    data = example("pull_request.opened.json")
    data["pull_request"]["head"]["repo"] = None
    (run,) = decide("pull_request", data).runs
    assert run.parameters["fork"] is True


def test_closed_pull_request_starts_nothing_even_when_merged():
    data = example("pull_request.closed.json")
    assert not decide("pull_request", data).starts_anything
    data["pull_request"]["merged"] = True  # the merge's own push starts CI
    assert not decide("pull_request", data).starts_anything


def test_ping_starts_nothing():
    assert not decide("ping", example("ping.json")).starts_anything


def test_malformed_payload_is_invalid_input():
    data = example("push.json")
    del data["repository"]
    with pytest.raises(InvalidInput, match="repository"):
        parse_payload("push", data)


# --- routing: the training repo ------------------------------------------------------------


def training_push(*paths: str) -> dict[str, Any]:
    data = copy.deepcopy(example("push.json"))
    data["commits"][0].update(added=list(paths), modified=[], removed=[])
    return data


def test_training_push_touching_only_readme_starts_nothing():
    # The octokit example itself adds only README.md.
    decision = decide("push", example("push.json"), TRAINING_CATALOG)
    assert not decision.starts_anything
    assert "matches" in decision.ignored


def test_training_push_touching_configs_starts_training_image():
    decision = decide("push", training_push("README.md", "configs/exp.yaml"), TRAINING_CATALOG)
    (run,) = decision.runs
    assert run.deployment == "training-image/training-image"
    assert run.parameters == {
        "image": "vision",
        "sha": "6113728f27ae82c7b1a177c8d03f9e96e0adf246",
        "ref": "refs/heads/master",
    }
    assert "configs/exp.yaml" in run.reason


def test_training_push_with_a_truncated_commit_list_builds():
    data = training_push("README.md")
    data["commits"] = data["commits"] * 20
    assert decide("push", data, TRAINING_CATALOG).starts_anything


def test_delivery_id_must_look_like_a_guid():
    assert validate_delivery_id("72d3162e-cc78-11e3-81ab-4c9367dc0958")
    for bad in (None, "", "../x", "a" * 80, "id with space"):
        with pytest.raises(InvalidInput):
            validate_delivery_id(bad)


# --- routing: the manifests repo (release-train bundle files) -------------------------------

MANIFESTS_CATALOG = parse_catalog(
    _CATALOG.format(service_repo="x/api", training_repo="x/train").replace(
        "  manifests_repo: file:///tmp/none/manifests.git\n",
        "  manifests_repo: file:///tmp/none/manifests.git\n"
        "  manifests_branch: master\n"
        "  manifests_github: Codertocat/Hello-World\n",
    ),
    env={},
)


def manifests_push(*commits: dict[str, list[str]]) -> dict[str, Any]:
    data = copy.deepcopy(example("push.json"))
    template = data["commits"][0]
    data["commits"] = [
        {**template, "added": [], "modified": [], "removed": [], **c} for c in commits
    ]
    return data


def test_a_pushed_bundle_file_starts_one_train_per_bundle():
    data = manifests_push(
        {"added": ["bundles/fleet-v2.yaml", "README.md"]},
        {"modified": ["bundles/nav.yml", "serving/api-gateway/overlays/staging/x.yaml"]},
    )
    decision = route("push", parse_payload("push", data), MANIFESTS_CATALOG, TARGETS)
    sha = "6113728f27ae82c7b1a177c8d03f9e96e0adf246"
    assert [r.parameters for r in decision.runs] == [
        {"bundle_file": "bundles/fleet-v2.yaml", "manifests_sha": sha},
        {"bundle_file": "bundles/nav.yml", "manifests_sha": sha},
    ]
    assert {r.deployment for r in decision.runs} == {"release-train/release-train"}
    # One delivery, two runs of one deployment: each its own idempotency key.
    keys = {r.idempotency_key("d-1") for r in decision.runs}
    assert keys == {
        "github-d-1-release-train/release-train-fleet-v2",
        "github-d-1-release-train/release-train-nav",
    }
    assert "train:fleet-v2" in decision.runs[0].tags


@pytest.mark.parametrize(
    ("commits", "why"),
    [
        # robotics-cd's own commits (overlays, leases) start nothing.
        ([{"modified": ["serving/api-gateway/overlays/production/canary.yaml"]}], "no bundle"),
        # A bundle added then removed in the same push is not there to release.
        ([{"added": ["bundles/x.yaml"]}, {"removed": ["bundles/x.yaml"]}], "no bundle"),
        # Nested or other extensions are not bundle files.
        ([{"added": ["bundles/old/x.yaml", "bundles/x.json"]}], "no bundle"),
        ([{"added": ["bundles/x.yaml"]}] * 20, "may be truncated"),
    ],
)
def test_a_manifests_push_without_a_bundle_file_starts_nothing(commits, why):
    data = manifests_push(*commits)
    decision = route("push", parse_payload("push", data), MANIFESTS_CATALOG, TARGETS)
    assert not decision.starts_anything and why in decision.ignored


def test_a_bundle_pushed_to_another_branch_of_the_manifests_repo_starts_nothing():
    data = manifests_push({"added": ["bundles/fleet-v2.yaml"]})
    data["ref"] = "refs/heads/feature"
    decision = route("push", parse_payload("push", data), MANIFESTS_CATALOG, TARGETS)
    assert not decision.starts_anything and "the manifests branch" in decision.ignored
