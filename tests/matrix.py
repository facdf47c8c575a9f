"""What CI runs and what only the full matrix runs.

CI (``scripts/test``) must stay under 45 minutes on a 2-core machine, so it runs one
representative scenario of each behaviour; ``ROBOTICS_CD_FULL_MATRIX=1 scripts/test`` runs
every scenario (every fault, every router, every ordering). The commands and the recorded
results are in docs/e2e-matrix.md.
"""

from __future__ import annotations

import os

import pytest

FULL_MATRIX = os.environ.get("ROBOTICS_CD_FULL_MATRIX", "") not in ("", "0", "false")

full_matrix = pytest.mark.skipif(
    not FULL_MATRIX, reason="full matrix only: ROBOTICS_CD_FULL_MATRIX=1 (docs/e2e-matrix.md)"
)
