"""Freeze windows: recurring (cron, duration, time zone) and one-off, global and per
service, each with a reason; whether production is frozen at t and until when."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from core.errors import CatalogError, InvalidInput
from core.freeze import (
    FreezeWindow,
    active_freeze,
    argocd_freezes,
    from_argocd_sync_window,
    is_frozen_at,
    next_freeze,
)
from tests.unit.test_catalog import GOOD, parse

BERLIN = ZoneInfo("Europe/Berlin")
FRIDAY_EVENING = FreezeWindow(
    reason="weekend: nobody on call", cron="0 18 * * 5", duration="62h", timezone="Europe/Berlin"
)


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def test_a_recurring_window_freezes_from_its_start_for_its_duration_in_its_zone() -> None:
    # Friday 2026-12-04 18:00 Berlin (UTC+1) = 17:00 UTC; 62 h later: Monday 08:00 Berlin.
    assert not is_frozen_at([FRIDAY_EVENING], utc(2026, 12, 4, 16, 59))
    freeze = active_freeze([FRIDAY_EVENING], utc(2026, 12, 4, 17, 0))
    assert freeze is not None
    assert freeze.until == utc(2026, 12, 7, 7, 0)
    assert freeze.reasons == ("weekend: nobody on call",)
    assert is_frozen_at([FRIDAY_EVENING], utc(2026, 12, 6, 12, 0))
    assert not is_frozen_at([FRIDAY_EVENING], utc(2026, 12, 7, 7, 0))  # the end is free
    assert not is_frozen_at([FRIDAY_EVENING], utc(2026, 12, 9, 12, 0))


def test_a_recurring_window_follows_daylight_saving_time() -> None:
    # In June Berlin is UTC+2: the same window starts at 16:00 UTC.
    assert is_frozen_at([FRIDAY_EVENING], utc(2026, 6, 5, 16, 0))
    assert not is_frozen_at([FRIDAY_EVENING], utc(2026, 6, 5, 15, 59))


def test_a_one_off_window_read_in_its_zone_when_dates_carry_none() -> None:
    launch = FreezeWindow(
        reason="product launch",
        start=datetime(2026, 12, 24, 0, 0),
        end=datetime(2026, 12, 27, 0, 0),
        timezone="Asia/Shanghai",
    )
    assert not is_frozen_at([launch], utc(2026, 12, 23, 15, 59))
    freeze = active_freeze([launch], utc(2026, 12, 23, 16, 0))
    assert freeze is not None and freeze.until == utc(2026, 12, 26, 16, 0)
    assert "product launch" in freeze.describe() and "2026-12-26 16:00 UTC" in freeze.describe()


def test_touching_and_overlapping_windows_end_at_the_end_of_the_whole_stretch() -> None:
    first = FreezeWindow(reason="audit", start=utc(2026, 12, 1, 0, 0), end=utc(2026, 12, 2, 0, 0))
    touching = FreezeWindow(reason="migration", start=utc(2026, 12, 2), end=utc(2026, 12, 3))
    overlapping = FreezeWindow(
        reason="holiday", start=utc(2026, 12, 2, 12, 0), end=utc(2026, 12, 4, 0, 0)
    )
    freeze = active_freeze(
        [("global", first), ("api", touching), ("api", overlapping)], utc(2026, 12, 1, 6, 0)
    )
    assert freeze is not None
    assert freeze.until == utc(2026, 12, 4, 0, 0)
    assert freeze.reasons == ("audit", "migration", "holiday")
    assert freeze.scopes == ("global", "api", "api")


def test_the_next_freeze_is_announced() -> None:
    assert next_freeze([FRIDAY_EVENING], utc(2026, 12, 7, 8, 0)) == utc(2026, 12, 11, 17, 0)
    assert next_freeze([], utc(2026, 12, 7, 8, 0)) is None


def test_a_time_without_a_zone_is_refused() -> None:
    with pytest.raises(InvalidInput, match="without a zone"):
        is_frozen_at([FRIDAY_EVENING], datetime(2026, 12, 4, 18, 0))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"reason": "x y z", "cron": "0 18 * *", "duration": "1h"}, "not a cron expression"),
        ({"reason": "x y z", "cron": "0 18 * * 5"}, "needs both cron and duration"),
        (
            {"reason": "x y z", "cron": "0 18 * * 5", "duration": "1h", "timezone": "Mars/Base"},
            "unknown time zone",
        ),
        (
            {"reason": "x y z", "start": "2026-12-02T00:00:00Z", "end": "2026-12-01T00:00:00Z"},
            "end must be after start",
        ),
        ({"reason": "x y z", "start": "2026-12-02T00:00:00Z"}, "needs both start and end"),
        (
            {
                "reason": "x y z",
                "cron": "0 1 * * *",
                "duration": "1h",
                "start": "2026-12-02T00:00:00Z",
            },
            "not both",
        ),
        ({"reason": "x y z"}, r"needs cron \+ duration, or start \+ end"),
        ({"reason": "", "cron": "0 1 * * *", "duration": "1h"}, "at least 3"),
    ],
)
def test_bad_windows_are_refused_with_what_to_write(fields: dict[str, str], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        FreezeWindow.model_validate(fields)


def test_the_catalog_takes_global_and_per_service_windows() -> None:
    text = GOOD.replace(
        "services:\n",
        "freeze:\n  - reason: year-end freeze\n    start: 2026-12-20T00:00:00Z\n"
        "    end: 2027-01-04T00:00:00Z\nservices:\n",
    ).replace(
        "    approvers: [alice, bob]\n",
        "    approvers: [alice, bob]\n    freeze:\n      - reason: friday deploys hurt\n"
        "        cron: '0 15 * * 5'\n        duration: 65h\n        timezone: Europe/Berlin\n",
    )
    catalog = parse(text)
    windows = catalog.freeze_windows("api-gateway")
    assert [(scope, w.reason) for scope, w in windows] == [
        ("global", "year-end freeze"),
        ("api-gateway", "friday deploys hurt"),
    ]
    freeze = active_freeze(windows, utc(2026, 12, 21, 9, 0))
    assert freeze is not None
    # The year-end freeze ends on Monday 2027-01-04 00:00 UTC, inside the service's own
    # weekend window (Friday 15:00 Berlin + 65 h = Monday 08:00 Berlin): one stretch.
    assert freeze.until == utc(2027, 1, 4, 7, 0)
    assert freeze.scopes == ("global", "api-gateway")
    assert active_freeze(windows, utc(2027, 1, 5, 9, 0)) is None


def test_a_bad_window_in_the_catalog_names_service_and_field() -> None:
    text = GOOD.replace(
        "    approvers: [alice, bob]\n",
        "    approvers: [alice, bob]\n    freeze:\n      - reason: oops oops\n        cron: 'every friday'\n        duration: 1h\n",
    )
    with pytest.raises(CatalogError) as caught:
        parse(text)
    assert caught.value.service == "api-gateway"
    assert caught.value.field.startswith("freeze.0")
    assert "not a cron expression" in str(caught.value)


def test_an_argocd_deny_window_of_the_production_app_is_a_freeze() -> None:
    deny = {
        "kind": "deny",
        "schedule": "0 22 * * *",
        "duration": "8h",
        "applications": ["*-production"],
        "timeZone": "UTC",
        "manualSync": True,
    }
    window = from_argocd_sync_window(deny, "api-gateway-production")
    assert window is not None
    assert is_frozen_at([window], utc(2026, 12, 7, 23, 0))
    assert active_freeze([window], utc(2026, 12, 7, 23, 0)).until == utc(2026, 12, 8, 6, 0)  # type: ignore[union-attr]
    assert from_argocd_sync_window(deny, "api-gateway-staging") is None
    assert from_argocd_sync_window({**deny, "kind": "allow"}, "api-gateway-production") is None
    with pytest.raises(InvalidInput, match="not understood"):
        from_argocd_sync_window({**deny, "duration": "forever"}, "api-gateway-production")


def test_a_window_shorter_than_a_minute_still_counts() -> None:
    brief = FreezeWindow(
        reason="short freeze for the e2e",
        start=utc(2026, 12, 7, 8, 0, 0),
        end=utc(2026, 12, 7, 8, 0, 30),
    )
    assert is_frozen_at([brief], utc(2026, 12, 7, 8, 0, 29))
    freeze = active_freeze([brief], utc(2026, 12, 7, 8, 0, 0))
    assert freeze is not None
    assert freeze.until - utc(2026, 12, 7, 8, 0) == timedelta(seconds=30)


# --- Argo CD sync windows: what GET .../syncwindows answers, with the project's windows ----------

NIGHT = {"kind": "deny", "schedule": "0 22 * * *", "duration": "8h", "manualSync": False}
NIGHT_SPEC = {
    **NIGHT,
    "applications": ["*-production"],
    "timeZone": "Europe/Berlin",
    "description": "night: nobody on call",
}


def test_an_assigned_deny_window_freezes_in_the_projects_time_zone_with_its_description() -> None:
    answer = {"assignedWindows": [NIGHT], "activeWindows": [NIGHT], "canSync": False}
    windows = argocd_freezes("api-gateway-production", answer, [NIGHT_SPEC], utc(2026, 12, 7, 22))
    assert len(windows) == 1
    # 22:00 Berlin = 21:00 UTC; 8 h later: 05:00 UTC.
    freeze = active_freeze(windows, utc(2026, 12, 7, 22, 0))
    assert freeze is not None and freeze.until == utc(2026, 12, 8, 5, 0)
    assert freeze.reasons == ("night: nobody on call",)
    assert not is_frozen_at(windows, utc(2026, 12, 7, 20, 59))
    # The project window not found (other schedule): read in UTC, with a reason of ours.
    other = argocd_freezes("api-gateway-production", answer, [], utc(2026, 12, 7, 22))
    freeze = active_freeze(other, utc(2026, 12, 7, 22, 30))
    assert freeze is not None and freeze.until == utc(2026, 12, 8, 6, 0)
    assert freeze.reasons == (
        "Argo CD sync window (0 22 * * * for 8h) denies api-gateway-production",
    )


def test_a_deny_window_with_manual_sync_still_freezes_and_no_window_means_none() -> None:
    manual = {**NIGHT, "manualSync": True}
    answer = {"assignedWindows": [manual], "canSync": True}
    windows = argocd_freezes("app", answer, [], utc(2026, 12, 7, 12))
    assert is_frozen_at(windows, utc(2026, 12, 7, 23))
    assert argocd_freezes("app", {"canSync": True}, [], utc(2026, 12, 7, 12)) == []


def test_outside_every_allow_window_is_frozen_until_the_next_one_opens() -> None:
    allow = {"kind": "allow", "schedule": "0 9 * * 1-5", "duration": "8h", "manualSync": False}
    now = utc(2026, 12, 5, 12)  # a Saturday
    closed = argocd_freezes("app", {"assignedWindows": [allow], "canSync": False}, [], now)
    freeze = active_freeze(closed, now)
    assert freeze is not None and freeze.until == utc(2026, 12, 7, 9, 0)  # Monday 09:00
    assert "allow windows" in freeze.reasons[0]
    # Open now (Argo CD says it can sync): no freeze.
    monday = utc(2026, 12, 7, 10)
    answer = {"assignedWindows": [allow], "activeWindows": [allow], "canSync": True}
    assert argocd_freezes("app", answer, [], monday) == []
    # A deny window active beside a closed allow window: the deny window says until when.
    both = {"assignedWindows": [allow, NIGHT], "activeWindows": [NIGHT], "canSync": False}
    night = utc(2026, 12, 5, 23)
    freeze = active_freeze(argocd_freezes("app", both, [], night), night)
    assert freeze is not None and freeze.until == utc(2026, 12, 6, 6, 0)
    with pytest.raises(InvalidInput, match="not understood"):
        argocd_freezes("app", {"assignedWindows": [{**NIGHT, "duration": "x"}]}, [], night)
