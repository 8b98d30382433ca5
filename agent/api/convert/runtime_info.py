"""Pure conversions of runtime information (Version, Status) into runtime.v1 messages."""

from __future__ import annotations

import json

from agent.api.gen.runtime.v1 import api_pb2 as pb
from agent.services.runtime import RuntimeStatus


def version_to_pb(v: dict[str, str]) -> pb.VersionResponse:
    """Version's answer from the service's fields."""
    return pb.VersionResponse(**v)


def status_to_pb(st: RuntimeStatus, verbose: bool, handlers: tuple[str, ...]) -> pb.StatusResponse:
    """Status' answer: conditions, runtime handlers and, when verbose, the info map (JSON values)."""
    resp = pb.StatusResponse(
        status=pb.RuntimeStatus(
            conditions=[
                pb.RuntimeCondition(type=c.type, status=c.status, reason=c.reason,
                                    message=c.message)
                for c in st.conditions
            ]
        ),
        runtime_handlers=[pb.RuntimeHandler(name=h, features=pb.RuntimeHandlerFeatures())
                          for h in handlers],
        features=pb.RuntimeFeatures(supplemental_groups_policy=False),
    )
    if verbose:
        for key, value in st.info.items():
            resp.info[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return resp
