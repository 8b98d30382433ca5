"""Pure conversions between runtime.v1 image messages and the image model."""

from __future__ import annotations

import json

from agent.api.gen.runtime.v1 import api_pb2 as pb
from agent.domain.image import Image
from agent.domain.registry import RegistryAuth


def image_filter_from_pb(req: pb.ListImagesRequest) -> str:
    """ListImages' filter: the image reference to look up, "" for every image."""
    return str(req.filter.image.image) if req.HasField("filter") else ""


def image_to_pb(img: Image) -> pb.Image:
    """One item of ListImages, and ImageStatus' image: the id is the config digest."""
    out = pb.Image(
        id=img.id,
        repo_tags=img.repo_tags,
        repo_digests=img.repo_digests,
        size=img.size,
        spec=pb.ImageSpec(image=img.id),
        pinned=False,
    )
    user = img.user.split(":", 1)[0]
    if user.isdigit():
        out.uid.value = int(user)
    elif user:
        out.username = user
    return out


def image_verbose_info(img: Image, disk_paths: dict[str, str]) -> str:
    """The JSON document behind a verbose ImageStatus' ``info``."""
    return json.dumps({
        "id": img.id,
        "manifestDigest": img.manifest_digest,
        "layers": list(img.layers),
        "configMediaType": img.config_media_type,
        "disks": [
            {"pathInImage": d.path_in_image, "format": d.format, "virtualSize": d.virtual_size,
             "size": d.size, "hostPath": disk_paths.get(d.file, "")}
            for d in img.disks
        ],
        "containerDisk": not img.disk_problem,
        "diskProblem": img.disk_problem,
    }, sort_keys=True)


def image_fs_usage_to_pb(mountpoint: str, used_bytes: int, inodes_used: int, at_ns: int) -> pb.FilesystemUsage:
    """ImageFsInfo's usage of the image store (VM disks live on the same filesystem)."""
    return pb.FilesystemUsage(
        timestamp=at_ns,
        fs_id=pb.FilesystemIdentifier(mountpoint=mountpoint),
        used_bytes=pb.UInt64Value(value=used_bytes),
        inodes_used=pb.UInt64Value(value=inodes_used),
    )


def registry_auth_from_pb(auth: pb.AuthConfig) -> RegistryAuth:
    """A PullImage's ``AuthConfig`` as the domain's registry credentials."""
    return RegistryAuth(
        username=auth.username,
        password=auth.password,
        auth=auth.auth,
        server_address=auth.server_address,
        identity_token=auth.identity_token,
        registry_token=auth.registry_token,
    )
