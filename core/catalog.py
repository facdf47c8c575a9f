"""The service catalog (``services.yaml``) and its rules.

Loading is strict: an unknown key, a duplicate service or an invalid image name stops with
a message naming the file, the service and the field. ``${VAR}`` and ``${VAR:-default}`` in
string values are expanded from the environment, so one catalog serves the sandbox and a
real platform.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.dependencies import describe_cycle, find_cycle, unknown_dependencies
from core.durations import Duration
from core.errors import CatalogError, InvalidInput
from core.freeze import FreezeWindow
from core.images import validate_registry, validate_repository
from core.traffic import Router
from core.training import DEFAULT_RUNTIME, Api, NamespaceLimits

Severity = Literal["UNKNOWN", "LOW", "MEDIUM", "HIGH", "CRITICAL"]
Environment = Literal["staging", "production"]
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def _check_name(value: str) -> str:
    if not NAME_RE.match(value):
        raise ValueError(f"{value!r} is not a DNS-1123 label (lowercase letters, digits, '-')")
    return value


def _check_repository(value: str) -> str:
    try:
        return validate_repository(value)
    except InvalidInput as exc:
        raise ValueError(str(exc)) from None


def _check_registry(value: str) -> str:
    try:
        return validate_registry(value)
    except InvalidInput as exc:
        raise ValueError(str(exc)) from None


def _check_relative_path(value: str) -> str:
    parts = Path(value).parts
    if value.startswith("/") or ".." in parts or not value:
        raise ValueError(f"{value!r} must be a relative path inside the repository")
    return value


Name = Annotated[str, AfterValidator(_check_name)]
ImageRepository = Annotated[str, AfterValidator(_check_repository)]
RegistryHost = Annotated[str, AfterValidator(_check_registry)]
RelPath = Annotated[str, AfterValidator(_check_relative_path)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScanIgnore(Strict):
    """One accepted finding: who may see it is the catalog's reviewers, not the commit."""

    id: str = Field(min_length=1, description="Rule or CVE id, e.g. CVE-2024-1234 or DS-0031.")
    reason: str = Field(min_length=10, description="Why it is accepted (kept in the report).")
    expires: date = Field(description="Last day the entry applies (YYYY-MM-DD).")


class ScanPolicy(Strict):
    ignore: list[ScanIgnore] = Field(
        default=[],
        description="Findings accepted despite the gate, each with a reason and an expiry date. "
        "The only ignore that applies to CRITICAL findings; a commit's .trivyignore is not "
        "honoured for them.",
    )
    fail_on: list[Severity] = Field(
        default=["CRITICAL", "HIGH"], description="Severities that fail the scan gate."
    )
    allow_missing_vuln_db: bool = Field(
        default=False,
        description="Let the vulnerability scanner be skipped when no DB is available. "
        "The scan artifact then says so plainly.",
    )
    vuln_db_repository: str | None = Field(
        default=None, description="OCI repository of the Trivy DB (e.g. a mirror in our registry)."
    )
    timeout: Duration = Field(default="10m", validate_default=True)


class MetricRule(Strict):
    max: float | None = Field(default=None, description="Absolute upper bound for the canary.")
    max_vs_stable: float | None = Field(
        default=None, description="Upper bound as a ratio of the stable track's value."
    )
    min: float | None = Field(
        default=None, description="Absolute lower bound (a metric that must not drop)."
    )
    min_vs_stable: float | None = Field(
        default=None, description="Lower bound as a ratio of the stable track's value."
    )
    query: str | None = Field(
        default=None,
        description="PromQL template; placeholders {namespace} {ingress} {service} {track} "
        "{deployment} {window}.",
    )
    total_query: str | None = Field(
        default=None,
        description="PromQL template of the count a ratio metric is over (e.g. tasks "
        "planned): lets a relative lower bound be tested for significance.",
    )


class MetricRules(Strict):
    error_ratio: MetricRule = MetricRule(max=0.05, max_vs_stable=2.0)
    p99_latency_seconds: MetricRule = MetricRule(max=1.0, max_vs_stable=1.5)
    restarts: MetricRule = MetricRule(max=0)
    cpu: MetricRule | None = MetricRule(max_vs_stable=3.0)
    memory: MetricRule | None = MetricRule(max_vs_stable=3.0)
    business: MetricRule | None = None


class CanaryPolicy(Strict):
    steps: list[Annotated[int, Field(ge=1, le=100)]] = Field(
        default=[10, 25, 50, 100], description="Percent of traffic at each step; ends at 100."
    )
    interval: Duration = Field(default="60s", validate_default=True)
    analyses_per_step: int = Field(default=3, ge=1)
    failure_limit: int = Field(default=1, ge=0, description="Roll back when failures > limit.")
    inconclusive_limit: int = Field(default=2, ge=0)
    min_requests: int = Field(default=100, ge=0, description="Per interval, else inconclusive.")
    canary_replicas: int = Field(default=1, ge=1)
    post_release_watch: Duration = Field(default="30m", validate_default=True)
    early_abort_alpha: float | None = Field(
        default=0.01,
        gt=0,
        lt=1,
        description="False-alarm rate of the early abort over a whole release (a sequential, "
        "anytime-valid test on 5xx and slow requests checked as data arrives); null turns "
        "the early abort off.",
    )
    early_abort_check: Duration = Field(
        default="2s",
        validate_default=True,
        description="How often the early abort looks at the data within an interval.",
    )

    @model_validator(mode="after")
    def _steps_rise_to_100(self) -> CanaryPolicy:
        if self.steps != sorted(set(self.steps)) or self.steps[-1] != 100:
            raise ValueError("steps must rise strictly and end at 100")
        return self


_LOGIN = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9]|-(?=[A-Za-z0-9])){0,38}$")


def _check_login(value: str) -> str:
    if not _LOGIN.match(value):
        raise ValueError(f"{value!r} is not a GitHub login (letters, digits, single '-')")
    return value


GitHubLogin = Annotated[str, AfterValidator(_check_login)]


class ApprovalPolicy(Strict):
    timeout: Duration = Field(default="24h", validate_default=True)
    required: int = Field(
        default=1,
        ge=1,
        description="Distinct approvers a production release needs. Above 1 only "
        "authenticated approvals count (GitHub comments, or the UI behind an authenticating "
        "proxy when ROBOTICS_CD_UI_AUTHENTICATED=1).",
    )
    remind_after: Duration | None = Field(
        default=None,
        description="Send a chat reminder for each such interval a release waits for "
        "approval (null: no reminders).",
    )
    github: dict[GitHubLogin, Name] = Field(
        default_factory=dict,
        description="GitHub logins allowed to approve by comment, each mapped to the "
        "approver (of `approvers`) it stands for. The login also needs write permission on "
        "the repository.",
    )

    def approver_for(self, login: str) -> str | None:
        """The approver a GitHub login stands for (logins compare case-insensitively)."""
        for known, approver in self.github.items():
            if known.lower() == login.lower():
                return approver
        return None


class EnvironmentTarget(Strict):
    path: RelPath = Field(description="Overlay folder in the manifests repo.")
    argocd_app: Name = Field(description="Argo CD Application of this service and environment.")
    namespace: Name
    host: str = Field(description="Ingress host of the service in this environment.")
    endpoint: str | None = Field(
        default=None,
        description="Where the ingress answers (e.g. a load balancer URL); requests carry "
        "the Host header. Defaults to https://<host>.",
    )

    @property
    def base_url(self) -> str:
        return self.endpoint or f"https://{self.host}"


class Traffic(Strict):
    """How requests reach the service, and so how a canary step moves them."""

    router: Router = Field(
        default="ingress-nginx",
        description="ingress-nginx: a canary Ingress with canary-weight; gateway-api: an "
        "HTTPRoute whose two weighted backendRefs are the stable and canary Services "
        "(metrics as Envoy Gateway exports them). See docs/traffic-routers.md.",
    )
    gateway: Name | None = Field(
        default=None,
        description="gateway-api only: the Gateway the HTTPRoute attaches to (default: the "
        "service's name).",
    )

    @model_validator(mode="after")
    def _gateway_only_for_gateway_api(self) -> Traffic:
        if self.gateway is not None and self.router != "gateway-api":
            raise ValueError("gateway is set, but the router is not gateway-api")
        return self


class BuildSpec(Strict):
    context: RelPath = "."
    dockerfile: RelPath = "Dockerfile"


class Checks(Strict):
    lint: list[str] = []
    unit: list[str] = []
    integration: list[str] = []
    image: str = Field(
        default="robotics-cd/check-runner:latest",
        description="Throwaway container image the untrusted check commands run in.",
    )
    network: bool = Field(default=False, description="Give check containers a network.")
    timeout: Duration = Field(default="10m", validate_default=True)
    cpus: float = Field(default=1.0, gt=0, le=64, description="CPU cores of a check container.")
    memory_mb: int = Field(
        default=1024,
        ge=64,
        description="Memory of a check's processes; the tmpfs sizes are added to the limit.",
    )
    workspace_mb: int = Field(
        default=512,
        ge=16,
        description="Size of the writable /workspace (tmpfs); the root filesystem is read-only.",
    )


class Service(Strict):
    repo: str = Field(description="Git remote of the service (URL or path).")
    github: str = Field(description="owner/name of the GitHub repository.")
    branch: str = "main"
    image: ImageRepository = Field(
        description="Repository path, e.g. robotics-serving/api-gateway."
    )
    build: BuildSpec = BuildSpec()
    checks: Checks = Checks()
    environments: dict[Environment, EnvironmentTarget]
    smoke: list[str] = ["/healthz"]
    traffic: Traffic = Traffic()
    metrics: MetricRules = MetricRules()
    canary: CanaryPolicy | None = None
    scan: ScanPolicy | None = None
    approvers: list[Name] = Field(min_length=1)
    approval: ApprovalPolicy | None = None
    depends_on: list[Name] = Field(
        default=[],
        description="Services this one calls: a release train rolls them out before it "
        "and rolls them back after it. An unknown service or a cycle is refused.",
    )
    bundle_smoke: list[str] = Field(
        default=[],
        description="Paths of this service that exercise the services it depends on (e.g. "
        "an endpoint that calls the callee): a release train requests them in staging once "
        "every service of the train is deployed there.",
    )
    freeze: list[FreezeWindow] = Field(
        default_factory=list,
        description="Freeze windows of this service's production (beside the global ones).",
    )

    @model_validator(mode="after")
    def _approval_fits_approvers(self) -> Service:
        if self.approval is not None:
            _check_policy_against(self.approval, self.approvers, "approval")
        return self


class TrainingImage(Strict):
    repo: str
    github: str
    branch: str = "main"
    image: ImageRepository
    build: BuildSpec = BuildSpec()
    paths: list[str] = ["src/**", "configs/**", "Dockerfile", "requirements.txt"]
    namespace: Name = "training"
    notify: list[str] = []
    scan: ScanPolicy | None = None
    api: Api = Field(
        default="pytorchjob",
        description="Job API of a train run: pytorchjob (Training Operator v1) or trainjob "
        "(Kubeflow Trainer v2); a run may choose the other.",
    )
    runtime: Name = Field(
        default=DEFAULT_RUNTIME,
        description="ClusterTrainingRuntime of a TrainJob (api trainjob).",
    )


class Defaults(Strict):
    push_registry: RegistryHost
    pull_registry: RegistryHost
    manifests_repo: str
    manifests_branch: str = "main"
    manifests_github: str = "robotics/robotics-k8s-manifests"
    scan: ScanPolicy = ScanPolicy()
    canary: CanaryPolicy = CanaryPolicy()
    approval: ApprovalPolicy = ApprovalPolicy()


def _check_policy_against(policy: ApprovalPolicy, approvers: list[str], where: str) -> None:
    unknown = sorted({a for a in policy.github.values() if a not in approvers})
    if unknown:
        raise ValueError(
            f"{where}.github maps logins to {', '.join(unknown)}, who are not in approvers "
            f"({', '.join(approvers)})"
        )
    if policy.required > len(set(approvers)):
        raise ValueError(
            f"{where}.required is {policy.required} but only {len(set(approvers))} "
            f"approver(s) are listed ({', '.join(approvers)}): the quorum could never be met"
        )


class Catalog(Strict):
    defaults: Defaults
    freeze: list[FreezeWindow] = Field(
        default_factory=list,
        description="Freeze windows of every service's production (global).",
    )
    services: dict[Name, Service] = {}
    training: dict[Name, TrainingImage] = {}
    limits: dict[Name, NamespaceLimits] = Field(
        default_factory=dict,
        description="Per-namespace limits of a training run (key: the namespace).",
    )

    @model_validator(mode="after")
    def _dependencies_known_and_acyclic(self) -> Catalog:
        """``depends_on`` names services of the catalog and has no cycle: refused at load,
        before any release train can write anything."""
        graph = self.dependency_graph()
        unknown = unknown_dependencies(graph)
        if unknown:
            svc, dep = unknown[0]
            raise ValueError(
                f"service {svc!r} depends on {dep!r}, which is not a service of the catalog"
            )
        cycle = find_cycle(graph)
        if cycle:
            raise ValueError(f"dependency cycle in depends_on: {describe_cycle(cycle)}")
        return self

    def dependency_graph(self) -> dict[str, list[str]]:
        """Each service and the services it depends on."""
        return {name: list(svc.depends_on) for name, svc in self.services.items()}

    @model_validator(mode="after")
    def _one_router_per_host(self) -> Catalog:
        """A host is served by one router in an environment: its DNS name resolves to one
        load balancer, ingress-nginx's or the Gateway's, so a host split between them
        would leave one router's routes without traffic (or split it by DNS, unmeasured)."""
        seen: dict[tuple[str, str], tuple[str, str]] = {}
        for name, svc in self.services.items():
            for env, target in svc.environments.items():
                key = (env, target.host.lower())
                other = seen.setdefault(key, (name, svc.traffic.router))
                if other[1] != svc.traffic.router:
                    raise ValueError(
                        f"host {target.host!r} in {env} is given to both routers: "
                        f"{other[0]} uses {other[1]}, {name} uses {svc.traffic.router}. "
                        "A host resolves to one load balancer, so one router would get no "
                        "traffic; put both services on one router, or give them different "
                        "hosts (docs/traffic-routers.md: moving a service between routers)"
                    )
        return self

    @model_validator(mode="after")
    def _default_approval_fits(self) -> Catalog:
        for name, svc in self.services.items():
            if svc.approval is None:
                try:
                    _check_policy_against(
                        self.defaults.approval, svc.approvers, "defaults.approval"
                    )
                except ValueError as exc:
                    raise ValueError(f"service {name!r}: {exc}") from None
        return self

    def freeze_windows(self, name: str) -> list[tuple[str, FreezeWindow]]:
        """Every window that freezes ``name``'s production: global ones, then its own."""
        own = self.service(name).freeze
        return [("global", w) for w in self.freeze] + [(name, w) for w in own]

    def service(self, name: str) -> Service:
        try:
            return self.services[name]
        except KeyError:
            known = ", ".join(sorted(self.services)) or "none"
            raise InvalidInput(f"unknown service {name!r} (catalog has: {known})") from None

    def training_image(self, name: str) -> TrainingImage:
        try:
            return self.training[name]
        except KeyError:
            known = ", ".join(sorted(self.training)) or "none"
            raise InvalidInput(f"unknown training image {name!r} (catalog has: {known})") from None

    def canary_policy(self, name: str) -> CanaryPolicy:
        return self.service(name).canary or self.defaults.canary

    def scan_policy(self, name: str) -> ScanPolicy:
        entry = self.services.get(name) or self.training.get(name)
        return (entry.scan if entry else None) or self.defaults.scan

    def approval_policy(self, name: str) -> ApprovalPolicy:
        return self.service(name).approval or self.defaults.approval

    def by_github(self, full_name: str) -> tuple[str, Service | TrainingImage] | None:
        for name, svc in self.services.items():
            if svc.github.lower() == full_name.lower():
                return name, svc
        for name, img in self.training.items():
            if img.github.lower() == full_name.lower():
                return name, img
        return None


# --- loading -----------------------------------------------------------------------------

_VAR = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(?::-([^}]*))?\}")


class _DuplicateKey(Exception):
    def __init__(self, key: str, path: tuple[str, ...]):
        super().__init__(key)
        self.key, self.path = key, path


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate mapping keys instead of keeping the last."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
        if key in seen:
            raise _DuplicateKey(str(key), ())
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _duplicate_path(node: yaml.Node, path: tuple[str, ...] = ()) -> tuple[str, ...] | None:
    """Where the first duplicate mapping key is (e.g. services.api, or services.api.repo)."""
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key in seen:
                return (*path, key)
            seen.add(key)
            found = _duplicate_path(value_node, (*path, key))
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found = _duplicate_path(item, (*path, str(i)))
            if found:
                return found
    return None


def _duplicate_error(text: str, key: str, file: str) -> CatalogError:
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    path = (_duplicate_path(root) if root is not None else None) or (key,)
    if len(path) >= 2 and path[0] in ("services", "training"):
        kind = "service" if path[0] == "services" else "training image"
        if len(path) == 2:
            return CatalogError(
                f"duplicate {kind} {path[1]!r}", file=file, service=path[1], field=path[0]
            )
        return CatalogError(
            f"duplicate key {key!r}", file=file, service=path[1], field=".".join(path[2:])
        )
    return CatalogError(f"duplicate key {key!r}", file=file, field=".".join(path))


def _expand(value: Any, env: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        expanded = _VAR.sub(lambda m: env.get(m.group(1), m.group(2) or ""), value)
        if _VAR.fullmatch(value) and expanded.startswith("["):
            # A whole value from the environment may be a YAML list: steps: ${STEPS:-[10, 50]}
            try:
                return yaml.safe_load(expanded)
            except yaml.YAMLError:
                return expanded
        return expanded
    if isinstance(value, list):
        return [_expand(v, env) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v, env) for k, v in value.items()}
    return value


def _inherit_canary_defaults(raw: dict[str, Any]) -> None:
    """A service's ``canary:`` overrides only the keys it names; the rest come from defaults."""
    defaults = raw.get("defaults", {})
    base = defaults.get("canary", {}) if isinstance(defaults, dict) else {}
    for svc in (raw.get("services") or {}).values():
        if isinstance(svc, dict) and isinstance(svc.get("canary"), dict) and isinstance(base, dict):
            svc["canary"] = {**base, **svc["canary"]}


def parse_catalog(
    text: str, *, file: str = "services.yaml", env: Mapping[str, str] | None = None
) -> Catalog:
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as exc:
        raise _duplicate_error(text, exc.key, file) from None
    except yaml.YAMLError as exc:
        raise CatalogError(f"not valid YAML: {exc}", file=file) from None
    if not isinstance(raw, dict):
        raise CatalogError("must be a mapping with 'defaults' and 'services'", file=file)
    raw = _expand(raw, os.environ if env is None else env)
    _inherit_canary_defaults(raw)
    try:
        return Catalog.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(p) for p in first["loc"]]
        service = loc[1] if len(loc) > 1 and loc[0] in ("services", "training") else ""
        field = ".".join(loc[2:] if service else loc)
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            message = f"unknown key {loc[-1]!r}"
        raise CatalogError(message, file=file, service=service, field=field) from None


def default_catalog_path() -> Path:
    return Path(
        os.environ.get("ROBOTICS_CD_CATALOG", Path(__file__).parent.parent / "services.yaml")
    )


def load_catalog(path: str | Path | None = None) -> Catalog:
    file = Path(path) if path else default_catalog_path()
    try:
        text = file.read_text()
    except OSError as exc:
        raise CatalogError(f"cannot read: {exc.strerror}", file=str(file)) from None
    return parse_catalog(text, file=str(file))
