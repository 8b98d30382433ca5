"""containerDisk images: pull, list, status, remove, usage, garbage collection.

Data path of a cold pull: resolve the reference (mirrors, rewrites, index →
linux/amd64) → store manifest and config → download missing layers in
parallel, each verified by digest → apply the layers to find the files under
/disk/ → validate every disk with qemu-img under limits → install them as the
image's read-only base disks → record the image (one transaction) → visible.
Nothing is visible before the record is written, and a crash at any point
leaves only scratch files and unreferenced blobs, collected at the next start.

Concurrent pulls of one reference share one pull; concurrent downloads of
one blob share one download (across images too).
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import structlog

from agent.adapters.blobstream import BlobProgress, FollowReader, Restarted
from agent.domain import image as image_model
from agent.domain.disk import DiskInfo
from agent.domain.errors import FailedPrecondition
from agent.domain.image import BaseDisk, Image
from agent.domain.imageref import ImageRef, parse_image_ref
from agent.domain.oci import layer_compression

log = structlog.get_logger(__name__)
T = TypeVar("T")


class RegistryPort(Protocol):
    def resolve(self, ref: ImageRef, *, credentials: Any = None) -> Any: ...
    def fetch_config(self, repo: Any, config: Any, *, credentials: Any = None) -> bytes: ...
    def fetch_blob(self, repo: Any, digest: str, dest_path: Any, *, expected_size: int | None = None,
                   credentials: Any = None, progress: BlobProgress | None = None) -> int: ...


class ImageStorePort(Protocol):
    def save_images(self, images: list[Image], delete: tuple[str, ...] = ()) -> None: ...
    def delete_image(self, image_id: str) -> None: ...
    def load_images(self) -> list[Image]: ...


class ImageFilesPort(Protocol):
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
    def add_layer(self, stream: Any, compression: Any, digest: str) -> None: ...
    def disks(self) -> dict[str, Any]: ...
    def discard(self) -> None: ...


@dataclass(frozen=True)
class ImagePorts:
    registry: RegistryPort
    store: ImageStorePort
    files: ImageFilesPort
    # (workdir, image name) → extractor; (path, source, max size) → DiskInfo.
    new_extractor: Callable[[Path, str], DiskExtractorPort]
    inspect_disk: Callable[[Path, str, int], DiskInfo]
    # credentials from a CRI AuthConfig (or None) for the image's registry.
    credentials: Callable[[Any, ImageRef], Any]
    now_ns: Callable[[], int]


class _Flight(Generic[T]):
    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: T | None = None
        self.error: BaseException | None = None


class SingleFlight(Generic[T]):
    """Callers asking for the same key while a call runs share its outcome."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[str, _Flight[T]] = {}

    def do(self, key: str, fn: Callable[[], T]) -> tuple[T, bool]:
        """(result, whether this caller did the work)."""
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
        if not leader:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            return flight.result, False  # type: ignore[return-value]
        try:
            flight.result = fn()
            return flight.result, True
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._lock:
                del self._flights[key]
            flight.done.set()


class ImageService:
    def __init__(self, ports: ImagePorts, *, max_virtual_size: int, parallelism: int = 4,
                 in_use: Callable[[], set[str]] = set) -> None:
        self._ports = ports
        self._max_virtual_size = max_virtual_size
        self._parallelism = parallelism
        self._in_use = in_use
        self._lock = threading.RLock()
        self._images: dict[str, Image] = {}
        self._snapshot: tuple[Image, ...] = ()
        self._pulls: SingleFlight[Image] = SingleFlight()
        self._blobs: SingleFlight[int] = SingleFlight()
        self.downloads = 0  # blobs actually fetched (tests and metrics)
        # Pulls decide to reuse blobs already on disk; garbage collection must
        # not delete one under them. GC runs only when no pull is active.
        self._activity = threading.Condition()
        self._active_pulls = 0
        self._collecting = False

    # State ---------------------------------------------------------------

    def recover(self) -> None:
        """Start-up: load records, drop scratch files, collect garbage."""
        removed = self._ports.files.clear_tmp()
        with self._lock:
            for img in self._ports.store.load_images():
                self._images[img.id] = img
            self._publish()
        collected = self.collect_garbage()
        log.info("images recovered", images=len(self._images), scratch_removed=len(removed),
                 blobs_collected=collected)

    def _publish(self) -> None:
        self._snapshot = tuple(sorted(self._images.values(), key=lambda i: i.created_at_ns))

    def set_in_use(self, in_use: Callable[[], set[str]]) -> None:
        self._in_use = in_use

    # Queries -------------------------------------------------------------

    def list_images(self, ref_filter: str = "") -> list[Image]:
        images = list(self._snapshot)
        if not ref_filter:
            return images
        found = image_model.find(images, ref_filter)
        return [found] if found is not None else []

    def status(self, text: str) -> Image | None:
        """None for an image the agent does not have (CRI: not an error)."""
        if not text:
            return None
        return image_model.find(self._snapshot, text)

    def get(self, text: str) -> Image:
        img = self.status(text)
        if img is None:
            raise FailedPrecondition(f"image {text!r} is not present on this host; pull it first")
        return img

    def base_disk_path(self, img: Image, disk: BaseDisk) -> Path:
        return self._ports.files.disk_path(img.id, disk.file)

    def usage(self) -> tuple[int, int]:
        return self._ports.files.usage()

    # Pull ----------------------------------------------------------------

    def pull(self, text: str, auth: Any = None) -> Image:
        ref = parse_image_ref(text, field="image.image")
        with self._activity:
            self._activity.wait_for(lambda: not self._collecting)
            self._active_pulls += 1
        try:
            img, _ = self._pulls.do(str(ref), lambda: self._pull(ref, auth))
        finally:
            with self._activity:
                self._active_pulls -= 1
                self._activity.notify_all()
        return img

    def _pull(self, ref: ImageRef, auth: Any) -> Image:
        started = time.perf_counter()
        credentials = self._ports.credentials(auth, ref)
        resolved = self._ports.registry.resolve(ref, credentials=credentials)
        resolved_at = time.perf_counter()
        manifest = resolved.manifest
        image_id = manifest.config.digest
        tag = image_model.tag_ref(ref)
        digest_ref = image_model.digest_ref(ref, resolved.reference_digest)
        with self._lock:
            existing = self._images.get(image_id)
        if existing is not None and self._complete(existing):
            return self._add_refs(existing, tag, digest_ref)

        name = str(ref)
        files = self._ports.files
        workdir = files.new_workdir()
        extractor = self._ports.new_extractor(workdir, name)
        try:
            files.write_blob(resolved.digest, resolved.manifest_bytes)
            config_bytes = self._ports.registry.fetch_config(resolved.repository, manifest.config,
                                                             credentials=credentials)
            files.write_blob(image_id, config_bytes)
            layers = list(manifest.layers)
            for layer in layers:
                layer_compression(layer.media_type)  # refuse unknown layer types before downloading

            # Downloads run in parallel; extraction follows each layer's file
            # while it is written, so unpacking overlaps the network.
            progress = {layer.digest: BlobProgress() for layer in layers if not files.has_blob(layer.digest)}
            with ThreadPoolExecutor(max_workers=max(1, self._parallelism)) as pool:
                downloads = [
                    pool.submit(self._fetch_blob, resolved.repository, layer.digest, layer.size,
                                credentials, progress.get(layer.digest))
                    for layer in layers
                ]
                for layer in layers:
                    self._extract_layer(extractor, layer, progress.get(layer.digest))
                extracted = time.perf_counter()
                for d in downloads:
                    d.result()  # a digest mismatch anywhere fails the pull
            downloaded = time.perf_counter()
            disks, staged, problem = self._validate_disks(extractor.disks(), name)
            files.install_disks(image_id, staged)
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
                user=_config_user(config_bytes),
                disks=tuple(disks),
                created_at_ns=self._ports.now_ns(),
                disk_problem=problem,
            )
            if existing is not None:  # re-pulled after its files went missing
                img = dataclasses.replace(
                    img,
                    repo_tags=_merge(existing.repo_tags, img.repo_tags),
                    repo_digests=_merge(existing.repo_digests, img.repo_digests),
                    created_at_ns=existing.created_at_ns,
                )
            return self._record(img, tag)
        except BaseException:
            if existing is None:
                files.remove_disks(image_id)
            raise
        finally:
            extractor.discard()
            shutil.rmtree(workdir, ignore_errors=True)

    def _complete(self, img: Image) -> bool:
        files = self._ports.files
        return all(files.has_blob(b) for b in img.blobs) and files.has_disks(
            img.id, [d.file for d in img.disks])

    def _fetch_blob(self, repo: Any, digest: str, size: int, credentials: Any,
                    progress: BlobProgress | None) -> None:
        files = self._ports.files
        try:
            if files.has_blob(digest):
                return

            def download() -> int:
                if files.has_blob(digest):
                    return 0
                n = self._ports.registry.fetch_blob(repo, digest, files.blob_path(digest),
                                                    expected_size=size, credentials=credentials,
                                                    progress=progress)
                with self._lock:
                    self.downloads += 1
                return n

            self._blobs.do(digest, download)
        finally:
            if progress is not None and progress.path is None:
                progress.finished()  # another pull downloaded it: read the file

    def _extract_layer(self, extractor: DiskExtractorPort, layer: Any, progress: BlobProgress | None) -> None:
        compression = layer_compression(layer.media_type)
        while progress is not None:
            try:
                follow = FollowReader(progress)
            except FileNotFoundError:
                break  # not downloaded by this pull: the finished file is read below
            try:
                with io.BufferedReader(follow, 1 << 20) as reader:
                    extractor.add_layer(reader, compression, layer.digest)
                return
            except Restarted:
                continue  # the download started over: so does the extraction
        with open(self._ports.files.blob_path(layer.digest), "rb") as blob:
            extractor.add_layer(blob, compression, layer.digest)

    def _validate_disks(self, found: dict[str, Any], name: str) -> tuple[list[BaseDisk], dict[str, Path], str]:
        disks: list[BaseDisk] = []
        staged: dict[str, Path] = {}
        problems = []
        for i, (path, f) in enumerate(found.items()):
            if f.temp is None:
                problems.append(f"{path} is a {f.kind}, not a regular file")
                continue
            info = self._ports.inspect_disk(f.temp, f"image {name}: {path}", self._max_virtual_size)
            file = f"disk{i}.{info.format}"
            staged[file] = f.temp
            disks.append(BaseDisk(path_in_image=path, file=file, format=info.format,
                                  virtual_size=info.virtual_size, size=f.size))
        if not found:
            problems.append("no file under /disk/")
        elif len(disks) > 1:
            problems.append(f"{len(disks)} files under /disk/; a containerDisk path must name one")
        return disks, staged, "; ".join(problems)

    def _record(self, img: Image, tag: str | None) -> Image:
        """Write the record; a tag moves from the image that held it."""
        with self._lock:
            changed = [img]
            if tag is not None:
                for other in self._images.values():
                    if other.id != img.id and tag in other.repo_tags:
                        changed.append(dataclasses.replace(
                            other, repo_tags=tuple(t for t in other.repo_tags if t != tag)))
            self._ports.store.save_images(changed)
            for i in changed:
                self._images[i.id] = i
            self._publish()
        log.info("image stored", image=img.name, id=img.id, disks=[d.path_in_image for d in img.disks])
        return img

    def _add_refs(self, img: Image, tag: str | None, digest_ref: str) -> Image:
        tags = _merge(img.repo_tags, (tag,) if tag else ())
        digests = _merge(img.repo_digests, (digest_ref,))
        if tags == img.repo_tags and digests == img.repo_digests:
            return img
        return self._record(dataclasses.replace(img, repo_tags=tags, repo_digests=digests), tag)

    # Remove and garbage collection -----------------------------------------

    def remove(self, text: str) -> None:
        """RemoveImage: by id, tag or digest; CRI: no error when already gone."""
        img = self.status(text)
        if img is None:
            return
        with self._lock:
            if img.id in self._in_use():
                raise FailedPrecondition(
                    f"image {img.name} ({img.id}) is used by a VM container on this host; remove that first"
                )
            self._ports.store.delete_image(img.id)
            self._images.pop(img.id, None)
            self._publish()
        self._ports.files.remove_disks(img.id)
        self.collect_garbage()
        log.info("image removed", image=img.name, id=img.id)

    def collect_garbage(self) -> int:
        """Delete blobs and base disks no image record references.

        Skipped while a pull runs (its blobs are not referenced yet); the next
        removal or start collects them.
        """
        with self._activity:
            if self._active_pulls:
                return 0
            self._collecting = True
        try:
            return self._collect()
        finally:
            with self._activity:
                self._collecting = False
                self._activity.notify_all()

    def _collect(self) -> int:
        with self._lock:
            live_blobs = {b for img in self._images.values() for b in img.blobs}
            live_ids = set(self._images)
            files = self._ports.files
            removed = 0
            for digest in files.blob_digests():
                if digest not in live_blobs:
                    files.remove_blob(digest)
                    removed += 1
            for image_id in files.disk_image_ids():
                if image_id not in live_ids:
                    files.remove_disks(image_id)
        return removed


def _merge(a: tuple[str, ...], b: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys((*a, *b)))


def _config_user(config: bytes) -> str:
    try:
        doc = json.loads(config)
        user = (doc.get("config") or {}).get("User") or ""
        return str(user)
    except (ValueError, AttributeError):
        return ""

