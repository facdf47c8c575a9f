"""The one exception tree of robotics-cd.

RoboticsCDError                      root: everything we raise on purpose
├── CatalogError                     services.yaml is wrong (file, service, field)
├── InvalidInput                     a parameter or payload refused before any side effect
├── SourceError                      git checkout of a service repo failed
├── CheckFailed                      lint / unit / integration command failed (stage, tail)
├── ImageError
│   ├── BuildFailed                  docker build failed
│   ├── RegistryAuthFailed           the registry refused our credentials (registry named)
│   ├── PushFailed                   push failed for another reason
│   └── RegistryUnavailable          the registry's HTTP API did not answer or answered 5xx
├── ScanError
│   ├── ScanGateFailed               findings at or above the gate severity
│   └── ScannerUnavailable           the scanner (or its DB) could not run
├── GitOpsError
│   ├── OverlayRefused               an overlay edit does not render or changes more than asked
│   ├── PushConflict                 still rejected after the bounded rebase-and-retry
│   ├── LeaseHeld                    the release lock belongs to another run
│   │   └── LeaseLost                this run's lease was taken over: its writes are refused
├── ArgoCDError
│   ├── ArgoCDUnavailable            5xx / connection trouble that outlived the retries
│   ├── ArgoCDRefused                4xx (e.g. auto-sync forbids an explicit revision)
│   └── SyncFailed                   the app ended Degraded / failed hook / deadline
├── KubeError                        Kubernetes API trouble (PyTorchJob, pods, logs)
│   └── TrainingFailed               a PyTorchJob ended Failed
├── MetricsError                     Prometheus unreachable or answered an error
├── VerificationFailed               smoke tests or staging metrics failed
├── CanaryFailed                     analysis verdict: roll back
├── RollbackFailed                   a restore could not be verified: production blocked
├── ControlPlaneLost                 the Prefect API stayed down past the limit
├── ApprovalRejected                 rejected by a person or timed out
├── Superseded                       production already runs a descendant of this commit
├── Quarantined                      the image digest was rolled back before (quarantine/)
├── GitHubError                      GitHub REST calls
├── NotifyError                      chat webhooks
├── TriggerError                     a run could not be started (webhook receiver, hand-off)
│   └── WebhookSecretMissing         no webhook secret in the Secret block nor the env
└── DemoFailed                       a step of `robotics-cd demo` did not end as expected
"""

from __future__ import annotations


class RoboticsCDError(Exception):
    """Root of every error robotics-cd raises on purpose."""


class CatalogError(RoboticsCDError):
    def __init__(self, message: str, *, file: str = "", service: str = "", field: str = ""):
        where = ", ".join(
            p
            for p in (
                file and f"file {file}",
                service and f"service {service!r}",
                field and f"field {field!r}",
            )
            if p
        )
        super().__init__(f"{where}: {message}" if where else message)
        self.file, self.service, self.field = file, service, field


class InvalidInput(RoboticsCDError, ValueError):
    """Bad input, refused before any side effect."""


class SourceError(RoboticsCDError):
    pass


class CheckFailed(RoboticsCDError):
    def __init__(self, stage: str, command: str, exit_code: int | None, tail: str):
        reason = "timed out" if exit_code is None else f"exit code {exit_code}"
        super().__init__(f"{stage} failed ({reason}) running {command!r}:\n{tail}")
        self.stage, self.command, self.exit_code, self.tail = stage, command, exit_code, tail


class ImageError(RoboticsCDError):
    pass


class BuildFailed(ImageError):
    pass


class RegistryAuthFailed(ImageError):
    def __init__(self, registry: str, detail: str = ""):
        super().__init__(
            f"registry {registry} refused the credentials"
            + (f" ({detail})" if detail else "")
            + "; check the DockerRegistryCredentials block's username and password"
        )
        self.registry = registry


class PushFailed(ImageError):
    pass


class RegistryUnavailable(ImageError):
    pass


class ScanError(RoboticsCDError):
    pass


class ScanGateFailed(ScanError):
    pass


class ScannerUnavailable(ScanError):
    pass


class GitOpsError(RoboticsCDError):
    pass


class OverlayRefused(GitOpsError):
    pass


class PushConflict(GitOpsError):
    pass


class LeaseHeld(GitOpsError):
    def __init__(self, lease: str, holder: str, expires: str, *, train: str | None = None):
        who = f"release train {train} (run {holder})" if train else holder
        super().__init__(f"lease {lease} is held by {who} until {expires}")
        self.lease, self.holder, self.expires, self.train = lease, holder, expires, train


class LeaseLost(LeaseHeld):
    """This run held the lease once but no longer does; the remote refuses its writes."""

    def __init__(self, lease: str, me: str, holder: str):
        GitOpsError.__init__(
            self,
            f"run {me} no longer holds lease {lease} (held by {holder} now): nothing was "
            "written; the holder answers for production",
        )
        self.lease, self.holder, self.expires, self.me = lease, holder, "", me
        self.train = None


class ArgoCDError(RoboticsCDError):
    pass


class ArgoCDUnavailable(ArgoCDError):
    pass


class ArgoCDRefused(ArgoCDError):
    pass


class SyncFailed(ArgoCDError):
    pass


class KubeError(RoboticsCDError):
    pass


class TrainingFailed(KubeError):
    pass


class MetricsError(RoboticsCDError):
    pass


class VerificationFailed(RoboticsCDError):
    pass


class CanaryFailed(RoboticsCDError):
    pass


class RollbackFailed(RoboticsCDError):
    """A restore of production could not be verified: the lease stays, blocked."""


class ControlPlaneLost(RoboticsCDError):
    """The Prefect API stayed unreachable past the limit: the run stops, the reconciler
    restores production from the lease."""


class ApprovalRejected(RoboticsCDError):
    pass


class Superseded(RoboticsCDError):
    pass


class Quarantined(RoboticsCDError):
    """A release of an image digest that a rollback quarantined (until it is lifted)."""


class GitHubError(RoboticsCDError):
    pass


class NotifyError(RoboticsCDError):
    pass


class TriggerError(RoboticsCDError):
    pass


class WebhookSecretMissing(TriggerError):
    pass


class DemoFailed(RoboticsCDError):
    """A step of ``robotics-cd demo`` did not end as expected; the message says where to look."""
