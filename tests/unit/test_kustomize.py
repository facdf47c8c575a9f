"""Overlay edits (golden files) and rendered-manifest comparisons.

Regenerate the golden files with ``ROBOTICS_CD_UPDATE_GOLDEN=1 pytest tests/unit/test_kustomize.py``
and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.errors import InvalidInput
from core.kustomize import (
    CanarySettings,
    FieldChange,
    FieldPattern,
    ImageEntry,
    canary_fields,
    diff_manifests,
    find_image,
    image_fields,
    images_in,
    parse_canary,
    parse_rendered,
    read_images,
    render_canary,
    set_image,
    unexpected_changes,
)

GOLDEN = Path(__file__).parent / "golden" / "kustomize"
DIGEST = "sha256:" + "ab" * 32


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("ROBOTICS_CD_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{name} differs; regenerate with ROBOTICS_CD_UPDATE_GOLDEN=1"


def source(name: str) -> str:
    return (GOLDEN / name).read_text()


def test_bump_replaces_the_entry_and_keeps_the_rest_of_the_file():
    out = set_image(
        source("input-staging.yaml"),
        ImageEntry(
            "api-gateway",
            "127.0.0.1:5000/robotics-serving/api-gateway",
            "20261127-abc1234",
            DIGEST,
        ),
    )
    check_golden("bump-staging.yaml", out)
    assert "# Staging overlay of api-gateway" in out
    assert "# one replica in staging" in out
    entry = find_image(out, "api-gateway")
    assert entry is not None
    assert (
        entry.reference == f"127.0.0.1:5000/robotics-serving/api-gateway:20261127-abc1234@{DIGEST}"
    )
    assert find_image(out, "sidecar") == ImageEntry("sidecar", None, "v1.2.3", None)


def test_new_entries_are_sorted_by_name_and_numeric_tags_quoted():
    out = set_image(source("input-staging.yaml"), ImageEntry("aaa-worker", "r/aaa", "20261127"))
    check_golden("add-numeric-tag.yaml", out)
    assert [e.name for e in read_images(out)] == ["aaa-worker", "api-gateway", "sidecar"]
    assert 'newTag: "20261127"' in out


def test_indented_sequences_keep_their_style():
    out = set_image(source("input-indented.yaml"), ImageEntry("beta", "r/beta", "1.0"))
    check_golden("indented.yaml", out)
    assert "  - name: alpha   # alpha is pinned" in out
    assert [e.name for e in read_images(out)] == ["alpha", "beta", "zeta"]


def test_setting_the_same_image_twice_changes_nothing():
    entry = ImageEntry("api-gateway", "r/api", "20261127-abc1234", DIGEST)
    once = set_image(source("input-staging.yaml"), entry)
    assert set_image(once, entry) == once


def test_the_whole_entry_is_replaced_as_kustomize_does():
    with_digest = set_image(
        source("input-staging.yaml"), ImageEntry("sidecar", "r/s", "v2", DIGEST)
    )
    without = set_image(with_digest, ImageEntry("sidecar", "r/s", "v3"))
    assert find_image(without, "sidecar") == ImageEntry("sidecar", "r/s", "v3", None)


@pytest.mark.parametrize(
    "entry",
    [
        ImageEntry("api-gateway", "r/a", "bad tag"),
        ImageEntry("api-gateway", "r/a", "v1", "sha256:short"),
    ],
)
def test_bad_tags_and_digests_are_refused(entry):
    with pytest.raises(InvalidInput):
        set_image(source("input-staging.yaml"), entry)


def test_not_a_kustomization_is_refused():
    with pytest.raises(InvalidInput):
        set_image("- a\n- b\n", ImageEntry("a", "r/a", "v1"))
    with pytest.raises(InvalidInput):
        read_images("images: {a: 1}\n")


def test_canary_yaml_round_trip_keeps_its_header():
    previous = (
        "# Hand-kept header: do not edit by hand.\n# Second line.\n"
        + render_canary("api-gateway", CanarySettings(0, 0)).split("\n", 1)[1]
    )
    out = render_canary("api-gateway", CanarySettings(replicas=1, weight=10), previous=previous)
    check_golden("canary-step.yaml", out)
    assert out.startswith("# Hand-kept header: do not edit by hand.\n# Second line.\n")
    assert parse_canary(out, "api-gateway") == CanarySettings(replicas=1, weight=10)


def test_canary_yaml_of_the_seed_parses():
    seed = (
        Path(__file__).parents[2]
        / "sandbox/seed/manifests/serving/api-gateway/overlays/production/canary.yaml"
    )
    text = seed.read_text()
    assert parse_canary(text, "api-gateway") == CanarySettings(0, 0)
    assert render_canary("api-gateway", CanarySettings(0, 0), previous=text) == text


@pytest.mark.parametrize("replicas,weight", [(-1, 0), (1, 101), (1, -5)])
def test_canary_settings_out_of_range_are_refused(replicas, weight):
    with pytest.raises(InvalidInput):
        CanarySettings(replicas, weight)


def test_canary_yaml_without_the_fields_is_refused():
    with pytest.raises(InvalidInput, match="api-gateway-canary"):
        parse_canary("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n", "api-gateway")


RENDERED = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: api-gateway, namespace: production}
spec:
  replicas: 2
  template:
    spec:
      containers:
      - {name: api-gateway, image: "r/api:v1"}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: api-gateway-canary, namespace: production}
spec:
  replicas: 0
  template:
    spec:
      containers:
      - {name: api-gateway, image: "r/api:v1"}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: api-gateway-canary
  namespace: production
  annotations: {nginx.ingress.kubernetes.io/canary-weight: "0"}
"""


def test_diff_names_each_changed_field():
    before = parse_rendered(RENDERED)
    after = parse_rendered(
        RENDERED.replace("replicas: 0", "replicas: 1").replace('weight: "0"', 'weight: "10"')
    )
    changes = diff_manifests(before, after)
    assert [str(c) for c in changes] == [
        "Deployment/production/api-gateway-canary spec.replicas: 0 -> 1",
        "Ingress/production/api-gateway-canary "
        "metadata.annotations.nginx.ingress.kubernetes.io/canary-weight: '0' -> '10'",
    ]
    assert unexpected_changes(changes, canary_fields("api-gateway")) == []


def test_a_change_outside_the_intended_fields_is_reported():
    before = parse_rendered(RENDERED)
    after = parse_rendered(
        RENDERED.replace("r/api:v1", "r/api:v2", 1).replace("replicas: 2", "replicas: 5")
    )
    changes = diff_manifests(before, after)
    unexpected = unexpected_changes(changes, image_fields("Deployment", "api-gateway"))
    assert unexpected == [
        FieldChange("Deployment/production/api-gateway", ("spec", "replicas"), 2, 5)
    ]


def test_added_and_removed_resources_are_changes():
    before = parse_rendered(RENDERED)
    after = before[:2]
    changes = diff_manifests(before, after)
    assert changes == [FieldChange("Ingress/production/api-gateway-canary", (), "present", None)]
    assert unexpected_changes(changes, [FieldPattern("*", "*", ("spec", "*"))]) == changes


def test_images_in_lists_container_images():
    assert images_in(parse_rendered(RENDERED)) == {"r/api:v1"}
