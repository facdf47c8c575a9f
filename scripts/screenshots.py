"""Screenshots of the Prefect UI for the README, taken in headless Chromium.

    python scripts/screenshots.py --ui http://127.0.0.1:4200 --suspended RUN_ID \\
        [--record-artifact-key release-robotics-api | --finished RUN_ID] --out docs/img

- ``approval-form.png``: the suspended release's Resume dialog with the form filled (approve,
  the first approver offered unless ``--approver``, a comment) and *not* submitted: the run
  stays suspended.
- ``release-record.png``: the page of the release record artifact, either the latest one
  under ``--record-artifact-key`` or the one a finished release (``--finished``) published
  (its markdown artifact keyed ``release-<service>``).

Debian's chromium (``/usr/bin/chromium``) is driven through the ``playwright`` package, with
the same selectors as the UI approval test (``tests/ui.py``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from uuid import UUID

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file from anywhere: import the repo's modules
    sys.path.insert(0, str(ROOT))

from playwright.sync_api import Error as PlaywrightError  # noqa: E402
from playwright.sync_api import Page  # noqa: E402
from prefect.client.orchestration import SyncPrefectClient  # noqa: E402
from prefect.client.schemas.filters import (  # noqa: E402
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterType,
)

from core.errors import RoboticsCDError  # noqa: E402
from tests.ui import (  # noqa: E402
    PrefectUIError,
    chromium,
    fill_approval_form,
    offered_choices,
    open_resume_dialog,
    save_page,
)

APPROVAL_PNG = "approval-form.png"
RECORD_PNG = "release-record.png"
RECORD_KEY_PREFIX = "release-"  # tasks.report.publish_release_record: release-<service>
MAX_HEIGHT = 4000  # px: a long record is cut here rather than making a huge image


def shoot_approval_form(
    page: Page, ui_url: str, run_id: str, out: Path, *, approver: str | None, comment: str
) -> Path:
    """The filled Resume dialog of a suspended run, before Submit."""
    dialog = open_resume_dialog(page, ui_url, run_id)
    chosen = approver or offered_choices(page, dialog, "Approver")[0]
    fill_approval_form(page, dialog, decision="approve", approver=chosen, comment=comment)
    # A long description scrolls inside the dialog: grow the window until all of it shows.
    hidden = page.evaluate(
        "() => { const b = document.querySelector('.p-modal__body');"
        " return b ? b.scrollHeight - b.clientHeight : 0 }"
    )
    _grow_viewport(page, int(hidden))
    path = out / APPROVAL_PNG
    page.screenshot(path=str(path))
    return path


def shoot_artifact(page: Page, ui_url: str, artifact_path: str, out: Path) -> Path:
    """An artifact's page (``artifact/<id>`` or ``key/<key>``), its markdown rendered."""
    page.goto(f"{ui_url.rstrip('/')}/artifacts/{artifact_path}", wait_until="domcontentloaded")
    content = page.locator(".markdown-renderer").first
    try:
        content.wait_for(state="visible", timeout=90_000)
    except PlaywrightError as exc:
        raise PrefectUIError(
            f"the artifact page /artifacts/{artifact_path} shows no markdown: is it the "
            "release record (a markdown artifact)?"
        ) from exc
    page.wait_for_load_state("networkidle")  # the record's images (data: URLs) laid out
    # The UI scrolls its content pane, not the document: size the window to the pane.
    hidden = page.evaluate(
        "() => Math.max(0, ...[...document.querySelectorAll('*')]"
        ".filter(e => e.scrollHeight > e.clientHeight + 1 && getComputedStyle(e).overflowY !== 'visible')"
        ".map(e => e.scrollHeight - e.clientHeight))"
    )
    _grow_viewport(page, int(hidden))
    path = out / RECORD_PNG
    page.screenshot(path=str(path))
    return path


def record_artifact_id(ui_url: str, run_id: str) -> UUID:
    """The release record a finished release published (its ``release-*`` markdown artifact)."""
    with SyncPrefectClient(f"{ui_url.rstrip('/')}/api") as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(run_id)]),
                type=ArtifactFilterType(any_=["markdown"]),
            )
        )
    records = [a for a in artifacts if (a.key or "").startswith(RECORD_KEY_PREFIX)]
    if not records:
        keys = sorted(a.key or "(no key)" for a in artifacts)
        raise PrefectUIError(
            f"flow run {run_id} published no release record (a markdown artifact keyed "
            f"{RECORD_KEY_PREFIX}<service>; its markdown artifacts: {keys or 'none'}). "
            "Pass a finished release, or --record-artifact-key."
        )
    return records[-1].id


def _grow_viewport(page: Page, extra: int) -> None:
    size = page.viewport_size or {"width": 1400, "height": 1000}
    if extra > 0:
        height = min(size["height"] + extra + 40, MAX_HEIGHT)
        page.set_viewport_size({"width": size["width"], "height": height})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Take the README's Prefect UI screenshots in headless Chromium."
    )
    parser.add_argument("--ui", required=True, help="Prefect UI URL, e.g. http://127.0.0.1:4200")
    parser.add_argument("--suspended", help="flow run id of a suspended release")
    record = parser.add_mutually_exclusive_group()
    record.add_argument("--record-artifact-key", help="key of the release record artifact")
    record.add_argument("--finished", help="flow run id of a finished release")
    parser.add_argument("--approver", help="approver to show (default: the first offered)")
    parser.add_argument(
        "--comment", default="Staging verified; go ahead with the canary.", help="comment to show"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="output folder")
    args = parser.parse_args(argv)
    for flag in ("suspended", "finished"):
        value = getattr(args, flag)
        if value is not None:
            try:
                UUID(value)
            except ValueError:
                parser.error(f"--{flag} must be a flow run id (a UUID), not {value!r}")
    if not (args.suspended or args.finished or args.record_artifact_key):
        parser.error("give --suspended, --finished or --record-artifact-key")
    if not args.ui.startswith(("http://", "https://")):
        parser.error(f"--ui must be an http(s) URL, not {args.ui!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with chromium() as page:
        try:
            saved = []
            if args.suspended:
                saved.append(
                    shoot_approval_form(
                        page,
                        args.ui,
                        args.suspended,
                        args.out,
                        approver=args.approver,
                        comment=args.comment,
                    )
                )
            artifact_path = None
            if args.record_artifact_key:
                artifact_path = f"key/{args.record_artifact_key}"
            elif args.finished:
                artifact_path = f"artifact/{record_artifact_id(args.ui, args.finished)}"
            if artifact_path:
                page.set_viewport_size({"width": 1400, "height": 1000})
                saved.append(shoot_artifact(page, args.ui, artifact_path, args.out))
        except (RoboticsCDError, PlaywrightError) as exc:
            debug = save_page(page, None, "screenshots")
            saved_to = ", ".join(str(p) for p in debug)
            print(f"screenshots failed: {exc}\n(page saved: {saved_to})", file=sys.stderr)
            return 1
    for path in saved:
        print(path)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RoboticsCDError as exc:  # e.g. no chromium: nothing was started
        print(f"screenshots: {exc}", file=sys.stderr)
        sys.exit(2)
