"""Which scan findings may be ignored, and on whose word.

The commit under scan is untrusted, so its own ``.trivyignore`` cannot decide what the gate
sees: the only ignore that counts for every severity is the catalog's allowlist
(``scan.ignore``: an id, a reason and an expiry date, reviewed like any catalog change). A
commit's ``.trivyignore`` is still read and reported; it is honoured below CRITICAL (a
team's accepted LOW/MEDIUM/HIGH noise) and never for CRITICAL.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from typing import Literal

from core.catalog import ScanIgnore

Disposition = Literal["gate", "allowlisted", "trivyignore", "trivyignore-not-honoured"]
NEVER_IGNORED_BY_COMMIT = frozenset({"CRITICAL"})
_EXP = re.compile(r"\bexp:(\d{4}-\d{2}-\d{2})\b")


@dataclass(frozen=True)
class Ruling:
    """What happens to one finding: it counts for the gate, or why it does not."""

    disposition: Disposition
    note: str = ""

    @property
    def counts(self) -> bool:
        return self.disposition in ("gate", "trivyignore-not-honoured")


def parse_trivyignore(text: str, today: date) -> set[str]:
    """Ids listed in a ``.trivyignore`` (comments, blanks and expired ``exp:`` lines dropped)."""
    ids: set[str] = set()
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        expiry = _EXP.search(line)
        if expiry and date.fromisoformat(expiry.group(1)) < today:
            continue
        ids.add(line.split()[0])
    return ids


def allowlist_entry(
    finding_id: str, allowlist: Iterable[ScanIgnore], today: date
) -> tuple[ScanIgnore | None, ScanIgnore | None]:
    """(the valid entry for ``finding_id``, or an expired one) from the catalog allowlist."""
    expired: ScanIgnore | None = None
    for entry in allowlist:
        if entry.id != finding_id:
            continue
        if entry.expires >= today:
            return entry, None
        expired = entry
    return None, expired


def rule(
    finding_id: str,
    severity: str,
    *,
    allowlist: Iterable[ScanIgnore],
    trivyignore: set[str],
    today: date,
) -> Ruling:
    """The ruling on one finding: catalog allowlist first, then the commit's .trivyignore."""
    entry, expired = allowlist_entry(finding_id, allowlist, today)
    if entry is not None:
        return Ruling("allowlisted", f"catalog: {entry.reason} (until {entry.expires})")
    lapsed = f"catalog allowlist entry expired on {expired.expires}; " if expired else ""
    if finding_id in trivyignore:
        if severity in NEVER_IGNORED_BY_COMMIT:
            return Ruling(
                "trivyignore-not-honoured",
                f"{lapsed}listed in the commit's .trivyignore, which is not honoured for "
                f"{severity}: accept it in services.yaml scan.ignore (id, reason, expires)",
            )
        return Ruling("trivyignore", f"{lapsed}ignored by the commit's .trivyignore")
    return Ruling("gate", lapsed.rstrip("; "))
