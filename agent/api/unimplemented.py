"""Fill every RPC a servicer does not define with a clear UNIMPLEMENTED.

The generated base classes answer "Method not implemented!"; an operator
deserves to know that Podvisor knows the call and does not do it yet.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf.descriptor import ServiceDescriptor

from agent import __version__
from agent.domain.errors import Unimplemented


def _make(service: str, method: str, why: str) -> Callable[..., Any]:
    message = f"{service}/{method} is not implemented in Podvisor {__version__}: {why}"

    def not_implemented(self: Any, request: Any, context: Any) -> Any:
        raise Unimplemented(message)

    not_implemented.__name__ = method
    return not_implemented


def fill(cls: type, descriptor: ServiceDescriptor, why: Callable[[str], str]) -> type:
    """Install an UNIMPLEMENTED handler for each method ``cls`` lacks."""
    # Defined by us (the class or a mixin), not by the generated base class.
    ours = [k for k in cls.__mro__ if not k.__module__.endswith("_pb2_grpc") and k is not object]
    for method in descriptor.methods:
        if not any(method.name in k.__dict__ for k in ours):
            setattr(cls, method.name, _make(descriptor.full_name, method.name, why(method.name)))
    return cls
