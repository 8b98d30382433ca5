"""containerDisk images: pull, list, status, remove, usage, garbage collection.

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

Concurrent pulls of one reference share one pull; pulls of other references
to the same image take turns after resolving it; concurrent downloads of one
blob share one download (across images too).
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
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
# Room above max_virtual_size for one extracted disk file: qcow2 metadata
# (header, L1/L2 tables, refcounts) on top of the guest data.
DISK_FILE_SLACK = 64 << 20


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
    def add_layer(self, stream: Any, compression: Any, digest: str) -> str: ...  # → the layer's diff_id
    def disks(self) -> dict[str, Any]: ...
    def discard(self) -> None: ...


class ExtractorFactory(Protocol):
    """(workdir, image name, largest file it may extract) → extractor."""

    def __call__(self, workdir: Path, image: str, max_file_bytes: int = ...) -> DiskExtractorPort: ...


@dataclass(frozen=True)
class ImagePorts:
    registry: RegistryPort
    store: ImageStorePort
    files: ImageFilesPort
    new_extractor: ExtractorFactory
    # (path, source, max size) → DiskInfo.
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


class KeyedLock:
    """One lock per key; a key's lock exists only while someone holds or awaits it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._lock:
            lock, users = self._locks.get(key) or (threading.Lock(), 0)
            self._locks[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._lock:
                users = self._locks[key][1] - 1
                if users:
                    self._locks[key] = (lock, users)
                else:
                    del self._locks[key]


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
        # Serialises the pulls of one image id (other references to it).
        self._image_locks = KeyedLock()
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
        layers = list(manifest.layers)
        tag = image_model.tag_ref(ref)
        digest_ref = image_model.digest_ref(ref, resolved.reference_digest)
        reusable = self._reusable(image_id, layers)
        if reusable is not None:
            return self._add_refs(reusable, tag, digest_ref)

        name = str(ref)
        files = self._ports.files
        files.write_blob(resolved.digest, resolved.manifest_bytes)
        config_bytes = self._ports.registry.fetch_config(resolved.repository, manifest.config,
                                                         credentials=credentials)
        files.write_blob(image_id, config_bytes)
        for layer in layers:
            layer_compression(layer.media_type)  # refuse unknown layer types before downloading
        diff_ids = _config_diff_ids(config_bytes, name)
        if len(diff_ids) != len(layers):
            raise FailedPrecondition(
                f"image {name}: the manifest has {len(layers)} layers but the config's "
                f"rootfs.diff_ids lists {len(diff_ids)}"
            )

        # Pulls of other references to this image wait here, then reuse what
        # the first stored: two pulls installing one image's disks side by side
        # would share its staging directory, and the later record would drop
        # the earlier one's tag.
        with self._image_locks.hold(image_id):
            reusable = self._reusable(image_id, layers)
            if reusable is not None:
                return self._add_refs(reusable, tag, digest_ref)
            with self._lock:
                existing = self._images.get(image_id)
            workdir = files.new_workdir()
            extractor = self._ports.new_extractor(
                workdir, name, max_file_bytes=self._max_virtual_size + DISK_FILE_SLACK)
            try:
                # Downloads run in parallel; extraction follows each layer's file
                # while it is written, so unpacking overlaps the network.
                progress = {layer.digest: BlobProgress() for layer in layers if not files.has_blob(layer.digest)}
                with ThreadPoolExecutor(max_workers=max(1, self._parallelism)) as pool:
                    downloads: dict[str, Future[None]] = {}
                    for layer in layers:
                        if layer.digest not in downloads:  # a layer listed twice is fetched once
                            downloads[layer.digest] = pool.submit(
                                self._fetch_blob, resolved.repository, layer.digest, layer.size,
                                credentials, progress.get(layer.digest))
                    for layer, diff_id in zip(layers, diff_ids, strict=True):
                        self._extract_layer(extractor, layer, diff_id, name, progress.get(layer.digest),
                                            downloads[layer.digest])
                    extracted = time.perf_counter()
                    for d in downloads.values():
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
                return self._record(img, tag)
            except BaseException:
                if existing is None:
                    files.remove_disks(image_id)
                raise
            finally:
                extractor.discard()
                shutil.rmtree(workdir, ignore_errors=True)

    def _reusable(self, image_id: str, layers: list[Any]) -> Image | None:
        """The stored image to reuse for a manifest: same config, same layers, files present.

        The layers are compared too: a record made from other layers under
        this config (an image stored before diff_ids were checked) is pulled
        again rather than trusted.
        """
        with self._lock:
            img = self._images.get(image_id)
        if img is None or img.layers != tuple(layer.digest for layer in layers) or not self._complete(img):
            return None
        return img

    def _complete(self, img: Image) -> bool:
        files = self._ports.files
        return all(files.has_blob(b) for b in img.blobs) and files.has_disks(
            img.id, [d.file for d in img.disks])

    def _fetch_blob(self, repo: Any, digest: str, size: int, credentials: Any,
                    progress: BlobProgress | None) -> None:
        files = self._ports.files

        def download() -> int:
            if files.has_blob(digest):
                return 0
            n = self._ports.registry.fetch_blob(repo, digest, files.blob_path(digest),
                                                expected_size=size, credentials=credentials,
                                                progress=progress)
            with self._lock:
                self.downloads += 1
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

    def _extract_layer(self, extractor: DiskExtractorPort, layer: Any, diff_id: str, name: str,
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
        elif len(found) > 1:
            # Entries that are not regular files count too (KubeVirt's rule, as
            # in choose_disk): one disk beside a symlink is not "exactly one".
            problems.append(f"{len(found)} files under /disk/; a containerDisk path must name one")
        return disks, staged, "; ".join(problems)

    def _record(self, img: Image, tag: str | None) -> Image:
        """Write the record; a tag moves from the image that held it.

        The references and creation time of the image's current record are
        kept: merged here, under the lock, so that a caller's older copy of
        the record cannot drop a reference added meanwhile.
        """
        with self._lock:
            current = self._images.get(img.id)
            if current is not None:
                img = dataclasses.replace(
                    img,
                    repo_tags=_merge(current.repo_tags, img.repo_tags),
                    repo_digests=_merge(current.repo_digests, img.repo_digests),
                    created_at_ns=current.created_at_ns,
                )
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


def _config_diff_ids(config: bytes, name: str) -> list[str]:
    """The config's rootfs.diff_ids: the digests of the layers' uncompressed tars."""
    try:
        diff_ids = json.loads(config)["rootfs"]["diff_ids"]
    except (ValueError, KeyError, TypeError):
        diff_ids = None
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
        raise FailedPrecondition(f"image {name}: its config has no rootfs.diff_ids list")
    return diff_ids


def _config_user(config: bytes) -> str:
    try:
        doc = json.loads(config)
        user = (doc.get("config") or {}).get("User") or ""
        return str(user)
    except (ValueError, AttributeError):
        return ""

