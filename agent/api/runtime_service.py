"""runtime.v1.RuntimeService: check → convert in → call the service → convert out."""

from __future__ import annotations

import threading
import time
from typing import Any

from agent.api import convert
from agent.api.containers import ContainerVerbs
from agent.api.unimplemented import fill
from agent.domain.errors import InvalidArgument
from agent.services.containers import ContainerService
from agent.services.images import ImageService
from agent.services.runtime import RuntimeInfoService
from agent.services.sandboxes import RUNTIME_HANDLERS, SandboxService

from runtime.v1 import api_pb2 as pb
from runtime.v1 import api_pb2_grpc


def _why(method: str) -> str:
    if method in ("ListMetricDescriptors", "ListPodSandboxMetrics"):
        return "CRI-provided metrics are not offered; kubelet uses the stats calls"
    if method in ("Exec", "ExecSync", "Attach", "PortForward"):
        return "streaming into VMs (serial console, guest agent, port forwarding) is not available yet"
    if method == "CheckpointContainer":
        return "checkpointing VMs is not supported"
    return "this call is not supported by the VM runtime yet"


class RuntimeServicer(ContainerVerbs, api_pb2_grpc.RuntimeServiceServicer):  # type: ignore[misc]
    def __init__(self, runtime: RuntimeInfoService, sandboxes: SandboxService,
                 sandboxes_dir: str, containers: ContainerService) -> None:
        self._runtime = runtime
        self._sandboxes = sandboxes
        self._containers = containers
        self._stopping = threading.Event()
        self._sandboxes_dir = sandboxes_dir
        self._list_encoder = convert.EncodedCache(convert.sandbox_to_pb, field_number=1)

    def UpdateRuntimeConfig(self, request: pb.UpdateRuntimeConfigRequest,
                            context: Any) -> pb.UpdateRuntimeConfigResponse:
        # kubelet sends the node's pod CIDR; CNI configuration owns addressing here.
        return pb.UpdateRuntimeConfigResponse()

    def Version(self, request: pb.VersionRequest, context: Any) -> pb.VersionResponse:
        return convert.version_to_pb(self._runtime.version())

    def Status(self, request: pb.StatusRequest, context: Any) -> pb.StatusResponse:
        return convert.status_to_pb(self._runtime.status(), request.verbose, RUNTIME_HANDLERS)

    def RunPodSandbox(self, request: pb.RunPodSandboxRequest, context: Any) -> pb.RunPodSandboxResponse:
        sb = self._sandboxes.run(convert.sandbox_spec_from_pb(request))
        return pb.RunPodSandboxResponse(pod_sandbox_id=sb.id)

    def StopPodSandbox(self, request: pb.StopPodSandboxRequest, context: Any) -> pb.StopPodSandboxResponse:
        self._sandboxes.stop(request.pod_sandbox_id)
        return pb.StopPodSandboxResponse()

    def RemovePodSandbox(self, request: pb.RemovePodSandboxRequest, context: Any) -> pb.RemovePodSandboxResponse:
        self._sandboxes.remove(request.pod_sandbox_id)
        return pb.RemovePodSandboxResponse()

    def PodSandboxStatus(self, request: pb.PodSandboxStatusRequest, context: Any) -> pb.PodSandboxStatusResponse:
        sb = self._sandboxes.get(request.pod_sandbox_id)
        resp = pb.PodSandboxStatusResponse(status=convert.sandbox_status_to_pb(sb),
                                           timestamp=self._now())
        if request.verbose:
            info = convert.sandbox_verbose_info(sb, f"{self._sandboxes_dir}/{sb.id}")
            resp.info.update(info)
        return resp

    def ListPodSandbox(self, request: pb.ListPodSandboxRequest, context: Any) -> bytes:
        # kubelet relists every second: answer from cached encodings of each
        # (immutable) sandbox value, joined as the repeated field 1 "items".
        items = self._sandboxes.list(convert.sandbox_filter_from_pb(request))
        return self._list_encoder.encode(items, complete=not request.HasField("filter"))

    @staticmethod
    def _now() -> int:
        return time.time_ns()


fill(RuntimeServicer, pb.DESCRIPTOR.services_by_name["RuntimeService"], _why)


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
        wanted = request.filter.image.image if request.HasField("filter") else ""
        return pb.ListImagesResponse(images=[convert.image_to_pb(i) for i in self._images.list_images(wanted)])

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
        usage = pb.FilesystemUsage(
            timestamp=time.time_ns(),
            fs_id=pb.FilesystemIdentifier(mountpoint=self._images_dir),
            used_bytes=pb.UInt64Value(value=used),
            inodes_used=pb.UInt64Value(value=inodes),
        )
        return pb.ImageFsInfoResponse(image_filesystems=[usage], container_filesystems=[usage])


fill(ImageServicer, pb.DESCRIPTOR.services_by_name["ImageService"],
     lambda _m: "streaming image lists are not supported; use ListImages")
