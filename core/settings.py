"""Where robotics-cd finds its configuration: block names, tool paths, workspace.

Everything is overridable by environment variables prefixed ``ROBOTICS_CD_`` (the sandbox's
``.sandbox/env`` sets them). Secrets are never here: only the *names* of the Prefect blocks
that hold them.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.durations import Duration


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ROBOTICS_CD_", extra="ignore")

    catalog: Path | None = Field(default=None, description="services.yaml to load.")
    workspace: Path = Field(
        default=Path("/tmp/robotics-cd-work"),
        description="Where checkouts and manifests clones live.",
    )

    # Prefect block names (the blocks hold the credentials).
    docker_host_block: str = "robotics-cd-docker"
    registry_block: str = "robotics-cd-registry"
    kubernetes_block: str = "robotics-cd-kube"
    argocd_url: str = "https://argocd.robotics.example"
    argocd_token_block: str = "robotics-cd-argocd-token"
    argocd_verify_tls: bool = True
    github_api_url: str = "https://api.github.com"
    github_token_block: str = "robotics-cd-github-token"
    # The token of HTTP(S) git remotes (GitHub takes the same token for REST and git).
    git_token_block: str = "robotics-cd-github-token"
    git_timeout: float = Field(
        default=60.0, gt=0, description="Seconds any one git command may take (clone, push...)."
    )
    control_plane_outage: Duration = Field(
        default=timedelta(minutes=5),
        description="How long a running canary holds its weight while the Prefect API does "
        "not answer before it stops and leaves production to the reconciler.",
    )
    rollback_deadline: Duration = Field(
        default=timedelta(minutes=10),
        description="How long a release retries restoring production (revert, sync, smoke) "
        "before it ends RollbackFailed and blocks the lease.",
    )
    reconcile_period: Duration = Field(
        default=timedelta(seconds=30), description="How often the reconciler runs."
    )
    webhook_secret_block: str = "robotics-cd-webhook-secret"
    ui_authenticated: bool = Field(
        default=False,
        description="The Prefect UI sits behind an authenticating proxy, so an approval given "
        "in its form proves who gave it and counts toward a quorum above 1 (open-source "
        "Prefect authenticates nobody; leave this off otherwise).",
    )
    prometheus_url: str = "http://prometheus.monitoring:9090"
    prometheus_auth_block: str = Field(
        default="robotics-cd-prometheus-auth",
        description="Secret block with Prometheus credentials: {username, password} for basic "
        "auth or {bearer_token} (or a plain string) for a bearer token; no block, no auth.",
    )
    prometheus_ca_bundle: Path | None = Field(
        default=None,
        description="CA bundle that signs Prometheus' TLS certificate (a private CA); TLS is "
        "always verified.",
    )
    chat_webhooks_block: str = "robotics-cd-chat-webhooks"

    # Tools (on the worker image's PATH in production; the dev extras ship them in the venv).
    trivy: str = "trivy"
    kubectl: str = "kubectl"
    trivy_cache_dir: Path | None = None

    # Deployment names the hand-offs start.
    ci_deployment: str = "ci/ci"
    release_deployment: str = "release/release"
    rollback_deployment: str = "rollback/rollback"
    training_image_deployment: str = "training-image/training-image"
    train_deployment: str = "train/train"
    release_train_deployment: str = "release-train/release-train"


def get_settings() -> Settings:
    """The settings as the environment says now. Not cached: a process that changes its
    environment (the demo pointing itself at the sandbox, a test) needs nothing else, and
    reading it costs about 1.4 ms, far below any call that uses it."""
    return Settings()
