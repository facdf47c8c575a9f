"""Release trains' pure rules: bundle files, depends_on, dependency order, the train step
rule and the all-or-nothing decision, on plain data."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from core.analysis import Decision, IntervalVerdict, Verdict
from core.catalog import Catalog, parse_catalog
from core.dependencies import dependency_order, find_cycle, reverse_dependency_order
from core.errors import CatalogError, InvalidInput
from core.train import (
    Bundle,
    TrainAnalysis,
    all_or_nothing,
    bundle_from_args,
    bundle_name,
    is_bundle_path,
    parse_bundle,
    plan_train,
    train_steps,
    weight_at,
    weights_at,
)

DIGEST = "sha256:" + "ab" * 32
REG = "127.0.0.1:5000"


def image(repo: str, n: int = 1) -> str:
    return f"{REG}/{repo}:20261207-abc123{n}@sha256:" + f"{n:02x}" * 32


def service_yaml(name: str, steps: str, depends_on: list[str] | None = None) -> str:
    deps = f"\n    depends_on: [{', '.join(depends_on)}]" if depends_on else ""
    return f"""\
  {name}:
    repo: https://git.example.com/{name}.git
    github: robotics/{name}
    image: robotics/{name}
    environments:
      staging:
        path: serving/{name}/overlays/staging
        argocd_app: {name}-staging
        namespace: staging
        host: {name}.robotics.local
      production:
        path: serving/{name}/overlays/production
        argocd_app: {name}-production
        namespace: production
        host: {name}.robotics.local
    canary: {{steps: {steps}, interval: 30s, analyses_per_step: 2}}
    approvers: [{name[0]}-owner]{deps}
"""


def catalog(*services: str) -> Catalog:
    text = f"""\
defaults:
  push_registry: {REG}
  pull_registry: registry-vpc.example.com
  manifests_repo: https://git.example.com/manifests.git
  canary: {{interval: 60s, failure_limit: 1, inconclusive_limit: 2}}
services:
{"".join(services)}"""
    return parse_catalog(text, file="services.yaml", env={})


SHOP = catalog(
    service_yaml("gateway", "[10, 25, 50, 100]", ["planner"]),
    service_yaml("planner", "[20, 50, 100]", ["maps"]),
    service_yaml("maps", "[50, 100]"),
    service_yaml("alone", "[10, 100]"),
)


# --- catalog: depends_on ------------------------------------------------------------------


def test_depends_on_an_unknown_service_is_refused_when_the_catalog_loads() -> None:
    with pytest.raises(CatalogError, match="'gateway' depends on 'ghost'"):
        catalog(service_yaml("gateway", "[50, 100]", ["ghost"]))


def test_a_dependency_cycle_is_refused_when_the_catalog_loads_and_named() -> None:
    with pytest.raises(CatalogError, match=r"cycle in depends_on: a -> b -> c -> a"):
        catalog(
            service_yaml("a", "[50, 100]", ["b"]),
            service_yaml("b", "[50, 100]", ["c"]),
            service_yaml("c", "[50, 100]", ["a"]),
        )
    with pytest.raises(CatalogError, match="cycle in depends_on: a -> a"):
        catalog(service_yaml("a", "[50, 100]", ["a"]))


def test_the_shipped_catalog_declares_an_acyclic_graph() -> None:
    from core.catalog import load_catalog

    shipped = load_catalog()
    assert find_cycle(shipped.dependency_graph()) is None


# --- dependency order ---------------------------------------------------------------------


def test_dependencies_come_first_and_roll_back_last() -> None:
    graph = SHOP.dependency_graph()
    assert dependency_order(graph, ["gateway", "planner", "maps"]) == ["maps", "planner", "gateway"]
    assert reverse_dependency_order(graph, ["gateway", "planner", "maps"]) == [
        "gateway",
        "planner",
        "maps",
    ]


def test_order_counts_dependencies_through_services_outside_the_train() -> None:
    # gateway -> planner -> maps; a train of gateway and maps still rolls maps out first.
    assert dependency_order(SHOP.dependency_graph(), ["gateway", "maps"]) == ["maps", "gateway"]


def test_unrelated_services_keep_name_order_whatever_the_input_order() -> None:
    graph = {"b": [], "a": [], "c": ["b"]}
    assert dependency_order(graph, ["c", "b", "a"]) == ["a", "b", "c"]
    assert dependency_order(graph, ["a", "c", "b"]) == ["a", "b", "c"]


def test_order_refuses_a_cycle_and_an_unknown_service() -> None:
    with pytest.raises(ValueError, match="cycle: x -> y -> x"):
        dependency_order({"x": ["y"], "y": ["x"]}, ["x"])
    with pytest.raises(ValueError, match="ghost"):
        dependency_order({"x": []}, ["x", "ghost"])


# --- bundle files ---------------------------------------------------------------------------


GOOD_BUNDLE = f"""\
reason: the planner's v2 API and the gateway calling it
services:
  gateway: {image("robotics/gateway", 1)}
  planner:
    image: {image("robotics/planner", 2)}
    source_sha: {"a" * 40}
"""


def test_a_bundle_file_parses_with_its_name_from_the_file() -> None:
    bundle = parse_bundle(GOOD_BUNDLE, file="bundles/fleet-v2.yaml")
    assert bundle.name == "fleet-v2"
    assert bundle.services["gateway"].image == image("robotics/gateway", 1)
    assert bundle.services["planner"].source_sha == "a" * 40
    assert bundle.reason.startswith("the planner's v2")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("services: [a, b]\n", "must be a mapping with 'services'"),
        ("services:\n  gateway: robotics/gateway\n", "must carry a tag"),
        (f"services:\n  gateway: {{image: {image('robotics/gateway')}, colour: red}}\n", "colour"),
        (f"services:\n  gateway: {image('robotics/gateway')}\nsteps: [150]\n", "steps"),
        (f"name: other\nservices:\n  gateway: {image('robotics/gateway')}\n", "file name"),
        ("services: {}\n", "services"),
        ("services: [\n", "not valid YAML"),
    ],
)
def test_a_bad_bundle_file_is_refused_naming_file_and_field(text: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message) as caught:
        parse_bundle(text, file="bundles/fleet-v2.yaml")
    assert "bundles/fleet-v2.yaml" in str(caught.value)


def test_bundle_paths() -> None:
    assert bundle_name("bundles/fleet-v2.yaml") == "fleet-v2"
    assert is_bundle_path("bundles/x.yml")
    for path in ("serving/x.yaml", "bundles/sub/x.yaml", "bundles/x.json"):
        assert not is_bundle_path(path)
    with pytest.raises(InvalidInput, match="DNS-1123"):
        parse_bundle(f"services:\n  a: {image('robotics/a')}\n", file="bundles/Bad_Name.yaml")


def test_the_cli_pairs_become_a_bundle() -> None:
    bundle = bundle_from_args(
        "cli-1",
        [f"gateway={image('robotics/gateway')}", f"planner={image('robotics/planner')}"],
        "v2",
    )
    assert sorted(bundle.services) == ["gateway", "planner"] and bundle.reason == "v2"
    with pytest.raises(InvalidInput, match="SERVICE=IMAGE"):
        bundle_from_args("cli-1", ["gateway"], "")
    with pytest.raises(InvalidInput, match="twice"):
        bundle_from_args("cli-1", [f"a={image('robotics/a')}", f"a={image('robotics/a')}"], "")


# --- the plan -------------------------------------------------------------------------------


def bundle(**services: str) -> Bundle:
    return bundle_from_args("t", [f"{k}={v}" for k, v in services.items()], "why")


def test_the_plan_orders_services_and_gives_each_its_weights() -> None:
    plan = plan_train(
        SHOP, bundle(gateway=image("robotics/gateway"), planner=image("robotics/planner"))
    )
    assert plan.order == ["planner", "gateway"] and plan.rollback_order == ["gateway", "planner"]
    assert plan.steps == [20, 25, 50, 100]
    assert plan.weights(0) == {"planner": 20, "gateway": 10}
    assert plan.weights(1) == {"planner": 20, "gateway": 25}
    assert plan.weights(3) == {"planner": 100, "gateway": 100}
    assert plan.interval == timedelta(seconds=30) and plan.analyses_per_step == 2
    assert plan.approvers == ["p-owner", "g-owner"]
    assert plan.service("gateway").pull_image.startswith("registry-vpc.example.com/")


def test_a_service_not_in_the_catalog_is_refused_before_any_write() -> None:
    with pytest.raises(InvalidInput, match=r"ghost not in the catalog.*nothing written"):
        plan_train(SHOP, bundle(gateway=image("robotics/gateway"), ghost=image("robotics/ghost")))


def test_a_cycle_is_refused_at_planning_too() -> None:
    # A catalog built without validation (e.g. model_construct) still cannot start a train.
    broken = SHOP.model_copy(
        update={
            "services": {
                **SHOP.services,
                "maps": SHOP.services["maps"].model_copy(update={"depends_on": ["gateway"]}),
            }
        }
    )
    with pytest.raises(InvalidInput, match="cycle gateway -> planner -> maps -> gateway"):
        plan_train(broken, bundle(gateway=image("robotics/gateway")))


def test_an_image_of_another_repository_is_refused() -> None:
    with pytest.raises(InvalidInput, match="not gateway's repository"):
        plan_train(SHOP, bundle(gateway=image("robotics/planner")))


# --- the train step rule --------------------------------------------------------------------


def test_each_service_gets_its_largest_step_not_above_the_train_step() -> None:
    assert weight_at([10, 25, 50, 100], 30) == 25
    assert weight_at([10, 25, 50, 100], 25) == 25
    assert weight_at([20, 50, 100], 99) == 50
    assert weights_at({"a": [10, 25, 50, 100], "b": [20, 50, 100]}, [20, 25, 50, 100]) == {
        "a": [10, 25, 50, 100],
        "b": [20, 20, 50, 100],
    }
    with pytest.raises(InvalidInput):
        weight_at([20, 100], 10)


def test_the_default_train_steps_start_where_every_service_has_a_step() -> None:
    assert train_steps({"a": [10, 25, 50, 100], "b": [20, 50, 100]}) == [20, 25, 50, 100]
    assert train_steps({"a": [10, 100]}) == [10, 100]


def test_given_train_steps_are_checked() -> None:
    own = {"a": [10, 25, 50, 100], "b": [20, 50, 100]}
    assert train_steps(own, [30, 100]) == [30, 100]
    with pytest.raises(InvalidInput, match="below the first step of b"):
        train_steps(own, [10, 100])
    with pytest.raises(InvalidInput, match="rise strictly and end at 100"):
        train_steps(own, [50, 30, 100])
    with pytest.raises(InvalidInput, match="rise strictly and end at 100"):
        train_steps(own, [50, 90])


# --- lockstep and all or nothing ------------------------------------------------------------


END = datetime(2026, 12, 7, 7, 0, tzinfo=UTC)


def verdict(v: Verdict, end: datetime = END, reason: str = "") -> IntervalVerdict:
    return IntervalVerdict(
        end=end,
        window_seconds=30,
        verdict=v,
        reason=reason or v.value,
        metrics=[],
        canary_requests=100,
        stable_requests=100,
    )


def two_service_analysis() -> TrainAnalysis:
    plan = plan_train(
        SHOP, bundle(gateway=image("robotics/gateway"), planner=image("robotics/planner"))
    )
    return TrainAnalysis.start(plan)


def test_the_train_moves_on_only_when_every_service_passed_the_step() -> None:
    run = two_service_analysis()
    both = {"gateway": verdict(Verdict.PASS), "planner": verdict(Verdict.PASS)}
    assert run.record(both) == Decision.CONTINUE
    lagging = {"gateway": verdict(Verdict.PASS), "planner": verdict(Verdict.INCONCLUSIVE)}
    assert run.record(lagging) == Decision.CONTINUE
    assert "waiting for planner" in run.reason
    assert run.record(both) == Decision.NEXT_STEP
    assert run.step_index == 1
    for _ in range(2 * 3 - 1):
        assert run.record(both) in (Decision.CONTINUE, Decision.NEXT_STEP)
    assert run.record(both) == Decision.PROMOTE
    assert run.finished


def test_one_service_past_its_limit_rolls_the_whole_train_back() -> None:
    run = two_service_analysis()
    bad = {"gateway": verdict(Verdict.PASS), "planner": verdict(Verdict.FAIL, reason="5xx")}
    assert run.record(bad) == Decision.CONTINUE  # failure limit 1
    assert run.record(bad) == Decision.ROLLBACK
    assert run.failed == ["planner"] and "planner: 2 failed intervals" in run.reason
    with pytest.raises(ValueError, match="already ended"):
        run.record(bad)


def test_every_service_is_judged_on_the_same_window() -> None:
    run = two_service_analysis()
    with pytest.raises(InvalidInput, match="same window"):
        run.record(
            {
                "gateway": verdict(Verdict.PASS),
                "planner": verdict(Verdict.PASS, end=END + timedelta(seconds=1)),
            }
        )
    with pytest.raises(InvalidInput, match="no verdict for planner"):
        run.record({"gateway": verdict(Verdict.PASS)})


def test_the_analysis_is_bounded() -> None:
    run = two_service_analysis()
    assert run.max_intervals == 4 * 2 + (1 + 2) + 1
    inconclusive = {s: verdict(Verdict.INCONCLUSIVE) for s in ("gateway", "planner")}
    decisions = [run.record(inconclusive) for _ in range(3)]
    assert decisions[-1] == Decision.ROLLBACK and run.failed == ["gateway", "planner"]


def test_all_or_nothing() -> None:
    assert all_or_nothing({"a": True, "b": True}) == (True, [])
    assert all_or_nothing({"a": True, "b": False}) == (False, ["b"])
    assert all_or_nothing({}) == (False, [])


# --- who holds a lease, and the train's record ------------------------------------------------


def test_a_lease_held_by_a_train_says_so() -> None:
    from core.release import LeaseRecord, TrainRef, describe_holder

    record = LeaseRecord(
        holder="run-7",
        taken_at=END,
        expires_at=END + timedelta(minutes=5),
        train=TrainRef(
            name="fleet-v2", leases=["fleet-planner-production", "api-gateway-production"]
        ),
    )
    assert describe_holder(record) == (
        "release train fleet-v2 (run run-7; fleet-planner, api-gateway)"
    )
    assert describe_holder(record.model_copy(update={"train": None})) == "release run-7"


def test_the_train_record_names_order_steps_and_the_one_rollback_commit() -> None:
    from core.release import ReleasePlan, ReleaseRecord
    from core.train import TrainRecord, render_train_record

    def rel(svc: str) -> ReleaseRecord:
        plan = ReleasePlan(
            service=svc,
            image=image(f"robotics/{svc}"),
            pull_image=image(f"robotics/{svc}"),
            tag="t",
            digest=DIGEST,
            source_sha="a" * 40,
            github="robotics/x",
        )
        return ReleaseRecord.start(plan, "run-7")

    record = TrainRecord(
        name="fleet-v2",
        flow_run_id="run-7",
        reason="v2",
        order=["planner", "gateway"],
        started_at=END,
        services={"planner": rel("planner"), "gateway": rel("gateway")},
        steps=[(20, {"planner": 20, "gateway": 10}, END)],
        production_commits=["b" * 40],
        rollback_commit="c" * 40,
        failed=["gateway"],
        outcome="rolled back: gateway failed",
    )
    text = render_train_record(record)
    assert "# Release train fleet-v2: rolled back: gateway failed" in text
    assert "planner → gateway" in text and "| 20% | planner 20%, gateway 10% |" in text
    assert "Rollback commit (one, for every service): `cccccccccccc`" in text
    assert "train-fleet-v2-gateway-analyses" in text
