"""One way to wait between retries, for every client loop that retries by itself.

Whole-task retries are Prefect's (``retries=`` in a task's decorator: the task is
idempotent, so running it again is safe). Inside one task, a client retries one request or
one push: the GitHub and Argo CD clients on transient answers, the git writers when a racer
pushed first. They all wait by a :class:`Backoff`.
"""

from __future__ import annotations

import random

from pydantic import BaseModel, ConfigDict, Field


class Backoff(BaseModel):
    """Wait ``base_delay × factor**attempt`` seconds before retry ``attempt`` (0-based), at
    most ``max_delay``. With ``jitter`` each wait is spread over 50-150 % of that, so
    writers that collided do not collide again in step."""

    model_config = ConfigDict(frozen=True)
    retries: int = Field(default=3, ge=0, description="Retries after the first try.")
    base_delay: float = Field(default=1.0, ge=0, description="Seconds before the first retry.")
    factor: float = Field(default=2.0, ge=1)
    max_delay: float = Field(default=180.0, ge=0)
    jitter: bool = False

    @property
    def attempts(self) -> int:
        return self.retries + 1

    def delay(self, attempt: int) -> float:
        # The exponent is capped so a long loop never builds a huge float before the min.
        wait = float(min(self.base_delay * self.factor ** min(attempt, 64), self.max_delay))
        return wait * random.uniform(0.5, 1.5) if self.jitter else wait
