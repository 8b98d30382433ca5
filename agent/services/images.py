"""containerDisk images: list, status, remove, usage, garbage collection,
recovery — and the entry to pulls (the pipeline is agent.services.pull).

Concurrent pulls of one reference share one pull. Pulls decide to reuse
blobs already on disk, so garbage collection never runs while a pull does.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from agent.concurrency import SingleFlight
from agent.domain import image as image_model
from agent.domain.errors import FailedPrecondition, InvalidArgument
from agent.domain.image import BaseDisk, Image
from agent.domain.imageref import parse_image_ref
from agent.domain.oci import Descriptor
from agent.domain.registry import RegistryAuth
from agent.services.ports import ImageFilesPort, ImagePorts, ImageStorePort
from agent.services.pull import ImagePull

log = structlog.get_logger(__name__)


class ImageCatalogue:
    """The image records: held in memory for lookups, written through to the store."""

    def __init__(self, store: ImageStorePort, files: ImageFilesPort) -> None:
        self._store = store
        self._files = files
        self._lock = threading.RLock()
        self._images: dict[str, Image] = {}
        self._snapshot: tuple[Image, ...] = ()

    def load(self) -> int:
        """Read the stored records (start-up); how many there are."""
        with self._lock:
            for img in self._store.load_images():
                self._images[img.id] = img
            self._publish()
            return len(self._images)

    def _publish(self) -> None:
        self._snapshot = tuple(sorted(self._images.values(), key=lambda i: i.created_at_ns))

    def snapshot(self) -> tuple[Image, ...]:
        """Every image, oldest first (a consistent copy, read without locking)."""
        return self._snapshot

    def stored(self, image_id: str) -> Image | None:
        """The record of ``image_id``, if any."""
        with self._lock:
            return self._images.get(image_id)

    def reusable(self, image_id: str, layers: list[Descriptor]) -> Image | None:
        """The stored image to reuse for a manifest: same config, same layers, files present.

        The layers are compared too: a record made from other layers under
        this config (an image stored before diff_ids were checked) is pulled
        again rather than trusted.
        """
        img = self.stored(image_id)
        if img is None or img.layers != tuple(layer.digest for layer in layers) or not self._complete(img):
            return None
        return img

    def _complete(self, img: Image) -> bool:
        files = self._files
        return all(files.has_blob(b) for b in img.blobs) and files.has_disks(
            img.id, [d.file for d in img.disks])

    def record(self, img: Image, tag: str | None) -> Image:
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
            self._store.save_images(changed)
            for i in changed:
                self._images[i.id] = i
            self._publish()
        log.info("image stored", image=img.name, id=img.id, disks=[d.path_in_image for d in img.disks])
        return img

    def add_refs(self, img: Image, tag: str | None, digest_ref: str) -> Image:
        """``img`` also known by ``tag`` and ``digest_ref`` (recorded when new)."""
        tags = _merge(img.repo_tags, (tag,) if tag else ())
        digests = _merge(img.repo_digests, (digest_ref,))
        if tags == img.repo_tags and digests == img.repo_digests:
            return img
        return self.record(dataclasses.replace(img, repo_tags=tags, repo_digests=digests), tag)

    def delete(self, img: Image, in_use: Callable[[], set[str]]) -> None:
        """Forget ``img``'s record, unless a VM container uses it."""
        with self._lock:
            if img.id in in_use():
                raise FailedPrecondition(
                    f"image {img.name} ({img.id}) is used by a VM container on this host; remove that first"
                )
            self._store.delete_image(img.id)
            self._images.pop(img.id, None)
            self._publish()

    def collect(self) -> int:
        """Delete blobs and base disks no record references; how many blobs went."""
        with self._lock:
            live_blobs = {b for img in self._images.values() for b in img.blobs}
            live_ids = set(self._images)
            files = self._files
            removed = 0
            for digest in files.blob_digests():
                if digest not in live_blobs:
                    files.remove_blob(digest)
                    removed += 1
            for image_id in files.disk_image_ids():
                if image_id not in live_ids:
                    files.remove_disks(image_id)
        return removed


class ImageService:
    """The CRI image verbs over the catalogue, the pull pipeline and the image files."""

    def __init__(self, ports: ImagePorts, *, max_virtual_size: int, parallelism: int = 4,
                 max_pull_bytes: int = 0, min_free_bytes: int = 0,
                 in_use: Callable[[], set[str]] = set) -> None:
        self._ports = ports
        self._in_use = in_use
        self._catalogue = ImageCatalogue(ports.store, ports.files)
        self._puller = ImagePull(ports, self._catalogue, max_virtual_size=max_virtual_size,
                                 parallelism=parallelism, max_pull_bytes=max_pull_bytes,
                                 min_free_bytes=min_free_bytes)
        self._pulls: SingleFlight[Image] = SingleFlight()
        # Pulls decide to reuse blobs already on disk; garbage collection must
        # not delete one under them. GC runs only when no pull is active.
        self._activity = threading.Condition()
        self._active_pulls = 0
        self._collecting = False

    @property
    def downloads(self) -> int:
        """Blobs actually fetched (tests and metrics)."""
        return self._puller.downloads

    # State ---------------------------------------------------------------

    def recover(self) -> None:
        """Start-up: load records, drop scratch files, collect garbage."""
        removed = self._ports.files.clear_tmp()
        images = self._catalogue.load()
        collected = self.collect_garbage()
        log.info("images recovered", images=images, scratch_removed=len(removed),
                 blobs_collected=collected)

    def set_in_use(self, in_use: Callable[[], set[str]]) -> None:
        """Where to ask which image ids VM containers use (known once containers exist)."""
        self._in_use = in_use

    # Queries -------------------------------------------------------------

    def list_images(self, ref_filter: str = "") -> list[Image]:
        """ListImages: every image, oldest first, or the one ``ref_filter`` names."""
        images = list(self._catalogue.snapshot())
        if not ref_filter:
            return images
        found = image_model.find(images, ref_filter)
        return [found] if found is not None else []

    def status(self, text: str) -> Image | None:
        """None for an image the agent does not have (CRI: not an error)."""
        if not text:
            return None
        return image_model.find(self._catalogue.snapshot(), text)

    def get(self, text: str) -> Image:
        """The image ``text`` names; ``FailedPrecondition`` when it is not on this host."""
        img = self.status(text)
        if img is None:
            raise FailedPrecondition(f"image {text!r} is not present on this host; pull it first")
        return img

    def base_disk_path(self, img: Image, disk: BaseDisk) -> Path:
        """Where ``disk`` of ``img`` lies on the host."""
        return self._ports.files.disk_path(img.id, disk.file)

    def usage(self) -> tuple[int, int]:
        """ImageFsInfo: (bytes, inodes) used under the images directory."""
        return self._ports.files.usage()

    # Pull ----------------------------------------------------------------

    def pull(self, text: str, auth: RegistryAuth | None = None) -> Image:
        """PullImage: the image ``text`` names, with a pull's own credentials if any."""
        ref = parse_image_ref(text, field="image.image")
        return self._pulling(str(ref), lambda: self._puller.pull(ref, auth), metered=True)

    def import_layout(self, layout_path: str, layout_ref: str, text: str) -> Image:
        """Images/Import: the OCI layout at ``layout_path`` (on this host), stored as ``text``.

        The layout stands in for the registry; everything else is a pull:
        same verification, same records, same clean-up when refused.
        """
        if not text:
            raise InvalidArgument("image", "is required: the reference to store the image under")
        ref = parse_image_ref(text, field="image")
        if not layout_path:
            raise InvalidArgument("layout_path", "is required")
        if self._ports.open_layout is None:
            raise FailedPrecondition("this agent cannot import images (no OCI layout reader configured)")
        source = self._ports.open_layout(Path(layout_path), layout_ref)
        img = self._pulling(f"import {ref}", lambda: self._puller.pull(ref, None, source), metered=False)
        log.info("image imported", image=str(ref), id=img.id, layout=layout_path)
        return img

    def _pulling(self, key: str, run: Callable[[], Image], *, metered: bool) -> Image:
        """Run a pull (or an import: ``metered`` False, not counted as a pull in the metrics)."""
        begun = time.monotonic()
        with self._activity:
            self._activity.wait_for(lambda: not self._collecting)
            self._active_pulls += 1
        try:
            img, _ = self._pulls.do(key, run)
        except BaseException:
            if metered:
                self._ports.metrics.image_pulled(time.monotonic() - begun, 0, ok=False)
            self._pull_ended()
            # A refused or broken pull leaves nothing in the store: what it
            # downloaded (manifest, config, layers) belongs to no image and is
            # collected now, unless another pull runs (then at the next
            # removal or start).
            try:
                self.collect_garbage()
            except OSError as exc:
                log.warning("image garbage collection failed", error=str(exc))
            raise
        self._pull_ended()
        if metered:
            self._ports.metrics.image_pulled(time.monotonic() - begun, img.size, ok=True)
        return img

    def _pull_ended(self) -> None:
        with self._activity:
            self._active_pulls -= 1
            self._activity.notify_all()

    # Remove and garbage collection -----------------------------------------

    def remove(self, text: str) -> None:
        """RemoveImage: by id, tag or digest; CRI: no error when already gone."""
        img = self.status(text)
        if img is None:
            return
        self._catalogue.delete(img, self._in_use)
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
            return self._catalogue.collect()
        finally:
            with self._activity:
                self._collecting = False
                self._activity.notify_all()


def _merge(a: tuple[str, ...], b: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys((*a, *b)))
