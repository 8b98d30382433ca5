"""The pull pipeline: a containerDisk reference → a stored, checked image.

Data path of a cold pull: resolve the reference (mirrors, rewrites, index →
linux/amd64) → store manifest and config → download missing layers in
parallel, each verified by digest → apply the layers to find the files under
/disk/, each layer's uncompressed content checked against the config's
rootfs.diff_ids (the image id is the config digest: layers that do not match
it must never be stored under it) → validate every disk with qemu-img under
limits → install them as the image's read-only base disks → record the image
(one transaction) → visible.
Nothing is visible before the record is written, and a crash at any point
leaves only scratch files and unreferenced blobs, collected at the next start.

Pulls of other references to the same image take turns after resolving it;
concurrent downloads of one blob share one download (across images too).
Concurrent pulls of one reference share one pull (``ImageService.pull``).
"""

from __future__ import annotations

import io
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import structlog

from agent import faults
from agent.concurrency import BlobProgress, FollowReader, KeyedLock, Restarted, SingleFlight
from agent.domain import disk as disk_model
from agent.domain import image as image_model
from agent.domain.errors import FailedPrecondition, ResourceExhausted
from agent.domain.image import BaseDisk, DiskFile, Image
from agent.domain.imageref import ImageRef, RemoteRepository
from agent.domain.oci import Descriptor, layer_compression, parse_image_config
from agent.domain.registry import RegistryAuth
from agent.services.ports import DiskExtractorPort, ImagePorts, RegistryPort

log = structlog.get_logger(__name__)
# Room above max_virtual_size for one extracted disk file: qcow2 metadata
# (header, L1/L2 tables, refcounts) on top of the guest data.
DISK_FILE_SLACK = 64 << 20


class ImageRecords(Protocol):
    """What a pull reads and writes of the stored images (``images.ImageCatalogue``)."""

    def stored(self, image_id: str) -> Image | None: ...
    def reusable(self, image_id: str, layers: list[Descriptor]) -> Image | None: ...
    def record(self, img: Image, tag: str | None) -> Image: ...
    def add_refs(self, img: Image, tag: str | None, digest_ref: str) -> Image: ...


class ImagePull:
    """Pulls images into the records: download, extract, check, install, record."""

    def __init__(self, ports: ImagePorts, records: ImageRecords, *, max_virtual_size: int,
                 parallelism: int = 4, max_pull_bytes: int = 0, min_free_bytes: int = 0) -> None:
        self._ports = ports
        self._records = records
        self._max_virtual_size = max_virtual_size
        self._parallelism = parallelism
        # What one pull may unpack (0: one disk of the largest size allowed).
        self._max_pull_bytes = max_pull_bytes or max_virtual_size + DISK_FILE_SLACK
        # Free space no pull may eat into on the images filesystem, which
        # also holds the state database.
        self._min_free_bytes = min_free_bytes
        # Serialises the pulls of one image id (other references to it).
        self._image_locks = KeyedLock()
        self._blobs: SingleFlight[int] = SingleFlight()
        self._lock = threading.Lock()
        self.downloads = 0  # blobs actually fetched (tests and metrics)

    def pull(self, ref: ImageRef, auth: RegistryAuth | None, source: RegistryPort | None = None) -> Image:
        """Pull ``ref`` (or reuse what is stored) and return its record.

        ``auth`` (a pull's own credentials) belongs to the image's registry
        unless it names its server; it never reaches another registry.
        ``source`` replaces the registry (an import from an OCI layout: the
        same checks, another origin).
        """
        started = time.perf_counter()
        auth = auth.scoped_to(ref.registry) if auth is not None else None
        registry = source or self._ports.registry
        resolved = registry.resolve(ref, auth=auth)
        resolved_at = time.perf_counter()
        manifest = resolved.manifest
        image_id = manifest.config.digest
        layers = list(manifest.layers)
        tag = image_model.tag_ref(ref)
        digest_ref = image_model.digest_ref(ref, resolved.reference_digest)
        reusable = self._records.reusable(image_id, layers)
        if reusable is not None:
            return self._records.add_refs(reusable, tag, digest_ref)

        name = str(ref)
        files = self._ports.files
        missing = {layer.digest: layer.size for layer in layers if not files.has_blob(layer.digest)}
        self._check_reserve(name, len(resolved.manifest_bytes) + manifest.config.size + sum(missing.values()),
                            "download")
        files.write_blob(resolved.digest, resolved.manifest_bytes)
        faults.point("pull.manifest")
        config_bytes = registry.fetch_config(resolved.repository, manifest.config, auth=auth)
        files.write_blob(image_id, config_bytes)
        faults.point("pull.config")
        for layer in layers:
            layer_compression(layer.media_type)  # refuse unknown layer types before downloading
        config = parse_image_config(config_bytes, source=f"image {name}")
        if len(config.diff_ids) != len(layers):
            raise FailedPrecondition(
                f"image {name}: the manifest has {len(layers)} layers but the config's "
                f"rootfs.diff_ids lists {len(config.diff_ids)}"
            )

        # Pulls of other references to this image wait here, then reuse what
        # the first stored: two pulls installing one image's disks side by side
        # would share its staging directory, and the later record would drop
        # the earlier one's tag.
        with self._image_locks.hold(image_id):
            reusable = self._records.reusable(image_id, layers)
            if reusable is not None:
                return self._records.add_refs(reusable, tag, digest_ref)
            existing = self._records.stored(image_id)
            workdir = files.new_workdir()
            extractor = self._ports.new_extractor(
                workdir, name, max_file_bytes=self._max_virtual_size + DISK_FILE_SLACK,
                max_total_bytes=self._max_pull_bytes, min_free_bytes=self._min_free_bytes)
            try:
                # Downloads run in parallel; extraction follows each layer's file
                # while it is written, so unpacking overlaps the network.
                progress = {layer.digest: BlobProgress() for layer in layers if not files.has_blob(layer.digest)}
                with ThreadPoolExecutor(max_workers=max(1, self._parallelism)) as pool:
                    downloads: dict[str, Future[None]] = {}
                    for layer in layers:
                        if layer.digest not in downloads:  # a layer listed twice is fetched once
                            downloads[layer.digest] = pool.submit(
                                self._fetch_blob, registry, resolved.repository, layer.digest, layer.size,
                                auth, progress.get(layer.digest))
                    for layer, diff_id in zip(layers, config.diff_ids, strict=True):
                        self._extract_layer(extractor, layer, diff_id, name, progress.get(layer.digest),
                                            downloads[layer.digest])
                    extracted = time.perf_counter()
                    for d in downloads.values():
                        d.result()  # a digest mismatch anywhere fails the pull
                faults.point("pull.extracted")
                downloaded = time.perf_counter()
                disks, staged, problem = self._validate_disks(extractor.disks(), name)
                self._check_reserve(name, 0, "install its disks")
                files.install_disks(image_id, staged)
                faults.point("pull.installed")
                log.info("image pulled", image=name, id=image_id,
                         resolve_s=round(resolved_at - started, 3), extract_s=round(extracted - resolved_at, 3),
                         download_s=round(downloaded - resolved_at, 3),
                         check_install_s=round(time.perf_counter() - downloaded, 3))
                img = Image(
                    id=image_id,
                    manifest_digest=resolved.digest,
                    repo_tags=(tag,) if tag else (),
                    repo_digests=(digest_ref,),
                    size=manifest.config.size + sum(layer.size for layer in layers),
                    layers=tuple(layer.digest for layer in layers),
                    config_media_type=manifest.config.media_type,
                    user=config.user,
                    disks=tuple(disks),
                    created_at_ns=self._ports.clock.now_ns(),
                    disk_problem=problem,
                )
                recorded = self._records.record(img, tag)
                faults.point("pull.recorded")
                return recorded
            except BaseException:
                if existing is None:
                    files.remove_disks(image_id)
                raise
            finally:
                extractor.discard()
                shutil.rmtree(workdir, ignore_errors=True)

    def _check_reserve(self, name: str, needed: int, step: str) -> None:
        """ResourceExhausted when ``needed`` more bytes would leave less than the reserve free."""
        if self._min_free_bytes <= 0:
            return
        free = self._ports.files.free_bytes()
        if free - needed < self._min_free_bytes:
            raise ResourceExhausted(
                f"image {name}: not enough space to {step}: {needed} bytes needed, {free} free on the "
                f"images filesystem, of which {self._min_free_bytes} are kept in reserve ([images] min_free_bytes)"
            )

    def _fetch_blob(self, registry: RegistryPort, repo: RemoteRepository, digest: str, size: int,
                    auth: RegistryAuth | None, progress: BlobProgress | None) -> None:
        files = self._ports.files

        def download() -> int:
            if files.has_blob(digest):
                return 0
            n = registry.fetch_blob(repo, digest, files.blob_path(digest),
                                                expected_size=size, auth=auth, progress=progress)
            with self._lock:
                self.downloads += 1
            faults.point("pull.blob")
            return n

        try:
            if not files.has_blob(digest):
                self._blobs.do(digest, download)
        except BaseException as exc:
            if progress is not None:
                # Also when another pull's download (shared) failed: the
                # extraction following this progress must see that error.
                progress.finished(exc)
            raise
        if progress is not None and progress.path is None:
            progress.finished()  # another pull downloaded it: read the file

    def _extract_layer(self, extractor: DiskExtractorPort, layer: Descriptor, diff_id: str, name: str,
                       progress: BlobProgress | None, download: Future[None]) -> None:
        """Apply one layer, following its download when this pull makes it."""
        compression = layer_compression(layer.media_type)
        content: str | None = None
        while progress is not None and content is None:
            try:
                follow = FollowReader(progress)
            except FileNotFoundError:
                break  # not downloaded by this pull, or already renamed: the finished file is read below
            try:
                with io.BufferedReader(follow, 1 << 20) as reader:
                    content = extractor.add_layer(reader, compression, layer.digest)
            except Restarted:
                continue  # the download started over: so does the extraction
        if content is None:
            # A failed download's own error, not the FileNotFoundError of the
            # blob file it never wrote.
            download.result()
            with open(self._ports.files.blob_path(layer.digest), "rb") as blob:
                content = extractor.add_layer(blob, compression, layer.digest)
        if content != diff_id:
            raise FailedPrecondition(
                f"image {name}: layer {layer.digest} does not match the image config "
                f"(its content is {content}; the config's rootfs.diff_ids says {diff_id})"
            )

    def _validate_disks(self, found: dict[str, DiskFile], name: str
                        ) -> tuple[list[BaseDisk], dict[str, Path], str]:
        disks: list[BaseDisk] = []
        staged: dict[str, Path] = {}
        problems = []
        for i, (path, f) in enumerate(found.items()):
            if f.temp is None:
                problems.append(f"{path} is a {f.kind}, not a regular file")
                continue
            info = self._ports.inspect_disk(f.temp, f"image {name}: {path}", self._max_virtual_size,
                                            disk_model.declared_format(path))
            file = f"disk{i}.{info.format}"
            staged[file] = f.temp
            disks.append(BaseDisk(path_in_image=path, file=file, format=info.format,
                                  virtual_size=info.virtual_size, size=f.size))
        if not found:
            problems.append("no file under /disk/")
        elif len(found) > 1:
            # Entries that are not regular files count too (KubeVirt's rule, as
            # in choose_disk): one disk beside a symlink is not "exactly one".
            problems.append(f"{len(found)} files under /disk/; a containerDisk path must name one")
        return disks, staged, "; ".join(problems)
