"""Pushing to a registry: blobs (with cross-repository mount) and manifests."""

from __future__ import annotations

import hashlib
import os
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import closing
from pathlib import Path

import httpx
import structlog

from agent.adapters.registry.auth import Session, pull_scope, push_scope
from agent.adapters.registry.transport import CHUNK_SIZE, ERROR_BODY_LIMIT, check_reference, check_status
from agent.domain.errors import FailedPrecondition, InvalidArgument, Unavailable
from agent.domain.imageref import RemoteRepository
from agent.domain.oci import is_digest, parse_digest, sha256_digest
from agent.domain.registry import RegistryAuth

log = structlog.get_logger(__name__)


class RegistryPush:
    """The pushing half of ``RegistryClient`` (which sets ``_session``)."""

    _session: Session

    def blob_exists(
        self,
        repo: RemoteRepository,
        digest: str,
        *,
        auth: RegistryAuth | None = None,
        scopes: Sequence[str] | None = None,
    ) -> bool:
        """HEAD the blob: True when ``repo`` has it."""
        digest = parse_digest(digest)
        response = self._session.send(
            repo,
            "HEAD",
            f"/v2/{repo.name}/blobs/{digest}",
            scopes=tuple(scopes) if scopes else (pull_scope(repo.name),),
            auth=auth,
        )
        with closing(response):
            if response.status_code == 404:
                return False
            check_status(response, repo, f"blob {digest}", ok=(200,))
            return True

    def push_blob(
        self,
        repo: RemoteRepository,
        content: bytes | str | os.PathLike[str],
        digest: str | None = None,
        *,
        mount_from: str | None = None,
        auth: RegistryAuth | None = None,
    ) -> str:
        """Upload a blob (bytes or a file path) unless ``repo`` already has it.

        Returns its digest (computed when not given; a given digest is trusted
        to the registry, which verifies it). With ``mount_from`` (a repository
        name on the same registry) a cross-repository mount is tried first.
        """
        if isinstance(content, bytes):
            size = len(content)
            data: bytes | None = content
            path: Path | None = None
        else:
            path = Path(content)
            size = path.stat().st_size
            data = None
        if digest is None:
            digest = sha256_digest(data) if data is not None else _hash_file(path)  # type: ignore[arg-type]
        else:
            digest = parse_digest(digest)
        scopes = [push_scope(repo.name)]
        if mount_from:
            scopes.append(pull_scope(mount_from))
        if self.blob_exists(repo, digest, auth=auth, scopes=scopes):
            log.info("registry.blob_exists", endpoint=str(repo), digest=digest)
            return digest

        params: dict[str, str] = {}
        if mount_from:
            params = {"mount": digest, "from": mount_from}
        response = self._session.send(
            repo,
            "POST",
            f"/v2/{repo.name}/blobs/uploads/",
            scopes=tuple(scopes),
            auth=auth,
            params=params,
            headers={"Content-Length": "0"},
        )
        with closing(response):
            if mount_from and response.status_code == 201:
                log.info("registry.blob_mounted", endpoint=str(repo), digest=digest, source=mount_from)
                return digest
            check_status(response, repo, f"upload of blob {digest}", ok=(202,))
            location = response.headers.get("location")
            if not location:
                raise Unavailable(f"registry {repo.registry} started an upload without a Location")
            upload_url = urllib.parse.urljoin(str(response.request.url), location)

        put_url = str(httpx.URL(upload_url).copy_merge_params({"digest": digest}))

        def body() -> Iterator[bytes]:
            if data is not None:
                yield data
                return
            assert path is not None
            with path.open("rb") as handle:
                while chunk := handle.read(CHUNK_SIZE):
                    yield chunk

        response = self._session.send(
            repo,
            "PUT",
            put_url,
            scopes=tuple(scopes),
            auth=auth,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            body=body,
            max_bytes=size + ERROR_BODY_LIMIT,
        )
        with closing(response):
            check_status(response, repo, f"upload of blob {digest}", ok=(201, 204))
        log.info("registry.blob_pushed", endpoint=str(repo), digest=digest, size=size)
        return digest

    def push_manifest(
        self,
        repo: RemoteRepository,
        reference: str,
        data: bytes,
        media_type: str,
        *,
        auth: RegistryAuth | None = None,
    ) -> str:
        """PUT a manifest or index under a tag or its digest; returns its digest."""
        check_reference(reference)
        digest = sha256_digest(data)
        if is_digest(reference) and reference != digest:
            raise InvalidArgument("reference", f"manifest bytes hash to {digest}, not to the reference {reference}")
        response = self._session.send(
            repo,
            "PUT",
            f"/v2/{repo.name}/manifests/{reference}",
            scopes=(push_scope(repo.name),),
            auth=auth,
            headers={"Content-Type": media_type},
            body=lambda: iter([data]),
            max_bytes=len(data) + ERROR_BODY_LIMIT,
        )
        with closing(response):
            check_status(response, repo, f"manifest {reference}", ok=(200, 201, 204))
            header = response.headers.get("docker-content-digest", "").strip()
        if is_digest(header) and header != digest:
            raise FailedPrecondition(
                f"registry {repo.registry} stored manifest {reference} as {header}, expected {digest}"
            )
        log.info("registry.manifest_pushed", endpoint=str(repo), reference=reference, digest=digest)
        return digest


def _hash_file(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_SIZE):
            hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()
