"""How long ``robotics-cd sandbox up`` takes on this machine, part by part.

Each run starts from an empty state dir (own Prefect server, registry, Prometheus, twin,
seeded repos and images), then measures a second ``up`` on the same dir (everything reused),
``status`` and ``down --purge``. The Docker base images are kept between runs: they are
made once per machine and other sandboxes on the engine share them.

Target (issue 5): a cold ``up`` under 60 s. A run that has to make the launcher's migrated
Prefect database cache (once per machine and Prefect version) is marked as such. ``--write`` puts the table into
``docs/benchmarks.md``, section "Sandbox start-up".

Run: ``.venv/bin/python -m bench.bench_sandbox_up [--runs 2] [--write]``
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from sandbox import launcher

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"
SECTION = "## Sandbox start-up"
TARGET_SECONDS = 60.0


def _cache_exists() -> bool:
    version = importlib.metadata.version("prefect")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "robotics-cd"
    return (cache / f"prefect-{version}.db").exists()


def one_run(index: int) -> dict[str, float]:
    state = Path(tempfile.mkdtemp(prefix=f"bench-sandbox-{index}-"))
    cached = _cache_exists()
    try:
        sb = launcher.up(state, echo=lambda _line: None)
        timings = dict(sb.timings)
        t0 = time.monotonic()
        launcher.up(state, echo=lambda _line: None)
        timings["second up (reuse)"] = round(time.monotonic() - t0, 2)
        t0 = time.monotonic()
        parts = launcher.status(state)
        timings["status"] = round(time.monotonic() - t0, 2)
        if not all(p.ok for p in parts):
            raise SystemExit(f"status not green after up: {[p for p in parts if not p.ok]}")
    finally:
        t0 = time.monotonic()
        launcher.down(state, purge=True)
        down_seconds = round(time.monotonic() - t0, 2)
    timings["down --purge"] = down_seconds
    timings["cached"] = 1.0 if cached else 0.0
    return timings


def render(runs: list[dict[str, float]]) -> str:
    keys = [k for k in runs[0] if k != "cached"]
    load = os.getloadavg()[0]
    names = [
        f"run {i + 1} s" + ("" if r["cached"] else " (made the DB cache)")
        for i, r in enumerate(runs)
    ]
    header = "| step | " + " | ".join(names) + " |"
    lines = [
        f"Measured by `bench/bench_sandbox_up.py`, {len(runs)} cold run(s) from an empty state "
        f"dir (Docker base images already made), 2 CPUs shared with whatever else runs (1-min "
        f"load {load:.1f} at the end), {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Steps marked "
        "(parallel) run in a thread beside the others: the Prefect server starts at once and "
        "its blocks are registered while Argo CD brings the applications up.",
        "",
        header,
        "|---|" + "---:|" * len(runs),
    ]
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(f"{r.get(key, 0):.1f}" for r in runs) + " |")
    usual = [r["total"] for r in runs if r["cached"]] or [r["total"] for r in runs]
    median = statistics.median(usual)
    verdict = "meets" if median <= TARGET_SECONDS else "misses"
    lines += [
        "",
        f"Median cold `up` once the machine has the migrated Prefect database cached: "
        f"{median:.1f} s, which {verdict} the {TARGET_SECONDS:.0f} s target. The Prefect "
        "server is the long pole: a fresh SQLite database spends most of its start in "
        "migrations, so the launcher keeps one migrated empty database per Prefect version "
        "under `~/.cache/robotics-cd/` (made by the first `up` on a machine, like the Docker "
        "base images) and copies it into each new state dir. Pass `--prefect-api-url` to "
        "reuse a running server (the test fixture does).",
        "",
    ]
    return "\n".join(lines)


def write_section(text: str) -> None:
    doc = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    start = doc.find(SECTION)
    if start == -1:
        doc = doc.rstrip("\n") + f"\n\n{SECTION}\n\n{text}"
    else:
        end = doc.find("\n## ", start + len(SECTION))
        rest = doc[end:] if end != -1 else ""
        doc = doc[:start] + f"{SECTION}\n\n{text}" + rest
    DOC.write_text(doc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    runs = [one_run(i) for i in range(args.runs)]
    text = render(runs)
    print(text)
    if args.write:
        write_section(text)


if __name__ == "__main__":
    main()
