"""The Argo CD twin's sync windows decide as Argo CD does: which windows an app is assigned
(application / namespace / cluster globs, OR-ed or AND-ed), which are active (cron in the
window's time zone, Go durations), and whether a manual sync may run."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from sandbox.argocd.windows import (
    WindowError,
    active,
    can_sync,
    go_duration,
    matches,
    sync_windows_answer,
)

APP = {
    "metadata": {"name": "api-gateway-production"},
    "spec": {
        "project": "serving",
        "destination": {"server": "https://kubernetes.default.svc", "namespace": "production"},
    },
}
DENY = {
    "kind": "deny",
    "schedule": "0 22 * * *",
    "duration": "8h",
    "applications": ["*-production"],
}


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def test_go_durations() -> None:
    assert go_duration("1h30m") == timedelta(minutes=90)
    assert go_duration("90s") == timedelta(seconds=90)
    assert go_duration("1.5h") == timedelta(minutes=90)
    for bad in ("", "1d", "h", "1h x"):
        with pytest.raises(WindowError, match="invalid duration"):
            go_duration(bad)


def test_a_window_matches_by_any_list_or_by_all_with_the_and_operator() -> None:
    assert matches(DENY, APP)
    assert not matches({**DENY, "applications": ["*-staging"]}, APP)
    by_ns = {"kind": "deny", "namespaces": ["prod*"], "applications": ["nothing"]}
    assert matches(by_ns, APP)
    assert not matches({**by_ns, "andOperator": True}, APP)
    assert matches({"kind": "deny", "clusters": ["https://kubernetes.default.svc"]}, APP)
    assert not matches({"kind": "deny", "schedule": "* * * * *"}, APP)  # selects nothing


def test_active_reads_the_schedule_in_the_windows_time_zone() -> None:
    assert active(DENY, utc(2026, 12, 7, 23))
    assert not active(DENY, utc(2026, 12, 7, 21, 59))
    assert not active(DENY, utc(2026, 12, 8, 6, 0))  # 22:00 + 8 h: closed
    berlin = {**DENY, "timeZone": "Europe/Berlin"}  # 22:00 Berlin = 21:00 UTC
    assert active(berlin, utc(2026, 12, 7, 21, 30))
    assert not active(berlin, utc(2026, 12, 8, 5, 0))


def test_can_sync_as_argo_cd_decides_a_manual_sync() -> None:
    night = utc(2026, 12, 7, 23)
    day = utc(2026, 12, 7, 12)
    assert can_sync([], night)
    assert not can_sync([DENY], night) and can_sync([DENY], day)
    assert can_sync([{**DENY, "manualSync": True}], night)
    assert not can_sync([{**DENY, "manualSync": True}], night, manual=False)
    allow = {"kind": "allow", "schedule": "0 9 * * *", "duration": "8h"}
    assert can_sync([allow], day) and not can_sync([allow], night)
    assert can_sync([{**allow, "manualSync": True}], night)
    assert not can_sync([allow, DENY], utc(2026, 12, 8, 1))


def test_the_answer_lists_only_the_four_public_fields_and_leaves_out_empty_lists() -> None:
    project = {"spec": {"syncWindows": [{**DENY, "timeZone": "UTC", "description": "night"}]}}
    answer = sync_windows_answer(project, APP, utc(2026, 12, 7, 23))
    public = {"kind": "deny", "schedule": "0 22 * * *", "duration": "8h", "manualSync": False}
    assert answer == {"canSync": False, "activeWindows": [public], "assignedWindows": [public]}
    assert sync_windows_answer(project, APP, utc(2026, 12, 7, 12)) == {
        "canSync": True,
        "assignedWindows": [public],
    }
    assert sync_windows_answer(None, APP) == {"canSync": True}
