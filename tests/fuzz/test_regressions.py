"""Crashes the fuzzers found (or issue #10 listed) in areas other fixes own, as plain cases.

Kept out of the property tests' @example lists so that a failing case here
does not stop those properties from exploring. Each must be refused with
InvalidArgument naming the field, never RecursionError or another exception.
"""

from __future__ import annotations

import pytest

from agent.domain import annotations as ann
from agent.domain.kubevirt import DEFAULT_FIELD, parse_vmi
from agent.domain.vmrequest import CRIResources, build_vm_request
from tests.fuzz.properties import Refused, domain_errors_only

DEEP_ANNOTATIONS = [
    pytest.param({ann.VM: "[" * 100_000}, ann.VM, id="vm-json-array-100000"),
    pytest.param({ann.VM: "- " * 3000}, ann.VM, id="vm-yaml-block-3000"),
    pytest.param({ann.NETWORK_CONFIG: "{" * 3000}, ann.NETWORK_CONFIG, id="network-config-flow-3000"),
    pytest.param({ann.NETWORK_CONFIG: "[" * 1100}, ann.NETWORK_CONFIG, id="network-config-array-1100"),
    pytest.param({ann.USER_DATA: "#cloud-config\n" + "[" * 3000}, ann.USER_DATA, id="user-data-3000"),
]


@pytest.mark.parametrize(("annotations", "key"), DEEP_ANNOTATIONS)
def test_deep_nesting_in_annotations_is_invalid_argument(annotations: dict[str, str], key: str) -> None:
    result = domain_errors_only(build_vm_request, cri_resources=CRIResources(), pod_annotations={},
                                container_annotations=annotations)
    assert isinstance(result, Refused)
    assert key in result.error.field  # type: ignore[attr-defined]


def test_deep_vmi_document_is_invalid_argument() -> None:
    result = domain_errors_only(parse_vmi, "[" * 100_000, DEFAULT_FIELD)
    assert isinstance(result, Refused)
