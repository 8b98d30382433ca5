"""Pulling from a registry: resolving references (rewrites, mirrors, an index
to linux/amd64), manifests, configs and blob downloads.

Blobs stream to disk with SHA-256 verification: content that does not match
its digest is ``FailedPrecondition`` and never left on disk; 404 is
``NotFound`` naming the image.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from contextlib import closing
from pathlib import Path
from typing import Protocol

import httpx
import structlog

from agent.adapters.nospace import exhausted, is_no_space
from agent.adapters.registry.auth import Session, pull_scope
from agent.adapters.registry.transport import check_reference, check_status, read_limited
from agent.concurrency import BlobProgress
from agent.domain.errors import FailedPrecondition, NotFound, PodvisorError, ResourceExhausted
from agent.domain.imageref import ImageRef, Mirror, RemoteRepository, RewriteRule, pull_candidates
from agent.domain.oci import (
    MANIFEST_ACCEPT,
    Descriptor,
    ImageIndex,
    is_digest,
    parse_digest,
    parse_manifest_document,
    select_platform,
    sha256_digest,
    strip_media_type_parameters,
)
from agent.domain.registry import FetchedManifest, RegistryAuth, ResolvedImage

log = structlog.get_logger(__name__)

# distribution refuses manifests over 4 MiB; so do we, before parsing.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_CONFIG_BYTES = 16 * 1024 * 1024
# A blob of unknown size is given the deadline of this many bytes.
UNKNOWN_BLOB_BYTES = 1 << 30
_MAX_INDEX_DEPTH = 2


class _Sink(Protocol):
    """Where a download goes: a file or a buffer that can be rewound."""

    def write(self, data: bytes, /) -> int: ...

    def seek(self, offset: int, /) -> int: ...

    def truncate(self, size: int | None = None, /) -> int: ...


class _MemorySink(io.BytesIO):
    pass


class _ProgressSink:
    """Writes through to the file and tells a follower how far it got."""

    def __init__(self, out: _Sink, progress: BlobProgress) -> None:
        self._out = out
        self._progress = progress

    def write(self, data: bytes, /) -> int:
        n = self._out.write(data)
        self._progress.wrote(n)
        return n

    def seek(self, offset: int, /) -> int:
        if offset == 0 and self._progress.written:
            self._progress.restarted()
        return self._out.seek(offset)

    def truncate(self, size: int | None = None, /) -> int:
        return self._out.truncate(size)


class RegistryPull:
    """The pulling half of ``RegistryClient`` (which sets these attributes)."""

    _session: Session
    _rewrites: tuple[RewriteRule, ...]
    _mirrors: tuple[Mirror, ...]
    _platform: tuple[str, str, str | None]

    def candidates(self, ref: ImageRef) -> list[RemoteRepository]:
        """Where ``ref`` would be pulled from, in order (rewrites and mirrors applied)."""
        return pull_candidates(ref, self._rewrites, self._mirrors)

    def resolve(self, ref: ImageRef, *, auth: RegistryAuth | None = None) -> ResolvedImage:
        """Resolve ``ref`` to its linux/amd64 manifest, trying mirrors then the registry.

        A mirror that fails in any way is skipped (and logged); the error of the
        last candidate is raised.
        """
        candidates = self.candidates(ref)
        for position, repo in enumerate(candidates):
            try:
                return self.resolve_in(repo, ref, auth=auth)
            except PodvisorError as exc:
                if position == len(candidates) - 1:
                    raise
                log.warning(
                    "registry.candidate_failed",
                    image=str(ref),
                    endpoint=str(repo),
                    error=exc.message,
                )
        raise AssertionError("pull_candidates always returns the upstream")  # pragma: no cover

    def resolve_in(
        self,
        repo: RemoteRepository,
        ref: ImageRef,
        *,
        auth: RegistryAuth | None = None,
    ) -> ResolvedImage:
        """Resolve ``ref``'s tag or digest in ``repo``, following an index to linux/amd64."""
        source = str(ref)
        top = self.fetch_manifest(repo, ref.reference, auth=auth, image=source)
        document = parse_manifest_document(top.data, top.media_type, source=source)
        current = top
        index: ImageIndex | None = None
        depth = 0
        while isinstance(document, ImageIndex):
            depth += 1
            if depth > _MAX_INDEX_DEPTH:
                raise FailedPrecondition(f"{source}: indexes are nested too deeply")
            index = document
            os_name, architecture, variant = self._platform
            entry = select_platform(document, os_name, architecture, variant, source=source)
            current = self.fetch_manifest(repo, entry.digest, auth=auth, image=source)
            if len(current.data) != entry.size:
                raise FailedPrecondition(
                    f"{source}: manifest {entry.digest} is {len(current.data)} bytes, the index says {entry.size}"
                )
            document = parse_manifest_document(current.data, current.media_type or entry.media_type, source=source)
        log.info(
            "registry.resolved",
            image=source,
            endpoint=str(repo),
            digest=current.digest,
            reference_digest=top.digest,
        )
        return ResolvedImage(
            ref=ref,
            repository=repo,
            digest=current.digest,
            media_type=document.media_type,
            manifest_bytes=current.data,
            manifest=document,
            reference_digest=top.digest,
            index=index,
        )

    def fetch_manifest(
        self,
        repo: RemoteRepository,
        reference: str,
        *,
        auth: RegistryAuth | None = None,
        image: str | None = None,
    ) -> FetchedManifest:
        """GET a manifest or index by tag or digest, verifying its digest.

        By digest, the bytes must hash to it. By tag, the registry's
        ``Docker-Content-Digest`` is used when present and must match the bytes
        when it is a sha256 digest; otherwise the digest is computed.
        """
        check_reference(reference)
        what = image or f"{repo}:{reference}"

        def attempt() -> tuple[bytes, httpx.Headers]:
            response = self._session.send(
                repo,
                "GET",
                f"/v2/{repo.name}/manifests/{reference}",
                scopes=(pull_scope(repo.name),),
                auth=auth,
                headers={"Accept": MANIFEST_ACCEPT},
                max_bytes=MAX_MANIFEST_BYTES,
            )
            with closing(response):
                if response.status_code == 404:
                    raise NotFound(
                        f"image {what} not found: registry {repo.registry} has no manifest "
                        f"{reference!r} in repository {repo.name}"
                    )
                check_status(response, repo, f"manifest {reference} of {what}", ok=(200,))
                return read_limited(response, MAX_MANIFEST_BYTES, f"manifest of {what}"), response.headers

        data, headers = self._session.transport.retry_body(repo.registry, f"the manifest of {what}", attempt)
        computed = sha256_digest(data)
        if is_digest(reference):
            if computed != reference:
                raise FailedPrecondition(
                    f"image {what}: registry {repo.registry} served a manifest that hashes to "
                    f"{computed}, not the requested {reference}"
                )
            digest = reference
        else:
            header = headers.get("docker-content-digest", "").strip()
            if is_digest(header) and header != computed:
                raise FailedPrecondition(
                    f"image {what}: registry {repo.registry} says the manifest is {header} but it hashes to {computed}"
                )
            digest = computed
        media_type = strip_media_type_parameters(headers.get("content-type"))
        return FetchedManifest(digest=digest, media_type=media_type, data=data)

    def fetch_config(
        self,
        repo: RemoteRepository,
        config: Descriptor,
        *,
        auth: RegistryAuth | None = None,
    ) -> bytes:
        """The image config blob (held in memory, size-limited, verified)."""
        if config.size > MAX_CONFIG_BYTES:
            raise FailedPrecondition(
                f"config {config.digest} of {repo} is {config.size} bytes, more than the {MAX_CONFIG_BYTES} allowed"
            )
        return self.fetch_blob_bytes(repo, config.digest, expected_size=config.size, auth=auth)

    def fetch_blob_bytes(
        self,
        repo: RemoteRepository,
        digest: str,
        *,
        expected_size: int | None = None,
        limit: int = MAX_CONFIG_BYTES,
        auth: RegistryAuth | None = None,
    ) -> bytes:
        """A small blob in memory, verified against ``digest`` (and ``expected_size``)."""
        digest = parse_digest(digest)
        sink = _MemorySink()
        self._download(repo, digest, sink, expected_size, limit, auth)
        return sink.getvalue()

    def fetch_blob(
        self,
        repo: RemoteRepository,
        digest: str,
        dest_path: str | os.PathLike[str],
        *,
        expected_size: int | None = None,
        auth: RegistryAuth | None = None,
        progress: BlobProgress | None = None,
    ) -> int:
        """Stream a blob to ``dest_path`` and return its size.

        With ``progress``, another thread may follow the file while it is
        written (agent.concurrency); the digest is still checked before
        the file is renamed into place, and a failure reaches the follower.

        The content goes to a temporary file beside ``dest_path`` while being
        hashed, and is renamed into place only once its SHA-256 (and size, when
        given) match; on any failure the temporary file is removed and
        ``dest_path`` is untouched.
        """
        digest = parse_digest(digest)
        dest = Path(dest_path)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".partial")
        tmp = Path(tmp_name)
        try:
            if progress is not None:
                progress.started(tmp_name)
            # Unbuffered when followed, so a reader sees every chunk at once.
            with os.fdopen(fd, "wb", buffering=0 if progress is not None else -1) as out:
                sink: _Sink = out if progress is None else _ProgressSink(out, progress)
                size = self._download(repo, digest, sink, expected_size, None, auth)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dest)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if is_no_space(exc):
                exc = exhausted(f"downloading blob {digest}", dest.parent)
            if progress is not None:
                progress.finished(exc)
            if isinstance(exc, ResourceExhausted):
                raise exc from None
            raise
        if progress is not None:
            progress.finished()
        _fsync_dir(dest.parent)
        log.info("registry.blob_fetched", endpoint=str(repo), digest=digest, size=size)
        return size

    def _download(
        self,
        repo: RemoteRepository,
        digest: str,
        sink: _Sink,
        expected_size: int | None,
        limit: int | None,
        auth: RegistryAuth | None,
    ) -> int:
        """Copy a blob into ``sink`` while hashing it; return its verified size.

        A stream that breaks off is restarted from scratch (the sink is
        rewound) within the retry budget. What the sink holds is only valid
        when this returns; the caller discards it on an exception.
        """
        max_bytes = min(x for x in (expected_size, limit, UNKNOWN_BLOB_BYTES) if x is not None)

        def attempt() -> int:
            sink.seek(0)
            sink.truncate()
            hasher = hashlib.sha256()
            size = 0
            response = self._session.send(
                repo,
                "GET",
                f"/v2/{repo.name}/blobs/{digest}",
                scopes=(pull_scope(repo.name),),
                auth=auth,
                # Blobs are stored compressed already; a transparent transport
                # encoding would only make the hash check ambiguous.
                headers={"Accept-Encoding": "identity"},
                max_bytes=max_bytes,
            )
            with closing(response):
                if response.status_code == 404:
                    raise NotFound(f"blob {digest} not found in repository {repo.name} of registry {repo.registry}")
                check_status(response, repo, f"blob {digest}", ok=(200,))
                # iter_raw avoids a re-chunking copy; a transfer encoding we
                # did not ask for still gets decoded (chunk by chunk as it comes).
                encoded = response.headers.get("content-encoding", "identity") not in ("", "identity")
                chunks = response.iter_bytes() if encoded else response.iter_raw()
                for chunk in chunks:
                    size += len(chunk)
                    if expected_size is not None and size > expected_size:
                        raise FailedPrecondition(
                            f"blob {digest} from registry {repo.registry} ({repo.name}) is "
                            f"larger than the {expected_size} bytes its descriptor says"
                        )
                    if limit is not None and size > limit:
                        raise FailedPrecondition(
                            f"blob {digest} from registry {repo.registry} is larger than the {limit} bytes allowed"
                        )
                    hasher.update(chunk)
                    sink.write(chunk)
            actual = "sha256:" + hasher.hexdigest()
            if actual != digest:
                raise FailedPrecondition(
                    f"blob {digest} from registry {repo.registry} ({repo.name}) failed "
                    f"verification: its content hashes to {actual}"
                )
            if expected_size is not None and size != expected_size:
                raise FailedPrecondition(
                    f"blob {digest} from registry {repo.registry} ({repo.name}) is {size} bytes, "
                    f"its descriptor says {expected_size}"
                )
            return size

        return self._session.transport.retry_body(repo.registry, f"the download of blob {digest}", attempt)


def _fsync_dir(directory: Path) -> None:
    # Make the rename durable; best effort on filesystems that refuse it.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
