"""runtime.v1.RuntimeService: one servicer composed of the per-resource verbs.

Runtime information (runtime_info.py), pod sandboxes (sandboxes.py), VM
containers (containers.py), streaming (streaming.py) and ExecSync
(exec_sync.py) each hold their handlers and convert through their own module
in convert/; every call this runtime does not serve answers
UNIMPLEMENTED with the reason below.
"""

from __future__ import annotations

import threading

from agent.api.containers import ContainerVerbs
from agent.api.convert.sandboxes import sandbox_to_pb
from agent.api.convert.wire import EncodedCache
from agent.api.exec_sync import ExecSyncVerbs
from agent.api.gen.runtime.v1 import api_pb2 as pb
from agent.api.gen.runtime.v1 import api_pb2_grpc
from agent.api.runtime_info import RuntimeInfoVerbs
from agent.api.sandboxes import SandboxVerbs
from agent.api.streaming import StreamingVerbs
from agent.api.unimplemented import fill
from agent.services.containers import ContainerService
from agent.services.exec import ExecService
from agent.services.runtime import RuntimeInfoService
from agent.services.sandboxes import SandboxService
from agent.services.stats import StatsService
from agent.services.streaming import StreamingService


def _why(method: str) -> str:
    if method in ("ListMetricDescriptors", "ListPodSandboxMetrics"):
        return "CRI-provided metrics are not offered; kubelet uses the stats calls"
    if method == "CheckpointContainer":
        return "checkpointing VMs is not supported"
    return "this call is not supported by the VM runtime yet"


class RuntimeServicer(RuntimeInfoVerbs, SandboxVerbs, ContainerVerbs, StreamingVerbs, ExecSyncVerbs,
                      api_pb2_grpc.RuntimeServiceServicer):  # type: ignore[misc]
    def __init__(self, runtime: RuntimeInfoService, sandboxes: SandboxService, sandboxes_dir: str,
                 containers: ContainerService, stats: StatsService, streaming: StreamingService,
                 execs: ExecService | None = None) -> None:
        self._runtime = runtime
        self._execs = execs
        self._sandboxes = sandboxes
        self._containers = containers
        self._stats = stats
        self._streaming = streaming
        self._stopping = threading.Event()
        self._sandboxes_dir = sandboxes_dir
        self._list_encoder = EncodedCache(sandbox_to_pb, field_number=1)


fill(RuntimeServicer, pb.DESCRIPTOR.services_by_name["RuntimeService"], _why)
