"""`podvisorctl image build`: a disk file → containerDisk OCI image (pure Python).

Works without an agent: it validates the disk with qemu-img like the agent
will, writes an OCI image layout, and with --push uploads it with Podvisor's
own registry client.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from agent.adapters import qemu_img
from agent.adapters.registry import RegistryClient
from agent.adapters.registry.credentials import RegistryCredentials
from agent.adapters.registry.transport import RegistryHostConfig
from agent.cli import oci_layout
from agent.domain.errors import PodvisorError
from agent.domain.imageref import RemoteRepository, parse_image_ref, registry_endpoint


class BuildError(Exception):
    pass


def add_parser(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:  # type: ignore[type-arg]
    image = sub.add_parser("image", help="containerDisk images: build (no agent needed), import")
    image_sub: argparse._SubParsersAction = image.add_subparsers(  # type: ignore[type-arg]
        dest="image_command", metavar="COMMAND", required=True)
    build = image_sub.add_parser(
        "build", help="build a containerDisk image from a qcow2 or raw disk",
        description="Write a containerDisk (the disk under /disk/, uid 107) as an OCI image "
                    "layout, and optionally push it to a registry.")
    build.add_argument("--disk", type=Path, required=True, help="qcow2 or raw disk file")
    build.add_argument("--tag", required=True, help="image reference, e.g. 127.0.0.1:5000/vms/tiny:1")
    build.add_argument("--output", type=Path,
                       help="OCI layout directory to write (default: a temporary one, removed after --push)")
    build.add_argument("--push", action="store_true", help="push to the registry the tag names")
    build.add_argument("--insecure", action="store_true", help="allow plain HTTP / unverified TLS")
    build.add_argument("--username", default="", help="registry user for --push")
    build.add_argument("--password", default="", help="registry password for --push")
    build.add_argument("--no-compress", action="store_true", help="store the layer uncompressed")
    build.set_defaults(local=run_build)
    return image_sub


def run_build(args: argparse.Namespace) -> str:
    """Build (and push); returns the lines to print."""
    if not args.disk.is_file():
        raise BuildError(f"--disk {args.disk}: no such file")
    try:
        ref = parse_image_ref(args.tag, field="--tag")
        tag = ref.tag or "latest"
        info = qemu_img.info(args.disk, source=str(args.disk), max_virtual_size=1 << 50)
    except PodvisorError as exc:
        raise BuildError(exc.message) from None
    if args.output is None and not args.push:
        raise BuildError("nothing to do: give --output DIR, --push, or both")
    tmp = None
    layout = args.output
    if layout is None:
        tmp = tempfile.TemporaryDirectory(prefix="podvisor-build-")
        layout = Path(tmp.name)
    try:
        built = oci_layout.build(args.disk, layout, tag, compress=not args.no_compress)
        lines = [f"built {ref} ({info.format}, virtual size {info.virtual_size} bytes)",
                 f"manifest {built.manifest_digest}"]
        if args.output is not None:
            lines.append(f"layout {layout} (oci:{layout}:{tag})")
        if args.push:
            creds = RegistryCredentials(args.username, args.password) if args.username else None
            hosts = {ref.registry: RegistryHostConfig(insecure=True)} if args.insecure else {}
            repo = RemoteRepository(registry=ref.registry, host=registry_endpoint(ref.registry),
                                    name=ref.repository)
            with RegistryClient(credentials=(lambda _r: creds), hosts=hosts, timeout=120) as client:
                try:
                    digest = oci_layout.push(client, layout, built, repo, tag)
                except PodvisorError as exc:
                    raise BuildError(f"push failed: {exc.message}") from None
            lines.append(f"pushed {ref.name}:{tag}@{digest}")
        return "\n".join(lines)
    finally:
        if tmp is not None:
            tmp.cleanup()
