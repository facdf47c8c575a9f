"""The recovery settings read the catalog's duration syntax from the environment."""

from __future__ import annotations

from datetime import timedelta

import pytest

from core.settings import Settings


def test_recovery_durations_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROBOTICS_CD_ROLLBACK_DEADLINE", "20s")
    monkeypatch.setenv("ROBOTICS_CD_RECONCILE_PERIOD", "10s")
    monkeypatch.setenv("ROBOTICS_CD_CONTROL_PLANE_OUTAGE", "2m")
    settings = Settings()
    assert settings.rollback_deadline == timedelta(seconds=20)
    assert settings.reconcile_period == timedelta(seconds=10)
    assert settings.control_plane_outage == timedelta(minutes=2)


def test_recovery_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ROLLBACK_DEADLINE", "RECONCILE_PERIOD", "CONTROL_PLANE_OUTAGE"):
        monkeypatch.delenv(f"ROBOTICS_CD_{name}", raising=False)
    settings = Settings()
    assert settings.rollback_deadline == timedelta(minutes=10)
    assert settings.reconcile_period == timedelta(seconds=30)
    assert settings.control_plane_outage == timedelta(minutes=5)
