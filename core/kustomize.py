"""Kustomization edits and rendered-manifest comparisons, as pure text-in/text-out rules.

The release writes a few fields of an overlay and nothing else (see the manifests repo's
README): an ``images:`` entry of ``kustomization.yaml`` and the canary replicas and weight of
``canary.yaml``. The weight lives where the service's traffic router reads it: the canary
Ingress's ``canary-weight`` annotation (ingress-nginx) or the ``weight`` of the two
``backendRefs`` of the service's ``HTTPRoute`` (Gateway API); ``canary.yaml`` itself says
which, so the callers need not. Edits are ruamel.yaml round-trips, so comments, key order and the rest of
the file stay as people wrote them. :func:`diff_manifests` compares two renderings (``kubectl
kustomize`` output before and after an edit) field by field, so the caller can refuse an edit
that changed more than it meant to.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError as RuamelYAMLError
from ruamel.yaml.scalarstring import DoubleQuotedScalarString

from core.errors import InvalidInput
from core.images import validate_digest, validate_tag

CANARY_WEIGHT_ANNOTATION = "nginx.ingress.kubernetes.io/canary-weight"
CANARY_HEADER = "# Written by the release flow: canary replicas and traffic weight.\n"
GATEWAY_API_VERSION = "gateway.networking.k8s.io/v1"

# --- images: entries ----------------------------------------------------------------------


@dataclass(frozen=True)
class ImageEntry:
    """One ``images:`` entry: which image ``name`` the containers use, and what replaces it."""

    name: str
    new_name: str | None = None
    new_tag: str | None = None
    digest: str | None = None

    @property
    def reference(self) -> str:
        """The image the containers end up with (``newName:newTag@digest``)."""
        ref = self.new_name or self.name
        if self.new_tag:
            ref += f":{self.new_tag}"
        if self.digest:
            ref += f"@{self.digest}"
        return ref


def _yaml(text: str) -> YAML:
    """A round-trip YAML that writes sequences the way ``text`` indents them."""
    rt = YAML(typ="rt")
    rt.preserve_quotes = True
    rt.width = 4096  # never fold long lines (image references, scripts)
    offset = 0
    match = re.search(r"^[A-Za-z_][\w.-]*:\s*\n( *)- ", text, re.MULTILINE)
    if match:
        offset = len(match.group(1))
    rt.indent(mapping=2, sequence=offset + 2, offset=offset)
    return rt


def _load(text: str, what: str) -> Any:
    try:
        return _yaml(text).load(text)
    except RuamelYAMLError as exc:
        raise InvalidInput(f"{what} is not valid YAML: {exc}") from exc


def _dump(rt: YAML, data: Any) -> str:
    out = io.StringIO()
    rt.dump(data, out)
    return out.getvalue()


def _needs_quotes(value: str) -> bool:
    """True when a plain scalar would read back as a number, bool or null (as kustomize does)."""
    return not isinstance(yaml.safe_load(value), str)


def _scalar(value: str) -> str:
    return DoubleQuotedScalarString(value) if _needs_quotes(value) else value


def _kustomization(text: str) -> CommentedMap:
    data = _load(text, "kustomization.yaml")
    if not isinstance(data, CommentedMap):
        raise InvalidInput("kustomization.yaml must be a mapping")
    return data


def read_images(text: str) -> list[ImageEntry]:
    """The ``images:`` entries of a kustomization.yaml text."""
    data = _kustomization(text)
    entries = data.get("images") or []
    if not isinstance(entries, list):
        raise InvalidInput("kustomization.yaml 'images' must be a list")
    result = []
    for item in entries:
        if not isinstance(item, Mapping) or "name" not in item:
            raise InvalidInput(f"kustomization.yaml images entry without a name: {item!r}")
        result.append(
            ImageEntry(
                name=str(item["name"]),
                new_name=_opt_str(item.get("newName")),
                new_tag=_opt_str(item.get("newTag")),
                digest=_opt_str(item.get("digest")),
            )
        )
    return result


def _opt_str(value: object) -> str | None:
    return None if value is None else str(value)


def find_image(text: str, name: str) -> ImageEntry | None:
    return next((e for e in read_images(text) if e.name == name), None)


def set_image(text: str, entry: ImageEntry) -> str:
    """``kustomize edit set image`` on a kustomization.yaml text.

    The entry for ``entry.name`` is replaced whole (or added), entries are sorted by name,
    tags that would read as numbers are quoted; every other line stays as it was.
    """
    if entry.new_tag is not None:
        validate_tag(entry.new_tag)
    if entry.digest is not None:
        validate_digest(entry.digest)
    rt = _yaml(text)
    data = _kustomization(text)
    old = data.get("images")
    if old is not None and not isinstance(old, list):
        raise InvalidInput("kustomization.yaml 'images' must be a list")
    items: list[Any] = list(old or [])
    current = next(
        (i for i in items if isinstance(i, CommentedMap) and i.get("name") == entry.name), None
    )
    if current is None:
        current = CommentedMap()
        items.append(current)
    _fill_entry(current, entry)
    items.sort(key=lambda i: str(i.get("name", "")) if isinstance(i, Mapping) else "")
    if isinstance(old, CommentedSeq):
        # Keep the sequence object (and the comments attached to it); refill it in order.
        old[:] = items
    else:
        seq = CommentedSeq(items)
        data["images"] = seq
    return _dump(rt, data)


def _fill_entry(target: CommentedMap, entry: ImageEntry) -> None:
    """Replace the entry's fields in place (the map keeps the comments attached to it)."""
    for key in list(target):
        del target[key]
    target["name"] = entry.name
    if entry.new_name:
        target["newName"] = entry.new_name
    if entry.new_tag:
        target["newTag"] = _scalar(entry.new_tag)
    if entry.digest:
        target["digest"] = entry.digest


# --- canary.yaml --------------------------------------------------------------------------


@dataclass(frozen=True)
class CanarySettings:
    replicas: int
    weight: int

    def __post_init__(self) -> None:
        if self.replicas < 0:
            raise InvalidInput(f"canary replicas must be >= 0, got {self.replicas}")
        if not 0 <= self.weight <= 100:
            raise InvalidInput(f"canary weight must be within 0..100, got {self.weight}")


def render_canary(service: str, settings: CanarySettings, *, previous: str | None = None) -> str:
    """The ``canary.yaml`` patch for ``service``; keeps the header comment of ``previous``.

    When ``previous`` routes through an ``HTTPRoute`` (Gateway API), only the replicas and
    the two ``weight`` values change, in place: the rules, matches and filters people wrote
    stay as they are (see :func:`set_route_weights`).
    """
    if previous and _route_docs(previous, service):
        return _render_gateway_canary(service, settings, previous)
    header = CANARY_HEADER
    if previous:
        lines = []
        for line in previous.splitlines(keepends=True):
            if not line.startswith("#"):
                break
            lines.append(line)
        header = "".join(lines) or CANARY_HEADER
    return (
        header
        + "apiVersion: apps/v1\n"
        + "kind: Deployment\n"
        + "metadata:\n"
        + f"  name: {service}-canary\n"
        + "spec:\n"
        + f"  replicas: {settings.replicas}\n"
        + "---\n"
        + "apiVersion: networking.k8s.io/v1\n"
        + "kind: Ingress\n"
        + "metadata:\n"
        + f"  name: {service}-canary\n"
        + "  annotations:\n"
        + f'    {CANARY_WEIGHT_ANNOTATION}: "{settings.weight}"\n'
    )


def parse_canary(text: str, service: str) -> CanarySettings:
    """Read canary replicas and weight for ``service`` from a ``canary.yaml`` text.

    The weight is the canary's percent of traffic: the ingress-nginx annotation, or for an
    ``HTTPRoute`` ``<service>`` the canary backend's share of the weighted rule.
    """
    try:
        docs = [d for d in yaml.safe_load_all(text) if d]
    except yaml.YAMLError as exc:
        raise InvalidInput(f"canary.yaml is not valid YAML: {exc}") from exc
    replicas: int | None = None
    weight: int | None = None
    for doc in docs:
        if not isinstance(doc, dict):
            continue
        name = (doc.get("metadata") or {}).get("name")
        if doc.get("kind") == "HTTPRoute" and name == service:
            weight = route_weight(doc, service)
            continue
        if name != f"{service}-canary":
            continue
        if doc.get("kind") == "Deployment":
            replicas = int(doc.get("spec", {}).get("replicas", 0))
        elif doc.get("kind") == "Ingress":
            raw = (doc.get("metadata", {}).get("annotations") or {}).get(CANARY_WEIGHT_ANNOTATION)
            weight = int(raw) if raw is not None else None
    if replicas is None or weight is None:
        raise InvalidInput(
            f"canary.yaml holds no {service}-canary Deployment replicas and no traffic weight "
            f"(Ingress {service}-canary {CANARY_WEIGHT_ANNOTATION}, or HTTPRoute {service} "
            "with weighted backendRefs to both tracks); restore it from the manifests repo's "
            "seed layout"
        )
    return CanarySettings(replicas=replicas, weight=weight)


# --- Gateway API: the weighted HTTPRoute ------------------------------------------------------


def _route_docs(text: str, service: str) -> list[dict[str, Any]]:
    try:
        docs = [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]
    except yaml.YAMLError as exc:
        raise InvalidInput(f"canary.yaml is not valid YAML: {exc}") from exc
    return [
        d
        for d in docs
        if d.get("kind") == "HTTPRoute" and (d.get("metadata") or {}).get("name") == service
    ]


def weighted_rule(route: Mapping[str, Any], service: str) -> int:
    """Index of the rule that splits ``service``'s traffic: the first whose backendRefs name
    both ``<service>`` and ``<service>-canary``."""
    rules = (route.get("spec") or {}).get("rules") or []
    for index, rule in enumerate(rules):
        names = [str(b.get("name")) for b in (rule or {}).get("backendRefs") or []]
        if service in names and f"{service}-canary" in names:
            return index
    raise InvalidInput(
        f"HTTPRoute {service} has no rule with backendRefs to both {service} and "
        f"{service}-canary; a canary step edits the weights of that rule"
    )


def route_weight(route: Mapping[str, Any], service: str) -> int:
    """The canary's percent of the weighted rule (weights need not add up to 100)."""
    rule = (route.get("spec") or {})["rules"][weighted_rule(route, service)]
    weights: dict[str, int] = {}
    for ref in rule.get("backendRefs") or []:
        raw = ref.get("weight", 1)  # Gateway API's default weight is 1
        try:
            weights[str(ref.get("name"))] = int(raw)
        except (TypeError, ValueError):
            raise InvalidInput(f"HTTPRoute {service}: weight {raw!r} is not a number") from None
    stable, canary = weights[service], weights[f"{service}-canary"]
    if stable < 0 or canary < 0:
        raise InvalidInput(f"HTTPRoute {service}: weights must be >= 0")
    total = stable + canary
    return 0 if total == 0 else round(100 * canary / total)


def set_route_weights(text: str, service: str, weight: int) -> str:
    """Give ``<service>-canary`` ``weight`` and ``<service>`` ``100 - weight`` in the weighted
    rule of the ``HTTPRoute`` ``service`` in a multi-document YAML text; nothing else moves."""
    if not 0 <= weight <= 100:
        raise InvalidInput(f"canary weight must be within 0..100, got {weight}")
    return _edit_docs(text, service, weight=weight, replicas=None)


def _render_gateway_canary(service: str, settings: CanarySettings, previous: str) -> str:
    return _edit_docs(previous, service, weight=settings.weight, replicas=settings.replicas)


def _edit_docs(text: str, service: str, *, weight: int, replicas: int | None) -> str:
    rt = _yaml(text)
    try:
        docs = list(rt.load_all(text))
    except RuamelYAMLError as exc:
        raise InvalidInput(f"canary.yaml is not valid YAML: {exc}") from exc
    found = False
    for doc in docs:
        if not isinstance(doc, CommentedMap):
            continue
        name = (doc.get("metadata") or {}).get("name")
        if doc.get("kind") == "HTTPRoute" and name == service:
            rule = doc["spec"]["rules"][weighted_rule(doc, service)]
            for ref in rule["backendRefs"]:
                if ref.get("name") == service:
                    ref["weight"] = 100 - weight
                elif ref.get("name") == f"{service}-canary":
                    ref["weight"] = weight
            found = True
        elif (
            doc.get("kind") == "Deployment" and name == f"{service}-canary" and replicas is not None
        ):
            doc.setdefault("spec", CommentedMap())["replicas"] = replicas
    if not found:
        raise InvalidInput(f"canary.yaml holds no HTTPRoute {service}")
    out = io.StringIO()
    rt.dump_all(docs, out)
    return out.getvalue()


# --- comparing renderings -----------------------------------------------------------------

Path = tuple[str, ...]


class _Any:
    def __repr__(self) -> str:
        return "ANY"


ANY: Any = _Any()


@dataclass(frozen=True)
class FieldChange:
    """One leaf that differs between two renderings. ``before``/``after`` None: absent."""

    resource: str  # Kind/namespace/name
    path: Path
    before: Any
    after: Any

    def __str__(self) -> str:
        where = ".".join(self.path) or "(whole resource)"
        return f"{self.resource} {where}: {self.before!r} -> {self.after!r}"


@dataclass(frozen=True)
class FieldPattern:
    """Which changes an edit means to make: ``*`` matches any one kind, name or path element."""

    kind: str
    name: str
    path: Path
    after: Any = ANY  # when set, the change must also end with exactly this value

    def matches(self, change: FieldChange) -> bool:
        kind, _, rest = change.resource.partition("/")
        name = rest.partition("/")[2]
        if self.kind not in ("*", kind) or self.name not in ("*", name):
            return False
        if self.after is not ANY and change.after != self.after:
            return False
        if len(self.path) != len(change.path):
            return False
        return all(p in ("*", c) for p, c in zip(self.path, change.path, strict=True))


def parse_rendered(text: str) -> list[dict[str, Any]]:
    """The documents of a ``kubectl kustomize`` output."""
    try:
        return [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]
    except yaml.YAMLError as exc:
        raise InvalidInput(f"rendered manifests are not valid YAML: {exc}") from exc


def _resource_key(doc: Mapping[str, Any]) -> str:
    meta = doc.get("metadata") or {}
    return f"{doc.get('kind', '?')}/{meta.get('namespace', '')}/{meta.get('name', '?')}"


def _leaves(value: Any, path: Path) -> Iterator[tuple[Path, Any]]:
    if isinstance(value, Mapping) and value:
        for key, sub in value.items():
            yield from _leaves(sub, (*path, str(key)))
    elif isinstance(value, list) and value:
        for index, sub in enumerate(value):
            yield from _leaves(sub, (*path, str(index)))
    else:
        yield path, value


def diff_manifests(
    before: Sequence[Mapping[str, Any]], after: Sequence[Mapping[str, Any]]
) -> list[FieldChange]:
    """Every leaf field that differs, by resource (added/removed resources as one change)."""
    old = {_resource_key(d): d for d in before}
    new = {_resource_key(d): d for d in after}
    changes: list[FieldChange] = []
    for key in sorted(old.keys() | new.keys()):
        if key not in new:
            changes.append(FieldChange(key, (), "present", None))
        elif key not in old:
            changes.append(FieldChange(key, (), None, "present"))
        else:
            a = dict(_leaves(old[key], ()))
            b = dict(_leaves(new[key], ()))
            for path in sorted(a.keys() | b.keys()):
                if a.get(path) != b.get(path):
                    changes.append(FieldChange(key, path, a.get(path), b.get(path)))
    return changes


def unexpected_changes(
    changes: Iterable[FieldChange], allowed: Iterable[FieldPattern]
) -> list[FieldChange]:
    patterns = list(allowed)
    return [c for c in changes if not any(p.matches(c) for p in patterns)]


def image_fields(kind: str = "*", name: str = "*", *, image: Any = ANY) -> list[FieldPattern]:
    """Container image fields of workloads (pod templates of Deployments, Jobs, CronJobs).

    With ``image``, only changes that end at exactly that reference match.
    """
    prefixes: list[Path] = [
        ("spec", "template", "spec"),
        ("spec", "jobTemplate", "spec", "template", "spec"),
    ]
    return [
        FieldPattern(kind, name, (*prefix, group, "*", "image"), image)
        for prefix in prefixes
        for group in ("containers", "initContainers")
    ]


def canary_fields(service: str, settings: CanarySettings | None = None) -> list[FieldPattern]:
    """The fields a canary step changes: canary replicas and the weight, for either router
    (the canary Ingress's annotation, or the ``weight`` of a backendRef of HTTPRoute
    ``<service>``)."""
    replicas = ANY if settings is None else settings.replicas
    weight = ANY if settings is None else str(settings.weight)
    return [
        FieldPattern("Deployment", f"{service}-canary", ("spec", "replicas"), replicas),
        FieldPattern(
            "Ingress",
            f"{service}-canary",
            ("metadata", "annotations", CANARY_WEIGHT_ANNOTATION),
            weight,
        ),
        FieldPattern("HTTPRoute", service, ("spec", "rules", "*", "backendRefs", "*", "weight")),
    ]


def images_in(docs: Iterable[Mapping[str, Any]]) -> set[str]:
    """Every container image the rendered workloads use."""
    found: set[str] = set()
    for doc in docs:
        for path, value in _leaves(doc, ()):
            if (
                len(path) >= 3
                and path[-1] == "image"
                and path[-3] in ("containers", "initContainers")
            ):
                found.add(str(value))
    return found
