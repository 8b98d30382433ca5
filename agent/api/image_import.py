"""podvisor.v1.Images: image import from an OCI layout on the agent's host."""

from __future__ import annotations

from typing import Any

from agent.api.gen.podvisor.v1 import podvisor_pb2, podvisor_pb2_grpc
from agent.services.images import ImageService


class ImagesServicer(podvisor_pb2_grpc.ImagesServicer):  # type: ignore[misc]
    def __init__(self, images: ImageService) -> None:
        self._images = images

    def Import(self, request: podvisor_pb2.ImportImageRequest, context: Any) -> podvisor_pb2.ImportImageResponse:
        img = self._images.import_layout(request.layout_path, request.layout_ref, request.image)
        return podvisor_pb2.ImportImageResponse(image_ref=img.id, manifest_digest=img.manifest_digest,
                                                repo_tags=list(img.repo_tags))
