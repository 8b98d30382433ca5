"""OCI distribution registries: pull and push over HTTP (see ``client``).

Modules: ``transport`` (connections, TLS, retries, status checks),
``auth`` (challenges, bearer tokens, the 401 round), ``credentials`` (what is
sent to which registry), ``pull`` and ``push``; ``client`` puts them together.
"""

from agent.adapters.registry.client import RegistryClient

__all__ = ["RegistryClient"]
