"""The real registry fixture for the socket fuzz (pytest finds fixtures by name here)."""

from tests.integration.registry_fixture import registry  # noqa: F401
