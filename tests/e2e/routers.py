"""The release e2e through either traffic router (issue 23).

``use_router(sandbox, "gateway-api", work)`` moves the sample service (api-gateway) from
ingress-nginx to the Gateway API the way docs/traffic-routers.md says: a manifests commit that
swaps the Ingresses for a Gateway and an HTTPRoute (weighted backendRefs, a header rule, a
track filter per backendRef), production synced with prune, and a catalog that says
``traffic.router: gateway-api`` (``ROBOTICS_CD_CATALOG``). The returned undo restores both.

``ROUTERS``: the routers the release scenarios run on. CI runs ingress-nginx for every
scenario (tests/e2e/test_release.py) and promote + rollback on gateway-api
(tests/e2e/test_release_gateway.py); ``ROBOTICS_CD_FULL_MATRIX=1`` runs every scenario on both.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.e2e.releases import ROOT
from tests.matrix import FULL_MATRIX

ROUTERS = ["ingress-nginx", "gateway-api"] if FULL_MATRIX else ["ingress-nginx"]
SERVICE = "api-gateway"
HOST = "api.robotics.local"
PORT = 8000
SERVING = f"serving/{SERVICE}"


def _track(track: str, indent: str) -> str:
    return (
        f"{indent}filters:  # one per backendRef: Envoy Gateway gives each track its own cluster\n"
        f"{indent}- type: RequestHeaderModifier\n"
        f"{indent}  requestHeaderModifier:\n"
        f"{indent}    set: [{{name: x-robotics-track, value: {track}}}]\n"
    )


def _rules(service: str, port: int, stable_weight: int, canary_weight: int) -> str:
    i = "      "
    return (
        "  rules:\n"
        "  # rule 0: every request, split by weight between the tracks (stable first)\n"
        "  - matches:\n"
        "    - path: {type: PathPrefix, value: /}\n"
        "    backendRefs:\n"
        f"    - name: {service}\n"
        f"      port: {port}\n"
        f"      weight: {stable_weight}\n" + _track("stable", i) + f"    - name: {service}-canary\n"
        f"      port: {port}\n"
        f"      weight: {canary_weight}\n"
        + _track("canary", i)
        + '  # rule 1: "x-canary: always" reaches the canary at any weight\n'
        "  - matches:\n"
        "    - path: {type: PathPrefix, value: /}\n"
        "      headers: [{name: x-canary, value: always}]\n"
        "    backendRefs:\n"
        f"    - name: {service}-canary\n"
        f"      port: {port}\n" + _track("canary", i)
    )


def gateway_files(
    service: str = SERVICE, host: str = HOST, port: int = PORT, *, load_rps: int = 20
) -> dict[str, str]:
    """The gateway-api layout of a service's manifests (see docs/traffic-routers.md)."""
    serving = f"serving/{service}"
    route_head = (
        f"apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: {service}\n"
    )
    return {
        f"{serving}/base/gateway.yaml": (
            "# The Gateway of the service (Envoy Gateway's class eg); its address is the\n"
            "# load balancer the host's DNS name points at.\n"
            "apiVersion: gateway.networking.k8s.io/v1\n"
            "kind: Gateway\n"
            "metadata:\n"
            f"  name: {service}\n"
            "spec:\n"
            "  gatewayClassName: eg\n"
            "  listeners:\n"
            "  - name: http\n"
            "    protocol: HTTP\n"
            "    port: 80\n"
        ),
        f"{serving}/base/httproute.yaml": (
            route_head + "  annotations:\n"
            "    # Read by the sandbox only: requests per second of synthetic traffic.\n"
            f'    sandbox.robotics.dev/load: "{load_rps}"\n'
            "spec:\n"
            f"  parentRefs:\n  - name: {service}\n"
            f"  hostnames:\n  - {host}\n"
            "  rules:\n"
            "  - matches:\n"
            "    - path: {type: PathPrefix, value: /}\n"
            "    backendRefs:\n"
            f"    - name: {service}\n"
            f"      port: {port}\n" + _track("stable", "      ")
        ),
        f"{serving}/canary/httproute.yaml": (
            "# The canary's share of the route: at rest stable 100, canary 0.\n"
            + route_head
            + "spec:\n"
            + _rules(service, port, 100, 0)
        ),
        f"{serving}/canary/kustomization.yaml": (
            "# The canary track, a kustomize Component included by the production overlay:\n"
            "# its Deployment and Service, and the HTTPRoute's weighted rules.\n"
            "apiVersion: kustomize.config.k8s.io/v1alpha1\n"
            "kind: Component\n"
            "resources:\n- deployment.yaml\n- service.yaml\n"
            "patches:\n- path: httproute.yaml\n"
        ),
        f"{serving}/overlays/production/canary.yaml": (
            "# Written by the release flow: canary replicas and the two weights of rule 0.\n"
            "# The rules are spelled out whole: a patch replaces a custom resource's lists.\n"
            "apiVersion: apps/v1\n"
            "kind: Deployment\n"
            "metadata:\n"
            f"  name: {service}-canary\n"
            "spec:\n"
            "  replicas: 0\n"
            "---\n" + route_head + "spec:\n" + _rules(service, port, 100, 0)
        ),
    }


def _catalog(router: str, dest: Path) -> Path:
    text = (ROOT / "services.yaml").read_text()
    marker = "    smoke: [/healthz, /v1/status]\n"
    assert marker in text, "services.yaml changed: update tests/e2e/routers.py"
    dest.write_text(text.replace(marker, marker + f"    traffic: {{router: {router}}}\n", 1))
    return dest


def _kubectl(sandbox: Any, *args: str) -> str:
    return subprocess.run(
        [
            str(Path(sys.executable).parent / "kubectl"),
            "--kubeconfig",
            str(sandbox.kubeconfig),
            *args,
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout


def live_weights(sandbox: Any, service: str) -> dict[str, int]:
    """The weights of the production HTTPRoute's rule 0, as the cluster has them."""
    import json

    route = json.loads(
        _kubectl(sandbox, "get", "httproute", service, "-n", "production", "-o", "json")
    )
    return {r["name"]: r.get("weight", 1) for r in route["spec"]["rules"][0]["backendRefs"]}


def _sync_production(sandbox: Any, revision: str) -> None:
    """As a person would after the migration commit: sync with prune (the old router's
    objects go), then wait for what ``argocd app wait`` checks."""
    with sandbox.argocd() as client:
        client.get(f"/api/v1/applications/{SERVICE}-production", params={"refresh": "hard"})
        response = client.post(
            f"/api/v1/applications/{SERVICE}-production/sync",
            json={"revision": revision, "prune": True},
        )
        response.raise_for_status()
    sandbox.wait_synced(f"{SERVICE}-production", revision, timeout=180)
    sandbox.app(f"{SERVICE}-staging", refresh=True)
    sandbox.wait_synced(f"{SERVICE}-staging", revision, timeout=180)


def _routes_accepted(sandbox: Any) -> bool:
    import json

    for ns in ("staging", "production"):
        route = json.loads(_kubectl(sandbox, "get", "httproute", SERVICE, "-n", ns, "-o", "json"))
        parents = (route.get("status") or {}).get("parents") or []
        conds = {c["type"]: c["status"] for p in parents for c in p["conditions"]}
        if conds != {"Accepted": "True", "ResolvedRefs": "True"}:
            return False
    return True


def use_router(sandbox: Any, router: str, work: Path) -> tuple[dict[str, str], Callable[[], None]]:
    """Put the sample service on ``router``; return (env additions, undo)."""
    if router == "ingress-nginx":
        return {}, lambda: None
    clone = sandbox.clone("robotics-k8s-manifests", work / "manifests")
    base = clone / SERVING / "base" / "kustomization.yaml"
    files = gateway_files()
    files[str(base.relative_to(clone))] = base.read_text().replace(
        "- ingress.yaml\n", "- gateway.yaml\n- httproute.yaml\n"
    )
    for gone in ("base/ingress.yaml", "canary/ingress.yaml"):
        (clone / SERVING / gone).unlink()
    moved = sandbox.commit_and_push(
        clone, f"{SERVICE}: move from ingress-nginx to the Gateway API (e2e)", files
    )
    _sync_production(sandbox, moved)
    deadline = time.monotonic() + 60
    while not _routes_accepted(sandbox):
        assert time.monotonic() < deadline, "HTTPRoutes not Accepted/ResolvedRefs in 60 s"
        time.sleep(1)
    catalog = _catalog(router, work / "services.yaml")

    def undo() -> None:
        sandbox.git("pull", "-q", "--rebase", "origin", "main", cwd=clone)
        sandbox.git("revert", "--no-edit", moved, cwd=clone)
        sandbox.git("push", "-q", "origin", "HEAD:main", cwd=clone)
        _sync_production(sandbox, sandbox.git("rev-parse", "HEAD", cwd=clone))

    return {"ROBOTICS_CD_CATALOG": str(catalog)}, undo
