"""cloud-init NoCloud seed files: user-data, network-config, meta-data (pure).

Every function returns bytes computed only from its arguments, so equal VMs
get byte-identical seeds; ``agent.render.nocloud.build_seed_iso`` packs them.

user-data
    Podvisor adds to the user's user-data: SSH keys
    (``podvisor.io/ssh-authorized-keys``), the container env (appended to
    ``/etc/environment``, and exported to the command), the container
    command (a ``runcmd`` entry run as an argv list), the pod's DNS and
    sysctls and the links to CRI devices (``bootcmd`` entries, every boot)
    and the hostname (only when the user set neither ``hostname`` nor
    ``fqdn``).

    * nothing to add: the user's user-data byte for byte (comments and all);
      without any, a ``#cloud-config`` naming the hostname, since cloud-init
      needs the file.
    * ``#cloud-config``: one ``#cloud-config`` document, the user's keys
      first in their order, Podvisor's appended to the lists
      ``ssh_authorized_keys``, ``write_files`` and ``runcmd``; the comments
      of the user's document do not survive the YAML round trip.
    * any other format (``#!`` script, ``#include``, ``#cloud-boothook``,
      jinja template, gzip, MIME multipart…): kept byte for byte; a MIME
      multipart carries it as the first part (base64, or nested verbatim when
      it is MIME itself) and a ``text/cloud-config`` part with Podvisor's
      additions second. That part's ``Merge-Type`` appends to lists and never
      replaces a user's key, so a cloud-config inside the user's MIME keeps
      its ``runcmd`` and keys.

vendor-data
    Podvisor's own ``#cloud-config`` for Exec's SSH access (when the agent
    gives one): ``disable_root: false`` and the VM's ed25519 host key in
    ``ssh_keys``. cloud-init merges vendor-data under the user-data, so a
    user's own ``disable_root`` or ``ssh_keys`` wins; the user-data itself is
    never touched for it. The agent's key for root goes in meta-data's
    ``public-keys`` (``agent.render.nocloud``), which cloud-init adds to the
    configured keys rather than being replaced by a user's list.

network-config
    The user's verbatim when given; else, when the pod's address is known, a
    version 2 config that matches the NIC by MAC and states the CNI result
    (addresses, routes, DNS), so guests come up on the pod network without
    DHCP; else none.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from agent.domain.guest_settings import has_dns, resolv_conf_lines, sysctl_proc_path
from agent.domain.vm import WORKLOAD_EXIT_CHANNEL, CloudInit, GuestAccess
from agent.domain.vmrequest import CLOUD_CONFIG_HEADER, UserDataFormat, parse_cloud_config, user_data_format
from agent.domain.volumes import GUEST_ROOT, VIRTIOFS_TAG, VOLUMES_STATUS_CHANNEL, Share, device_by_id
from agent.render.nocloud import render_meta_data

ENVIRONMENT_FILE = "/etc/environment"

# The pod's dns_config: /etc/resolv.conf written at every boot by a bootcmd
# (cloud-init's resolv_conf module does not run on Debian, and network-config
# carries no resolver options); dhclient, where a DHCP lease would rewrite it,
# is told to leave it alone.
RESOLV_CONF_HEADER = ("# Written by Podvisor at every boot from the pod's dns_config.",)
RESOLV_CONF_SCRIPT = ('printf "%s\\n" "$@" > /etc/resolv.conf.podvisor && '
                      'mv -f /etc/resolv.conf.podvisor /etc/resolv.conf')
DHCLIENT_HOOK = "/etc/dhcp/dhclient-enter-hooks.d/podvisor-resolv-conf"
DHCLIENT_HOOK_CONTENT = ("# Podvisor: /etc/resolv.conf holds the pod's dns_config; dhclient leaves it alone.\n"
                         "make_resolv_conf() { :; }\n")

# The pod's linux.sysctls: in sysctl.d (systemd-sysctl applies them early at
# every later boot) and written to /proc/sys by a bootcmd at every boot, the
# first one included (bootcmd runs before write_files).
SYSCTL_FILE = "/etc/sysctl.d/90-podvisor-pod.conf"
SYSCTL_HEADER = "# Podvisor: the pod's linux.sysctls.\n"
SYSCTL_SCRIPT = ('rc=0; while [ "$#" -ge 2 ]; do printf "%s\\n" "$2" > "$1" || '
                 '{ echo "podvisor: cannot set $1" >&2; rc=1; }; shift 2; done; exit "$rc"')

# CRI devices: the guest finds each by its serial under /dev/disk/by-id; a
# bootcmd links the container path kubelet asked for to that name at every
# boot (/dev is made afresh at each). A path that is something else already
# is left alone, unless it is that very device; the reason goes to the console.
# udev has named the disks long before cloud-init's first stage as a rule; a
# device still missing is waited for up to DEVICE_LINK_WAIT_S.
DEVICE_LINK_WAIT_S = 30
DEVICE_LINK_SCRIPT = (
    'rc=0; while [ "$#" -ge 2 ]; do link=$1; dev=$2; shift 2; i=0; '
    'while [ ! -e "$dev" ] && [ "$i" -lt ' + str(DEVICE_LINK_WAIT_S) + ' ]; do '
    'sleep 1; i=$((i + 1)); done; '
    'if [ ! -e "$dev" ]; then echo "podvisor: device $dev for $link did not appear" >&2; rc=1; '
    'elif [ -e "$link" ] && [ ! -L "$link" ]; then [ "$link" -ef "$dev" ] || '
    '{ echo "podvisor: $link exists and is not a symlink; the device is $dev" >&2; rc=1; }; '
    'else mkdir -p "$(dirname "$link")" && ln -sfn "$dev" "$link" || '
    '{ echo "podvisor: cannot link $link to $dev" >&2; rc=1; }; fi; done; exit "$rc"')
# The pod volumes (docs/volumes.md): at every boot a bootcmd mounts the VM's
# virtiofs share at GUEST_ROOT and binds each entry at its container path
# (read-only ones remounted read-only), then reports "ok" or "error: ..." on
# the virtio-serial port VOLUMES_STATUS_CHANNEL; a problem is also printed on
# the console. It always exits 0: a VM whose volumes cannot be mounted still
# boots. Arguments: TAG ROOT, then NAME d|f ro|rw PATH per mount.
VOLUMES_SCRIPT = f"""\
tag=$1; root=$2; shift 2
port=/dev/virtio-ports/{VOLUMES_STATUS_CHANNEL}
say() {{
    echo "podvisor: $1" >&2
    for c in /dev/console /dev/ttyS0; do
        if [ -c "$c" ] && echo "podvisor: $1" >"$c" 2>/dev/null; then break; fi
    done
    if [ -c "$port" ]; then echo "error: $1" >"$port"; fi
}}
mkdir -p "$root"
if ! mountpoint -q "$root"; then
    modprobe virtiofs 2>/dev/null
    if ! mount -t virtiofs "$tag" "$root"; then
        say "cannot mount the pod volumes: this guest has no virtiofs support or the share $tag is missing; \
the container's mounts are not available in this VM"
        exit 0
    fi
fi
failed=""
while [ "$#" -ge 4 ]; do
    name=$1; kind=$2; mode=$3; path=$4; shift 4
    if [ "$kind" = d ]; then
        mkdir -p "$path"
    else
        mkdir -p "$(dirname "$path")" && {{ [ -e "$path" ] || : >"$path"; }}
    fi
    if mountpoint -q "$path"; then continue; fi
    if ! {{ mount --bind "$root/$name" "$path" && {{ [ "$mode" = rw ] || mount -o remount,bind,ro "$path"; }}; }}; then
        failed="$failed $path"
    fi
done
if [ -n "$failed" ]; then
    say "cannot mount the pod volumes at:$failed"
elif [ -c "$port" ]; then
    echo ok >"$port"
fi
exit 0
"""


def volumes_bootcmd_args(volumes: tuple[Share, ...]) -> list[str]:
    """The mount script's arguments after its name: tag, root, then name, kind, mode, path per share."""
    args = [VIRTIOFS_TAG, GUEST_ROOT]
    for v in volumes:
        args += [v.name, "d" if v.is_dir else "f", "ro" if v.mount.readonly else "rw", v.mount.container_path]
    return args


# The container's command as the VM's workload.
WORKLOAD_SCRIPT = "/var/lib/podvisor/workload"
WORKLOAD_SCRIPT_CONTENT = f"""#!/bin/sh
# Podvisor: the container's command is this VM's workload (docs/annotations.md).
# "start CMD [ARG]...": run it detached from cloud-init (a transient systemd
# unit where systemd runs), so that cloud-init's final stage ends.
# "run CMD [ARG]...": run it with stdin from /dev/null and stdout and stderr
# on the serial console (the container log), hand its exit code to the host
# on the virtio-serial port {WORKLOAD_EXIT_CHANNEL}, and power the guest off.
port=/dev/virtio-ports/{WORKLOAD_EXIT_CHANNEL}
console=/dev/ttyS0
[ -c "$console" ] || console=/dev/console
case "${{1:-}}" in
start)
    shift
    if command -v systemd-run >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        exec systemd-run --quiet --collect --unit=podvisor-workload /bin/sh "$0" run "$@"
    fi
    setsid /bin/sh "$0" run "$@" </dev/null >/dev/null 2>&1 &
    exit 0
    ;;
run)
    shift
    ;;
*)
    echo "usage: $0 start|run COMMAND [ARG]..." >&2
    exit 2
    ;;
esac
out=/run/podvisor-workload.out
rm -f "$out"
mkfifo -m 600 "$out"
(
    # A getty's hangup of the console ends cat: open it again.
    while :; do
        if cat >"$console" 2>/dev/null; then break; fi
        sleep 1
    done
) <"$out" &
relay=$!
"$@" </dev/null >"$out" 2>&1
code=$?
# What is still in the pipe reaches the console; a child of the command
# that keeps the pipe open does not hold the guest up (10 s at most).
i=0
while kill -0 "$relay" 2>/dev/null && [ "$i" -lt 100 ]; do
    sleep 0.1
    i=$((i + 1))
done
[ -c "$port" ] && printf '%s\\n' "$code" >"$port"
sync
poweroff
"""
# cloud-init's merge rules for Podvisor's part of a MIME user-data: append to
# lists, recurse into them, never replace a value the user set.
MERGE_TYPE = "list(append)+dict(no_replace,recurse_list)+str()"
_BOUNDARY_PREFIX = "podvisor-"

# cloud-init's INCLUSION_TYPES_MAP, longest prefix first, for the MIME part
# that carries the user's own user-data.
_PART_TYPES: tuple[tuple[bytes, str], ...] = tuple(sorted(
    (
        (b"#include-once", "text/x-include-once-url"),
        (b"#include", "text/x-include-url"),
        (b"#!", "text/x-shellscript"),
        (b"#cloud-config-archive", "text/cloud-config-archive"),
        (b"#cloud-config-jsonp", "text/cloud-config-jsonp"),
        (b"#cloud-config", "text/cloud-config"),
        (b"#upstart-job", "text/upstart-job"),
        (b"#part-handler", "text/part-handler"),
        (b"#cloud-boothook", "text/cloud-boothook"),
        (b"## template: jinja", "text/jinja2"),
        (b"\x1f\x8b", "application/x-gzip"),
    ),
    key=lambda item: -len(item[0]),
))
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


@dataclass(frozen=True)
class Route:
    """A route from the CNI result; ``via`` None means the interface's gateway of that family."""

    to: str  # a network in CIDR form; "0.0.0.0/0" / "::/0" for the default route
    via: str | None = None
    metric: int | None = None


@dataclass(frozen=True)
class PodNetwork:
    """What CNI assigned to the pod, in the shape of a CNI result (one interface)."""

    mac: str  # the guest NIC's MAC, matched by the config
    addresses: tuple[str, ...]  # "10.88.0.7/16", "fd00::7/64"
    gateways: tuple[str, ...] = ()  # at most one per address family
    routes: tuple[Route, ...] = ()
    dns_servers: tuple[str, ...] = ()
    dns_searches: tuple[str, ...] = ()
    mtu: int | None = None
    name: str = "eth0"  # the config's id for the NIC (cloud-init renames to it off netplan)


class _Quoted(str):
    """A string always written double-quoted (a MAC must never read as a number)."""


class _Argv(list[str]):
    """An argv list, written on one line (``[env, A=1, cmd, arg]``)."""


class _Dumper(yaml.SafeDumper):
    """Block style, multi-line strings as ``|`` literals, quoted MACs, one-line argv lists."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


def _represent_quoted(dumper: yaml.SafeDumper, value: _Quoted) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", str(value), style='"')


def _represent_argv(dumper: yaml.SafeDumper, value: _Argv) -> yaml.SequenceNode:
    return dumper.represent_sequence("tag:yaml.org,2002:seq", list(value), flow_style=True)


_Dumper.add_representer(str, _represent_str)
_Dumper.add_representer(_Argv, _represent_argv)
_Dumper.add_representer(_Quoted, _represent_quoted)


def _dump(doc: Mapping[str, Any]) -> str:
    # sort_keys=False: the user's order is kept and ours is fixed, so the
    # output is deterministic without reordering what the user wrote.
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                     allow_unicode=True, width=2**16)


# -- user-data ------------------------------------------------------------------


def render_user_data(ci: CloudInit, hostname: str) -> bytes:
    """The seed's ``user-data`` for ``ci`` and the VM's ``hostname`` (see the module docstring)."""
    fmt = user_data_format(ci.user_data)
    if fmt is UserDataFormat.NONE:
        # cloud-init wants a user-data file even when nobody wrote one.
        return _cloud_config(_merge_additions({}, ci, hostname))
    assert ci.user_data is not None
    if not _has_additions(ci):
        return ci.user_data  # verbatim, comments and all, as KubeVirt passes it
    if fmt is UserDataFormat.CLOUD_CONFIG:
        return _cloud_config(_merge_additions(parse_cloud_config(ci.user_data), ci, hostname))
    ours = _cloud_config(_merge_additions({}, ci, hostname))
    return _multipart(ci.user_data, fmt, ours)


def _cloud_config(doc: Mapping[str, Any]) -> bytes:
    body = _dump(doc) if doc else ""
    return CLOUD_CONFIG_HEADER + b"\n" + body.encode("utf-8")


def _has_additions(ci: CloudInit) -> bool:
    # The hostname alone does not justify wrapping a user's script: meta-data's
    # local-hostname already names the guest.
    return bool(ci.ssh_authorized_keys or ci.env or ci.command or has_dns(ci.dns) or ci.sysctls
                or ci.device_paths or ci.volumes)


def _merge_additions(base: Mapping[str, Any], ci: CloudInit, hostname: str) -> dict[str, Any]:
    doc = copy.deepcopy(dict(base))  # never mutate the caller's document
    if "hostname" not in doc and "fqdn" not in doc and hostname:
        short, _, domain = hostname.partition(".")
        doc["hostname"] = short
        if domain:
            doc["fqdn"] = hostname
    if ci.ssh_authorized_keys:
        keys = doc.get("ssh_authorized_keys") or []
        keys = [keys] if isinstance(keys, str) else list(keys)  # cloud-init accepts one key as a string
        doc["ssh_authorized_keys"] = keys + [k for k in ci.ssh_authorized_keys if k not in keys]
    bootcmd: list[Any] = []
    files: list[dict[str, Any]] = []
    if ci.volumes:
        bootcmd.append(_Argv(["sh", "-c", VOLUMES_SCRIPT, "podvisor-volumes", *volumes_bootcmd_args(ci.volumes)]))
    if ci.env:
        files.append({
            "path": ENVIRONMENT_FILE,
            "append": True,
            "content": "".join(f"{k}={_environment_value(v)}\n" for k, v in ci.env.items()),
        })
    if has_dns(ci.dns):
        # Every boot, after the network is up: the file replaces whatever is
        # there (a symlink to systemd-resolved's or resolvconf's file
        # included: mv replaces the link, not its target).
        bootcmd.append(_Argv(["sh", "-c", RESOLV_CONF_SCRIPT, "podvisor-resolv-conf",
                              *RESOLV_CONF_HEADER, *resolv_conf_lines(ci.dns)]))
        files.append({"path": DHCLIENT_HOOK, "content": DHCLIENT_HOOK_CONTENT})
    if ci.sysctls:
        names = sorted(ci.sysctls)
        files.append({"path": SYSCTL_FILE,
                      "content": SYSCTL_HEADER + "".join(f"{n} = {ci.sysctls[n]}\n" for n in names)})
        pairs = [word for n in names for word in (sysctl_proc_path(n), ci.sysctls[n])]
        bootcmd.append(_Argv(["sh", "-c", SYSCTL_SCRIPT, "podvisor-sysctl", *pairs]))
    if ci.device_paths:
        pairs = [word for path in ci.device_paths for word in (path, device_by_id(path))]
        bootcmd.append(_Argv(["sh", "-c", DEVICE_LINK_SCRIPT, "podvisor-devices", *pairs]))
    if ci.command:
        files.append({"path": WORKLOAD_SCRIPT, "permissions": "0700", "content": WORKLOAD_SCRIPT_CONTENT})
    if bootcmd:
        doc["bootcmd"] = list(doc.get("bootcmd") or []) + bootcmd
    if files:
        doc["write_files"] = list(doc.get("write_files") or []) + files
    if ci.command:
        # An argv list is run without a shell, so nothing in it needs quoting;
        # env(1) puts the container env in front, as a container would see it.
        # The wrapper runs it detached from cloud-init, its output on the
        # console, and reports its exit code before powering the guest off.
        env_prefix = ["env", *(f"{k}={v}" for k, v in ci.env.items())] if ci.env else []
        doc["runcmd"] = list(doc.get("runcmd") or []) + [
            _Argv(["sh", WORKLOAD_SCRIPT, "start", *env_prefix, *ci.command])]
    return doc


def _environment_value(value: str) -> str:
    """A value as pam_env reads it from /etc/environment: bare when safe, else quoted.

    pam_env strips one pair of surrounding quotes and does no escaping, so a
    value is single-quoted when it holds a double quote.
    """
    if re.fullmatch(r"[A-Za-z0-9_./:,@%+=-]*", value) and value:
        return value
    return f"'{value}'" if '"' in value else f'"{value}"'


def _multipart(original: bytes, fmt: UserDataFormat, ours: bytes) -> bytes:
    """A MIME multipart/mixed user-data: the user's part unchanged, then ours.

    Written by hand rather than with email.generator, which may re-fold
    headers and re-encode bodies: the user's bytes must reach cloud-init
    exactly. cloud-init parses the result with the email package.
    """
    if fmt is UserDataFormat.MIME:
        # A MIME document is itself a valid body part (headers, blank line,
        # body), so it nests verbatim; cloud-init's walk() descends into it.
        first = original
    else:
        ctype = next((t for prefix, t in _PART_TYPES if original.startswith(prefix)), "text/x-not-multipart")
        encoded = base64.encodebytes(original)  # 76-column lines
        first = (
            f"Content-Type: {ctype}\n"
            "MIME-Version: 1.0\n"
            "Content-Transfer-Encoding: base64\n"
            'Content-Disposition: attachment; filename="user-data"\n'
            "\n"
        ).encode("ascii") + encoded
    if ours.isascii():
        ours_encoding, ours_body = "7bit", ours
    else:
        # An 8-bit body is mangled by cloud-init's message_from_string; base64 is not.
        ours_encoding, ours_body = "base64", base64.encodebytes(ours)
    second = (
        'Content-Type: text/cloud-config; charset="utf-8"\n'
        "MIME-Version: 1.0\n"
        f"Content-Transfer-Encoding: {ours_encoding}\n"
        'Content-Disposition: attachment; filename="podvisor.cfg"\n'
        f"Merge-Type: {MERGE_TYPE}\n"
        "\n"
    ).encode("ascii") + ours_body
    boundary = _boundary((first, second))
    sep = f"--{boundary}".encode("ascii")
    return b"".join((
        f'Content-Type: multipart/mixed; boundary="{boundary}"\n'.encode("ascii"),
        b"MIME-Version: 1.0\n",
        b"\n",
        sep, b"\n", first, b"\n",
        sep, b"\n", second, b"\n",
        sep, b"--\n",
    ))


def _boundary(parts: tuple[bytes, ...]) -> str:
    """A boundary that depends only on the content and occurs in none of it."""
    digest = hashlib.sha256(b"\0".join(parts)).hexdigest()
    for salt in range(1000):
        candidate = f"{_BOUNDARY_PREFIX}{digest[:32]}" + (f"-{salt}" if salt else "")
        if not any(candidate.encode("ascii") in part for part in parts):
            return candidate
    raise ValueError("no MIME boundary avoids the user-data content")  # needs a crafted input


# -- vendor-data ------------------------------------------------------------------


def render_vendor_data(access: GuestAccess) -> bytes:
    """The seed's ``vendor-data``: root login by key allowed (unless the user-data
    says otherwise) and the VM's own SSH host key, which the agent checks."""
    return _cloud_config({
        "disable_root": False,
        "ssh_keys": {"ed25519_private": access.host_private_key, "ed25519_public": access.host_public_key},
    })


# -- network-config ---------------------------------------------------------------


def render_network_config(ci: CloudInit, network: PodNetwork | None) -> bytes | None:
    """The seed's ``network-config``: the user's verbatim, else one for ``network``, else None."""
    if ci.network_config is not None:
        return ci.network_config
    if network is None:
        return None
    return _dump({"version": 2, "ethernets": {network.name: _ethernet(network)}}).encode("utf-8")


def _ethernet(net: PodNetwork) -> dict[str, Any]:
    mac = net.mac.lower()
    if not _MAC.fullmatch(mac):
        raise ValueError(f"not a MAC address: {net.mac!r}")
    if not net.addresses:
        raise ValueError("a pod network needs at least one address")
    interfaces = [ipaddress.ip_interface(a) for a in net.addresses]
    gateways: dict[int, str] = {}
    for g in net.gateways:
        ip = ipaddress.ip_address(g)
        if ip.version in gateways:
            raise ValueError(f"more than one IPv{ip.version} gateway")
        gateways[ip.version] = str(ip)
    eth: dict[str, Any] = {"match": {"macaddress": _Quoted(mac)}, "addresses": [str(i) for i in interfaces]}
    routes = []
    for r in net.routes:
        # Explicit networks rather than "to: default": netplan 0.99 and older
        # cloud-init route parsers do not know "default".
        dst = ipaddress.ip_network(r.to, strict=False)
        route: dict[str, Any] = {"to": str(dst)}
        via = r.via or gateways.get(dst.version)
        if via:
            route["via"] = str(ipaddress.ip_address(via))
        else:
            route["scope"] = "link"  # CNI: no gateway at all means the network is on-link
        if r.metric is not None:
            route["metric"] = r.metric
        routes.append(route)
    if routes:
        eth["routes"] = routes
    if net.dns_servers or net.dns_searches:
        ns: dict[str, Any] = {}
        if net.dns_servers:
            ns["addresses"] = [str(ipaddress.ip_address(s)) for s in net.dns_servers]
        if net.dns_searches:
            ns["search"] = list(net.dns_searches)
        eth["nameservers"] = ns
    if net.mtu is not None:
        eth["mtu"] = net.mtu
    return eth


# -- the whole seed ---------------------------------------------------------------


def seed_files(*, instance_id: str, hostname: str, cloud_init: CloudInit,
               network: PodNetwork | None = None, access: GuestAccess | None = None) -> dict[str, bytes]:
    """``meta-data``, ``user-data`` and, when there is one, ``network-config``;
    with Exec's SSH ``access``, ``vendor-data`` and root's key in meta-data.

    Ready for ``build_seed_iso(files["meta-data"], files["user-data"], files.get("network-config"),
    files.get("vendor-data"))``.
    """
    files = {
        "meta-data": render_meta_data(instance_id, hostname,
                                      public_keys=(access.client_public_key,) if access else ()),
        "user-data": render_user_data(cloud_init, hostname),
    }
    if access is not None:
        files["vendor-data"] = render_vendor_data(access)
    network_config = render_network_config(cloud_init, network)
    if network_config is not None:
        files["network-config"] = network_config
    return files
