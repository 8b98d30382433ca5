"""Per-VM files on the host: overlay, seed, console, sockets, firmware vars.

Layout: ``<state>/sandboxes/<sandbox>/containers/<container>/`` holds the
qcow2 overlay, the NoCloud seed ISO, the raw console copy and its follower
state; unix sockets live under a short runtime directory (socket paths are
limited to 107 bytes). Directories are 0711 so libvirt's QEMU user can reach
files libvirt hands it, but cannot list them. The guest's disks (overlay,
seed) are 0600 root: libvirt's DAC driver (``dynamic_ownership``, on by
default) hands them to QEMU's user while the VM runs.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from agent.adapters import qemu_img
from agent.adapters.atomic import write_atomic
from agent.adapters.nospace import no_space_is_exhausted
from agent.domain.errors import InvalidArgument, ResourceExhausted
from agent.domain.vm import ContainerPaths, WorkloadExit, parse_workload_exit

_HEX = re.compile(r"^[0-9a-f]{64}$")
OVMF_CODE = ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_CODE.fd")
WORKLOAD_EXIT_FILE = "workload.exit"
VOLUMES_STATUS_FILE = "volumes.status"
# The wrapper writes one short line; more is the guest's noise, of which the end counts.
_WORKLOAD_EXIT_READ = 4096
OVMF_VARS = ("/usr/share/OVMF/OVMF_VARS_4M.fd", "/usr/share/OVMF/OVMF_VARS.fd")


class VMFiles:
    def __init__(self, sandboxes_dir: Path, runtime_dir: Path) -> None:
        self.sandboxes = sandboxes_dir
        self.sockets = runtime_dir / "vm"

    def container_paths(self, sandbox_id: str, container_id: str) -> ContainerPaths:
        for value, name in ((sandbox_id, "pod_sandbox_id"), (container_id, "container_id")):
            if not _HEX.fullmatch(value):
                raise InvalidArgument(name, f"{value!r} is not an id")
        d = self.sandboxes / sandbox_id / "containers" / container_id
        return ContainerPaths(
            directory=str(d),
            overlay=str(d / "disk.qcow2"),
            seed=str(d / "cloudinit.iso"),
            console_log=str(d / "console.raw"),
            serial_socket=str(self.sockets / f"{container_id[:32]}.serial"),
            workload_exit=str(d / WORKLOAD_EXIT_FILE),
            virtiofs_socket=str(self.sockets / f"{container_id[:32]}.fs"),
            volumes_status=str(d / VOLUMES_STATUS_FILE),
            guest_agent_socket=str(self.sockets / f"{container_id[:32]}.qga"),
        )

    def create_container_dir(self, paths: ContainerPaths) -> None:
        d = Path(paths.directory)
        try:
            d.parent.mkdir(parents=True, exist_ok=True)
            d.parent.chmod(0o711)
            d.mkdir(exist_ok=True)
            d.chmod(0o711)
            self.sockets.mkdir(parents=True, exist_ok=True)
            self.sockets.chmod(0o711)
        except OSError as exc:
            raise ResourceExhausted(f"cannot create {d}: {exc.strerror}") from None

    def create_overlay(self, base: Path, base_format: str, overlay: str) -> None:
        with no_space_is_exhausted("creating the VM's disk overlay", Path(overlay).parent):
            qemu_img.create_overlay(base, base_format, Path(overlay))
        # qemu-img creates it under the umask (0644): the guest's disk is
        # private to root, and to QEMU once libvirt relabels it (DAC).
        os.chmod(overlay, 0o600)

    def write_seed(self, path: str, data: bytes) -> None:
        with no_space_is_exhausted("writing the VM's cloud-init seed", Path(path).parent):
            write_atomic(path, data)

    def remove_container_dir(self, directory: str) -> None:
        d = Path(directory)
        if d.parent.name != "containers" or not _HEX.fullmatch(d.name):
            raise InvalidArgument("container_id", f"refusing to delete unexpected path {directory}")
        shutil.rmtree(d, ignore_errors=True)
        (self.sockets / f"{d.name[:32]}.serial").unlink(missing_ok=True)
        (self.sockets / f"{d.name[:32]}.qga").unlink(missing_ok=True)
        (self.sockets / f"{d.name[:32]}.fs").unlink(missing_ok=True)

    def workload_exit(self, directory: str) -> WorkloadExit | None:
        """What the VM's command reported (its exit port's file); None when the VM has no
        command (libvirt creates the file when a VM with the port starts)."""
        path = Path(directory) / WORKLOAD_EXIT_FILE
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(max(0, size - _WORKLOAD_EXIT_READ))
                data = f.read(_WORKLOAD_EXIT_READ)
        except FileNotFoundError:
            return None
        except OSError:
            return WorkloadExit(code=None)
        return WorkloadExit(code=parse_workload_exit(data))

    def volumes_report(self, directory: str) -> bytes:
        """What the guest's mount script reported on its port (b"" for nothing yet)."""
        try:
            with open(Path(directory) / VOLUMES_STATUS_FILE, "rb") as f:
                return f.read(_WORKLOAD_EXIT_READ)
        except OSError:
            return b""

    def console_state(self, directory: str) -> str:
        return str(Path(directory) / "console.state")

    def firmware(self, kind: str, paths: ContainerPaths) -> dict[str, str]:
        if kind != "uefi":
            return {}
        loader = next((p for p in OVMF_CODE if os.path.exists(p)), "")
        template = next((p for p in OVMF_VARS if os.path.exists(p)), "")
        if not loader or not template:
            raise ResourceExhausted("UEFI firmware requested but OVMF is not installed (Debian package ovmf)")
        return {"loader": loader, "vars_template": template, "nvram": str(Path(paths.directory) / "nvram.fd")}

    def owns(self, domain_xml: str) -> bool:
        """Whether a domain's files live under this agent's state directory."""
        return f"{self.sandboxes}/" in domain_xml

    @staticmethod
    def allocated_bytes(path: str) -> int:
        try:
            return os.stat(path).st_blocks * 512
        except OSError:
            return 0
