"""Pure rules of the twin's runtime: canary choice as ingress-nginx makes it, route matching,
rolling-update arithmetic, and the HTTP fault middleware."""

from __future__ import annotations

import itertools
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route as StarletteRoute

from sandbox.faults import FaultInjector, FaultRegistry, HttpFault
from sandbox.runtime.objects import int_or_percent, quantity
from sandbox.runtime.router import build_routes, choose_canary


def _ingress(name: str, host: str, path: str, svc: str, **annotations: str) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "annotations": {
                f"nginx.ingress.kubernetes.io/{k.replace('_', '-')}": v
                for k, v in annotations.items()
            },
        },
        "spec": {
            "rules": [
                {
                    "host": host,
                    "http": {
                        "paths": [
                            {
                                "path": path,
                                "pathType": "Prefix",
                                "backend": {"service": {"name": svc, "port": {"number": 80}}},
                            }
                        ]
                    },
                }
            ]
        },
    }


def test_canary_joins_the_main_route_and_a_lone_canary_is_ignored() -> None:
    routes = build_routes(
        [
            _ingress("api", "api.test", "/", "api"),
            _ingress(
                "api-canary", "api.test", "/", "api-canary", canary="true", canary_weight="10"
            ),
            _ingress("orphan-canary", "other.test", "/", "x", canary="true", canary_weight="50"),
        ]
    )
    assert len(routes) == 1
    (route,) = routes
    assert route.main is not None and route.main.service == "api"
    assert route.canary is not None and route.canary.service == "api-canary"


def test_canary_precedence_header_then_cookie_then_weight() -> None:
    (route,) = build_routes(
        [
            _ingress("a", "h", "/", "a"),
            _ingress(
                "c",
                "h",
                "/",
                "c",
                canary="true",
                canary_weight="0",
                canary_by_header="X-Canary",
                canary_by_cookie="canary",
            ),
        ]
    )
    never = lambda: 0.99  # noqa: E731 - a weight roll that never picks the canary
    assert choose_canary(route, {"x-canary": "always"}, never)
    assert not choose_canary(route, {"x-canary": "never", "cookie": "canary=always"}, never)
    assert choose_canary(route, {"cookie": "canary=always"}, never)
    assert not choose_canary(route, {}, never)
    route.canary_annotations["canary-by-header-value"] = "blue"
    assert choose_canary(route, {"x-canary": "blue"}, never)
    assert not choose_canary(route, {"x-canary": "always"}, never)


def test_canary_weight_is_a_share_of_the_weight_total() -> None:
    (route,) = build_routes(
        [
            _ingress("a", "h", "/", "a"),
            _ingress(
                "c", "h", "/", "c", canary="true", canary_weight="20", canary_weight_total="200"
            ),
        ]
    )
    rolls = itertools.cycle(i / 100 for i in range(100))
    picked = sum(choose_canary(route, {}, lambda: next(rolls)) for _ in range(100))
    assert picked == 10


def test_prefix_paths_match_by_element_and_longest_wins() -> None:
    routes = build_routes([_ingress("root", "h", "/", "root"), _ingress("api", "h", "/api", "api")])
    by_path = {r.path: r for r in routes}
    assert by_path["/api"].matches_path("/api/v1")
    assert not by_path["/api"].matches_path("/apix")
    assert by_path["/"].matches_path("/anything")


@pytest.mark.parametrize(
    ("value", "total", "up", "expected"),
    [
        ("25%", 4, True, 1),
        ("25%", 2, True, 1),
        ("25%", 2, False, 0),
        (2, 5, False, 2),
        ("50%", 5, False, 2),
    ],
)
def test_surge_and_unavailable_rounding(value: Any, total: int, up: bool, expected: int) -> None:
    assert int_or_percent(value, total, round_up=up) == expected


def test_quantities() -> None:
    assert quantity("500m") == 0.5
    assert quantity("64Mi") == 64 * 1024 * 1024
    assert quantity(2) == 2.0
    with pytest.raises(ValueError, match="quantity"):
        quantity("lots")


async def test_fault_injector_answers_then_disarms() -> None:
    registry = FaultRegistry()

    async def hello(request: Any) -> PlainTextResponse:
        return PlainTextResponse("hello")

    app = FaultInjector(
        Starlette(routes=[StarletteRoute("/api/x", hello)]), target="argocd", registry=registry
    )
    registry.add_http(HttpFault(target="argocd", path_prefix="/api", status=503, count=2))
    registry.add_http(HttpFault(target="github", path_prefix="/", status=500))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    ) as client:
        codes = [(await client.get("/api/x")).status_code for _ in range(3)]
    assert codes == [503, 503, 200]
    assert [f.target for f in registry.http] == ["github"]


def test_fault_without_effect_is_refused() -> None:
    with pytest.raises(ValueError, match="status"):
        FaultRegistry().add_http(HttpFault(target="argocd"))
