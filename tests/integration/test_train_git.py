"""A release train's git side against real git (a bare repo) and the real `kubectl kustomize`:
every lease in one atomic push (two trains racing: one takes all, the other nothing), one
commit per train step covering every overlay, one promotion commit, and one restoring commit
naming every commit it undoes."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest

from core.errors import LeaseHeld, LeaseLost
from core.images import parse_reference
from core.kustomize import CanarySettings
from core.release import StepKind, commits_to_revert
from tasks.gitops.train import TrainMember, TrainRepo
from tests.integration.test_gitops import KUBECTL, git, image, seed_manifests

pytestmark = pytest.mark.integration

SERVICES = ("fleet-planner", "api-gateway")  # dependency order: the gateway calls the planner
LEASES = [f"{s}-production" for s in SERVICES]


def overlay(service: str) -> str:
    return f"serving/{service}/overlays/production"


def repo(tmp_path: Path, url: str, name: str) -> TrainRepo:
    return TrainRepo(url=url, workdir=tmp_path / "work" / name, kubectl=KUBECTL)


def members(n: int = 7) -> list[TrainMember]:
    return [
        TrainMember(
            service=s,
            overlay=overlay(s),
            lease=f"{s}-production",
            image=parse_reference(image(s, n + i)),
            replicas=2,
        )
        for i, s in enumerate(SERVICES)
    ]


def bare(url: str) -> Path:
    return Path(url.removeprefix("file://"))


@pytest.fixture
def manifests(tmp_path: Path) -> str:
    return seed_manifests(tmp_path)


def test_a_train_takes_every_lease_in_one_push_and_names_itself(
    tmp_path: Path, manifests: str
) -> None:
    train = repo(tmp_path, manifests, "train")
    head = train.head_commit()
    taken = train.take_train(LEASES, "train-run-1", timedelta(minutes=5), "fleet-v2")
    assert sorted(taken) == sorted(LEASES)
    for lease in taken.values():
        assert lease.holder == "train-run-1" and lease.before == head
        assert lease.record.train is not None and lease.record.train.name == "fleet-v2"
        assert lease.record.train.leases == LEASES
    # A single release of one of its services is told it waits for the train.
    single = repo(tmp_path, manifests, "single")
    with pytest.raises(LeaseHeld, match="held by release train fleet-v2 \\(run train-run-1\\)"):
        single.take_lease("api-gateway-production", "release-9", timedelta(minutes=5))
    # Re-taken by the same run (a re-executed train): renewed, records intact.
    again = train.take_train(LEASES, "train-run-1", timedelta(minutes=5), "fleet-v2")
    assert all(again[n].before == head for n in LEASES)
    assert train.release_train(LEASES, "train-run-1") is True
    assert all(lease is None for lease in train.read_leases(LEASES).values())
    assert train.release_train(LEASES, "train-run-1") is False


def test_a_train_takes_nothing_when_one_lease_is_held(tmp_path: Path, manifests: str) -> None:
    single = repo(tmp_path, manifests, "single")
    single.take_lease("api-gateway-production", "release-9", timedelta(minutes=5))
    train = repo(tmp_path, manifests, "train")
    with pytest.raises(LeaseHeld, match="api-gateway-production is held by release-9"):
        train.take_train(LEASES, "train-run-1", timedelta(minutes=5), "fleet-v2")
    assert train.read_leases(["fleet-planner-production"]) == {"fleet-planner-production": None}


def test_two_trains_racing_one_takes_every_lease_the_other_none(
    tmp_path: Path, manifests: str
) -> None:
    """The deadlock-shaped race: the trains list the leases in opposite orders, both read
    them free at the same moment, then push. The remote applies one atomic push; the other
    is refused whole."""
    for round_ in range(3):
        outcomes: dict[str, str] = {}
        barrier = threading.Barrier(2)

        def race(
            name: str,
            names: list[str],
            outcomes: dict[str, str] = outcomes,
            barrier: threading.Barrier = barrier,
            round_: int = round_,
        ) -> None:
            r = repo(tmp_path, manifests, f"{name}-{round_}")
            r.read_leases(names)
            barrier.wait(timeout=30)
            try:
                r.take_train(names, name, timedelta(minutes=5), name)
                outcomes[name] = "took"
            except LeaseHeld as exc:
                outcomes[name] = f"held: {exc.holder}"

        threads = [
            threading.Thread(target=race, args=("train-a", LEASES)),
            threading.Thread(target=race, args=("train-b", list(reversed(LEASES)))),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert list(outcomes.values()).count("took") == 1, outcomes
        winner = next(n for n, o in outcomes.items() if o == "took")
        loser = next(n for n in outcomes if n != winner)
        assert outcomes[loser] == f"held: {winner}", outcomes
        holders = {
            n: lease.holder if lease else None
            for n, lease in repo(tmp_path, manifests, f"check-{round_}").read_leases(LEASES).items()
        }
        assert holders == {n: winner for n in LEASES}, (holders, outcomes)
        repo(tmp_path, manifests, f"free-{round_}").release_train(LEASES, winner)


def test_steps_promotion_and_one_restoring_commit(tmp_path: Path, manifests: str) -> None:
    train = repo(tmp_path, manifests, "train")
    before = train.head_commit()
    seeded = {s: train.read_file(f"{overlay(s)}/kustomization.yaml") for s in SERVICES}
    train.take_train(LEASES, "train-run-1", timedelta(minutes=5), "fleet-v2")
    team = members()
    first = train.train_canary(
        train="fleet-v2",
        members=team,
        weights={"fleet-planner": 20, "api-gateway": 10},
        holder="train-run-1",
    )
    assert first.changed
    # One commit covering both overlays, with both weights.
    files = git(bare(manifests), "show", "--name-only", "--format=", first.sha).split()
    assert {f.rsplit("/", 1)[0] for f in files} == {overlay(s) for s in SERVICES}
    assert train.canary_settings(overlay("fleet-planner"), "fleet-planner") == CanarySettings(2, 20)
    assert train.canary_settings(overlay("api-gateway"), "api-gateway") == CanarySettings(2, 10)
    same = train.train_canary(
        train="fleet-v2",
        members=team,
        weights={"fleet-planner": 20, "api-gateway": 10},
        holder="train-run-1",
    )
    assert same.changed is False and same.sha == first.sha
    second = train.train_canary(
        train="fleet-v2",
        members=team,
        weights={"fleet-planner": 20, "api-gateway": 25},
        holder="train-run-1",
    )
    leases = train.read_leases(LEASES)
    for lease in leases.values():
        assert lease is not None and lease.commits == [first.sha, second.sha]
        assert lease.step is not None and lease.step.kind == StepKind.CANARY
    assert leases["api-gateway-production"].step.weight == 25  # type: ignore[union-attr]
    assert leases["fleet-planner-production"].step.weight == 20  # type: ignore[union-attr]

    # All or nothing: one commit restores both overlays and names every commit it undoes.
    recorded = leases["api-gateway-production"].commits  # type: ignore[union-attr]
    revert = commits_to_revert(recorded, set())
    restored = train.train_revert(
        train="fleet-v2",
        members=list(reversed(team)),
        commits=revert,
        holder="train-run-1",
        reason="fleet-planner failed its canary",
    )
    assert restored.changed
    log = git(bare(manifests), "log", "--format=%H", f"{before}..main").split()
    assert log == [restored.sha, second.sha, first.sha]
    body = git(bare(manifests), "log", "-1", "--format=%B", "main")
    assert all(f"Undoes: {sha}" in body for sha in recorded)
    assert "train fleet-v2 (api-gateway, fleet-planner)" in body
    for s in SERVICES:
        assert git(bare(manifests), "rev-parse", f"main:{overlay(s)}") == git(
            bare(manifests), "rev-parse", f"{before}:{overlay(s)}"
        )
        assert train.read_file(f"{overlay(s)}/kustomization.yaml") == seeded[s]
    again = train.train_revert(
        train="fleet-v2", members=team, commits=revert, holder="train-run-1", reason="again"
    )
    assert again.changed is False and again.sha == restored.sha
    assert all(
        lease is not None and lease.step is not None and lease.step.kind == StepKind.ROLLBACK
        for lease in train.read_leases(LEASES).values()
    )


def test_one_promotion_commit_for_the_whole_train(tmp_path: Path, manifests: str) -> None:
    train = repo(tmp_path, manifests, "train")
    before = train.head_commit()
    train.take_train(LEASES, "train-run-1", timedelta(minutes=5), "fleet-v2")
    team = members()
    train.train_canary(
        train="fleet-v2", members=team, weights={s: 100 for s in SERVICES}, holder="train-run-1"
    )
    promoted = train.train_promote(train="fleet-v2", members=team, holder="train-run-1")
    assert promoted.changed
    subjects = git(bare(manifests), "log", "--format=%s", f"{before}..main").splitlines()
    assert [s for s in subjects if s.startswith("promote(")] == [
        "promote(production): train fleet-v2: fleet-planner:20261127-abc1234 "
        "api-gateway:20261127-abc1234"
    ]
    for m in team:
        entry = train.current_image(m.overlay, m.service)
        assert entry is not None and entry.digest == m.image.digest
        assert train.canary_settings(m.overlay, m.service) == CanarySettings(0, 0)


def test_a_train_whose_lease_was_taken_over_writes_nothing(tmp_path: Path, manifests: str) -> None:
    train = repo(tmp_path, manifests, "train")
    train.take_train(LEASES, "train-run-1", timedelta(minutes=5), "fleet-v2")
    head = git(bare(manifests), "rev-parse", "main")
    other = repo(tmp_path, manifests, "reconciler")
    other.take_over_lease("api-gateway-production", "rec-1", "train-run-1", timedelta(minutes=5))
    with pytest.raises(LeaseLost):
        train.train_canary(
            train="fleet-v2",
            members=members(),
            weights={"fleet-planner": 20, "api-gateway": 10},
            holder="train-run-1",
        )
    assert git(bare(manifests), "rev-parse", "main") == head


def test_a_train_and_a_single_release_racing_never_share_production(
    tmp_path: Path, manifests: str
) -> None:
    outcomes: dict[str, str] = {}
    barrier = threading.Barrier(2)

    def train() -> None:
        r = repo(tmp_path, manifests, "train")
        barrier.wait(timeout=30)
        try:
            r.take_train(LEASES, "train-run-1", timedelta(minutes=5), "fleet-v2")
            outcomes["train"] = "took"
        except LeaseHeld as exc:
            outcomes["train"] = f"held: {exc.holder}"

    def single() -> None:
        r = repo(tmp_path, manifests, "single")
        barrier.wait(timeout=30)
        try:
            r.take_lease("api-gateway-production", "release-9", timedelta(minutes=5))
            outcomes["single"] = "took"
        except LeaseHeld as exc:
            outcomes["single"] = f"held: {exc.holder}"

    threads = [threading.Thread(target=train), threading.Thread(target=single)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(outcomes.values()).count("took") == 1, outcomes
    leases = repo(tmp_path, manifests, "check").read_leases(LEASES)
    holders = {n: lease.holder if lease else None for n, lease in leases.items()}
    if outcomes["train"] == "took":
        assert holders == {n: "train-run-1" for n in LEASES}
        assert outcomes["single"] == "held: train-run-1"
    else:  # the train took nothing, not even the lease nobody else wanted
        assert holders == {"fleet-planner-production": None, "api-gateway-production": "release-9"}
