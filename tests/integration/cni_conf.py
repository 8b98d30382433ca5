"""A private CNI network for one test or benchmark: its own bridge name, /24
subnet and host-local IPAM directory, with portmap for hostPorts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_conflist(conf_dir: Path, *, name: str, bridge: str, subnet: str, ipam_dir: Path,
                   ip_masq: bool = True, file_name: str = "", **bridge_options: Any) -> Path:
    """Write ``file_name`` (default ``10-<name>.conflist``: bridge + host-local,
    portmap) into ``conf_dir``."""
    conf_dir.mkdir(parents=True, exist_ok=True)
    path = conf_dir / (file_name or f"10-{name}.conflist")
    path.write_text(json.dumps({
        "cniVersion": "1.0.0", "name": name,
        "plugins": [
            {"type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": ip_masq, **bridge_options,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]],
                      "dataDir": str(ipam_dir), "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ]}))
    return path
