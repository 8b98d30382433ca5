"""Ports: what the services need from the outside world, as Protocols.

Services receive them in one bundle (``Ports``), so service tests can hand in
recording fakes while integration tests run the real adapters.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from agent.concurrency import BlobProgress
from agent.domain.disk import DiskInfo
from agent.domain.image import DiskFile, Image
from agent.domain.imageref import ImageRef, RemoteRepository
from agent.domain.oci import Compression, Descriptor
from agent.domain.registry import RegistryAuth, ResolvedImage
from agent.domain.sandbox import Sandbox


class Clock(Protocol):
    def now_ns(self) -> int: ...


class SystemClock:
    def now_ns(self) -> int:
        return time.time_ns()


class SandboxStore(Protocol):
    def insert_sandbox(self, sandbox: Sandbox) -> None: ...
    def update_sandbox(self, sandbox: Sandbox) -> None: ...
    def delete_sandbox(self, sandbox_id: str) -> None: ...
    def load_sandboxes(self) -> list[Sandbox]: ...


class SandboxNetwork(Protocol):
    """Pod networking (agent.adapters.pod_network.PodNetworkManager)."""

    def add(self, sandbox_id: str, name: str, namespace: str, uid: str, port_mappings: Any, dns: Any,
            hostname: str, workdir: Path) -> Any: ...
    def remove(self, sandbox_id: str, workdir: Path) -> None: ...
    def ensure_dhcp(self, sandbox_id: str, workdir: Path) -> bool: ...
    def recover(self, sandbox_id: str, workdir: Path) -> None: ...
    def cached_sandbox_ids(self) -> list[str]: ...


class SandboxFiles(Protocol):
    def sandbox_dir(self, sandbox_id: str) -> Path: ...
    def create_sandbox_dir(self, sandbox_id: str) -> Path: ...
    def remove_sandbox_dir(self, sandbox_id: str) -> None: ...
    def list_sandbox_dirs(self) -> list[str]: ...
    def ensure_log_directory(self, path: str) -> None: ...


@dataclass(frozen=True)
class Ports:
    store: SandboxStore
    files: SandboxFiles
    clock: Clock
    # None: no pod networking (disabled in the config, or in service tests).
    network: SandboxNetwork | None = None
    # The node's address, reported as the IP of hostNetwork (NODE) sandboxes.
    node_ip: Callable[[], str] = lambda: ""


# --- images --------------------------------------------------------------------------------
# What the image service needs (agent.services.images and .pull); the values
# these ports trade live in agent.domain (registry, image, oci, disk).


class RegistryPort(Protocol):
    """An OCI registry, pull side (agent.adapters.registry.RegistryClient).

    ``auth`` is a pull's own credentials, scoped to the registry they belong to.
    """

    def resolve(self, ref: ImageRef, *, auth: RegistryAuth | None = None) -> ResolvedImage: ...
    def fetch_config(self, repo: RemoteRepository, config: Descriptor, *,
                     auth: RegistryAuth | None = None) -> bytes: ...
    def fetch_blob(self, repo: RemoteRepository, digest: str, dest_path: str | os.PathLike[str], *,
                   expected_size: int | None = None, auth: RegistryAuth | None = None,
                   progress: BlobProgress | None = None) -> int: ...


class ImageStorePort(Protocol):
    """Image records (agent.adapters.store.Store)."""

    def save_images(self, images: list[Image], delete: tuple[str, ...] = ()) -> None: ...
    def delete_image(self, image_id: str) -> None: ...
    def load_images(self) -> list[Image]: ...


class ImageFilesPort(Protocol):
    """Blobs, scratch space and base disks on the host (agent.adapters.image_files.ImageFiles)."""

    def blob_path(self, digest: str) -> Path: ...
    def has_blob(self, digest: str) -> bool: ...
    def write_blob(self, digest: str, data: bytes) -> None: ...
    def blob_digests(self) -> list[str]: ...
    def remove_blob(self, digest: str) -> None: ...
    def new_workdir(self) -> Path: ...
    def clear_tmp(self) -> list[str]: ...
    def install_disks(self, image_id: str, files: dict[str, Path]) -> None: ...
    def disk_path(self, image_id: str, file: str) -> Path: ...
    def has_disks(self, image_id: str, files: list[str]) -> bool: ...
    def disk_image_ids(self) -> list[str]: ...
    def remove_disks(self, image_id: str) -> None: ...
    def usage(self) -> tuple[int, int]: ...


class DiskExtractorPort(Protocol):
    """Applies one image's layers to find its /disk/ files (agent.adapters.layers.DiskExtractor)."""

    def add_layer(self, stream: BinaryIO, compression: Compression, digest: str) -> str: ...  # → its diff_id
    def disks(self) -> dict[str, DiskFile]: ...
    def discard(self) -> None: ...


class ExtractorFactory(Protocol):
    """(workdir, image name, largest file it may extract) → extractor."""

    def __call__(self, workdir: Path, image: str, max_file_bytes: int = ...) -> DiskExtractorPort: ...


# (path, source named in errors, largest virtual size) → the checked disk
# (agent.adapters.qemu_img.info).
DiskInspector = Callable[[Path, str, int], DiskInfo]


@dataclass(frozen=True)
class ImagePorts:
    registry: RegistryPort
    store: ImageStorePort
    files: ImageFilesPort
    new_extractor: ExtractorFactory
    inspect_disk: DiskInspector
    now_ns: Callable[[], int]
