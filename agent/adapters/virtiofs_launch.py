"""The pod volumes' virtiofsd launcher: run as ``unshare --mount --propagation private
python -m agent.adapters.virtiofs_launch SPEC`` by ``agent.adapters.virtiofs``.

In its own private mount namespace it builds the share's root: a small
tmpfs (at ``root``, a directory that stays empty on the host) holding one
entry per mount, a bind mount of the host path (a directory on a directory,
a file on an empty file), read-only entries remounted ``bind,ro`` so that the
host refuses writes (EROFS) whatever the guest does. The root itself is then
made read-only, and the process becomes virtiofsd serving it. Nothing of the
namespace outlives virtiofsd, so no host mount is ever left behind.

SPEC is a JSON file: ``{"root", "socket", "virtiofsd", "entries": [{"name",
"source", "dir", "readonly"}]}``. A failure prints one line on stderr (the
agent's virtiofsd log) and exits 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

MOUNT_TIMEOUT_S = 30
# virtiofsd's cache=auto: attributes and directory entries are trusted for 1 s,
# so an update on the host (kubelet's ..data symlink swap) reaches the guest
# within about a second, without a remount.
VIRTIOFSD_OPTIONS = ("-o", "cache=auto", "-o", "no_posix_lock", "-o", "no_flock")


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=MOUNT_TIMEOUT_S, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"mount {' '.join(args)}: {done.stderr.strip() or done.returncode}")


def prepare(spec: dict[str, Any]) -> None:
    """Build the share's root as the spec says (in the caller's mount namespace)."""
    root = spec["root"]
    _mount("-t", "tmpfs", "-o", "mode=0755,size=1m,nr_inodes=4096", "podvisor-volumes", root)
    for entry in spec["entries"]:
        source = os.path.realpath(entry["source"])
        target = os.path.join(root, entry["name"])
        if entry["dir"]:
            if not os.path.isdir(source):
                raise RuntimeError(f"{entry['source']} is no longer a directory")
            os.mkdir(target, 0o755)
        else:
            if not os.path.isfile(source):
                raise RuntimeError(f"{entry['source']} is no longer a regular file")
            os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        _mount("--bind", source, target)
        if entry["readonly"]:
            _mount("-o", "remount,bind,ro", target)
    _mount("-o", "remount,ro", root)


def virtiofsd_argv(spec: dict[str, Any]) -> list[str]:
    return [spec["virtiofsd"], f"--socket-path={spec['socket']}", "-o", f"source={spec['root']}",
            *VIRTIOFSD_OPTIONS]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: virtiofs_launch SPEC.json", file=sys.stderr)
        return 2
    try:
        with open(argv[1], encoding="utf-8") as f:
            spec = json.load(f)
        prepare(spec)
        args = virtiofsd_argv(spec)
    except (OSError, ValueError, KeyError, RuntimeError, subprocess.SubprocessError) as exc:
        print(f"podvisor virtiofs launcher: {exc}", file=sys.stderr, flush=True)
        return 1
    os.execv(args[0], args)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
