"""The demo's own small rules: which canary windows it uses, the commits it writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.demo_story import DEMO_WINDOWS, FAST_WINDOWS, DemoOptions, digest_of, non_root

SEED = Path(__file__).resolve().parents[2] / "sandbox/seed/robotics-training/Dockerfile"


def test_fast_shortens_the_windows_and_the_environment_wins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key in FAST_WINDOWS:
        monkeypatch.delenv(key, raising=False)
    assert DemoOptions(Path("s"), fast=True).windows() == FAST_WINDOWS
    assert DemoOptions(Path("s")).windows() == DEMO_WINDOWS
    monkeypatch.setenv("ROBOTICS_CD_CANARY_INTERVAL", "30s")
    assert DemoOptions(Path("s"), fast=True).windows()["ROBOTICS_CD_CANARY_INTERVAL"] == "30s"


def test_fast_windows_fit_the_sandbox_load() -> None:
    # 20 requests/s per host: at the first step (10%) a canary sees ~2/s over one interval.
    interval = int(FAST_WINDOWS["ROBOTICS_CD_CANARY_INTERVAL"].removesuffix("s"))
    assert int(FAST_WINDOWS["ROBOTICS_CD_CANARY_MIN_REQUESTS"]) <= 20 * 0.10 * interval / 2


def test_the_training_commit_makes_the_trainer_non_root_once() -> None:
    seed = SEED.read_text()
    changed = non_root(seed)
    assert "\nUSER 65534:65534\nENTRYPOINT" in changed
    assert changed.index("chown 65534:65534 /checkpoints") < changed.index("\nUSER ")
    assert non_root(changed) == changed  # a second demo on the same sandbox changes nothing


def test_digest_of_an_image_reference() -> None:
    assert digest_of("r:5000/a/b:t@sha256:abc") == "sha256:abc"
    assert digest_of("r:5000/a/b:t") == ""
