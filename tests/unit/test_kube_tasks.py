"""Edge rules of tasks/kube.py that need no cluster."""

from __future__ import annotations

from kubernetes_asyncio.client.exceptions import ApiException
from prefect.states import Failed

from core.errors import KubeError
from tasks.kube import api_error, retry_unless_ours


async def test_only_transport_errors_and_5xx_are_retried():
    refused = api_error(ApiException(status=422, reason="Unprocessable Entity"), "creating x")
    broken = api_error(ApiException(status=503, reason="Service Unavailable"), "creating x")
    assert "422" in str(refused) and "invalid" in str(refused)
    assert not await retry_unless_ours(None, None, Failed(data=refused))
    assert await retry_unless_ours(None, None, Failed(data=broken))
    assert await retry_unless_ours(None, None, Failed(data=ConnectionResetError("reset")))
    assert isinstance(refused, KubeError)
