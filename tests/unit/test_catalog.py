"""The catalog model: strict loading with errors naming the file, the service and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.catalog import ScanPolicy, load_catalog, parse_catalog
from core.errors import CatalogError, InvalidInput

GOOD = """\
defaults:
  push_registry: registry.example.com
  pull_registry: registry-vpc.example.com
  manifests_repo: https://git.example.com/robotics-k8s-manifests.git
services:
  api-gateway:
    repo: https://git.example.com/robotics-api.git
    github: robotics/robotics-api
    image: robotics-serving/api-gateway
    checks:
      lint: ["sh scripts/lint.sh"]
    environments:
      staging:
        path: serving/api-gateway/overlays/staging
        argocd_app: api-gateway-staging
        namespace: staging
        host: api.robotics.local
    approvers: [alice, bob]
"""


def parse(text: str):
    return parse_catalog(text, file="services.yaml", env={})


def test_the_shipped_catalog_loads() -> None:
    catalog = load_catalog(Path(__file__).resolve().parents[2] / "services.yaml")
    assert "api-gateway" in catalog.services
    assert "vision-train" in catalog.training


def test_a_good_catalog_gives_defaults_where_the_service_says_nothing() -> None:
    catalog = parse(GOOD)
    svc = catalog.service("api-gateway")
    assert svc.branch == "main" and svc.build.dockerfile == "Dockerfile"
    assert svc.checks.network is False and svc.checks.image == "robotics-cd/check-runner:latest"
    assert catalog.scan_policy("api-gateway") == ScanPolicy()
    assert catalog.scan_policy("api-gateway").fail_on == ["CRITICAL", "HIGH"]
    assert catalog.scan_policy("api-gateway").allow_missing_vuln_db is False


def test_an_unknown_key_names_file_service_and_field() -> None:
    text = GOOD.replace("    approvers:", "    colour: red\n    approvers:")
    with pytest.raises(CatalogError) as caught:
        parse(text)
    err = caught.value
    assert (err.file, err.service, err.field) == ("services.yaml", "api-gateway", "colour")
    assert "services.yaml" in str(err) and "api-gateway" in str(err) and "colour" in str(err)
    assert "unknown key" in str(err)


def test_an_unknown_nested_key_names_the_dotted_field() -> None:
    text = GOOD.replace('      lint: ["sh scripts/lint.sh"]', "      lint: []\n      lnit: []")
    with pytest.raises(CatalogError) as caught:
        parse(text)
    assert (caught.value.service, caught.value.field) == ("api-gateway", "checks.lnit")


def test_a_duplicate_service_is_refused_not_silently_replaced() -> None:
    text = GOOD + "  api-gateway:\n    repo: elsewhere\n"
    with pytest.raises(CatalogError) as caught:
        parse(text)
    err = caught.value
    assert (err.file, err.service, err.field) == ("services.yaml", "api-gateway", "services")
    assert "duplicate service 'api-gateway'" in str(err)


def test_a_duplicate_key_inside_a_service_names_it() -> None:
    text = GOOD.replace("    branch", "").replace(
        "    github: robotics/robotics-api\n",
        "    github: robotics/robotics-api\n    github: x/y\n",
    )
    with pytest.raises(CatalogError) as caught:
        parse(text)
    assert (caught.value.service, caught.value.field) == ("api-gateway", "github")


@pytest.mark.parametrize(
    "image",
    ["Robotics-Serving/API", "robotics-serving/../etc", "robotics;rm -rf /", "api gateway", "api/"],
)
def test_an_invalid_image_name_names_file_service_and_field(image: str) -> None:
    text = GOOD.replace("image: robotics-serving/api-gateway", f"image: '{image}'")
    with pytest.raises(CatalogError) as caught:
        parse(text)
    err = caught.value
    assert (err.file, err.service, err.field) == ("services.yaml", "api-gateway", "image")
    assert "invalid image repository" in str(err)


def test_an_invalid_registry_in_defaults_names_the_field() -> None:
    with pytest.raises(CatalogError) as caught:
        parse(GOOD.replace("push_registry: registry.example.com", "push_registry: 'reg;istry'"))
    assert caught.value.field == "defaults.push_registry" and caught.value.service == ""


def test_a_service_name_must_be_a_dns_label() -> None:
    with pytest.raises(CatalogError) as caught:
        parse(GOOD.replace("  api-gateway:\n", "  API_Gateway:\n", 1))
    assert "DNS-1123" in str(caught.value)


def test_variables_expand_from_the_environment_with_defaults() -> None:
    text = GOOD.replace("registry.example.com", "${PUSH:-fallback.example.com}")
    assert parse_catalog(text, env={}).defaults.push_registry == "fallback.example.com"
    assert (
        parse_catalog(text, env={"PUSH": "127.0.0.1:5000"}).defaults.push_registry
        == "127.0.0.1:5000"
    )


def test_unknown_service_lookup_lists_what_exists() -> None:
    with pytest.raises(InvalidInput, match="api-gateway"):
        parse(GOOD).service("nope")


def test_a_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(CatalogError) as caught:
        load_catalog(tmp_path / "absent.yaml")
    assert "absent.yaml" in str(caught.value)


def test_a_relative_path_may_not_leave_the_repository() -> None:
    text = GOOD.replace("    approvers:", "    build: {dockerfile: ../Dockerfile}\n    approvers:")
    with pytest.raises(CatalogError) as caught:
        parse(text)
    assert caught.value.field == "build.dockerfile"


def test_a_whole_value_from_the_environment_may_be_a_list():
    from core.catalog import parse_catalog

    text = (
        "defaults:\n  push_registry: r.example\n  pull_registry: r.example\n"
        "  manifests_repo: x\n  canary:\n    steps: ${STEPS:-[10, 100]}\n"
    )
    assert parse_catalog(text, env={}).defaults.canary.steps == [10, 100]
    assert parse_catalog(text, env={"STEPS": "[50, 100]"}).defaults.canary.steps == [50, 100]


def test_a_service_canary_overrides_only_the_keys_it_names():
    from core.catalog import parse_catalog

    text = (
        "defaults:\n  push_registry: r.example\n  pull_registry: r.example\n"
        "  manifests_repo: x\n  canary: {steps: [50, 100], interval: 7s}\n"
        "services:\n  api:\n    repo: x\n    github: o/api\n    image: ns/api\n"
        "    approvers: [alice]\n    canary: {canary_replicas: 2}\n"
        "    environments:\n      staging: {path: a, argocd_app: a, namespace: s, host: h}\n"
    )
    policy = parse_catalog(text, env={}).canary_policy("api")
    assert policy.canary_replicas == 2 and policy.steps == [50, 100]
    assert policy.interval.total_seconds() == 7
