"""ImageService over a recording fake registry, with the real ImageFiles,
DiskExtractor and Store in a temporary state directory; only qemu-img is
replaced (by an inspector that calls files starting with the qcow2 magic
qcow2 and everything else raw).

The fake registry serves real OCI manifests (agent.domain.oci), real gzip /
zstd layer tarballs, and writes blobs beside their destination and renames
them into place, as the real client does.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import tarfile
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zstandard

from agent.adapters.image_files import ImageFiles
from agent.adapters.layers import DiskExtractor
from agent.adapters.store import Store
from agent.concurrency import BlobProgress, KeyedLock, SingleFlight
from agent.domain import oci
from agent.domain.disk import DiskInfo
from agent.domain.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from agent.domain.image import BaseDisk, Image
from agent.domain.imageref import ImageRef, RemoteRepository, parse_image_ref
from agent.domain.registry import RegistryAuth, ResolvedImage
from agent.services.images import ImageService
from agent.services.ports import ImagePorts, Metrics, NoMetrics
from agent.services.pull import DISK_FILE_SLACK
from tests.services.service_fakes import FakeClock

QCOW2_MAGIC = b"QFI\xfb"
MAX_VIRTUAL_SIZE = 1 << 30
CIRROS = "docker.io/kubevirt/cirros:v1"


# Layers and images ---------------------------------------------------------------------


def layer_tar(files: Mapping[str, bytes | None]) -> bytes:
    """An uncompressed layer; a None value makes a symlink to /etc/shadow."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs: set[str] = set()
        for name, data in files.items():
            parent = name.rsplit("/", 1)[0] if "/" in name else ""
            if parent and parent not in dirs:
                dirs.add(parent)
                info = tarfile.TarInfo(parent)
                info.type = tarfile.DIRTYPE
                info.mode = 0o555
                tar.addfile(info)
            info = tarfile.TarInfo(name)
            info.uid = info.gid = 107
            if data is None:
                info.type = tarfile.SYMTYPE
                info.linkname = "/etc/shadow"
                tar.addfile(info)
            else:
                info.size = len(data)
                info.mode = 0o444
                tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


@dataclass(frozen=True)
class Layer:
    blob: bytes
    media_type: str
    diff_id: str


def gzip_layer(files: Mapping[str, bytes | None]) -> Layer:
    tar = layer_tar(files)
    return Layer(gzip.compress(tar, mtime=0), oci.OCI_LAYER_GZIP, oci.sha256_digest(tar))


def zstd_layer(files: Mapping[str, bytes | None]) -> Layer:
    tar = layer_tar(files)
    return Layer(zstandard.ZstdCompressor().compress(tar), oci.OCI_LAYER_ZSTD, oci.sha256_digest(tar))


def plain_layer(files: Mapping[str, bytes | None]) -> Layer:
    tar = layer_tar(files)
    return Layer(tar, oci.DOCKER_LAYER, oci.sha256_digest(tar))


def qcow2_bytes(tag: bytes) -> bytes:
    """Content our fake inspector calls qcow2 (real qemu-img is not run here)."""
    return QCOW2_MAGIC + b"\x00\x00\x00\x03" + tag * 100


def config_for(layers: list[Layer], user: str = "107") -> bytes:
    return json.dumps({
        "architecture": "amd64",
        "os": "linux",
        "config": {"User": user} if user else {},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
    }, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Published:
    """An image as the fake registry serves it."""

    name: str  # registry/repository
    resolved: ResolvedImage
    config: bytes
    layers: tuple[Layer, ...]

    @property
    def id(self) -> str:
        return self.resolved.manifest.config.digest

    @property
    def digest(self) -> str:
        return self.resolved.digest

    @property
    def digest_ref(self) -> str:
        return f"{self.name}@{self.digest}"

    @property
    def layer_digests(self) -> tuple[str, ...]:
        return tuple(oci.sha256_digest(layer.blob) for layer in self.layers)


# The fake registry -------------------------------------------------------------------


@dataclass
class FakeRegistry:
    """Serves what was published; records every call with the auth given."""

    manifests: dict[str, Published] = field(default_factory=dict)  # "name:tag" / "name@digest"
    blobs: dict[str, bytes] = field(default_factory=dict)
    calls: list[tuple[str, str, RegistryAuth | None]] = field(default_factory=list)
    blob_delay: float = 0.0
    fail_blob: dict[str, BaseException] = field(default_factory=dict)
    # Called inside fetch_config / fetch_blob (to hold a pull at that point).
    on_fetch_config: Callable[[], None] | None = None
    on_fetch_blob: Callable[[str], None] | None = None
    on_blob_failed: Callable[[str], None] | None = None  # after the temp file is gone
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def publish(self, reference: str, layers: list[Layer], *, user: str = "107",
                config: bytes | None = None) -> Published:
        ref = parse_image_ref(reference)
        config = config if config is not None else config_for(layers, user)
        manifest = oci.ImageManifest(
            media_type=oci.OCI_MANIFEST,
            config=oci.Descriptor(oci.OCI_CONFIG, oci.sha256_digest(config), len(config)),
            layers=tuple(oci.Descriptor(layer.media_type, oci.sha256_digest(layer.blob), len(layer.blob))
                         for layer in layers),
        )
        data = oci.encode_manifest(manifest)
        digest = oci.sha256_digest(data)
        parsed = oci.parse_manifest_document(data, oci.OCI_MANIFEST)
        assert isinstance(parsed, oci.ImageManifest)
        resolved = ResolvedImage(
            ref=ref,
            repository=RemoteRepository(registry=ref.registry, host=ref.registry, name=ref.repository),
            digest=digest,
            media_type=oci.OCI_MANIFEST,
            manifest_bytes=data,
            manifest=parsed,
            reference_digest=digest,
        )
        published = Published(ref.name, resolved, config, tuple(layers))
        with self._lock:
            self.blobs[published.id] = config
            for layer in layers:
                self.blobs[oci.sha256_digest(layer.blob)] = layer.blob
            if ref.tag is not None:
                self.manifests[f"{ref.name}:{ref.tag}"] = published
            self.manifests[published.digest_ref] = published
        return published

    def count(self, method: str) -> int:
        with self._lock:
            return sum(1 for call in self.calls if call[0] == method)

    def blob_fetches(self) -> Counter[str]:
        with self._lock:
            return Counter(call[1] for call in self.calls if call[0] == "fetch_blob")

    def _record(self, method: str, what: str, auth: RegistryAuth | None) -> None:
        with self._lock:
            self.calls.append((method, what, auth))

    # RegistryPort

    def resolve(self, ref: ImageRef, *, auth: RegistryAuth | None = None) -> ResolvedImage:
        self._record("resolve", str(ref), auth)
        key = f"{ref.name}@{ref.digest}" if ref.digest else f"{ref.name}:{ref.tag}"
        with self._lock:
            published = self.manifests.get(key)
        if published is None:
            raise NotFound(f"image {ref} not found")
        return dataclasses.replace(published.resolved, ref=ref)

    def fetch_config(self, repo: RemoteRepository, config: oci.Descriptor, *,
                     auth: RegistryAuth | None = None) -> bytes:
        self._record("fetch_config", config.digest, auth)
        if self.on_fetch_config is not None:
            self.on_fetch_config()
        return self.blobs[config.digest]

    def fetch_blob(self, repo: RemoteRepository, digest: str, dest_path: str | os.PathLike[str], *,
                   expected_size: int | None = None, auth: RegistryAuth | None = None,
                   progress: BlobProgress | None = None) -> int:
        """Like RegistryClient.fetch_blob: a temporary file beside dest_path, followed
        through ``progress`` while written, renamed into place at the end."""
        self._record("fetch_blob", digest, auth)
        if self.on_fetch_blob is not None:
            self.on_fetch_blob(digest)
        data = self.blobs[digest]
        assert expected_size == len(data)
        dest = Path(dest_path)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".partial")
        try:
            if progress is not None:
                progress.started(tmp_name)
            with os.fdopen(fd, "wb", buffering=0) as out:
                for at in range(0, len(data), 64 << 10):
                    if digest in self.fail_blob and at >= len(data) // 2:
                        raise self.fail_blob[digest]
                    n = out.write(data[at:at + (64 << 10)])
                    if progress is not None:
                        progress.wrote(n)
                    if self.blob_delay:
                        time.sleep(self.blob_delay)
                if digest in self.fail_blob:
                    raise self.fail_blob[digest]
            os.replace(tmp_name, dest)
        except BaseException as exc:
            Path(tmp_name).unlink(missing_ok=True)
            if progress is not None:
                progress.finished(exc)
            if self.on_blob_failed is not None:
                self.on_blob_failed(digest)
            raise
        if progress is not None:
            progress.finished()
        return len(data)


class FakeInspector:
    """inspect_disk without qemu-img: the qcow2 magic decides the format."""

    def __init__(self) -> None:
        self.calls: list[tuple[bytes, str, int]] = []
        self.declared: list[str | None] = []  # the format each disk's name declared
        self.fail: BaseException | None = None
        self._lock = threading.Lock()

    def __call__(self, path: Path, source: str, limit: int, declared: str | None) -> DiskInfo:
        data = path.read_bytes()
        with self._lock:
            self.calls.append((data, source, limit))
            self.declared.append(declared)
        if self.fail is not None:
            raise self.fail
        fmt = "qcow2" if data.startswith(QCOW2_MAGIC) else "raw"
        return DiskInfo(format=fmt, virtual_size=len(data) * 10, actual_size=len(data))


# The service under test --------------------------------------------------------------


@dataclass
class Env:
    root: Path
    registry: FakeRegistry
    files: ImageFiles
    store: Store
    inspect: FakeInspector
    in_use: set[str]
    service: ImageService

    def restart(self) -> Env:
        """A new agent process on the same state directory (recover() not yet run)."""
        self.store.close()
        return make_env(self.root, self.registry)

    def tmp_entries(self) -> list[str]:
        return sorted(p.name for p in self.files.tmp.iterdir())

    def partial_blobs(self) -> list[str]:
        return sorted(p.name for p in self.files.blobs.iterdir() if not p.name.isalnum())

    def disk_dirs(self) -> list[str]:
        return sorted(p.name for p in self.files.disks.iterdir())

    def disk_bytes(self, img: Image, which: int = 0) -> bytes:
        return self.service.base_disk_path(img, img.disks[which]).read_bytes()


def make_env(root: Path, registry: FakeRegistry | None = None, metrics: Metrics | None = None) -> Env:
    registry = registry or FakeRegistry()
    files = ImageFiles(root / "images")
    store = Store(root / "podvisor.db")
    inspect = FakeInspector()
    in_use: set[str] = set()
    ports = ImagePorts(
        registry=registry,
        store=store,
        files=files,
        new_extractor=DiskExtractor,
        inspect_disk=inspect,
        clock=FakeClock(),
        metrics=metrics or NoMetrics(),
    )
    service = ImageService(ports, max_virtual_size=MAX_VIRTUAL_SIZE, parallelism=4,
                           in_use=lambda: set(in_use))
    return Env(root, registry, files, store, inspect, in_use, service)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = make_env(tmp_path)
    yield e
    e.store.close()


def publish_cirros(env: Env, reference: str = CIRROS, tag: bytes = b"cirros") -> Published:
    return env.registry.publish(reference, [
        gzip_layer({"disk/cirros.qcow2": qcow2_bytes(tag)}),
        zstd_layer({"etc/motd": b"hello\n"}),
    ])


def in_parallel(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Run fn(0..n-1) on n threads started together; results or exceptions, in order."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=10)  # a broken start is handed back too, not lost in the thread
            results[i] = fn(i)
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    return results


# Pull ------------------------------------------------------------------------------------


def test_pull_records_the_image_with_tag_and_digest_refs(env: Env) -> None:
    pub = publish_cirros(env)
    img = env.service.pull(CIRROS)

    disk = qcow2_bytes(b"cirros")
    assert img == Image(
        id=pub.id,
        manifest_digest=pub.digest,
        repo_tags=(CIRROS,),
        repo_digests=(pub.digest_ref,),
        size=len(pub.config) + sum(len(layer.blob) for layer in pub.layers),
        layers=pub.layer_digests,
        config_media_type=oci.OCI_CONFIG,
        user="107",
        disks=(BaseDisk(path_in_image="/disk/cirros.qcow2", file="disk0.qcow2", format="qcow2",
                        virtual_size=len(disk) * 10, size=len(disk)),),
        created_at_ns=img.created_at_ns,
        disk_problem="",
    )
    assert img.created_at_ns > 0
    assert env.service.list_images() == [img]
    assert env.store.load_images() == [img]
    assert env.disk_bytes(img) == disk
    path = env.service.base_disk_path(img, img.disks[0])
    assert path == env.files.disks / pub.id.removeprefix("sha256:") / "disk0.qcow2"
    # Private to root and QEMU's group: never world-readable (issue #10, item 11).
    assert path.stat().st_mode & 0o777 == 0o640 and path.parent.stat().st_mode & 0o777 == 0o750
    for blob in img.blobs:
        assert env.files.has_blob(blob)
    assert env.files.blob_path(pub.digest).read_bytes() == pub.resolved.manifest_bytes
    assert env.files.blob_path(pub.id).read_bytes() == pub.config
    assert env.inspect.calls == [(disk, f"image {CIRROS}: /disk/cirros.qcow2", MAX_VIRTUAL_SIZE)]
    assert env.tmp_entries() == []
    assert env.partial_blobs() == []


def test_pull_by_short_name_is_normalised(env: Env) -> None:
    pub = env.registry.publish("docker.io/library/cirros:latest", [gzip_layer({"disk/c.img": b"raw disk"})])
    img = env.service.pull("cirros")
    assert (img.repo_tags, img.repo_digests) == (("docker.io/library/cirros:latest",), (pub.digest_ref,))
    assert img.disks[0].format == "raw"
    assert env.service.status("cirros:latest") == img
    assert env.service.status("docker.io/library/cirros") == img


def test_pull_by_digest_records_only_the_digest_ref(env: Env) -> None:
    pub = publish_cirros(env)
    img = env.service.pull(pub.digest_ref)
    assert (img.repo_tags, img.repo_digests) == ((), (pub.digest_ref,))
    assert img.name == pub.digest_ref


def test_pull_passes_the_credentials_to_every_registry_call(env: Env) -> None:
    publish_cirros(env)
    auth = RegistryAuth(username="u", password="p")
    env.service.pull(CIRROS, auth)
    # Bound to the image's registry, so they never reach another one.
    assert {call[2] for call in env.registry.calls} == {RegistryAuth("u", "p", server_address="docker.io")}
    assert [call[0] for call in env.registry.calls] == ["resolve", "fetch_config", "fetch_blob", "fetch_blob"]


def test_pull_of_a_missing_image_is_not_found_and_stores_nothing(env: Env) -> None:
    with pytest.raises(NotFound):
        env.service.pull("docker.io/kubevirt/absent:1")
    assert env.service.list_images() == []
    assert env.tmp_entries() == []


def test_pull_of_a_malformed_reference(env: Env) -> None:
    with pytest.raises(InvalidArgument) as caught:
        env.service.pull("Not A Ref")
    assert caught.value.field == "image.image"
    assert env.registry.calls == []


def test_second_pull_downloads_nothing(env: Env) -> None:
    pub = publish_cirros(env)
    first = env.service.pull(CIRROS)
    assert env.registry.blob_fetches() == Counter(pub.layer_digests)
    assert env.service.downloads == 2

    again = env.service.pull(CIRROS)
    by_digest = env.service.pull(pub.digest_ref)

    assert again == first
    assert by_digest == first
    assert env.registry.count("fetch_blob") == 2
    assert env.registry.count("fetch_config") == 1
    assert env.service.downloads == 2
    assert len(env.inspect.calls) == 1


def test_pull_of_another_tag_of_the_same_image_adds_the_tag(env: Env) -> None:
    pub = publish_cirros(env)
    env.registry.manifests["docker.io/kubevirt/cirros:latest"] = pub
    first = env.service.pull(CIRROS)
    second = env.service.pull("docker.io/kubevirt/cirros:latest")
    assert second.id == first.id
    assert second.repo_tags == (CIRROS, "docker.io/kubevirt/cirros:latest")
    assert second.repo_digests == (pub.digest_ref,)
    assert second.created_at_ns == first.created_at_ns
    assert env.store.load_images() == [second]
    assert env.registry.count("fetch_blob") == 2


def test_ten_concurrent_pulls_fetch_each_layer_once(env: Env) -> None:
    pub = publish_cirros(env)
    env.registry.blob_delay = 0.2
    results = in_parallel(10, lambda _i: env.service.pull(CIRROS))

    assert all(isinstance(r, Image) for r in results), results
    assert len({r.id for r in results}) == 1
    assert env.registry.blob_fetches() == Counter(pub.layer_digests)
    assert env.service.downloads == 2
    assert env.registry.count("resolve") == 1  # one pull shared by all ten
    assert len(env.service.list_images()) == 1
    assert env.tmp_entries() == []


def test_concurrent_pulls_of_images_sharing_a_layer_fetch_it_once(env: Env) -> None:
    shared = zstd_layer({"etc/os-release": b"ID=podvisor\n"})
    images = [env.registry.publish(f"docker.io/kubevirt/vm{i}:1",
                                   [shared, gzip_layer({f"disk/vm{i}.img": f"disk {i}".encode()})])
              for i in range(5)]
    env.registry.blob_delay = 0.2
    results = in_parallel(5, lambda i: env.service.pull(f"docker.io/kubevirt/vm{i}:1"))

    assert [r.id for r in results] == [p.id for p in images]
    fetches = env.registry.blob_fetches()
    assert fetches[oci.sha256_digest(shared.blob)] == 1
    assert sum(fetches.values()) == 6
    assert [env.disk_bytes(r) for r in results] == [f"disk {i}".encode() for i in range(5)]


def test_concurrent_pulls_of_two_tags_of_one_image_keep_both_tags(env: Env) -> None:
    pub = publish_cirros(env)
    env.registry.manifests["docker.io/kubevirt/cirros:latest"] = pub
    meet = threading.Barrier(2)
    arrivals: list[int] = []

    def both_inside() -> None:
        # Hold each pull in fetch_config until the other arrives: both race past resolve
        # at once. A timeout breaks the barrier, fails that pull and so the test.
        arrivals.append(meet.wait(timeout=10))

    env.registry.on_fetch_config = both_inside
    refs = [CIRROS, "docker.io/kubevirt/cirros:latest"]
    results = in_parallel(2, lambda i: env.service.pull(refs[i]))

    assert all(isinstance(r, Image) for r in results), results
    assert sorted(arrivals) == [0, 1]  # both pulls were inside fetch_config together
    (img,) = env.service.list_images()
    assert sorted(img.repo_tags) == sorted(refs)
    assert env.store.load_images() == [img]
    assert env.disk_bytes(img) == qcow2_bytes(b"cirros")
    assert env.registry.blob_fetches() == Counter(pub.layer_digests)  # the second pull reused the first's
    assert len(env.inspect.calls) == 1


def test_layers_are_applied_in_order(env: Env) -> None:
    pub = env.registry.publish("docker.io/kubevirt/layered:1", [
        gzip_layer({"disk/old.img": b"old"}),
        plain_layer({"disk/.wh.old.img": b"", "disk/keep.img": b"overwritten"}),
        zstd_layer({"disk/keep.img": qcow2_bytes(b"kept"), "etc/hostname": b"vm\n"}),
    ])
    img = env.service.pull("docker.io/kubevirt/layered:1")
    assert img.layers == pub.layer_digests
    assert [(d.path_in_image, d.file, d.format) for d in img.disks] == [("/disk/keep.img", "disk0.qcow2", "qcow2")]
    assert env.disk_bytes(img) == qcow2_bytes(b"kept")


@pytest.mark.parametrize(
    ("files", "disks", "problem"),
    [
        ({"etc/motd": b"no disk"}, [], "no file under /disk/"),
        ({"disk/a.img": None}, [], "/disk/a.img is a symlink, not a regular file"),
    ],
    ids=["no-disk", "symlink"],
)
def test_images_that_cannot_back_a_vm_are_still_recorded(env: Env, files: dict[str, bytes | None],
                                                         disks: list[tuple[str, str, str]], problem: str) -> None:
    env.registry.publish("docker.io/x/odd:1", [gzip_layer(files)])
    img = env.service.pull("docker.io/x/odd:1")
    assert [(d.path_in_image, d.file, d.format) for d in img.disks] == disks
    assert img.disk_problem == problem
    assert env.store.load_images() == [img]
    assert env.disk_dirs() == [img.id.removeprefix("sha256:")]
    with pytest.raises(FailedPrecondition):
        img.disk_for(None)


@pytest.mark.parametrize(
    ("layers", "names"),
    [
        ([{"disk/a.img": b"A", "disk/b.qcow2": qcow2_bytes(b"B")}], "/disk/a.img, /disk/b.qcow2"),
        ([{"disk/a.img": b"A", "disk/b.img": None}], "/disk/a.img, /disk/b.img"),
        ([{"disk/a.img": b"A"}, {"disk/sub/b.img": b"B"}], "/disk/a.img, /disk/sub/b.img"),
    ],
    ids=["two-files", "file-and-symlink", "second-in-an-upper-layer"],
)
def test_a_second_entry_under_disk_is_refused(env: Env, layers: list[dict[str, bytes | None]],
                                              names: str) -> None:
    pub = env.registry.publish("docker.io/x/two:1", [gzip_layer(files) for files in layers])
    with pytest.raises(FailedPrecondition) as caught:
        env.service.pull("docker.io/x/two:1")
    assert caught.value.message == (
        f"image docker.io/x/two:1: layer {pub.layer_digests[-1]} makes a second entry under /disk/ "
        f"({names}); a containerDisk holds exactly one disk file"
    )
    assert env.inspect.calls == []
    _assert_nothing_left(env, pub.id)


def test_each_disk_is_inspected_as_the_format_its_name_declares(env: Env) -> None:
    for i, (name, declared) in enumerate((("disk/a.qcow2", "qcow2"), ("disk/a.RAW", "raw"),
                                          ("disk/a.img", None), ("disk/qcow2", None))):
        env.registry.publish(f"docker.io/x/fmt:{i}", [gzip_layer({name: qcow2_bytes(b"x%d" % i)})])
        env.service.pull(f"docker.io/x/fmt:{i}")
        assert env.inspect.declared[-1] == declared


def _assert_nothing_left(env: Env, image_id: str) -> None:
    assert env.service.list_images() == []
    assert env.service.status(image_id) is None
    assert env.store.load_images() == []
    assert env.disk_dirs() == []
    assert env.tmp_entries() == []
    assert env.partial_blobs() == []
    assert env.files.blob_digests() == []  # not even the manifest, config or verified layers


def test_pull_failing_in_inspect_disk_leaves_nothing(env: Env) -> None:
    pub = publish_cirros(env)
    env.inspect.fail = FailedPrecondition("image x: /disk/cirros.qcow2: refusing a disk with a backing file")
    with pytest.raises(FailedPrecondition, match="backing file"):
        env.service.pull(CIRROS)
    _assert_nothing_left(env, pub.id)

    # Nothing half-done gets in the way of the next attempt.
    env.inspect.fail = None
    img = env.service.pull(CIRROS)
    assert env.disk_bytes(img) == qcow2_bytes(b"cirros")
    # The failed pull's blobs were collected at once: the retry fetches them again.
    assert env.registry.count("fetch_blob") == 4


def _big_disk_image(env: Env, reference: str = "docker.io/x/big:1") -> Published:
    """One layer of many 64 KiB chunks (incompressible), then a small one."""
    return env.registry.publish(reference, [
        gzip_layer({"disk/big.img": os.urandom(1 << 20)}),
        zstd_layer({"etc/motd": b"hello\n"}),
    ])


def test_pull_failing_in_download_leaves_nothing(env: Env) -> None:
    pub = _big_disk_image(env)
    env.registry.blob_delay = 0.01  # extraction follows the download chunk by chunk
    env.registry.fail_blob[pub.layer_digests[0]] = Unavailable("registry docker.io is unreachable")
    with pytest.raises(Unavailable, match="registry docker.io is unreachable"):
        env.service.pull("docker.io/x/big:1")
    _assert_nothing_left(env, pub.id)
    assert not env.files.has_blob(pub.layer_digests[0])


def test_download_error_of_a_later_layer_is_the_pulls_error(env: Env) -> None:
    pub = publish_cirros(env)
    first, second = pub.layer_digests
    second_failed = threading.Event()
    env.registry.fail_blob[second] = Unavailable("registry docker.io is unreachable")
    env.registry.on_blob_failed = lambda digest: second_failed.set() if digest == second else None
    held: list[bool] = []

    def hold_first(digest: str) -> None:
        # The first layer (extracted first) arrives only after the second one failed.
        if digest == first:
            held.append(second_failed.wait(timeout=10))

    env.registry.on_fetch_blob = hold_first

    with pytest.raises(Unavailable, match="registry docker.io is unreachable"):
        env.service.pull(CIRROS)
    assert held == [True]  # the order the test is about really happened
    _assert_nothing_left(env, pub.id)


def test_download_error_reaches_a_pull_that_shared_the_download(env: Env) -> None:
    shared = gzip_layer({"disk/shared.img": os.urandom(256 << 10)})
    own = zstd_layer({"etc/b": b"b"})
    env.registry.publish("docker.io/x/a:1", [shared])
    env.registry.publish("docker.io/x/b:1", [own, shared])
    shared_digest = oci.sha256_digest(shared.blob)
    b_started = threading.Event()
    release = threading.Event()

    def hold(digest: str) -> None:
        if digest == shared_digest:
            assert release.wait(timeout=10)  # a's download of the shared blob waits for b to join
        else:
            b_started.set()

    env.registry.on_fetch_blob = hold
    env.registry.blob_delay = 0.02  # a's own extraction is attached to the download when it fails
    env.registry.fail_blob[shared_digest] = Unavailable("registry docker.io is unreachable")
    results: dict[str, Any] = {}

    def pull(name: str) -> None:
        try:
            results[name] = env.service.pull(f"docker.io/x/{name}:1")
        except BaseException as exc:  # noqa: BLE001 - checked below
            results[name] = exc

    a = threading.Thread(target=pull, args=("a",))
    a.start()
    while env.registry.count("fetch_blob") == 0:
        time.sleep(0.01)
    b = threading.Thread(target=pull, args=("b",))
    b.start()
    assert b_started.wait(timeout=10)
    time.sleep(0.3)  # b's download of the shared blob joins a's
    release.set()
    a.join(timeout=10)
    b.join(timeout=10)

    assert env.registry.blob_fetches()[shared_digest] == 1
    assert not a.is_alive() and not b.is_alive()
    assert isinstance(results["a"], Unavailable), results["a"]
    assert isinstance(results["b"], Unavailable), results["b"]


def test_pull_failing_in_extraction_leaves_nothing(env: Env) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name in ("disk/a.img", "../../etc/cron.d/evil"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    tar_bytes = raw.getvalue()
    bad = Layer(gzip.compress(tar_bytes), oci.OCI_LAYER_GZIP, oci.sha256_digest(tar_bytes))
    pub = env.registry.publish("docker.io/x/evil:1", [bad])
    with pytest.raises(FailedPrecondition, match="unsafe tar entry '../../etc/cron.d/evil'"):
        env.service.pull("docker.io/x/evil:1")
    _assert_nothing_left(env, pub.id)
    assert env.inspect.calls == []


def test_unknown_layer_type_is_refused_before_downloading(env: Env) -> None:
    layer = gzip_layer({"disk/a.img": b"A"})
    env.registry.publish("docker.io/x/artifact:1",
                         [Layer(layer.blob, "application/vnd.cncf.helm.chart.content.v1.tar+gzip", layer.diff_id)])
    with pytest.raises(FailedPrecondition, match="is not a supported filesystem layer"):
        env.service.pull("docker.io/x/artifact:1")
    assert env.registry.count("fetch_blob") == 0
    assert env.service.list_images() == []
    assert env.tmp_entries() == []


def test_tag_moves_from_the_old_image_to_the_new(env: Env) -> None:
    old_pub = publish_cirros(env, tag=b"old")
    old = env.service.pull(CIRROS)
    new_pub = publish_cirros(env, tag=b"new")  # the tag now points at another image
    new = env.service.pull(CIRROS)

    assert new.id == new_pub.id != old.id
    assert new.repo_tags == (CIRROS,)
    old_now = env.service.status(old.id)
    assert old_now is not None
    assert old_now.repo_tags == ()
    assert old_now.repo_digests == (old_pub.digest_ref,)
    assert env.service.status(CIRROS) == new
    assert env.service.status(old_pub.digest_ref) == old_now
    assert {i.id: i.repo_tags for i in env.store.load_images()} == {old.id: (), new.id: (CIRROS,)}
    assert env.disk_bytes(new) == qcow2_bytes(b"new")
    assert env.disk_bytes(old_now) == qcow2_bytes(b"old")


def test_a_foreign_manifest_reusing_a_config_cannot_plant_disks(env: Env) -> None:
    good_layers = [gzip_layer({"disk/fedora.qcow2": qcow2_bytes(b"good")})]
    evil = gzip_layer({"disk/fedora.qcow2": qcow2_bytes(b"evil")})
    trusted_config = config_for(good_layers)
    attacker = env.registry.publish("docker.io/attacker/x:1", [evil], config=trusted_config)
    env.registry.publish("quay.io/containerdisks/fedora:39", good_layers)
    # The attacker's pull is refused: its layer is not what the (reused) config says.
    with pytest.raises(FailedPrecondition) as caught:
        env.service.pull("docker.io/attacker/x:1")
    assert caught.value.message == (
        f"image docker.io/attacker/x:1: layer {attacker.layer_digests[0]} does not match the image config "
        f"(its content is {evil.diff_id}; the config's rootfs.diff_ids says {good_layers[0].diff_id})"
    )
    _assert_nothing_left(env, attacker.id)
    img = env.service.pull("quay.io/containerdisks/fedora:39")
    assert img.id == attacker.id  # the same config, so the same image id: nothing of the attacker's was kept
    assert env.disk_bytes(img) == qcow2_bytes(b"good")


def test_layers_that_do_not_match_the_configs_diff_ids_are_refused(env: Env) -> None:
    good = [gzip_layer({"etc/motd": b"hi\n"}), gzip_layer({"disk/fedora.qcow2": qcow2_bytes(b"good")})]
    evil = gzip_layer({"disk/fedora.qcow2": qcow2_bytes(b"evil")})
    pub = env.registry.publish("docker.io/attacker/x:1", [good[0], evil], config=config_for(good))
    with pytest.raises(FailedPrecondition) as caught:
        env.service.pull("docker.io/attacker/x:1")
    assert caught.value.message == (
        f"image docker.io/attacker/x:1: layer {pub.layer_digests[1]} does not match the image config "
        f"(its content is {evil.diff_id}; the config's rootfs.diff_ids says {good[1].diff_id})"
    )
    _assert_nothing_left(env, pub.id)
    assert env.inspect.calls == []


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (b'{"rootfs": {"type": "layers", "diff_ids": []}}',
         "image docker.io/x/y:1: the manifest has 1 layers but the config's rootfs.diff_ids lists 0"),
        (b'{"architecture": "amd64", "os": "linux"}', "image docker.io/x/y:1: its config has no rootfs.diff_ids list"),
        (b'{"rootfs": {"diff_ids": [1]}}', "image docker.io/x/y:1: its config has no rootfs.diff_ids list"),
        (b"[]", "image docker.io/x/y:1: its config has no rootfs.diff_ids list"),
    ],
    ids=["count", "no-rootfs", "not-strings", "not-an-object"],
)
def test_config_without_matching_diff_ids_is_refused_before_downloading(env: Env, config: bytes,
                                                                        message: str) -> None:
    pub = env.registry.publish("docker.io/x/y:1", [gzip_layer({"disk/a.img": b"A"})], config=config)
    with pytest.raises(FailedPrecondition) as caught:
        env.service.pull("docker.io/x/y:1")
    assert caught.value.message == message
    assert env.registry.count("fetch_blob") == 0
    assert env.service.status(pub.id) is None
    assert env.tmp_entries() == []


def test_a_layer_listed_twice_is_fetched_once_and_applied_twice(env: Env) -> None:
    base = zstd_layer({"etc/motd": b"hello\n"})
    pub = env.registry.publish("docker.io/x/twice:1", [base, gzip_layer({"disk/a.img": b"A"}), base])
    env.registry.blob_delay = 0.01
    img = env.service.pull("docker.io/x/twice:1")
    assert img.layers == pub.layer_digests
    assert env.registry.blob_fetches() == Counter(set(pub.layer_digests))
    assert env.disk_bytes(img) == b"A"


def test_record_of_the_same_config_with_other_layers_is_not_reused(env: Env) -> None:
    # The same content compressed another way: same config (and id), other layer blobs.
    files = {"disk/a.img": qcow2_bytes(b"same")}
    as_gzip = env.registry.publish("docker.io/x/gz:1", [gzip_layer(files)])
    as_zstd = env.registry.publish("docker.io/x/zst:1", [zstd_layer(files)])
    assert as_gzip.id == as_zstd.id
    first = env.service.pull("docker.io/x/gz:1")

    again = env.service.pull("docker.io/x/zst:1")

    assert env.registry.blob_fetches() == Counter(as_gzip.layer_digests + as_zstd.layer_digests)
    assert len(env.inspect.calls) == 2  # extracted and checked again, not trusted
    assert again.id == first.id
    assert again.layers == as_zstd.layer_digests
    assert again.manifest_digest == as_zstd.digest
    assert again.repo_tags == ("docker.io/x/gz:1", "docker.io/x/zst:1")
    assert again.created_at_ns == first.created_at_ns
    assert env.service.list_images() == [again]
    assert env.disk_bytes(again) == qcow2_bytes(b"same")


def test_extractor_is_bounded_by_the_largest_virtual_size(env: Env) -> None:
    limits: list[tuple[int, int | None, int]] = []

    def new_extractor(workdir: Path, image: str, max_file_bytes: int = 0, max_total_bytes: int | None = None,
                      min_free_bytes: int = 0) -> DiskExtractor:
        limits.append((max_file_bytes, max_total_bytes, min_free_bytes))
        return DiskExtractor(workdir, image, max_file_bytes=16)

    ports = ImagePorts(registry=env.registry, store=env.store, files=env.files, new_extractor=new_extractor,
                       inspect_disk=env.inspect, clock=FakeClock())
    service = ImageService(ports, max_virtual_size=1000)
    env.registry.publish("docker.io/x/big:1", [gzip_layer({"disk/big.img": b"B" * 17})])
    with pytest.raises(FailedPrecondition, match="/disk/big.img in layer .* is 17 bytes, more than the 16"):
        service.pull("docker.io/x/big:1")
    # Without a per-pull cap configured, a pull may unpack one disk of the largest size.
    assert limits == [(1000 + DISK_FILE_SLACK, 1000 + DISK_FILE_SLACK, 0)]
    assert DISK_FILE_SLACK == 64 << 20
    assert env.tmp_entries() == []
    assert env.disk_dirs() == []


def test_pull_again_after_the_disk_files_went_missing(env: Env) -> None:
    first = env.service.pull(publish_cirros(env).digest_ref)
    env.registry.manifests[CIRROS] = env.registry.manifests[first.repo_digests[0]]
    env.files.remove_disks(first.id)
    again = env.service.pull(CIRROS)
    assert again.id == first.id
    assert again.created_at_ns == first.created_at_ns
    assert again.repo_tags == (CIRROS,)
    assert again.repo_digests == first.repo_digests
    assert env.disk_bytes(again) == qcow2_bytes(b"cirros")
    assert env.registry.count("fetch_blob") == 2  # blobs were still there


# Queries ----------------------------------------------------------------------------------


def test_status_get_and_list_filter(env: Env) -> None:
    publish_cirros(env)
    img = env.service.pull(CIRROS)
    assert env.service.status("") is None
    assert env.service.status("docker.io/kubevirt/other:1") is None
    assert env.service.get(img.id) == img
    with pytest.raises(FailedPrecondition) as caught:
        env.service.get("docker.io/kubevirt/other:1")
    assert caught.value.message == "image 'docker.io/kubevirt/other:1' is not present on this host; pull it first"
    assert env.service.list_images("") == [img]
    assert env.service.list_images(CIRROS) == [img]
    assert env.service.list_images("docker.io/kubevirt/other:1") == []


# Remove and garbage collection ---------------------------------------------------------


@pytest.mark.parametrize(
    "how",
    ["tag", "tag-short", "id", "id-hex", "id-prefix", "digest-ref"],
)
def test_remove_by_tag_id_or_digest(env: Env, how: str) -> None:
    pub = publish_cirros(env)
    img = env.service.pull(CIRROS)
    text = {
        "tag": CIRROS,
        "tag-short": "kubevirt/cirros:v1",
        "id": img.id,
        "id-hex": img.id.removeprefix("sha256:"),
        "id-prefix": img.id[:19],
        "digest-ref": pub.digest_ref,
    }[how]
    env.service.remove(text)

    assert env.service.list_images() == []
    assert env.store.load_images() == []
    assert env.disk_dirs() == []
    assert env.files.blob_digests() == []


def test_remove_keeps_other_images_and_the_blobs_they_share(env: Env) -> None:
    shared = zstd_layer({"etc/os-release": b"ID=podvisor\n"})
    a = env.registry.publish("docker.io/x/a:1", [shared, gzip_layer({"disk/a.img": b"A"})])
    b = env.registry.publish("docker.io/x/b:1", [shared, gzip_layer({"disk/b.img": b"B"})])
    env.service.pull("docker.io/x/a:1")
    img_b = env.service.pull("docker.io/x/b:1")

    env.service.remove("docker.io/x/a:1")

    assert env.service.list_images() == [img_b]
    assert sorted(env.files.blob_digests()) == sorted(img_b.blobs)
    assert env.files.has_blob(oci.sha256_digest(shared.blob))
    assert not env.files.has_blob(a.layer_digests[1])
    assert env.disk_dirs() == [b.id.removeprefix("sha256:")]
    assert env.disk_bytes(img_b) == b"B"


def test_remove_is_idempotent(env: Env) -> None:
    publish_cirros(env)
    img = env.service.pull(CIRROS)
    env.service.remove(img.id)
    env.service.remove(img.id)
    env.service.remove(CIRROS)
    env.service.remove("docker.io/never/pulled:1")
    env.service.remove("sha256:" + "f" * 64)
    env.service.remove("")
    assert env.service.list_images() == []


def test_remove_of_an_image_in_use_is_refused(env: Env) -> None:
    publish_cirros(env)
    img = env.service.pull(CIRROS)
    env.in_use.add(img.id)
    with pytest.raises(FailedPrecondition) as caught:
        env.service.remove(CIRROS)
    assert caught.value.message == (
        f"image {CIRROS} ({img.id}) is used by a VM container on this host; remove that first"
    )
    assert env.service.list_images() == [img]
    assert env.store.load_images() == [img]
    assert env.disk_bytes(img) == qcow2_bytes(b"cirros")
    assert img.blobs and all(env.files.has_blob(b) for b in img.blobs)

    env.in_use.clear()
    env.service.remove(CIRROS)
    assert env.service.list_images() == []


def test_set_in_use_replaces_the_callback(env: Env) -> None:
    publish_cirros(env)
    img = env.service.pull(CIRROS)
    env.service.set_in_use(lambda: {img.id})
    with pytest.raises(FailedPrecondition):
        env.service.remove(img.id)


def test_collect_garbage_removes_unreferenced_blobs_and_disk_dirs(env: Env) -> None:
    publish_cirros(env)
    img = env.service.pull(CIRROS)
    junk = [oci.sha256_digest(b"junk %d" % i) for i in range(3)]
    for i, digest in enumerate(junk):
        env.files.write_blob(digest, b"junk %d" % i)
    stray_id = "sha256:" + "e" * 64
    stray_file = env.files.new_workdir() / "x"
    stray_file.write_bytes(b"stray disk")
    env.files.install_disks(stray_id, {"disk0.raw": stray_file})

    assert env.service.collect_garbage() == 3

    assert sorted(env.files.blob_digests()) == sorted(img.blobs)
    assert env.disk_dirs() == [img.id.removeprefix("sha256:")]
    assert env.disk_bytes(img) == qcow2_bytes(b"cirros")
    assert env.service.collect_garbage() == 0


def test_collect_garbage_waits_for_no_pull(env: Env) -> None:
    pub = publish_cirros(env)
    junk = oci.sha256_digest(b"junk")
    env.files.write_blob(junk, b"junk")
    inside = threading.Event()
    release = threading.Event()

    def hold(digest: str) -> None:
        if digest == pub.layer_digests[1]:
            inside.set()
            assert release.wait(timeout=10)

    env.registry.on_fetch_blob = hold
    result: list[Any] = []
    puller = threading.Thread(target=lambda: result.append(env.service.pull(CIRROS)))
    puller.start()
    assert inside.wait(timeout=10)
    # The pull's manifest, config and first layer are on disk but not referenced yet.
    assert env.service.collect_garbage() == 0
    assert env.files.has_blob(pub.digest) and env.files.has_blob(pub.id)
    release.set()
    puller.join(timeout=10)
    (img,) = result
    assert env.disk_bytes(img) == qcow2_bytes(b"cirros")
    assert env.service.collect_garbage() == 1
    assert not env.files.has_blob(junk)


def test_recover_clears_scratch_and_loads_records(env: Env) -> None:
    publish_cirros(env)
    img = env.service.pull(CIRROS)
    # What a crash leaves behind.
    work = env.files.new_workdir()
    (work / "disk-abc").write_bytes(b"half a disk")
    (env.files.tmp / "loose-file").write_bytes(b"x")
    partial_blob = env.files.blobs / ("." + "9" * 64 + ".abc.partial")
    partial_blob.write_bytes(b"half a blob")
    partial_disks = env.files.disks / ("8" * 64 + ".partial")
    partial_disks.mkdir()
    (partial_disks / "disk0.raw").write_bytes(b"half installed")
    orphan = oci.sha256_digest(b"orphan")
    env.files.write_blob(orphan, b"orphan")

    restarted = env.restart()
    try:
        assert restarted.service.list_images() == []  # nothing before recover()
        restarted.service.recover()

        assert restarted.service.list_images() == [img]
        assert restarted.service.status(CIRROS) == img
        assert restarted.tmp_entries() == []
        assert restarted.partial_blobs() == []
        assert restarted.disk_dirs() == [img.id.removeprefix("sha256:")]
        assert sorted(restarted.files.blob_digests()) == sorted(img.blobs)
        assert restarted.disk_bytes(img) == qcow2_bytes(b"cirros")
        # And the recovered service pulls warm.
        fetches = restarted.registry.count("fetch_blob")
        assert restarted.service.pull(CIRROS) == img
        assert restarted.registry.count("fetch_blob") == fetches
    finally:
        restarted.store.close()


def test_list_is_ordered_by_creation(env: Env) -> None:
    for i in range(3):
        env.registry.publish(f"docker.io/x/img{i}:1", [gzip_layer({"disk/a.img": b"%d" % i})])
    pulled = [env.service.pull(f"docker.io/x/img{i}:1") for i in (2, 0, 1)]
    assert env.service.list_images() == pulled


# SingleFlight -------------------------------------------------------------------------------


def test_single_flight_runs_concurrent_calls_once_and_shares_the_result() -> None:
    flight: SingleFlight[object] = SingleFlight()
    calls = []
    result = object()
    gate = threading.Event()

    def work() -> object:
        calls.append(1)
        assert gate.wait(timeout=10)
        return result

    outcomes: list[Any] = []
    lock = threading.Lock()

    def call(_i: int) -> None:
        out = flight.do("k", work)
        with lock:
            outcomes.append(out)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # let every caller join the flight
    gate.set()
    for t in threads:
        t.join(timeout=10)

    assert calls == [1]
    assert len(outcomes) == 10
    assert all(value is result for value, _ in outcomes)
    assert sorted(leader for _, leader in outcomes) == [False] * 9 + [True]


def test_single_flight_shares_the_exception() -> None:
    flight: SingleFlight[int] = SingleFlight()
    error = Unavailable("registry down")
    calls = []
    gate = threading.Event()

    def work() -> int:
        calls.append(1)
        assert gate.wait(timeout=10)
        raise error

    def call(_i: int) -> int:
        if _i == 0:
            return flight.do("k", work)[0]
        time.sleep(0.1)  # join the flight the first caller started
        return flight.do("k", work)[0]

    def open_gate() -> None:
        time.sleep(0.8)
        gate.set()

    opener = threading.Thread(target=open_gate)
    opener.start()
    results = in_parallel(5, call)
    opener.join()
    assert calls == [1]
    assert all(r is error for r in results)


def test_single_flight_keys_are_independent_and_nothing_is_cached() -> None:
    flight: SingleFlight[str] = SingleFlight()
    both_running = threading.Barrier(2)
    calls: list[str] = []

    def work(key: str) -> str:
        calls.append(key)
        both_running.wait(timeout=5)  # would time out if key b waited for key a
        return key.upper()

    results = in_parallel(2, lambda i: flight.do("ab"[i], lambda: work("ab"[i])))
    assert results == [("A", True), ("B", True)]
    # A finished flight is forgotten: the next call runs again.
    assert flight.do("a", lambda: "again") == ("again", True)
    assert sorted(calls) == ["a", "b"]


def test_single_flight_after_an_error_runs_again() -> None:
    flight: SingleFlight[int] = SingleFlight()
    with pytest.raises(ValueError):
        flight.do("k", lambda: int("x"))
    assert flight.do("k", lambda: 7) == (7, True)


# KeyedLock -----------------------------------------------------------------------------------


def test_keyed_lock_serialises_one_key_and_forgets_it() -> None:
    locks = KeyedLock()
    inside: list[str] = []
    overlap: list[bool] = []

    def hold(i: int) -> None:
        key = "same" if i < 3 else f"other{i}"
        with locks.hold(key):
            overlap.append(any(k == key for k in inside))
            inside.append(key)
            time.sleep(0.05)
            inside.remove(key)

    in_parallel(6, hold)
    assert overlap == [False] * 6
    assert locks._locks == {}  # noqa: SLF001 - no lock is kept for a key nobody holds
