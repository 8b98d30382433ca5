"""Podvisor: a node agent that runs virtual machines as Kubernetes pod workloads."""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("podvisor")
except _metadata.PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+source"
