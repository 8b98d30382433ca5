"""CNI network configurations and the values a plugin call carries (pure).

Parsing a configuration file (:func:`parse`, lenient: what makes a file a
candidate), normalising a document into a configuration list for execution
(:func:`normalize_config`, strict), the agent's built-in network, the
``runtimeConfig`` a runtime offers, the stdin of one plugin, and the
attachment (the ``CNI_*`` variables of one sandbox).
"""

from __future__ import annotations

import copy
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.domain import jsontext
from agent.domain.errors import FailedPrecondition, InvalidArgument
from agent.domain.sandbox import DNSConfig, PortMapping

CONFIG_SUFFIXES = (".conflist", ".conf", ".json")
DEFAULT_NETWORK_NAME = "podvisor"
# A plugin type names a file in a bin dir: a plain file name, nothing more.
_PLUGIN_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")
# Container ids and CNI_ARGS values: CNI allows [A-Za-z0-9_.-]; ';' and '='
# would break CNI_ARGS' own syntax.
CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_BRIDGE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


@dataclass(frozen=True)
class NetworkConfig:
    """What a configuration file says, in short: its network and plugin types."""

    name: str
    cni_version: str
    plugin_types: tuple[str, ...]


def load_config(raw: bytes) -> tuple[dict[str, Any], NetworkConfig]:
    """The document of a .conflist (or a single-plugin .conf) and its
    summary; ValueError says what is wrong."""
    doc = jsontext.loads(raw)  # ValueError "not JSON: ..."
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("missing network name")
    if "plugins" in doc:
        plugins = doc["plugins"]
        if not isinstance(plugins, list) or not plugins:
            raise ValueError("'plugins' must be a non-empty list")
    else:
        plugins = [doc]  # a single-plugin .conf
    types = []
    for p in plugins:
        if not isinstance(p, dict) or not isinstance(p.get("type"), str) or not p["type"]:
            raise ValueError("every plugin needs a 'type'")
        types.append(p["type"])
    return doc, NetworkConfig(name=name, cni_version=str(doc.get("cniVersion", "")), plugin_types=tuple(types))


def parse(raw: bytes) -> NetworkConfig:
    """Parse a .conflist (or a single-plugin .conf); ValueError says what is wrong."""
    return load_config(raw)[1]


def normalize_config(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A configuration list from a .conflist or a single-plugin .conf document.

    Raises FailedPrecondition naming the problem: a bad host configuration is
    an operator's error, not the request's.
    """
    if not isinstance(doc, Mapping):
        raise FailedPrecondition("CNI configuration is not a JSON object")
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        raise FailedPrecondition("CNI configuration has no network name")
    version = doc.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise FailedPrecondition(f"CNI network {name} has no cniVersion")
    if "plugins" in doc:
        plugins = doc["plugins"]
        if not isinstance(plugins, list) or not plugins:
            raise FailedPrecondition(f"CNI network {name}: 'plugins' must be a non-empty list")
        conflist = copy.deepcopy(dict(doc))
    else:
        # libcni's ConfListFromConf: the whole document is the only plugin.
        conflist = {"cniVersion": version, "name": name, "plugins": [copy.deepcopy(dict(doc))]}
    for i, plugin in enumerate(conflist["plugins"]):
        if not isinstance(plugin, dict):
            raise FailedPrecondition(f"CNI network {name}: plugins[{i}] is not an object")
        ptype = plugin.get("type")
        if not isinstance(ptype, str) or not _PLUGIN_TYPE.match(ptype):
            raise FailedPrecondition(f"CNI network {name}: plugins[{i}] has no valid 'type'")
    return conflist


def builtin_default_config(bridge: str, subnet: str, *, name: str = DEFAULT_NETWORK_NAME,
                           ipam_data_dir: Path | None = None) -> dict[str, Any]:
    """The network the agent uses when /etc/cni/net.d has none.

    bridge + host-local + portmap, as containerd's default template:
    - ``isGateway`` puts the subnet's gateway address on the host bridge (the
      pod's default route and the host's route to the pods); it also turns
      on IP forwarding, which a node needs for pod egress anyway.
    - ``ipMasq`` lets pods reach the outside; ``hairpinMode`` lets a VM reach
      itself through its own host port.
    - portmap serves CRI port mappings (its ``snat`` default covers
      connections to 127.0.0.1:<hostPort>).
    No ``loopback`` network: kubelet-era runtimes attach it as a separate
    network so that containers get a working ``lo``, but here the pod's
    namespace only carries the wiring to the VM, and the VM has its own lo.
    """
    if not _BRIDGE_NAME.match(bridge):
        raise FailedPrecondition(f"CNI bridge name {bridge!r} is not a valid interface name (at most 15 characters)")
    try:
        net = ipaddress.ip_network(subnet)
    except ValueError:
        raise FailedPrecondition(f"CNI subnet {subnet!r} is not a network in CIDR notation") from None
    ipam: dict[str, Any] = {
        "type": "host-local",
        "ranges": [[{"subnet": str(net)}]],
        "routes": [{"dst": "0.0.0.0/0" if net.version == 4 else "::/0"}],
    }
    if ipam_data_dir is not None:
        ipam["dataDir"] = str(ipam_data_dir)
    return {
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [
            {"type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": True, "hairpinMode": True,
             "ipam": ipam},
            {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
        ],
    }


def runtime_config(port_mappings: Sequence[PortMapping], dns: DNSConfig | None) -> dict[str, Any]:
    """The runtimeConfig values the runtime offers (CNI CONVENTIONS.md).

    Mappings without a host port are dropped, as containerd does: they
    publish nothing.
    """
    rc: dict[str, Any] = {}
    mappings = []
    for pm in port_mappings:
        if pm.host_port <= 0:
            continue
        entry: dict[str, Any] = {"hostPort": pm.host_port, "containerPort": pm.container_port,
                                 "protocol": pm.protocol.lower() or "tcp"}
        if pm.host_ip:
            entry["hostIP"] = pm.host_ip
        mappings.append(entry)
    if mappings:
        rc["portMappings"] = mappings
    if dns is not None and (dns.servers or dns.searches or dns.options):
        rc["dns"] = {"servers": list(dns.servers), "searches": list(dns.searches), "options": list(dns.options)}
    return rc


def plugin_stdin(conflist: Mapping[str, Any], plugin: Mapping[str, Any], rc: Mapping[str, Any],
                 prev_result: Mapping[str, Any] | None) -> dict[str, Any]:
    """The configuration one plugin reads on stdin (pure; CNI spec section 3)."""
    conf = copy.deepcopy(dict(plugin))
    conf["name"] = conflist["name"]
    conf["cniVersion"] = conflist["cniVersion"]
    capabilities = plugin.get("capabilities")
    # A plugin only sees the runtime values it asked for: unknown keys in
    # runtimeConfig are an error for some plugins.
    conf.pop("runtimeConfig", None)
    if isinstance(capabilities, dict):
        wanted = {k: v for k, v in rc.items() if capabilities.get(k) is True}
        if wanted:
            conf["runtimeConfig"] = wanted
    if prev_result is not None:
        conf["prevResult"] = copy.deepcopy(dict(prev_result))
    else:
        conf.pop("prevResult", None)
    return conf


@dataclass(frozen=True)
class Attachment:
    """Who is being attached: the CNI_* variables of one sandbox."""

    container_id: str
    netns: Path
    ifname: str = "eth0"
    pod_name: str = ""
    pod_namespace: str = ""
    pod_uid: str = ""

    def validate(self) -> None:
        """Raise InvalidArgument for a value CNI cannot carry."""
        if not CONTAINER_ID.match(self.container_id):
            raise InvalidArgument("pod_sandbox_id", f"{self.container_id!r} is not a valid CNI container id")
        if not _IFNAME.match(self.ifname):
            raise InvalidArgument("ifname", f"{self.ifname!r} is not a valid interface name")
        for field_name, value in (("metadata.name", self.pod_name), ("metadata.namespace", self.pod_namespace),
                                  ("metadata.uid", self.pod_uid)):
            if any(c in value for c in ";=\x00") or any(ord(c) < 0x20 for c in value):
                raise InvalidArgument(field_name, "must not contain ';', '=' or control characters")

    def cni_args(self) -> str:
        """CNI_ARGS as kubelet-era runtimes pass them.

        IgnoreUnknown=1 comes first because plugins that parse CNI_ARGS
        strictly (host-local, for one) refuse keys they do not know otherwise.
        """
        pairs = [("IgnoreUnknown", "1"), ("K8S_POD_NAMESPACE", self.pod_namespace),
                 ("K8S_POD_NAME", self.pod_name), ("K8S_POD_INFRA_CONTAINER_ID", self.container_id),
                 ("K8S_POD_UID", self.pod_uid)]
        return ";".join(f"{k}={v}" for k, v in pairs)

    def to_json(self) -> dict[str, str]:
        """The attachment as the CNI cache file keeps it."""
        return {"containerId": self.container_id, "netns": str(self.netns), "ifName": self.ifname,
                "podName": self.pod_name, "podNamespace": self.pod_namespace, "podUid": self.pod_uid}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Attachment:
        """Read back :meth:`to_json`'s document."""
        return cls(container_id=str(doc["containerId"]), netns=Path(str(doc["netns"])),
                   ifname=str(doc.get("ifName", "eth0")), pod_name=str(doc.get("podName", "")),
                   pod_namespace=str(doc.get("podNamespace", "")), pod_uid=str(doc.get("podUid", "")))
