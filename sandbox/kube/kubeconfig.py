"""The kubeconfig the twin writes for its clients, and the bearer token it requires.

The token comes from ``twin-config.json`` (``kube_token``) or is generated once and kept in
``<state>/kube/token``, so a restarted twin accepts the kubeconfig it wrote before.
"""

from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path

import yaml

CONTEXT = "robotics-twin"
CLUSTER = "robotics-twin"
USER = "robotics-twin-admin"


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it holds a credential)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def load_or_create_token(state_dir: Path, configured: str | None) -> str:
    if configured:
        return configured
    path = state_dir / "kube" / "token"
    if path.exists():
        token = path.read_text().strip()
        if token:
            return token
    token = secrets.token_urlsafe(32)
    _write_private(path, token)
    return token


def kubeconfig_document(
    server: str, token: str, ca_pem: bytes, namespace: str = "default"
) -> dict[str, object]:
    cluster = {
        "server": server,
        "certificate-authority-data": base64.b64encode(ca_pem).decode(),
    }
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": CLUSTER, "cluster": cluster}],
        "users": [{"name": USER, "user": {"token": token}}],
        "contexts": [
            {"name": CONTEXT, "context": {"cluster": CLUSTER, "user": USER, "namespace": namespace}}
        ],
        "current-context": CONTEXT,
        "preferences": {},
    }


def write_kubeconfig(path: Path, server: str, token: str, ca_pem: bytes) -> Path:
    document = kubeconfig_document(server, token, ca_pem)
    _write_private(path, yaml.safe_dump(document, sort_keys=False))
    return path
