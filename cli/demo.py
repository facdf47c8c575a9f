"""``robotics-cd demo``: the whole release story on the local sandbox (see cli/demo_story.py)."""

from __future__ import annotations

from pathlib import Path

import typer

from sandbox import launcher


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        fast: bool = typer.Option(
            False,
            "--fast",
            help="Short canary windows (5 s intervals, one analysis per step, 5 s watch): "
            "the CI replay. The ROBOTICS_CD_CANARY_* variables, when set, win.",
        ),
        interactive: bool = typer.Option(
            False,
            "--interactive",
            help="Wait for you to approve each release in the Prefect UI instead of approving it.",
        ),
        state: Path = typer.Option(
            launcher.DEFAULT_STATE,
            "--state",
            help="State dir of the sandbox (reused when one is up there already).",
        ),
        keep: bool = typer.Option(
            True,
            "--keep/--no-keep",
            help="Leave the sandbox running at the end (default), or stop it.",
        ),
    ) -> None:
        """Start the sandbox and play the story: a good release promoted through its canary,
        a bad one rolled back by itself, a training image and a distributed training run.
        Exits 1 when a step did not end as expected."""
        from cli.demo_story import DemoOptions, run_demo

        code = run_demo(DemoOptions(state=state, fast=fast, interactive=interactive, keep=keep))
        if code:
            raise typer.Exit(code)
