"""``podvisorctl image import FILE|OCI-LAYOUT [--tag REF]``: an image without a registry.

As ``ctr images import`` does for containerd: the agent loads an OCI image
layout that lies on its host (podvisor.v1 ``Images/Import``), running the
pull pipeline over it, so an import is checked exactly like a pull (blob
digests and sizes, layer contents against the config, the hostile-input
checks of layer extraction, the disk with qemu-img under the configured
limits). A qcow2 or raw disk is first written by podvisorctl into a
temporary OCI layout (``image build``'s code, agent/cli/oci_layout.py) in a
directory the agent can read, and removed afterwards.

The agent reads the path itself, so the client must run on the agent's host
(it does: podvisorctl talks over the agent's unix socket).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from agent.adapters import qemu_img
from agent.api.gen.podvisor.v1 import podvisor_pb2
from agent.cli import oci_layout
from agent.cli.main import PROG, Client
from agent.cli.vmref import CtlError, import_stub, rpc
from agent.domain.errors import PodvisorError
from agent.domain.imageref import parse_image_ref

IMPORT_REGISTRY = "import.local"  # the default reference's registry part (never contacted)
IMPORT_TIMEOUT = 900.0
SCRATCH_DIR = "/var/tmp"  # readable by a root agent; QEMU never sees it


def _default_name(stem: str) -> str:
    name = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._") or "image"
    return f"{IMPORT_REGISTRY}/{name}:latest"


def _layout_names(layout: Path) -> list[str]:
    try:
        index = json.loads((layout / "index.json").read_text())
    except (OSError, ValueError):
        return []
    return [str(m.get("annotations", {}).get(oci_layout.REF_NAME, "")) for m in index.get("manifests", [])
            if isinstance(m, dict)]


def _split_layout(text: str) -> tuple[Path, str]:
    """``DIR`` or ``DIR:NAME`` (skopeo's oci:DIR:NAME without the transport)."""
    path = Path(text)
    if path.exists():
        return path, ""
    head, sep, name = text.rpartition(":")
    if sep and Path(head).is_dir():
        return Path(head), name
    raise CtlError("INVALID_ARGUMENT", f"{text}: no such file or directory",
                   "give a qcow2/raw disk file or an OCI layout directory (DIR or DIR:NAME)")


def run_import(client: Client, args: argparse.Namespace) -> None:
    source, layout_ref = _split_layout(args.source)
    tmp: str | None = None
    try:
        if source.is_dir():
            layout = source.resolve()
            if not layout_ref:
                names = [n for n in _layout_names(layout) if n]
                layout_ref = names[0] if len(names) == 1 and len(_layout_names(layout)) == 1 else ""
            tag = args.tag
            if not tag:
                guess = layout_ref if layout_ref and ("/" in layout_ref) else ""
                tag = guess or _default_name(layout.name + (f"-{layout_ref}" if layout_ref else ""))
        else:
            tag = args.tag or _default_name(source.stem)
            try:
                ref = parse_image_ref(tag, field="--tag")
                qemu_img.info(source, source=str(source), max_virtual_size=1 << 50)
            except PodvisorError as exc:
                raise CtlError("INVALID_ARGUMENT", exc.message, "give a qcow2 or raw disk and a valid --tag") from None
            tmp = tempfile.mkdtemp(prefix="podvisor-import-", dir=args.scratch_dir)
            os.chmod(tmp, 0o700)
            layout = Path(tmp)
            layout_ref = ref.tag or "latest"
            oci_layout.build(source, layout, layout_ref)
        try:
            parse_image_ref(tag, field="--tag")
        except PodvisorError as exc:
            raise CtlError("INVALID_ARGUMENT", exc.message, "e.g. --tag import.local/vms/tiny:1") from None
        with rpc(f"check the layout; `{PROG} image build --output DIR` writes a valid one"):
            resp = import_stub(client).Import(
                podvisor_pb2.ImportImageRequest(layout_path=str(layout), layout_ref=layout_ref, image=tag),
                timeout=max(client.timeout, IMPORT_TIMEOUT))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"imported {tag}")
    print(f"image id {resp.image_ref}")
    print(f"manifest {resp.manifest_digest}")


def add_parser(image_sub: Any) -> None:
    imp = image_sub.add_parser(
        "import", help="load a qcow2/raw disk or an OCI layout into the agent's image store",
        description="Load a local disk (qcow2 or raw) or an OCI image layout straight into the agent's "
                    "image store, checked like a pull (for hosts without a registry).")
    imp.add_argument("source", metavar="FILE|OCI-LAYOUT",
                     help="a qcow2 or raw disk, or an OCI layout directory (DIR or DIR:NAME)")
    imp.add_argument("--tag", default="", metavar="REF",
                     help=f"the reference to store it under (default: {IMPORT_REGISTRY}/<file name>:latest, "
                          "or the layout's own ref name when it is a full reference)")
    imp.add_argument("--scratch-dir", default=SCRATCH_DIR, metavar="DIR",
                     help=f"where a disk's temporary OCI layout is written (default: {SCRATCH_DIR})")
    imp.set_defaults(func=run_import, local=None)
