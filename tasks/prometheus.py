"""Prometheus' HTTP API: the client (``/api/v1/query``, ``/api/v1/query_range``), its
credentials (none, basic or bearer, from a Secret block; TLS against a private CA), and the
samples and series it returns. What to ask it, and how to judge the answers, is
:mod:`tasks.metrics`.
"""

from __future__ import annotations

import ipaddress
import json
import math
import ssl
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import httpx
from prefect.blocks.system import Secret
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from core.errors import InvalidInput, MetricsError
from core.settings import get_settings

# --- the client ----------------------------------------------------------------------------


class Sample(BaseModel):
    model_config = ConfigDict(frozen=True)
    labels: dict[str, str]
    value: float


class Series(BaseModel):
    model_config = ConfigDict(frozen=True)
    labels: dict[str, str]
    points: list[tuple[float, float]]


def prom_float(raw: Any) -> float:
    try:
        return float(raw)  # Prometheus sends "NaN", "+Inf", "1.5" as strings
    except (TypeError, ValueError) as exc:
        raise MetricsError(f"Prometheus sent a non-numeric sample value {raw!r}") from exc


def _loopback(url: str) -> bool:
    host = httpx.URL(url).host
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _timestamp(value: datetime | float) -> float:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise InvalidInput(f"time {value.isoformat()} has no timezone; pass an aware datetime")
        return value.timestamp()
    return float(value)


def prometheus_auth(value: Any, *, block: str = "") -> httpx.Auth:
    """Basic or bearer auth from a Secret block's value (never echoed in an error)."""
    if isinstance(value, str) and value:
        return _Bearer(value)
    if isinstance(value, dict):
        if isinstance(value.get("bearer_token"), str) and value["bearer_token"]:
            return _Bearer(value["bearer_token"])
        username, password = value.get("username"), value.get("password")
        if isinstance(username, str) and username and isinstance(password, str):
            return httpx.BasicAuth(username, password)
    raise MetricsError(
        f"Secret block {block!r} must hold {{'username': ..., 'password': ...}} (basic auth) or "
        "{'bearer_token': ...} or the token as a plain string"
    )


class _Bearer(httpx.Auth):
    def __init__(self, token: str) -> None:
        self._token = token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self._token}"
        yield request


class PrometheusClient:
    """A small client of Prometheus' HTTP API (``/api/v1/query``, ``/api/v1/query_range``).

    ``auth`` is basic or bearer (managed services such as Alibaba Cloud ARMS need one); TLS
    is always verified, against ``ca_bundle`` when Prometheus' certificate has a private CA.
    """

    def __init__(
        self,
        *,
        base_url: str,
        timeout: float = 10.0,
        auth: httpx.Auth | None = None,
        ca_bundle: str | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        if (
            auth is not None
            and self.base_url.startswith("http://")
            and not _loopback(self.base_url)
        ):
            raise MetricsError(
                f"refusing to send Prometheus credentials over plain HTTP to {self.base_url}; "
                "use an https:// URL"
            )
        verify: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=ca_bundle) if ca_bundle else True
        )
        self._http = httpx.Client(
            base_url=self.base_url, timeout=timeout, transport=transport, auth=auth, verify=verify
        )

    def __enter__(self) -> PrometheusClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _get(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        try:
            response = self._http.get(path, params=params)
        except httpx.HTTPError as exc:
            raise MetricsError(
                f"Prometheus at {self.base_url} is unreachable ({type(exc).__name__}: {exc}); "
                "check that it runs and that ROBOTICS_CD_PROMETHEUS_URL points at it"
            ) from exc
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code in (401, 403):
            raise MetricsError(
                f"Prometheus at {self.base_url} refused the credentials (HTTP "
                f"{response.status_code}); check the Secret block named by "
                "ROBOTICS_CD_PROMETHEUS_AUTH_BLOCK"
            )
        if not isinstance(body, dict):
            raise MetricsError(
                f"Prometheus at {self.base_url} answered HTTP {response.status_code} "
                f"without a JSON body: {response.text[:200]!r}"
            )
        if body.get("status") != "success":
            kind = body.get("errorType", "unknown")
            raise MetricsError(
                f"Prometheus refused the query ({kind}): {body.get('error', '')} "
                f"[HTTP {response.status_code}; query {params.get('query', '')!r}]"
            )
        data = body.get("data")
        if not isinstance(data, dict):
            raise MetricsError(f"Prometheus answered success without data: {body!r:.200}")
        return data

    def query(self, promql: str, time: datetime | float | None = None) -> list[Sample]:
        """An instant query: a vector (one sample per series) or a scalar (one sample)."""
        params = {"query": promql}
        if time is not None:
            params["time"] = f"{_timestamp(time):.3f}"
        data = self._get("/api/v1/query", params)
        kind, result = data.get("resultType"), data.get("result")
        if kind == "vector" and isinstance(result, list):
            return [
                Sample(labels=dict(item.get("metric", {})), value=prom_float(item["value"][1]))
                for item in result
            ]
        if kind == "scalar" and isinstance(result, list):
            return [Sample(labels={}, value=prom_float(result[1]))]
        raise MetricsError(
            f"expected an instant vector or scalar from {promql!r}, got {kind!r}; "
            "wrap range selectors in rate()/increase()"
        )

    def query_range(
        self, promql: str, start: datetime | float, end: datetime | float, step: float
    ) -> list[Series]:
        params = {
            "query": promql,
            "start": f"{_timestamp(start):.3f}",
            "end": f"{_timestamp(end):.3f}",
            "step": f"{step:g}",
        }
        data = self._get("/api/v1/query_range", params)
        if data.get("resultType") != "matrix" or not isinstance(data.get("result"), list):
            raise MetricsError(f"expected a matrix from {promql!r}, got {data.get('resultType')!r}")
        return [
            Series(
                labels=dict(item.get("metric", {})),
                points=[(float(ts), prom_float(v)) for ts, v in item.get("values", [])],
            )
            for item in data["result"]
        ]

    def scalar(self, promql: str, time: datetime | float | None = None) -> float | None:
        """The single value of an aggregated query; ``None`` when no series (no data)."""
        samples = self.query(promql, time)
        if not samples:
            return None
        if len(samples) > 1:
            raise MetricsError(
                f"query returned {len(samples)} series, expected one; aggregate it (sum/avg): "
                f"{promql!r}"
            )
        value = samples[0].value
        return None if math.isnan(value) else value


class PrometheusCredentials(BaseModel):
    """Where Prometheus is, how to authenticate (none, basic or bearer: what the Secret block
    holds) and the CA of its certificate: the one way the product builds a
    :class:`PrometheusClient` (``get_client``). The secret value is kept as ``SecretStr``."""

    model_config = ConfigDict(frozen=True)
    base_url: str
    auth_block: str = ""
    auth_value: SecretStr | None = Field(
        default=None, description="The Secret block's value as JSON (a token or a mapping)."
    )
    ca_bundle: str | None = None

    @classmethod
    def load(cls, url: str | None = None) -> PrometheusCredentials:
        """From settings; a missing auth block means this Prometheus takes no credentials."""
        settings = get_settings()
        name = settings.prometheus_auth_block
        value: Any = None
        try:
            block: Secret[Any] = Secret.load(name, _sync=True)  # type: ignore[call-arg,assignment]
            value = block.get()
        except ValueError:
            pass
        return cls(
            base_url=url or settings.prometheus_url,
            auth_block=name,
            auth_value=SecretStr(json.dumps(value)) if value is not None else None,
            ca_bundle=str(settings.prometheus_ca_bundle) if settings.prometheus_ca_bundle else None,
        )

    def get_client(self, *, transport: httpx.BaseTransport | None = None) -> PrometheusClient:
        auth = (
            prometheus_auth(json.loads(self.auth_value.get_secret_value()), block=self.auth_block)
            if self.auth_value is not None
            else None
        )
        return PrometheusClient(
            base_url=self.base_url, auth=auth, ca_bundle=self.ca_bundle, transport=transport
        )


@contextmanager
def prometheus(
    url: str | None = None, *, transport: httpx.BaseTransport | None = None
) -> Iterator[PrometheusClient]:
    client = PrometheusCredentials.load(url).get_client(transport=transport)
    try:
        yield client
    finally:
        client.close()
