"""Drive the Prefect UI in headless Chromium, as a person would.

Debian's ``chromium`` (``/usr/bin/chromium``) through the Python ``playwright`` package; no
browser is downloaded. The approval path is the one a release's approver takes: open the
suspended run's page, press Resume, fill the ``RunInput`` form Prefect renders from the
schema (decision and approver are selects, the comment a textarea), submit.

Selectors (Prefect 3.9's Vue UI, prefect-design components), found by dumping the DOM:

- the run page: ``<ui>/runs/flow-run/<id>``; its state badge
  ``.page-heading-flow-run__meta .state-badge`` ("Suspended" while the form waits; its first
  render is the sign the UI has booted) and its ``Resume`` button (role button);
- the dialog: role ``dialog`` titled "Resume Flow Run"; each field is a
  ``.schema-form-property`` whose ``.schema-form-property__label`` starts with the field's
  title ("Decision", "Approver", "Comment (Optional)");
- a select: ``button.p-select-button__control``; it opens on ArrowDown (a mouse click on it
  toggles twice in headless Chromium and stays closed), then a ``listbox`` of ``option`` roles;
- the comment: the field's ``textarea``; ``Submit`` (role button) in the dialog;
- success: the dialog closes and a toast says "Flow run resumed".

Every step waits with a deadline. On failure a screenshot and the page's HTML are saved and
the error names them.
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from weakref import WeakKeyDictionary

from playwright.sync_api import Browser, Locator, Page, Response, sync_playwright
from playwright.sync_api import Error as PlaywrightError

from core.errors import InvalidInput, RoboticsCDError

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",  # runs as root in CI containers
    "--disable-gpu",
    "--disable-background-networking",  # no calls home: this machine has no internet
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
VIEWPORT = {"width": 1400, "height": 1000}
DECISIONS = ("approve", "reject")
RESUMED_TOAST = "Flow run resumed"
PAUSED_STATES = ("Suspended", "Paused")  # the run page's state badge while a form waits

log = logging.getLogger(__name__)


class PrefectUIError(RoboticsCDError):
    """The Prefect UI did not let us do what a person would do; see the saved page."""


@contextmanager
def chromium(*, timeout: float = 30.0) -> Iterator[Page]:
    """A fresh headless Chromium page; every Playwright wait on it defaults to ``timeout``."""
    if not Path(CHROMIUM).exists():
        raise PrefectUIError(
            f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)"
        )
    with sync_playwright() as pw:
        browser: Browser = pw.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=timeout * 1000
        )
        try:
            page = browser.new_page(viewport=VIEWPORT)  # type: ignore[arg-type]
            page.set_default_timeout(timeout * 1000)
            page.set_default_navigation_timeout(timeout * 1000)
            yield page
        finally:
            browser.close()


def flow_run_url(ui_url: str, flow_run_id: str) -> str:
    return f"{ui_url.rstrip('/')}/runs/flow-run/{flow_run_id}"


def open_resume_dialog(
    page: Page, ui_url: str, flow_run_id: str, *, load_timeout: float = 90.0
) -> Locator:
    """Open the run's page and its Resume dialog; return the dialog.

    ``load_timeout`` bounds the first render: the UI is one large script bundle, and on a
    loaded two-core machine Chromium takes tens of seconds to boot it.
    """
    page.goto(flow_run_url(ui_url, flow_run_id), wait_until="domcontentloaded")
    try:
        _heading_badge(page).wait_for(state="visible", timeout=load_timeout * 1000)
    except PlaywrightError as exc:
        raise PrefectUIError(
            f"the page of flow run {flow_run_id} did not render within {load_timeout:.0f}s: "
            "is the id right and the server up?"
        ) from exc
    state = _state_badge(page, timeout=None)  # the badge may re-render while the page loads
    if state not in PAUSED_STATES:
        raise PrefectUIError(
            f"flow run {flow_run_id} is {state!r}, not waiting for input: nothing to resume"
        )
    resume = page.get_by_role("button", name="Resume", exact=True)
    try:
        resume.wait_for(state="visible")
    except PlaywrightError as exc:
        raise PrefectUIError(
            f"flow run {flow_run_id} shows no Resume button: is it suspended (Paused)? "
            f"Its page says: {_state_badge(page)!r}"
        ) from exc
    resume.click()
    dialog = page.get_by_role("dialog").filter(has_text="Resume Flow Run")
    dialog.wait_for(state="visible")
    return dialog


def fill_approval_form(
    page: Page, dialog: Locator, *, decision: str, approver: str, comment: str
) -> None:
    """Choose the decision and the approver, type the comment; check what the form shows."""
    _choose(page, _field(dialog, "Decision"), decision)
    _choose(page, _field(dialog, "Approver"), approver)
    _field(dialog, "Comment").locator("textarea").fill(comment)
    shown = {
        "decision": _select_value(_field(dialog, "Decision")),
        "approver": _select_value(_field(dialog, "Approver")),
        "comment": _field(dialog, "Comment").locator("textarea").input_value(),
    }
    wanted = {"decision": decision, "approver": approver, "comment": comment}
    if shown != wanted:
        raise PrefectUIError(f"the form shows {shown}, not {wanted}")


def submit_resume(page: Page, dialog: Locator) -> None:
    """Submit the dialog; wait until it closes and the UI confirms the resume.

    A server error on the resume call (a SQLite-backed server under load answers 500 when
    its database is locked) leaves the dialog open with the UI's generic "Oops" toast; a
    person presses Submit again, and so does this, once, saying so in the log.
    """
    for attempt in (1, 2):
        with page.expect_response(_is_resume_call) as answer:
            dialog.get_by_role("button", name="Submit", exact=True).click()
        response = answer.value
        if response.status < 500:
            break
        log.warning("the resume call answered %s (attempt %d)", _failed_call(response), attempt)
    try:
        dialog.wait_for(state="hidden")
        page.get_by_text(RESUMED_TOAST).first.wait_for(state="visible")
    except PlaywrightError as exc:
        raise PrefectUIError(
            f"the UI did not confirm the resume ({RESUMED_TOAST!r}); it shows: "
            f"{_visible_messages(page) or 'no error message'}"
        ) from exc


def approve_in_ui(
    ui_url: str,
    flow_run_id: str,
    *,
    decision: str,
    approver: str,
    comment: str,
    screenshot: Path | None = None,
    debug_dir: Path | None = None,
    timeout: float = 30.0,
    load_timeout: float = 90.0,
    page: Page | None = None,
) -> None:
    """Resume a suspended run through the Prefect UI's form, as an approver would.

    ``screenshot``: where to save the filled form, just before submitting. ``debug_dir``:
    where a failure leaves a screenshot and the page HTML (a new temp dir if not given).
    ``page``: a page of :func:`chromium` to reuse (its cache makes the UI boot faster; its
    own default timeout then applies); by default a browser is started for this call only.
    """
    if decision not in DECISIONS:
        raise InvalidInput(f"decision must be one of {DECISIONS}, not {decision!r}")
    if not approver:
        raise InvalidInput("approver is empty: pass one of the service's approvers")
    # A page handed in stays open for the caller; otherwise a browser lives for this call.
    session: AbstractContextManager[Page] = (
        nullcontext(page) if page is not None else chromium(timeout=timeout)
    )
    with session as current:
        _resume(
            current,
            ui_url,
            flow_run_id,
            decision,
            approver,
            comment,
            screenshot,
            debug_dir,
            load_timeout,
        )


def _resume(
    page: Page,
    ui_url: str,
    flow_run_id: str,
    decision: str,
    approver: str,
    comment: str,
    screenshot: Path | None,
    debug_dir: Path | None,
    load_timeout: float,
) -> None:
    started = time.monotonic()
    errors = script_errors(page)
    seen = len(errors)
    try:
        dialog = open_resume_dialog(page, ui_url, flow_run_id, load_timeout=load_timeout)
        log.info("resume dialog of %s open after %.1fs", flow_run_id, time.monotonic() - started)
        fill_approval_form(page, dialog, decision=decision, approver=approver, comment=comment)
        if screenshot is not None:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot))
        submit_resume(page, dialog)
        log.info(
            "flow run %s resumed in the UI after %.1fs", flow_run_id, time.monotonic() - started
        )
    except (PrefectUIError, PlaywrightError) as exc:
        saved = save_page(page, debug_dir, f"resume-{flow_run_id}")
        new_errors = errors[seen:]
        scripts = f"; script errors: {new_errors[:8]}" if new_errors else ""
        raise PrefectUIError(
            f"could not {decision} flow run {flow_run_id} in the Prefect UI at {ui_url} "
            f"after {time.monotonic() - started:.0f}s: {_first_line(exc)}{scripts} "
            f"(page saved: {', '.join(str(p) for p in saved)})"
        ) from exc


_SCRIPT_ERRORS: WeakKeyDictionary[Page, list[str]] = WeakKeyDictionary()


def script_errors(page: Page) -> list[str]:
    """The page's uncaught errors and console errors so far (they explain a blank page)."""
    if page not in _SCRIPT_ERRORS:
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        # a console 404 does not say which URL; the response does (and the API's reason)
        page.on("response", lambda r: errors.append(_failed_call(r)) if r.status >= 400 else None)
        _SCRIPT_ERRORS[page] = errors
    return _SCRIPT_ERRORS[page]


def save_page(page: Page, directory: Path | None, stem: str) -> list[Path]:
    """Save a screenshot and the HTML of ``page`` for a post-mortem; never raises."""
    directory = directory or Path(tempfile.mkdtemp(prefix="prefect-ui-"))
    directory.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%H%M%S")
    png, html = directory / f"{stem}-{stamp}.png", directory / f"{stem}-{stamp}.html"
    saved: list[Path] = []
    try:
        page.screenshot(path=str(png), full_page=True)
        saved.append(png)
    except PlaywrightError:
        pass  # a crashed page has no picture; the HTML below may still tell why
    try:
        html.write_text(page.content())
        saved.append(html)
    except PlaywrightError:
        pass  # same: keep whatever could be saved, the caller raises anyway
    return saved


# --- the form's pieces ---------------------------------------------------------------------


def _field(dialog: Locator, title: str) -> Locator:
    label = dialog.page.locator(
        ".schema-form-property__label", has_text=re.compile(f"^{re.escape(title)}")
    )
    return dialog.locator(".schema-form-property").filter(has=label)


def _choose(page: Page, field: Locator, value: str) -> None:
    """Open a prefect-design select with the keyboard and click the option ``value``."""
    control = field.locator("button.p-select-button__control")
    listbox = _open_select(page, control)
    options = listbox.get_by_role("option")
    choices = [text.strip() for text in options.all_inner_texts()]
    if value not in choices:
        control.press("Escape")
        listbox.wait_for(state="hidden")
        raise PrefectUIError(f"{value!r} is not a choice of the form; it offers {choices}")
    listbox.get_by_role("option", name=value, exact=True).click()
    listbox.wait_for(state="hidden")


def offered_choices(page: Page, dialog: Locator, title: str) -> list[str]:
    """The options a select field of the form offers (the select is closed again)."""
    control = _field(dialog, title).locator("button.p-select-button__control")
    listbox = _open_select(page, control)
    choices = [text.strip() for text in listbox.get_by_role("option").all_inner_texts()]
    control.press("Escape")
    listbox.wait_for(state="hidden")
    return choices


def _open_select(page: Page, control: Locator) -> Locator:
    control.focus()
    control.press("ArrowDown")
    listbox = page.get_by_role("listbox")
    listbox.wait_for(state="visible")
    return listbox


def _select_value(field: Locator) -> str:
    return field.locator(".p-select-button__value").inner_text().strip()


def _heading_badge(page: Page) -> Locator:
    return page.locator(".page-heading-flow-run__meta .state-badge").first


def _state_badge(page: Page, timeout: float | None = 2.0) -> str:
    """The run page's state (``None``: the page's default timeout)."""
    try:
        return _heading_badge(page).inner_text(timeout=timeout and timeout * 1000).strip()
    except PlaywrightError:
        return "no state badge"


def _is_resume_call(response: Response) -> bool:
    return response.request.method == "POST" and response.url.rstrip("/").endswith("/resume")


def _failed_call(response: Response) -> str:
    try:
        body = response.text()[:300]
    except PlaywrightError:
        body = ""
    body = " ".join(body.split())
    return f"{response.request.method} {response.url} -> {response.status} {body}".strip()


def _visible_messages(page: Page) -> str:
    texts = page.locator(".p-toast__message, .p-message, .p-label__message").all_inner_texts()
    return "; ".join(t.strip() for t in texts if t.strip())


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
