"""Shipping an image: find → build → scan → push, shared by the ``ci`` and
``training-image`` flows so that both make the same decisions in the same order.

A commit already in the registry (its release tag, labelled with its source commit) is
reused: nothing is built, scanned or pushed again, so a retried or replayed run ships
nothing twice.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from pydantic import BaseModel

from core.catalog import BuildSpec, ScanPolicy
from core.images import release_tag
from tasks.images import build_image, find_pushed_image, push_image
from tasks.scan import ScanReport, scan_image
from tasks.source import Checkout

Stage = Callable[[str], AbstractAsyncContextManager[None]]


@asynccontextmanager
async def _untimed(_: str) -> AsyncIterator[None]:
    yield


class Shipped(BaseModel):
    """The image of a commit in the registry; ``scan`` is None when it was reused."""

    ref: str
    digest: str
    tag: str
    reused: bool
    scan: ScanReport | None = None


async def ship_image(
    co: Checkout,
    *,
    registry: str,
    repository: str,
    github: str,
    build: BuildSpec,
    scan_policy: ScanPolicy,
    stage: Stage = _untimed,
) -> Shipped:
    """Ship the checked-out commit's image; ``stage(name)`` wraps each step (the CI flow
    times them for its summary)."""
    tag = release_tag(co.committed_at, co.sha)
    async with stage("find"):
        existing = await find_pushed_image(registry, repository, tag, co.sha)
    if existing is not None:
        return Shipped(ref=existing.ref, digest=existing.digest, tag=tag, reused=True)
    async with stage("build"):
        built = await build_image(
            co.path,
            registry=registry,
            repository=repository,
            tag=tag,
            sha=co.sha,
            committed_at=co.committed_at,
            source=f"https://github.com/{github}",
            context=build.context,
            dockerfile=build.dockerfile,
        )
    async with stage("scan"):
        report = await scan_image(
            built.ref, repo_path=co.path, dockerfile=build.dockerfile, policy=scan_policy
        )
    async with stage("push"):
        pushed = await push_image(built.ref)
    return Shipped(ref=pushed.ref, digest=pushed.digest, tag=tag, reused=False, scan=report)
