"""The CPU quota ↔ vCPU rule (agent.domain.vm), shared by CreateContainer, UpdateContainerResources and status."""

from __future__ import annotations

import pytest

from agent.domain.vm import CFS_DEFAULT_PERIOD_US, quota_for_vcpus, vcpus_for_quota


@pytest.mark.parametrize(
    ("quota", "period", "vcpus"),
    [
        (0, 0, 0),  # no quota: no limit, the size comes from elsewhere
        (-1, 100_000, 0),  # -1: kubelet's "unlimited"
        (100_000, 100_000, 1),
        (150_000, 100_000, 2),  # 1.5 CPUs need 2 vCPUs: rounded up, never down
        (200_000, 0, 2),  # an unset period is the kernel's 100000 µs
        (1, 0, 1),
        (150_000, 50_000, 3),
        (400_000, 100_000, 4),
    ],
)
def test_vcpus_for_quota(quota: int, period: int, vcpus: int) -> None:
    assert vcpus_for_quota(quota, period) == vcpus


def test_quota_for_vcpus_uses_the_kernel_period() -> None:
    assert CFS_DEFAULT_PERIOD_US == 100_000
    assert quota_for_vcpus(3) == (100_000, 300_000)


@pytest.mark.parametrize("vcpus", [1, 2, 7, 64])
def test_round_trip(vcpus: int) -> None:
    assert vcpus_for_quota(*reversed(quota_for_vcpus(vcpus))) == vcpus
