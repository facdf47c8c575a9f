"""Where the Debian base image is bootstrapped from: the machine's own apt sources."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandbox.engine import EngineUnavailable, debian_mirror


def test_deb822_sources_give_the_bookworm_mirror(tmp_path: Path) -> None:
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "debian.sources").write_text(
        "Types: deb\n# http://snapshot.debian.org/archive/debian/20250520T000000Z\n"
        "URIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\n"
        "Types: deb\nURIs: http://mirror.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n"
    )
    (d / "other.list").write_text("deb https://packages.example/apt cloud-sdk main\n")
    assert debian_mirror((tmp_path / "sources.list", d)) == "http://mirror.example/debian"


def test_one_line_sources_and_options(tmp_path: Path) -> None:
    f = tmp_path / "sources.list"
    f.write_text(
        "# deb http://old.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://ftp.example/debian bookworm main\n"
    )
    assert debian_mirror((f,)) == "http://ftp.example/debian"


def test_no_source_says_what_to_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ROBOTICS_CD_DEBIAN_MIRROR", raising=False)
    with pytest.raises(EngineUnavailable, match="ROBOTICS_CD_DEBIAN_MIRROR"):
        debian_mirror((tmp_path / "missing.list",))
    monkeypatch.setenv("ROBOTICS_CD_DEBIAN_MIRROR", "http://m.example/debian")
    assert debian_mirror((tmp_path / "missing.list",)) == "http://m.example/debian"
