"""Fixtures shared by the integration tests (real agent, libvirt, registry, CNI)."""

from tests.integration.agentproc import agent_factory, running_agent  # noqa: F401
from tests.integration.registry_fixture import (  # noqa: F401
    auth_registry,
    registry,
    tls_registry,
    token_registry,
)
