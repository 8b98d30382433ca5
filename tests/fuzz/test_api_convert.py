"""The API's converters on random protobuf requests: a model value or InvalidArgument, and then
the checks the service makes before writing anything refuse with a field, never another exception."""

from __future__ import annotations

from hypothesis import given

from agent.api.convert import containers, images, sandboxes
from agent.api.gen.runtime.v1 import api_pb2 as pb
from agent.domain.validation import validate_sandbox_spec
from agent.domain.vmrequest import CRIResources, build_vm_request
from tests.fuzz.messages import request
from tests.fuzz.properties import Refused, domain_errors_only


@given(request(pb.RunPodSandboxRequest))
def test_run_pod_sandbox(req: pb.RunPodSandboxRequest) -> None:
    spec = domain_errors_only(sandboxes.sandbox_spec_from_pb, req)
    if not isinstance(spec, Refused):
        domain_errors_only(validate_sandbox_spec, spec)


@given(request(pb.CreateContainerRequest))
def test_create_container(req: pb.CreateContainerRequest) -> None:
    spec = domain_errors_only(containers.container_spec_from_pb, req)
    if isinstance(spec, Refused):
        return
    pod = domain_errors_only(sandboxes.sandbox_spec_from_pb,
                             pb.RunPodSandboxRequest(config=req.sandbox_config))
    domain_errors_only(
        build_vm_request,
        cri_resources=CRIResources(spec.memory_limit_in_bytes, spec.cpu_quota, spec.cpu_period, spec.cpu_shares),
        pod_annotations={} if isinstance(pod, Refused) else pod.annotations,
        container_annotations=spec.annotations, env=spec.env, command=spec.command, args=spec.args)


@given(request(pb.ListContainersRequest), request(pb.ListContainerStatsRequest),
       request(pb.ListPodSandboxRequest), request(pb.ListPodSandboxStatsRequest),
       request(pb.ListImagesRequest), request(pb.PullImageRequest), request(pb.UpdateContainerResourcesRequest))
def test_filters_and_auth(lc: pb.ListContainersRequest, lcs: pb.ListContainerStatsRequest,
                          lp: pb.ListPodSandboxRequest, lps: pb.ListPodSandboxStatsRequest,
                          li: pb.ListImagesRequest, pull: pb.PullImageRequest,
                          upd: pb.UpdateContainerResourcesRequest) -> None:
    domain_errors_only(containers.container_filter_from_pb, lc)
    domain_errors_only(containers.container_stats_filter_from_pb, lcs)
    domain_errors_only(sandboxes.sandbox_filter_from_pb, lp)
    domain_errors_only(sandboxes.sandbox_stats_filter_from_pb, lps)
    domain_errors_only(images.image_filter_from_pb, li)
    auth = domain_errors_only(images.registry_auth_from_pb, pull.auth)
    if not isinstance(auth, Refused):
        assert auth.password == pull.auth.password
    domain_errors_only(containers.resources_from_pb, upd)
