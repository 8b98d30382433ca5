"""What the container service reports through its Metrics port, on recording fakes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from agent.domain.errors import FailedPrecondition, NotFound
from agent.services.containers import ContainerService
from agent.services.ports import Metrics, NoMetrics
from tests.services.container_fakes import ContainerFakes, cspec
from tests.services.test_image_service import CIRROS, make_env, publish_cirros


class RecordingMetrics:
    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []

    def rpc_done(self, service: str, method: str, code: str, seconds: float) -> None:
        self.calls.append((f"rpc {method} {code}", seconds))

    def vm_started(self, seconds: float) -> None:
        self.calls.append(("vm_started", seconds))

    def vm_stopped(self, seconds: float) -> None:
        self.calls.append(("vm_stopped", seconds))

    def image_pulled(self, seconds: float, size_bytes: int, ok: bool) -> None:
        self.calls.append((f"image_pulled {size_bytes} {ok}", seconds))


def _service(fakes: ContainerFakes, metrics: Metrics) -> ContainerService:
    return ContainerService(dataclasses.replace(fakes.ports, metrics=metrics))


def test_start_and_stop_are_reported_once_each() -> None:
    fakes, metrics = ContainerFakes(), RecordingMetrics()
    service = _service(fakes, metrics)
    c = service.create(cspec())
    assert metrics.calls == []
    service.start(c.id)
    assert metrics.calls == [("vm_started", 0.0)]  # the fake timer stands still
    with pytest.raises(FailedPrecondition):
        service.start(c.id)  # refused: not a start
    fakes.libvirt.acpi_powers_off = False
    service.stop(c.id, 10)  # ignores ACPI, no guest agent: the hard stop 2 s before the timeout
    assert metrics.calls[1:] == [("vm_stopped", pytest.approx(8.0))]
    service.stop(c.id, 10)  # already stopped: nothing was stopped
    assert len(metrics.calls) == 2


def test_state_counts_cover_every_state() -> None:
    fakes = ContainerFakes()
    service = _service(fakes, NoMetrics())
    c = service.create(cspec())
    counts = service.state_counts()
    assert counts["created"] == 1 and sum(counts.values()) == 1
    assert set(counts) == {"creating", "created", "running", "exited", "unknown", "removing"}
    service.start(c.id)
    assert service.state_counts()["running"] == 1


def test_pulls_are_reported_with_their_size_and_result(tmp_path: Path) -> None:
    metrics = RecordingMetrics()
    env = make_env(tmp_path, metrics=metrics)
    try:
        publish_cirros(env)
        img = env.service.pull(CIRROS)
        with pytest.raises(NotFound):
            env.service.pull("docker.io/kubevirt/absent:1")
    finally:
        env.store.close()
    assert [name for name, _ in metrics.calls] == [f"image_pulled {img.size} True", "image_pulled 0 False"]
    assert img.size > 0
