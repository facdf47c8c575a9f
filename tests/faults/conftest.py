"""The fault suite runs on the release e2e modules' sandbox and fixtures."""

from tests.e2e.conftest import build, docker_login, env, prefect_for_module  # noqa: F401
