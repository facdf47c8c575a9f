"""``robotics-cd sandbox up``'s Prefect backend options: a wrong one stops before anything
starts; the defaults (SQLite, or Redis with PostgreSQL) reach the launcher."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cli.app import app
from sandbox import launcher


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []

    def fake_up(state: Path, **kwargs: Any) -> Any:
        seen.append(kwargs)
        raise launcher.SandboxError("stop here")

    monkeypatch.setattr(launcher, "up", fake_up)
    return seen


def test_an_unknown_database_is_refused_before_anything_starts(calls, tmp_path):
    result = CliRunner().invoke(app, ["sandbox", "up", "--state", str(tmp_path), "--db", "mysql"])
    assert result.exit_code == 2
    assert "--db is one of sqlite, postgres" in result.output
    assert calls == []


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], ("sqlite", "memory")),
        (["--db", "postgres"], ("postgres", "redis")),
        (["--db", "postgres", "--messaging", "memory"], ("postgres", "memory")),
    ],
)
def test_backend_choices_reach_the_launcher(calls, tmp_path, args, expected):
    CliRunner().invoke(app, ["sandbox", "up", "--state", str(tmp_path), *args])
    assert (calls[0]["prefect_db"], calls[0]["prefect_messaging"]) == expected
