"""runtime.v1.ImageService: check → convert in → call the service → convert out."""

from __future__ import annotations

import time
from typing import Any

from agent.api.convert import images as convert
from agent.api.gen.runtime.v1 import api_pb2 as pb
from agent.api.gen.runtime.v1 import api_pb2_grpc
from agent.api.unimplemented import fill
from agent.domain.errors import InvalidArgument
from agent.services.images import ImageService


class ImageServicer(api_pb2_grpc.ImageServiceServicer):  # type: ignore[misc]
    def __init__(self, images: ImageService, images_dir: str) -> None:
        self._images = images
        self._images_dir = images_dir

    def PullImage(self, request: pb.PullImageRequest, context: Any) -> pb.PullImageResponse:
        if not request.image.image:
            raise InvalidArgument("image.image", "is required")
        auth = convert.registry_auth_from_pb(request.auth) if request.HasField("auth") else None
        img = self._images.pull(request.image.image, auth)
        # containerd and CRI-O answer with the image id (the config digest).
        return pb.PullImageResponse(image_ref=img.id)

    def ListImages(self, request: pb.ListImagesRequest, context: Any) -> pb.ListImagesResponse:
        items = self._images.list_images(convert.image_filter_from_pb(request))
        return pb.ListImagesResponse(images=[convert.image_to_pb(i) for i in items])

    def ImageStatus(self, request: pb.ImageStatusRequest, context: Any) -> pb.ImageStatusResponse:
        img = self._images.status(request.image.image)
        if img is None:
            return pb.ImageStatusResponse()  # CRI: an absent image is not an error
        resp = pb.ImageStatusResponse(image=convert.image_to_pb(img))
        if request.verbose:
            resp.info["info"] = convert.image_verbose_info(
                img, {d.file: str(self._images.base_disk_path(img, d)) for d in img.disks})
        return resp

    def RemoveImage(self, request: pb.RemoveImageRequest, context: Any) -> pb.RemoveImageResponse:
        if not request.image.image:
            raise InvalidArgument("image.image", "is required")
        self._images.remove(request.image.image)
        return pb.RemoveImageResponse()

    def ImageFsInfo(self, request: pb.ImageFsInfoRequest, context: Any) -> pb.ImageFsInfoResponse:
        used, inodes = self._images.usage()
        usage = convert.image_fs_usage_to_pb(self._images_dir, used, inodes, time.time_ns())
        return pb.ImageFsInfoResponse(image_filesystems=[usage], container_filesystems=[usage])


fill(ImageServicer, pb.DESCRIPTOR.services_by_name["ImageService"],
     lambda _m: "streaming image lists are not supported; use ListImages")
