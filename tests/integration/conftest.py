"""Fixtures shared by the integration tests (real agent, libvirt, registry, CNI)."""

from tests.integration.agentproc import agent_factory, running_agent  # noqa: F401
